"""Gemini Batch API mode end to end: real google-genai SDK over HTTP to the bundled server's batch and Files
endpoints, real Prefect engine and API (``prefect_api``), and for the kill test a real flow subprocess.

Every test tags its prompts with a fresh uuid so persisted results and job names of one test are never
re-attached by another.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _prefect_server import prefect_env, stop_process_group
from pydantic import BaseModel

from prefect_batchllm import LLMWorkItem, ProcessorConfig, RetryConfig, run_batch
from prefect_batchllm.core.pricing import ModelPrice, price_for
from prefect_batchllm.models.gemini import GeminiCachedModel, GeminiModel
from prefect_batchllm.strategies.direct import DirectCallStrategy
from prefect_batchllm.strategies.gemini import GeminiStrategy
from prefect_batchllm.testing import Fault, GeminiEmulator

pytestmark = pytest.mark.usefixtures("prefect_api")

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gemini-2.5-flash"
FAST = {"batch_poll_interval_s": 0.05, "batch_poll_max_interval_s": 0.2}


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _items(strategy: Any, n: int, tag: str, marks: dict[int, str] | None = None) -> list[LLMWorkItem]:
    marks = marks or {}
    return [
        LLMWorkItem(item_id=f"{tag}-{i:03d}", strategy=strategy, prompt=f"[{tag}-{i:03d}] {marks.get(i, '')}")
        for i in range(n)
    ]


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _batch_usage(emu: GeminiEmulator) -> dict[str, int]:
    totals = {"prompt": 0, "candidates": 0, "cached": 0}
    for r in emu.batch_requests():
        if r.usage:
            totals["prompt"] += int(r.usage.get("promptTokenCount", 0))
            totals["candidates"] += int(r.usage.get("candidatesTokenCount", 0))
            totals["cached"] += int(r.usage.get("cachedContentTokenCount", 0))
    return totals


def _faulty(emu: GeminiEmulator) -> dict[int, str]:
    """Prompt markers the bundled server faults on (online and inside batch jobs alike)."""
    emu.faults.add(Fault.safety_block(), contains="BLOCK-ME", times=None)
    emu.faults.add(Fault.status(500), contains="SERVER-ERROR", times=None)
    emu.faults.add(Fault.status(400, "Invalid argument."), contains="BAD-REQUEST", times=None)
    return {7: "BLOCK-ME", 70: "SERVER-ERROR", 150: "BAD-REQUEST", 222: "BLOCK-ME", 299: "SERVER-ERROR"}


EXPECTED_CATEGORIES = {"BLOCK-ME": "blocked", "SERVER-ERROR": "transient", "BAD-REQUEST": "fatal"}


@pytest.mark.parametrize("mode", ["inline", "file"])
def test_300_items_with_faults_match_online_at_batch_prices(emulator: GeminiEmulator, mode: str) -> None:
    emu = emulator
    emu.batch_delay = 0.1
    marks = _faulty(emu)
    tag = _tag()
    strategy = GeminiStrategy(GeminiModel(MODEL, emu.client()))
    items = _items(strategy, 300, tag, marks)
    extra = {} if mode == "inline" else {"batch_inline_max_bytes": 1000, "batch_max_requests_per_job": 120}
    result = run_batch(items, ProcessorConfig(execution="batch_api", **FAST, **extra))

    assert [r.item_id for r in result.results] == [i.item_id for i in items]
    failed = {r.item_id: r.error_category for r in result.results if not r.success}
    assert failed == {f"{tag}-{i:03d}": EXPECTED_CATEGORIES[m] for i, m in marks.items()}
    assert all(r.attempts == 1 for r in result.results)
    # Jobs: one inline job, or three uploaded JSONL files of at most 120 requests each.
    jobs = result.batch_jobs
    if mode == "inline":
        assert [(j["mode"], j["requests"]) for j in jobs] == [("inline", 300)]
        assert emu.batch_creates == 1
    else:
        assert [(j["mode"], j["requests"]) for j in jobs] == [("file", 120), ("file", 120), ("file", 60)]
        assert emu.batch_creates == 3
    assert all(j["state"] == "JOB_STATE_SUCCEEDED" for j in jobs)
    assert sum(j["succeeded"] for j in jobs) == 295 and sum(j["failed"] for j in jobs) == 5
    assert emu.count("generateContent") == 0  # nothing went online
    assert len(emu.batch_requests()) == 300

    # Token totals are the server's usage, blocked answers included; cost is the batch price.
    usage = _batch_usage(emu)
    assert result.total_input_tokens == usage["prompt"] > 0
    assert result.total_output_tokens == usage["candidates"] > 0
    price = price_for(MODEL)
    assert price is not None
    online_cost = price.cost(result.total_input_tokens, result.total_output_tokens)
    assert result.estimated_cost_usd == pytest.approx(online_cost * 0.5)
    assert all(r.metadata.get("billing") == "batch" for r in result.results if r.success)

    # The same prompts online (same parser, same server): equal outputs, the same failures.
    emu.reset()
    _faulty(emu)
    same = [LLMWorkItem(item_id=i.item_id + "-online", strategy=i.strategy, prompt=i.prompt) for i in items]
    online = run_batch(same, ProcessorConfig(max_workers=16, retry=RetryConfig(max_attempts=1)))
    assert [r.output for r in online.results] == [r.output for r in result.results]
    assert [r.error_category for r in online.results] == [r.error_category for r in result.results]
    assert online.estimated_cost_usd == pytest.approx(
        price.cost(online.total_input_tokens, online.total_output_tokens)
    )


def test_rerun_replays_collected_results_and_resubmits_only_failed(emulator: GeminiEmulator) -> None:
    emu = emulator
    emu.batch_delay = 0.05
    emu.faults.add(Fault.status(500), contains="FLAKY", times=1)
    tag = _tag()
    strategy = GeminiStrategy(GeminiModel(MODEL, emu.client()))
    items = _items(strategy, 20, tag, {4: "FLAKY"})
    config = ProcessorConfig(execution="batch_api", **FAST)
    first = run_batch(items, config)
    assert first.failed == 1 and first.results[4].error_category == "transient"

    # A rerun loads the 19 persisted answers and submits one new job with exactly the failed item.
    second = run_batch(items, config)
    assert second.failed == 0 and sum(r.replayed for r in second.results) == 19
    assert emu.batch_creates == 2 and len(emu.batch_requests()) == 21
    assert [r.item_id for r in second.results if not r.replayed] == [f"{tag}-004"]
    # Online mode replays results collected by batch jobs (same key, same store): nothing is requested.
    online = run_batch(items, ProcessorConfig())
    assert all(r.replayed for r in online.results) and emu.count("generateContent") == 0

    # refresh_cache requests every item anew: a new job, never the re-attached one.
    refreshed = run_batch(items, ProcessorConfig(execution="batch_api", refresh_cache=True, **FAST))
    assert refreshed.succeeded == 20 and not any(r.replayed for r in refreshed.results)
    assert emu.batch_creates == 3 and refreshed.batch_jobs[0]["reattached"] is False

    # And the other way: items answered online are replayed by a batch run; only new ones go into a job.
    fresh = _items(strategy, 8, _tag())
    run_batch(fresh[:5], ProcessorConfig())
    mixed = run_batch(fresh, config)
    assert [r.replayed for r in mixed.results] == [True] * 5 + [False] * 3
    assert [j["requests"] for j in mixed.batch_jobs] == [3] and emu.batch_creates == 4


def test_not_waiting_ends_pending_and_a_later_run_reattaches(emulator: GeminiEmulator) -> None:
    emu = emulator
    emu.batch_delay = (0.0, math.inf)  # RUNNING until released
    tag = _tag()
    strategy = GeminiStrategy(GeminiModel(MODEL, emu.client()))
    items = _items(strategy, 12, tag)
    config = ProcessorConfig(execution="batch_api", batch_wait_timeout_s=0, **FAST)
    first = run_batch(items, config)
    assert first.failed == 12 and set(first.error_categories()) == {"batch_pending"}
    assert "re-run" in (first.results[0].error or "")
    assert [j["state"] for j in first.batch_jobs] == ["JOB_STATE_RUNNING"]

    # Still running: the next run re-attaches (no new job) and again reports pending.
    again = run_batch(items, config)
    assert again.error_categories() == {"batch_pending": 12} and emu.batch_creates == 1
    assert again.batch_jobs[0]["reattached"] is True

    from prefect_batchllm.prefect.flows import BatchItemsFailed

    with pytest.raises(BatchItemsFailed, match=r"batch_pending=12\).*re-run to collect") as failed:
        run_batch(
            items, ProcessorConfig(execution="batch_api", batch_wait_timeout_s=0, fail_on_item_failure=True)
        )
    assert len(failed.value.result.results) == 12 and emu.batch_creates == 1
    pending = failed.value.result.results[0]
    assert (
        pending.error_category == "batch_pending"
        and pending.metadata["batch_job"] == first.batch_jobs[0]["name"]
    )

    emu.batch_delay = 0.0  # the job finishes; the next scheduled run collects it
    done = run_batch(items, config)
    assert done.succeeded == 12 and emu.batch_creates == 1
    assert done.batch_jobs[0]["name"] == first.batch_jobs[0]["name"]
    assert len(emu.batch_requests()) == 12


@pytest.mark.parametrize("state", ["EXPIRED", "CANCELLED"])
def test_job_ending_badly_fails_every_item_and_online_followup_reruns_exactly_those(
    emulator: GeminiEmulator, state: str
) -> None:
    emu = emulator
    emu.batch_delay = 0.05
    tag = _tag()
    emu.set_batch_outcome(state, contains=tag)
    strategy = GeminiStrategy(GeminiModel(MODEL, emu.client()))
    items = _items(strategy, 15, tag)
    result = run_batch(items, ProcessorConfig(execution="batch_api", **FAST))
    category = f"batch_{state.lower()}"
    assert [r.item_id for r in result.results] == [i.item_id for i in items]
    assert result.error_categories() == {category: 15}
    assert result.batch_jobs[0]["state"] == f"JOB_STATE_{state}"
    assert emu.count("generateContent") == 0

    # With the online follow-up, a run re-submits nothing the bad job held and re-runs exactly those online.
    followed = run_batch(items, ProcessorConfig(execution="batch_api", batch_followup="online", **FAST))
    assert followed.succeeded == 15
    assert sorted(r.prompt_text for r in emu.requests_for("generateContent")) == sorted(
        i.prompt for i in items
    )
    assert all(r.metadata.get("billing") != "batch" for r in followed.results)


def test_expired_job_followup_as_a_new_smaller_batch_job(emulator: GeminiEmulator) -> None:
    emu = emulator
    emu.batch_delay = math.inf
    tag = _tag()
    strategy = GeminiStrategy(GeminiModel(MODEL, emu.client()))
    items = _items(strategy, 10, tag)
    expired: list[str] = []

    def expire_the_first_job() -> None:
        name = _wait_for(lambda: next(iter(emu.batches), None), 60, "the first job")
        emu.expire_batch(name)
        expired.append(name)
        emu.batch_delay = 0.05  # the follow-up job runs normally

    watcher = threading.Thread(target=expire_the_first_job, daemon=True)
    watcher.start()
    result = run_batch(items, ProcessorConfig(execution="batch_api", batch_followup="batch", **FAST))
    watcher.join(10)
    assert result.succeeded == 10
    jobs = result.batch_jobs
    assert [(j["generation"], j["state"], j["requests"]) for j in jobs] == [
        (1, "JOB_STATE_EXPIRED", 10),
        (2, "JOB_STATE_SUCCEEDED", 10),
    ]
    assert jobs[0]["name"] == expired[0] and emu.batch_creates == 2
    assert {r.batch for r in emu.batch_requests()} == {jobs[1]["name"]}


class Book(BaseModel):
    genre: str
    pages: int


def test_structured_output_batch_on_one_shared_context_cache(emulator: GeminiEmulator) -> None:
    emu = emulator
    emu.batch_delay = 0.05
    tag = _tag()
    model = GeminiCachedModel(
        MODEL,
        emu.client(),
        cached_content=f"A long shared catalogue context {tag}. " * 40,
        system_instruction="Answer with JSON only.",
    )
    strategy = GeminiStrategy(model, response_schema=Book)
    items = _items(strategy, 40, tag)
    result = run_batch(items, ProcessorConfig(execution="batch_api", **FAST))
    assert result.succeeded == 40
    assert all(isinstance(r.output, Book) for r in result.results)
    assert emu.count("cachedContents.create", status=200) == 1
    (cache_name,) = emu.caches
    requests = emu.batch_requests()
    assert len(requests) == 40 and {r.cached_content for r in requests} == {cache_name}
    assert all("systemInstruction" not in (r.body or {}) for r in requests)
    assert result.total_cached_tokens == _batch_usage(emu)["cached"] > 0


def test_strategies_that_cannot_batch_fail_early_naming_the_fix(emulator: GeminiEmulator) -> None:
    direct = DirectCallStrategy(lambda prompt, attempt, timeout: "x")
    with pytest.raises(TypeError, match=r"DirectCallStrategy cannot run with execution='batch_api'.*online"):
        run_batch(_items(direct, 2, _tag()), ProcessorConfig(execution="batch_api"))
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    from prefect_batchllm.strategies.pydantic_ai import PydanticAIStrategy

    agent = Agent(TestModel(), output_type=Book)
    with pytest.raises(TypeError, match=r"PydanticAIStrategy cannot .*\(TestModel\) must be .*GoogleModel"):
        run_batch(_items(PydanticAIStrategy(agent), 2, _tag()), ProcessorConfig(execution="batch_api"))
    google = _google_agent(emulator, output_type=Book)

    @google.tool_plain
    def lookup(title: str) -> str:
        return title

    with pytest.raises(TypeError, match=r"the agent has tools.*execution='online'"):
        run_batch(_items(PydanticAIStrategy(google), 2, _tag()), ProcessorConfig(execution="batch_api"))
    assert emulator.batch_creates == 0
    dry = run_batch(
        _items(GeminiStrategy(GeminiModel(MODEL, emulator.client())), 3, _tag()),
        ProcessorConfig(execution="batch_api", dry_run=True),
    )
    assert dry.succeeded == 3 and emulator.batch_creates == 0 and emulator.count() == 0  # no call at all
    with pytest.raises(ValueError, match="execution"):
        ProcessorConfig(execution="batch")
    with pytest.raises(ValueError, match="batch_followup"):
        ProcessorConfig(batch_followup="later")
    with pytest.raises(ValueError, match="chunk_size"):
        ProcessorConfig(execution="batch_api", chunk_size=10)


def test_batch_price_is_half_the_online_price() -> None:
    price = ModelPrice(1.0, 2.0, 0.25)
    online = price.cost(1_000_000, 500_000, 200_000)
    assert price.cost(1_000_000, 500_000, 200_000, billing="batch") == pytest.approx(online / 2)


def test_batches_cli_lists_shows_and_cancels(
    emulator: GeminiEmulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from prefect_batchllm.cli import main

    emu = emulator
    emu.batch_delay = math.inf
    client = emu.client()
    job = client.batches.create(model=MODEL, src=[{"contents": [{"parts": [{"text": "hi"}]}]}])
    monkeypatch.setenv("GEMINI_API_KEY", "test-key-for-cli")
    base = ["--base-url", emu.base_url]
    assert main(["batches", "list", *base]) == 0
    assert job.name in capsys.readouterr().out
    assert main(["batches", "cancel", job.name, *base]) == 0
    assert "CANCELLED" in capsys.readouterr().out
    assert main(["batches", "show", job.name, *base]) == 0
    out = capsys.readouterr().out
    assert job.name in out and "JOB_STATE_CANCELLED" in out and "test-key-for-cli" not in out
    monkeypatch.delenv("GEMINI_API_KEY")
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    assert main(["batches", "list", *base]) == 2
    assert "GEMINI_API_KEY" in capsys.readouterr().err


SCRIPT = """
import json, sys
from prefect_batchllm import LLMWorkItem, ProcessorConfig, run_batch
from prefect_batchllm.models.gemini import GeminiModel
from prefect_batchllm.strategies.gemini import GeminiStrategy
from google import genai
from google.genai import types

