# Two entry points for a fresh clone: `make demo` (set up, run the main job on the
# embedded data) and `make test` (set up, lint, build the docs strictly, run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint docs

$(BIN)/kvtool: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(BIN)/kvtool

setup: $(BIN)/kvtool

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

lint: setup
	$(BIN)/ruff check kedit_vfl tests benchmarks docs
	$(BIN)/ruff format --check kedit_vfl tests benchmarks docs

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: lint docs
	$(BIN)/pytest -q
