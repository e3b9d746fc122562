# Everything a fresh machine needs goes through here: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv data demo demo-quick test lint format clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

# Debian datasets (Fashion-MNIST IDX files, openclipart PNGs) when apt is available.
data:
	bash scripts/setup_data.sh

# The main job: steal the Fashion-MNIST target end to end (50,000 queries, 10 epochs).
demo: venv data
	$(PY) -m copycat_tf.demo

# A first look (5,000 queries, 2 epochs; 1.5 min measured on 2 cores).
demo-quick: venv data
	$(PY) -m copycat_tf.demo --quick

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
