# The two commands a newcomer needs:
#   make run    # the whole service locally (SQLite, ./data, one worker, Redis)
#   make test   # unit, integration (real Redis/worker/SQLite/PostgreSQL) and browser tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test test-fast bench

install: $(VENV)/.installed

$(VENV)/.installed: requirements-worker.txt requirements-web.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-worker.txt -r requirements-web.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

run: install
	$(BIN)/ebb run

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest tests/unit -m "not slow"

bench: install
	$(BIN)/python benchmarks/iteration_speed.py
