VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test lint typecheck pytest test-unit test-contract test-e2e test-docker mutants bench clean

## run: the main job on the embedded default (SQLite + filesystem broker): `leasehold demo`
run: $(STAMP)
	$(BIN)/leasehold demo

## test: ruff, mypy and pytest (MariaDB and Redis on 127.0.0.1 are used when they answer)
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## the layers alone: no server; every store (SQLite, MariaDB); real processes (workers, beat)
test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-contract: $(STAMP)
	$(BIN)/python -m pytest tests/contract $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

## test-docker: the image, Redis and MySQL in containers (pytest-celery); needs a Docker engine
test-docker: $(STAMP)
	$(BIN)/python -m pytest tests/docker -m docker $(PYTEST_ARGS)

## mutants: break each lease statement in a scratch copy and prove a contract test catches it
mutants: $(STAMP)
	$(BIN)/python scripts/mutants.py

bench: $(STAMP)
	$(BIN)/python bench/fence_overhead.py
	$(BIN)/python bench/reclaim_scan.py
	$(BIN)/python bench/failover.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/signing.py
	$(BIN)/python bench/effects.py
	$(BIN)/python bench/control_latency.py
	$(BIN)/python bench/chaos.py --seed 1 --applies 120 --seconds 300
	$(BIN)/python bench/heartbeat_period.py
	$(BIN)/python bench/scale.py

$(STAMP): pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) scripts/bootstrap.sh $(VENV)
	touch $(STAMP)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache var leasehold.sqlite3*
