# kas-ray: one command to run, one to test. Works on a fresh Debian/Ubuntu machine with Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run demo test lint fuzz clean perf perf-default-proxy perf-autoscale

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
##   (and the prometheus binary, taken from Debian's package into the venv, for the scrape test; it skips without)
test: $(STAMP) lint
	@if [ "$$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; then \
	  PYTHON=$(PY) bash scripts/setup-opencryptoki.sh || echo "no PKCS#11 token: those tests will skip"; fi
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian/Ubuntu) for the shared-state tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; } \
	  || echo "no redis-server: the Redis tests will skip"
	@command -v prometheus >/dev/null || [ -x $(VENV)/bin/prometheus ] || \
	  SUDO=$(SUDO) bash scripts/fetch-prometheus.sh $(VENV)/bin || echo "no prometheus: the Prometheus test will skip"
	$(PY) -m pytest $(PYTEST_ARGS)

## lint: ruff, bandit and mypy (strict on the core modules; config in pyproject.toml); `make test` runs it first
lint: $(STAMP)
	$(VENV)/bin/ruff check kas_ray tests perf
	$(VENV)/bin/bandit -q -c pyproject.toml -r kas_ray
	$(VENV)/bin/mypy

## fuzz: the fuzz suites with large bounds (CI runs the same tests with small ones): schemathesis over every
##   route of a live KAS and hypothesis with valid credentials over mutated rewrap bodies (tests/test_fuzz_http.py),
##   every parser (tests/test_fuzz_parsers.py), the Connect codec (tests/test_proto.py). FUZZ_EXAMPLES per test.
FUZZ_EXAMPLES ?= 1000
fuzz: $(STAMP)
	KAS_RAY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) KAS_RAY_PROTO_EXAMPLES=$$(( 10 * $(FUZZ_EXAMPLES) )) $(PY) -m pytest -q \
	  --timeout 3600 tests/test_fuzz_parsers.py tests/test_proto.py tests/test_fuzz_http.py $(PYTEST_ARGS)

## perf: the KAS load benchmark on its own local Ray (about 15 min): perf/results/kas.json, its PNGs and
##   its section of docs/performance.md (Serve with HAProxy ingress; PERF_ARGS adds options, e.g. --quick)
##   (a missed target is a result, not a failure of the command: make succeeds and the MISS lines say which;
##   the script itself exits 1 then, for Ray jobs and scripts that gate on it)
perf: $(VENV)/.installed-perf
	@$(PY) perf/bench_kas.py --all --serve-mode haproxy $(PERF_ARGS); status=$$?; \
	  if [ $$status = 1 ]; then echo "perf: every output written; the targets marked MISS above were missed"; \
	  else exit $$status; fi

## perf-autoscale: one KAS with deployments/local.yaml's autoscaling under a low-high-low load (about 5 min):
##   perf/results/autoscale.json and .png (replicas rising and falling, latency per second)
perf-autoscale: $(VENV)/.installed-perf
	$(PY) perf/bench_autoscale.py $(PERF_ARGS)

## perf-default-proxy: the same with Serve's default Python proxy: perf/results/kas-default-proxy.json
perf-default-proxy: $(VENV)/.installed-perf
	$(PY) perf/bench_kas.py --all --serve-mode default --out perf/results/kas-default-proxy.json $(PERF_ARGS)

$(VENV)/.installed-perf: $(STAMP)
	$(PY) -m pip install -q -e '.[perf]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
