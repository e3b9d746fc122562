# Everything a fresh machine needs goes through here: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# pytest workers (pytest-xdist): the suite waits on servers and subprocesses as much as it
# computes, so two workers finish it ~1.6x sooner on 2 cores. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

.PHONY: venv data demo demo-quick test lint format package-check clean

$(STAMP): requirements.txt requirements-beam.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -r requirements-beam.txt
	touch $(STAMP)

venv: $(STAMP)

# Debian datasets (Fashion-MNIST IDX files, openclipart PNGs) when apt is available.
data:
	bash scripts/setup_data.sh

# The main job: steal the Fashion-MNIST target end to end (50,000 queries, 10 epochs).
demo: venv data
	$(PY) -m copycat_tf.demo

# A first look: fewer queries and epochs (Recipe.quick()).
demo-quick: venv data
	$(PY) -m copycat_tf.demo --quick

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Lint, the test suite, then the package as users install it (a wheel in an empty venv).
test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)
	$(MAKE) package-check

package-check: venv
	PYTHON=$(PYTHON) bash scripts/package_smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
