# The first two targets are the README's: `make run` and `make test`.
SHELL := /bin/bash
# The first interpreter that runs and is 3.11+ (pyenv shims may exist but not run).
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
BASE_STAMP := $(VENV)/.installed-base
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test lint bench soak demo install dev migrate clean

run: $(BASE_STAMP)
	$(BIN)/flywheel run

test: $(DEV_STAMP)
	@scripts/ensure_chromium.sh
	$(BIN)/python -m pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check app workers tests scripts migrations
	$(BIN)/ruff format --check app workers tests scripts migrations
	$(BIN)/mypy app workers

bench: $(DEV_STAMP)
	$(BIN)/python scripts/bench.py

# Ten minutes of steady mixed load through real processes on loopback; prints a row a
# minute and a memory verdict (not part of `make test`). SOAK_ARGS="--minutes 2 --rate 50".
soak: $(DEV_STAMP)
	$(BIN)/python scripts/soak.py $(SOAK_ARGS)

# The virtuous cycle on the gateway `make run` started (same FLYWHEEL_MASTER_KEY);
# the dev extras bring the openai SDK it drives the gateway with.
demo: $(DEV_STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

migrate: $(BASE_STAMP)
	$(BIN)/flywheel migrate

install: $(BASE_STAMP)
dev: $(DEV_STAMP)

$(VENV)/bin/python:
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is needed (none found on PATH)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(BASE_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(DEV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(BASE_STAMP)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