base_url, tag, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
client = genai.Client(api_key="test-key", http_options=types.HttpOptions(
    base_url=base_url, api_version="v1beta", retry_options=None))
strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", client))
ids = [f"{tag}-{i:03d}" for i in range(n)]
items = [LLMWorkItem(item_id=i, strategy=strategy, prompt=f"[{i}] ") for i in ids]
config = ProcessorConfig(execution="batch_api", batch_poll_interval_s=0.1, batch_poll_max_interval_s=0.3)
result = run_batch(items, config)
with open(out, "w") as f:
    json.dump({"succeeded": result.succeeded, "failed": result.failed, "jobs": result.batch_jobs,
               "ids": [r.item_id for r in result.results]}, f)
"""


def test_killed_flow_process_is_reattached_by_the_next_run(
    prefect_api: str, emulator: GeminiEmulator, tmp_path: Path
) -> None:
    emu = emulator
    emu.batch_delay = (0.0, math.inf)  # the job stays RUNNING until released
    tag = _tag()
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = prefect_env(prefect_api)
    env["PREFECT_LOGGING_LEVEL"] = "INFO"
    env["PYTHONPATH"] = str(ROOT)
    args = [sys.executable, str(script), emu.base_url, tag, "25"]
    log1 = tmp_path / "run1.log"
    with open(log1, "wb") as out:
        proc = subprocess.Popen(
            [*args, str(tmp_path / "run1.json")],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # Submitted, the submit task finished (its result persisted), and the flow is polling a RUNNING job.
        _wait_for(lambda: "JOB_STATE_RUNNING" in log1.read_text(errors="replace"), 180, "a RUNNING job")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop_process_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert emu.batch_creates == 1
    (name,) = emu.batches
    assert emu.batch_state(name) == "BATCH_STATE_RUNNING"

    emu.batch_delay = (0.0, 1.0)  # the job finishes about a second after the new run attaches
    log2 = tmp_path / "run2.log"
    with open(log2, "wb") as out:
        done = subprocess.run(
            [*args, str(tmp_path / "run2.json")],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert done.returncode == 0, log2.read_text(errors="replace")[-3000:]
    summary = json.loads((tmp_path / "run2.json").read_text())
    assert summary["succeeded"] == 25 and summary["failed"] == 0
    assert summary["ids"] == [f"{tag}-{i:03d}" for i in range(25)]
    assert emu.batch_creates == 1  # no second job: never billed twice
    assert [(j["name"], j["reattached"]) for j in summary["jobs"]] == [(name, True)]
    assert len(emu.batch_requests()) == 25


def test_jobs_beyond_the_batch_quota_wait_for_it_instead_of_failing(emulator: GeminiEmulator) -> None:
    emu = emulator
    emu.batch_delay = 0.1
    emu.max_active_batches = 1  # a second job is 429 RESOURCE_EXHAUSTED until the first one ended
    tag = _tag()
    strategy = GeminiStrategy(GeminiModel(MODEL, emu.client()))
    items = _items(strategy, 12, tag)
    config = ProcessorConfig(execution="batch_api", batch_max_requests_per_job=4, **FAST)
    result = run_batch(items, config)
    assert result.succeeded == 12
    assert [j["requests"] for j in result.batch_jobs] == [4, 4, 4]
    assert emu.batch_creates == 3 and emu.count("batches.create", status=429) >= 1


def test_enrich_dataframe_in_batch_mode_has_the_online_columns(emulator: GeminiEmulator) -> None:
    import pandas as pd

    from prefect_batchllm.dataframe import enrich_dataframe

    emu = emulator
    emu.batch_delay = 0.05
    emu.faults.add(Fault.safety_block(), contains="Dune", times=None)
    tag = _tag()
    df = pd.DataFrame({"title": ["Emma", "Dune", "Ulysses"], "tag": [tag] * 3}, index=[10, 11, 12])
    strategy = GeminiStrategy(GeminiModel(MODEL, emu.client()), response_schema=Book)
    template = "[{tag}] Catalogue {title}"
    batch = enrich_dataframe(
        df, template, strategy, config=ProcessorConfig(execution="batch_api", **FAST), output_type=Book
    )
    online = enrich_dataframe(
        df.assign(tag=tag + "-on"), template, strategy, config=ProcessorConfig(), output_type=Book
    )
    assert list(batch.columns) == list(online.columns) and list(batch.index) == [10, 11, 12]
    assert batch["success"].tolist() == [True, False, True]
    assert batch["error_category"].tolist()[1] == "blocked"
    assert emu.batch_creates == 1 and len(emu.batch_requests()) == 3


def test_enrich_table_on_a_schedule_submits_once_then_collects(
    emulator: GeminiEmulator, tmp_path: Path
) -> None:
    """What the ``nightly-books-batch`` deployment does: runs that do not wait, re-attaching until done."""
    import pandas as pd
    from pydantic import SecretStr

    from flows.enrich_table import RowsFailed, enrich_table
    from prefect_batchllm.prefect.blocks import GeminiCachedModelBlock, GeminiCredentials
    from prefect_batchllm.tables import read_table, write_table

    emu = emulator
    emu.batch_delay = (0.0, math.inf)
    block = f"batch-table-{_tag()}"
    GeminiCachedModelBlock(
        model=MODEL,
        credentials=GeminiCredentials(
            api_key=SecretStr("test-key"), base_url=emu.base_url, api_version="v1beta"
        ),
        system_instruction="You catalogue books. Answer with JSON only.",
    ).save(block, overwrite=True)
    tag = _tag()
    ids = [f"book-{i}" for i in range(6)]
    write_table(pd.DataFrame({"book_id": ids, "title": [f"T{i}" for i in range(6)]}), tmp_path / "in.parquet")
    params = {
        "input_path": str(tmp_path / "in.parquet"),
        "output_path": str(tmp_path / "out.parquet"),
        "prompt_template": f"[{{book_id}}] ({tag}) Catalogue {{title}}.",
        "model_block": block,
        "id_column": "book_id",
        "output_schema": {"genre": "str", "pages": "int"},
        "execution": "batch_api",
        "batch_wait_timeout_s": 0,
    }
    with pytest.raises(
        RowsFailed, match=r"6/6 rows failed.*6 of them are still in a running Gemini batch job"
    ):
        enrich_table(**params)  # hour 1: submitted, still running; the table is written with pending rows
    out = read_table(params["output_path"])
    assert out["error_category"].tolist() == ["batch_pending"] * 6
    with pytest.raises(RowsFailed):
        enrich_table(**params)  # hour 2: still running, re-attached (nothing submitted)
    assert emu.batch_creates == 1
    emu.batch_delay = 0.0
    summary = enrich_table(**params)  # hour 3: the job ended; collected
    assert summary["failed"] == 0 and emu.batch_creates == 1 and len(emu.batch_requests()) == 6
    out = read_table(params["output_path"])
    assert out["book_id"].tolist() == ids and out["success"].all() and out["genre"].notna().all()


def test_summary_artifact_lists_the_jobs_and_batch_billing() -> None:
    from prefect_batchllm.core.items import BatchResult, WorkItemResult
    from prefect_batchllm.prefect.artifacts import summary_markdown

    ok = WorkItemResult("a", True, output="x", model=MODEL, metadata={"billing": "batch"})
    bad = WorkItemResult("b", False, error="expired", error_category="batch_expired", model=MODEL)
    jobs = [
        {"name": "batches/one", "state": "JOB_STATE_SUCCEEDED", "mode": "inline", "requests": 1},
        {"name": "batches/two", "state": "JOB_STATE_EXPIRED", "mode": "file", "requests": 1, "failed": 1},
    ]
    text = summary_markdown(BatchResult([ok, bad], batch_jobs=jobs))
    assert "## Batch jobs" in text and "| batches/two | JOB_STATE_EXPIRED | file |" in text
    assert "answered by batch jobs (batch prices) | 1 |" in text and "| batch_expired | 1 |" in text


def test_polling_rides_out_server_errors_and_creation_retries_transient_ones(
    emulator: GeminiEmulator,
) -> None:
    emu = emulator
    emu.batch_delay = 0.2
    emu.faults.add(Fault.status(503), endpoint="batches.get", times=3)
    emu.faults.add(Fault.status(500), endpoint="batches.create", times=1)
    tag = _tag()
    items = _items(GeminiStrategy(GeminiModel(MODEL, emu.client())), 6, tag)
    result = run_batch(
        items, ProcessorConfig(execution="batch_api", retry=RetryConfig(initial_wait=0), **FAST)
    )
    assert result.succeeded == 6
    assert emu.count("batches.get", status=503) == 3 and emu.count("batches.create", status=500) == 1
    assert emu.batch_creates == 1


async def test_answers_without_keys_fall_back_to_input_order_only_when_counts_agree() -> None:
    from google.genai import types

    from prefect_batchllm.models.gemini_batch import read_answers

    def reply(text: str) -> types.InlinedResponse:
        content = types.Content(role="model", parts=[types.Part(text=text)])
        return types.InlinedResponse(
            response=types.GenerateContentResponse(candidates=[{"content": content}])
        )

    job = types.BatchJob(
        name="batches/x",
        dest=types.BatchJobDestination(
            inlined_responses=[reply("a"), types.InlinedResponse(error=types.JobError(code=8, message="q"))]
        ),
    )
    answers = await read_answers(None, job, ["k1", "k2"])  # type: ignore[arg-type]
    assert answers["k1"].response is not None and answers["k1"].response.text == "a"
    assert answers["k2"].error == {"code": 8, "message": "q"}
    with pytest.raises(RuntimeError, match="cannot be matched"):
        await read_answers(None, job, ["k1"])  # type: ignore[arg-type]


def test_jobs_are_split_by_count_and_size_and_a_too_large_request_is_named(emulator: GeminiEmulator) -> None:
    from prefect_batchllm.models.gemini_batch import BatchRequest, plan_jobs

    client = emulator.client()
    requests = [BatchRequest(f"k{i}", f"prompt {i} " + "x" * 100, None) for i in range(10)]
    assert [(p.mode, len(p.requests)) for p in plan_jobs(client, requests)] == [("inline", 10)]
    by_count = plan_jobs(client, requests, inline_max_bytes=10, max_requests_per_job=4)
    assert [(p.mode, p.keys) for p in by_count] == [
        ("file", ["k0", "k1", "k2", "k3"]),
        ("file", ["k4", "k5", "k6", "k7"]),
        ("file", ["k8", "k9"]),
    ]
    line = len(by_count[0].lines[0]) + 1
    by_size = plan_jobs(client, requests, inline_max_bytes=10, file_max_bytes=3 * line + 5)
    assert [len(p.requests) for p in by_size] == [3, 3, 3, 1]
    assert all(p.size_bytes <= 3 * line + 5 for p in by_size)
    assert json.loads(by_size[0].lines[0]) == {
        "key": "k0",
        "request": {"contents": [{"parts": [{"text": requests[0].contents}], "role": "user"}]},
    }
    with pytest.raises(ValueError, match=r"k0.*input file limit"):
        plan_jobs(client, requests, inline_max_bytes=10, file_max_bytes=50)


def _google_agent(emu: GeminiEmulator, **kwargs: Any) -> Any:
    from pydantic_ai import Agent
    from pydantic_ai.models.google import GoogleModel
    from pydantic_ai.providers.google import GoogleProvider

    return Agent(GoogleModel(MODEL, provider=GoogleProvider(client=emu.client())), **kwargs)


def test_pydantic_ai_agent_with_an_output_type_runs_as_a_batch_job(emulator: GeminiEmulator) -> None:
    from pydantic_ai import NativeOutput

    from prefect_batchllm.strategies.pydantic_ai import PydanticAIStrategy

    emu = emulator
    emu.batch_delay = 0.05
    emu.faults.add(Fault.invalid_json(), contains="BROKEN", times=None)
    agent = _google_agent(
        emu,
        output_type=NativeOutput(Book),
        instructions="You catalogue books.",
        model_settings={"temperature": 0.2, "max_tokens": 256},
    )
    tag = _tag()
    items = _items(PydanticAIStrategy(agent), 10, tag, {3: "BROKEN"})
    result = run_batch(items, ProcessorConfig(execution="batch_api", **FAST))
    assert [r.item_id for r in result.results] == [i.item_id for i in items]
    assert result.succeeded == 9 and result.results[3].error_category == "invalid_output"
    assert all(isinstance(r.output, Book) for r in result.results if r.success)
    (request, *_) = emu.batch_requests()
    body = request.body or {}
    generation = body.get("generationConfig") or body.get("generation_config") or {}
    assert generation.get("responseMimeType") == "application/json"
    assert generation.get("responseJsonSchema", {}).get("properties", {}).keys() == {"genre", "pages"}
    assert generation.get("temperature") == 0.2 and generation.get("maxOutputTokens") == 256
    assert "You catalogue books." in json.dumps(body.get("systemInstruction"))
    assert result.total_input_tokens == _batch_usage(emu)["prompt"]
    # The same agent online: same output type, the same items answered.
    online = run_batch(
        [LLMWorkItem(item_id=i.item_id + "-on", strategy=i.strategy, prompt=i.prompt) for i in items],
        ProcessorConfig(retry=RetryConfig(max_attempts=1)),
    )
    assert [r.success for r in online.results] == [r.success for r in result.results]
    assert all(isinstance(r.output, Book) for r in online.results if r.success)


def test_without_a_persisted_job_name_the_job_is_adopted_by_its_display_name(
    emulator: GeminiEmulator,
) -> None:
    """The safety net for a crash between ``batches.create`` answering and its result being persisted."""
    emu = emulator
    emu.batch_delay = (0.0, math.inf)
    items = _items(GeminiStrategy(GeminiModel(MODEL, emu.client())), 5, _tag())
    config = ProcessorConfig(execution="batch_api", persist_results=False, batch_wait_timeout_s=0, **FAST)
    first = run_batch(items, config)
    assert first.error_categories() == {"batch_pending": 5}
    emu.batch_delay = 0.0
    second = run_batch(items, config)
    assert second.succeeded == 5 and emu.batch_creates == 1
    assert second.batch_jobs[0]["name"] == first.batch_jobs[0]["name"] and second.batch_jobs[0]["reattached"]


def test_an_invalid_batch_answer_is_followed_up_online_with_the_correction_note(
    emulator: GeminiEmulator,
) -> None:
    emu = emulator
    emu.batch_delay = 0.05
    emu.faults.add(Fault.invalid_json(), contains="GARBLED", times=1)
    emu.faults.add(Fault.safety_block(), contains="BLOCKED", times=None)
    strategy = GeminiStrategy(GeminiModel(MODEL, emu.client()), response_schema=Book)
    tag = _tag()
    items = _items(strategy, 6, tag, {2: "GARBLED", 4: "BLOCKED"})
    result = run_batch(items, ProcessorConfig(execution="batch_api", batch_followup="online", **FAST))
    assert [r.success for r in result.results] == [True, True, True, True, False, True]
    assert result.results[4].error_category == "blocked"  # never followed up: it would be blocked again
    (online,) = emu.requests_for("generateContent")
    assert f"[{tag}-002]" in online.prompt_text and "Your previous answer was invalid" in online.prompt_text
    assert result.results[2].metadata.get("corrected") is True
    assert result.results[2].metadata.get("billing") is None  # the answer used was billed online


def test_a_job_whose_answers_cannot_be_read_fails_only_its_items(emulator: GeminiEmulator) -> None:
    emu = emulator
    emu.batch_delay = 0.05
    emu.faults.add(Fault.status(500), endpoint="files.download", times=None)
    tag = _tag()
    items = _items(GeminiStrategy(GeminiModel(MODEL, emu.client())), 9, tag)
    config = ProcessorConfig(
        execution="batch_api", batch_inline_max_bytes=1, batch_max_requests_per_job=3, **FAST
    )
    result = run_batch(items, config)
    assert [r.item_id for r in result.results] == [i.item_id for i in items]
    assert result.error_categories() == {"transient": 9}  # three file jobs, none readable, nothing lost
    assert all("files" in (r.error or "") or "500" in (r.error or "") for r in result.results)
    emu.faults.clear()
    again = run_batch(items, config)  # the jobs succeeded: a rerun re-attaches and reads them
    assert again.succeeded == 9 and emu.batch_creates == 3


def test_items_of_two_models_become_one_job_each_and_keep_input_order(emulator: GeminiEmulator) -> None:
    emu = emulator
    emu.batch_delay = 0.05
    flash = GeminiStrategy(GeminiModel(MODEL, emu.client()))
    lite = GeminiStrategy(GeminiModel("gemini-2.5-flash-lite", emu.client()))
    tag = _tag()
    items = [
        LLMWorkItem(item_id=f"{tag}-{i}", strategy=flash if i % 2 else lite, prompt=f"[{tag}-{i}] q")
        for i in range(10)
    ]
    result = run_batch(items, ProcessorConfig(execution="batch_api", **FAST))
    assert [r.item_id for r in result.results] == [i.item_id for i in items] and result.succeeded == 10
    assert sorted((j["model"], j["requests"]) for j in result.batch_jobs) == [
        ("gemini-2.5-flash", 5),
        ("gemini-2.5-flash-lite", 5),
    ]
    assert [r.model for r in result.results] == ["gemini-2.5-flash-lite", "gemini-2.5-flash"] * 5
    expected = 0.0
    for r in result.results:
        price = price_for(r.model)
        assert price is not None
        u = r.token_usage
        expected += price.cost(u["input_tokens"], u["output_tokens"]) / 2
    assert result.estimated_cost_usd == pytest.approx(expected)


def test_malformed_and_overlong_prompts_are_invalid_input_and_never_join_a_job(
    emulator: GeminiEmulator,
) -> None:
    from prefect_batchllm.core.model_limits import register_input_limit

    emu = emulator
    emu.batch_delay = 0.05
    tag = _tag()
    strategy = GeminiStrategy(GeminiModel("gemini-test-small", emu.client()))
    items = [
        LLMWorkItem("none-part", strategy, [None]),
        LLMWorkItem("too-long", strategy, f"({tag}) " + "word " * 2000),
        LLMWorkItem("fine", strategy, f"({tag}) a fine prompt"),
    ]
    register_input_limit("gemini-test-small", 1000)
    try:
        result = run_batch(items, ProcessorConfig(execution="batch_api", **FAST))
    finally:
        register_input_limit("gemini-test-small", None)
    by_id = result.by_id()
    for item_id in ("none-part", "too-long"):
        assert (by_id[item_id].error_category, by_id[item_id].attempts) == ("invalid_input", 0), by_id[
            item_id
        ]
    assert by_id["fine"].success
    assert len(emu.batch_requests()) == 1  # only the sendable prompt went into the job


def test_a_budget_cannot_be_combined_with_batch_jobs() -> None:
    with pytest.raises(ValueError, match="max_cost_usd"):
        ProcessorConfig(execution="batch_api", max_cost_usd=1.0)
