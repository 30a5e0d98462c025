PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-oldest test-ray test-matrix lint bench bench-install bench-limits bench-dask soak emulator ui-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# A second environment on the oldest supported Prefect (constraints/prefect-oldest.txt); `make test` runs on
# the newest 3.x the index serves. Both ends of `prefect>=3.8.8,<4` are tested; the browser check, the chaos
# soak, the Dask clusters and the quota-paced limiter runs (`heavy`: tens of seconds to minutes each, the same
# Prefect surface as the rest) run on the newest only.
OLDEST := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed

$(OLDEST_STAMP): pyproject.toml constraints/prefect-oldest.txt
	$(PY) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q -c constraints/prefect-oldest.txt -e '.[dev]'
	@touch $(OLDEST_STAMP)

demo: $(STAMP)
	$(BIN)/prefect-batchllm demo

lint: $(STAMP)
	$(BIN)/ruff check prefect_batchllm flows tests benchmarks
	$(BIN)/ruff format --check prefect_batchllm flows tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

test-oldest: $(OLDEST_STAMP)
	$(OLDEST)/bin/python -c "import prefect; assert prefect.__version__ == '3.8.8', prefect.__version__"
	$(OLDEST)/bin/python -m pytest -m "not browser and not heavy"

test-matrix: test test-oldest

# The Ray runner in its own environment: prefect-ray brings ray[default] and with it aiohttp, which
# google-genai then uses instead of httpx, so it stays out of the environment `make test` runs in.
RAYENV := .venv-ray
$(RAYENV)/.installed: pyproject.toml
	$(PY) -m venv $(RAYENV)
	$(RAYENV)/bin/python -m pip install -q --upgrade pip
	$(RAYENV)/bin/python -m pip install -q -e '.[dev,ray]'
	@touch $(RAYENV)/.installed

test-ray: $(RAYENV)/.installed
	$(RAYENV)/bin/python -m pytest tests/test_distributed.py tests/test_runners.py -k ray -q

# The Prefect UI checked in headless Chromium (installs Debian's chromium when missing) against a real
# `prefect server start` running the demo; refreshes the README's screenshots in docs/.
ui-check: $(STAMP)
	bash scripts/ensure-chromium.sh >/dev/null
	BATCHLLM_UI_SHOTS=docs $(BIN)/python -m pytest tests/test_ui.py -q

# Side by side in one run (benchmarks/bench.py): the bare SDK, async-batch-llm, per-item, chunked, streaming
# and Dask rows against one bundled server. `make bench BENCH_ARGS="--items 100000"`.
BENCH_STAMP := $(VENV)/.bench-installed

# The contenders that are not project dependencies go into the bench environment only.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q async-batch-llm prefect-dask py-spy
	@touch $(BENCH_STAMP)

bench-install: $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.bench $(BENCH_ARGS)

# The rate limiter's efficiency against quotas (benchmarks/run.py), ephemeral API and a real server.
bench-limits: $(STAMP)
	$(BIN)/python -m benchmarks.run --server

# Chunked run_batch in one process vs. 2 local Dask worker processes (client-CPU-bound case), then a quota pass.
bench-dask: $(STAMP)
	$(BIN)/python -m benchmarks.dask_scaling

soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak --rows 5000 --kills 10

emulator: $(STAMP)
	$(BIN)/prefect-batchllm emulator

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache .ruff_cache .mypy_cache
