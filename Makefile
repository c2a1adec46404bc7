# kas-ray: one command to run, one to test. Works on a fresh Debian/Ubuntu machine with Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run demo test lint clean perf perf-default-proxy

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "installing python3-venv (Debian/Ubuntu)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,gcp,pkcs11]'
	touch $(STAMP)

## run: the main job (the coalition demo scenario)
run: $(STAMP)
	$(VENV)/bin/kas-ray demo

demo: run

## test: install what the tests need and run the whole suite
##   (as root on Debian/Ubuntu also an opencryptoki token for the PKCS#11 tests; they skip without one)
##   (and redis-server, through apt where missing, for the shared-state tests; they skip without it)
test: $(STAMP) lint
	@if [ "$$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; then \
	  PYTHON=$(PY) bash scripts/setup-opencryptoki.sh || echo "no PKCS#11 token: those tests will skip"; fi
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian/Ubuntu) for the shared-state tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; } \
	  || echo "no redis-server: the Redis tests will skip"
	$(PY) -m pytest $(PYTEST_ARGS)

## lint: ruff, bandit and mypy (strict on the core modules; config in pyproject.toml); `make test` runs it first
lint: $(STAMP)
	$(VENV)/bin/ruff check kas_ray tests perf
	$(VENV)/bin/bandit -q -c pyproject.toml -r kas_ray
	$(VENV)/bin/mypy

## perf: the KAS load benchmark on its own local Ray (about 15 min): perf/results/kas.json, its PNGs and
##   its section of docs/performance.md (Serve with HAProxy ingress; PERF_ARGS adds options, e.g. --quick)
perf: $(VENV)/.installed-perf
	$(PY) perf/bench_kas.py --all --serve-mode haproxy $(PERF_ARGS)

## perf-default-proxy: the same with Serve's default Python proxy: perf/results/kas-default-proxy.json
perf-default-proxy: $(VENV)/.installed-perf
	$(PY) perf/bench_kas.py --all --serve-mode default --out perf/results/kas-default-proxy.json $(PERF_ARGS)

$(VENV)/.installed-perf: $(STAMP)
	$(PY) -m pip install -q -e '.[perf]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
