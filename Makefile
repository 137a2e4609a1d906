# Every target creates .venv and installs the package into it when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv test demo lint typecheck bench clean check-results

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,tensorboard]'
	# TorchDEQ, the peer library of the side-by-side tests, without its own dependencies
	$(PY) -m pip install -q --no-deps torchdeq==0.1.0
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15

demo: $(STAMP)
	$(PY) -m phantomdeq demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks tools
	$(PY) -m ruff format --check src tests benchmarks tools

# every measured number in README.md, EXPERIMENTS.md, BENCHMARKS.md against its committed source
# (convention: results/README.md); also run by `make test` (tests/test_check_results.py)
check-results:
	$(PYTHON) tools/check_results.py

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/solver_overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
