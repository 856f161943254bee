# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUN_OUT ?= out/demo

.PHONY: run test lint format bench images clean help

help:
	@echo "make run   - set up .venv and run the main job end to end on an embedded sample"
	@echo "make test  - set up .venv (with test extras) and run lint + the whole test suite"
	@echo "make bench - run the benchmarks in bench/ (needs ../shared/datasets)"
	@echo "make images REGISTRY=r TAG=t - build and push the images in images/ (needs docker)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Stamps re-install when pyproject.toml changes.
$(VENV)/.run-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[beam,kfp,train,evaluate,tensorboard,demo,clean,serve,export,video]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[dev]'
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(PY) -m kaedama.demo --out $(RUN_OUT) $(if $(DATA),--data $(DATA))

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(VENV)/.dev-installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# Each bench prints JSON and a summary; BENCHMARKS.md records the figures and commands.
BENCH := nice -n 10 $(PY)
bench: $(VENV)/.dev-installed
	$(BENCH) bench/bench_search.py --n 1000000 --subset 50000 --repeats 3
	$(BENCH) bench/bench_hash.py --repeats 5
	$(BENCH) bench/bench_planted.py --planted 300
	$(BENCH) bench/bench_dedup.py --repeats 3 --breakdown
	$(BENCH) bench/bench_train.py throughput --models resnet18 efficientnet_b0 --runs 3
	$(BENCH) bench/bench_train.py pipeline --runs 3
	$(BENCH) bench/bench_serve.py all

# One image per folder in images/ (see images/README.md), built from the repository root and
# pushed as $(REGISTRY)/kaedama[-NAME]:$(TAG). PUSH=0 builds only.
REGISTRY ?=
TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
PUSH ?= 1
DOCKER ?= docker
IMAGES := kaedama serve train beam

images:
	@test -n "$(REGISTRY)" || test "$(PUSH)" = 0 || { echo "set REGISTRY=... (or PUSH=0 to build only)"; exit 2; }
	@set -e; for name in $(IMAGES); do \
	  ref="$(if $(REGISTRY),$(REGISTRY)/)$$( [ $$name = kaedama ] && echo kaedama || echo kaedama-$$name ):$(TAG)"; \
	  echo "building $$ref"; \
	  $(DOCKER) build -f images/$$name/Dockerfile -t $$ref .; \
	  if [ "$(PUSH)" = 1 ]; then $(DOCKER) push $$ref; fi; \
	done

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
