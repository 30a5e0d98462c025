PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench soak emulator ui-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m flows.demo

lint: $(STAMP)
	$(BIN)/ruff check prefect_batchllm flows tests benchmarks
	$(BIN)/ruff format --check prefect_batchllm flows tests benchmarks

test: lint
	$(BIN)/python -m pytest

# The Prefect UI checked in headless Chromium (installs Debian's chromium when missing) against a real
# `prefect server start` running the demo; refreshes the README's screenshots in docs/.
ui-check: $(STAMP)
	bash scripts/ensure-chromium.sh >/dev/null
	BATCHLLM_UI_SHOTS=docs $(BIN)/python -m pytest tests/test_ui.py -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --server

soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak --rows 5000 --kills 10

emulator: $(STAMP)
	$(BIN)/prefect-batchllm emulator

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
