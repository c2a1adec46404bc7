# kas-ray: one command to run, one to test. Works on a fresh Debian/Ubuntu machine with Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run demo test lint clean

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
test: $(STAMP)
	@if [ "$$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; then \
	  PYTHON=$(PY) bash scripts/setup-opencryptoki.sh || echo "no PKCS#11 token: those tests will skip"; fi
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check kas_ray tests perf

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
