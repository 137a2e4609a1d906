# Every target creates .venv and installs the package into it when needed: `make demo` only
# what the demo needs (torch and the train and plots extras, DEMO_STAMP); every other target
# the whole development environment on top of it (STAMP: dev, tensorboard, docs, TorchDEQ), so
# `make demo` then `make test` installs the rest, and `make test` then `make demo` nothing more.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.demo-stamp
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv test test-all docs demo lint typecheck bench clean check-results

$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,plots]'
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[dev,tensorboard,docs]'
	# TorchDEQ, the peer library of the side-by-side tests, without its own dependencies
	$(PY) -m pip install -q --no-deps torchdeq==0.1.0
	touch $(STAMP)

venv: $(STAMP)

# the fast tier (unit tests and one short training run, a few minutes); the documentation site
# is built first (quiet unless it fails: warnings are errors), so that pytest's summary stays
# the last line
test: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet
	$(PY) -m pytest -q -x --durations=15

# every test: the fast tier and the `slow` one (full training runs, multi-process runs); what CI runs
test-all: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet
	$(PY) -m pytest -q -x --durations=25 -m "slow or not slow"

# the documentation site into site/ (open site/index.html); offline, warnings are errors
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

demo: $(DEMO_STAMP)
	$(PY) -m phantomdeq demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks tools docs/hooks
	$(PY) -m ruff format --check src tests benchmarks tools docs/hooks

# every measured number in README.md, EXPERIMENTS.md, BENCHMARKS.md and docs/ against its committed source
# (convention: results/README.md); also run by `make test` (tests/test_check_results.py)
check-results:
	$(PYTHON) tools/check_results.py
	$(PYTHON) tools/verdicts.py --check

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/solver_overhead.py

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache
