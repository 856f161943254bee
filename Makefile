# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUN_OUT ?= out/demo

.PHONY: run test lint format bench clean help

help:
	@echo "make run   - set up .venv and run the main job end to end on an embedded sample"
	@echo "make test  - set up .venv (with test extras) and run lint + the whole test suite"
	@echo "make bench - run the benchmarks in bench/ (needs ../shared/datasets)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Stamps re-install when pyproject.toml changes.
$(VENV)/.run-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[beam,kfp,train,demo]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[dev]'
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(PY) -m kaedama.demo --out $(RUN_OUT)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(VENV)/.dev-installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: $(VENV)/.dev-installed
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
