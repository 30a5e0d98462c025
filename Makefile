PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench emulator clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/prefect-batchllm demo

lint: $(STAMP)
	$(BIN)/ruff check prefect_batchllm flows tests benchmarks
	$(BIN)/ruff format --check prefect_batchllm flows tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --server

emulator: $(STAMP)
	$(BIN)/prefect-batchllm emulator

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
