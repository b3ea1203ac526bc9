# One entry point for everything: `make run`, `make test`. Each target
# creates .venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/muxserver $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check muxserver tests
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check muxserver tests
	$(VENV)/bin/ruff format --check muxserver tests

format: $(STAMP)
	$(VENV)/bin/ruff format muxserver tests
	$(VENV)/bin/ruff check --fix muxserver tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis reports
