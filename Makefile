# Two entry points for a fresh clone: `make demo` (set up, run the main job on the
# embedded data) and `make test` (set up, lint, run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench

$(BIN)/kvtool: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(BIN)/kvtool

setup: $(BIN)/kvtool

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

lint: setup
	$(BIN)/ruff check kedit_vfl tests benchmarks
	$(BIN)/ruff format --check kedit_vfl tests benchmarks

test: lint
	$(BIN)/pytest -q
