# The README's two quickstart commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the demo on the embedded default (SQLite, a local HubSpot simulator).
demo: $(STAMP)
	$(BIN)/idsync demo

## Lint, type-check and run the whole test suite (needs PostgreSQL and Redis).
test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

## Benchmarks: ingest, delivery, naive, isolation, webhook, backfill, claims, vendors (see python -m bench --help).
bench: $(STAMP)
	$(BIN)/python -m bench

## A long soak with random faults (the suite runs a short one).
soak: $(STAMP)
	IDSYNC_SOAK_EVENTS=5000 IDSYNC_FAULT_EXAMPLES=40 IDSYNC_SOAK_REPORTED=1 \
		$(BIN)/python -m pytest tests/test_soak.py tests/test_properties_faults_e2e.py -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
