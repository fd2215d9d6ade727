# The two documented commands: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export GLUE_HOME ?= $(CURDIR)/.glue
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: run test test-fast lint format bench clean-store clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)  ## build the demo zoo (cached) and run the whole recipe on it
	$(BIN)/glue zoo build
	$(BIN)/glue run $(GLUE_HOME)/zoo/glue.yaml

test: $(STAMP)  ## run the whole test suite (slow end-to-end tests included)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/merge_bench.py

clean-store:  ## forget every cached artifact, score and Prefect result (keeps the zoo)
	rm -rf $(GLUE_HOME)/store $(GLUE_HOME)/lineage.duckdb $(GLUE_HOME)/prefect

clean:
	rm -rf $(GLUE_HOME) $(VENV)
