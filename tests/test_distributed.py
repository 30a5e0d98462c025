"""Chunk tasks on Prefect's Dask (and Ray) task runners: same results, one quota, one cache, no item lost.

Everything goes through the real path: ``run_batch.with_options(task_runner=DaskTaskRunner(...))`` on a
``distributed.LocalCluster`` with two worker *processes*, the real ``google-genai`` SDK over loopback HTTP to
the bundled Gemini-compatible server, and the session's Prefect API (the workers reach it through the
settings Prefect ships with every task). The models travel with a live ``genai.Client`` (pickled as a
recipe) and the items record the pid of the process that called the model, which is the evidence that
the chunk tasks ran in the workers. Assertions are on counts and orderings, never on wall time.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from prefect_batchllm import GeminiStrategy, LLMWorkItem, ProcessorConfig, run_batch
from prefect_batchllm.core.config import RateLimitConfig, RetryConfig
from prefect_batchllm.core.strategy import RetryState
from prefect_batchllm.models.base import LLMResponse
from prefect_batchllm.models.gemini import GeminiCachedModel, GeminiModel
from prefect_batchllm.prefect.result_log import ResultLog
from prefect_batchllm.testing import Fault, GeminiEmulator

distributed = pytest.importorskip("distributed", reason="the [dask] extra is not installed")
prefect_dask = pytest.importorskip("prefect_dask", reason="the [dask] extra is not installed")

MODEL = "gemini-2.5-flash"
FAST_RETRY = RetryConfig(max_attempts=3, initial_wait=0.05, max_wait=0.2, jitter=False)
TESTS = Path(__file__).resolve().parent
PID = "pid"  # result metadata key: the process that called the model for this item


class Summary(BaseModel):
    title: str
    pages: int


class WhereStrategy(GeminiStrategy[Any]):
    """``GeminiStrategy`` that records which process answered the item (the only test-side addition)."""

    def parse_response(self, response: LLMResponse, state: RetryState | None = None) -> Any:
        output, usage, metadata = super().parse_response(response, state)
        return output, usage, {**metadata, PID: os.getpid()}


def _client(base_url: str) -> Any:
    from google import genai
    from google.genai import types

    options = types.HttpOptions(base_url=base_url, api_version="v1beta", retry_options=None)
    return genai.Client(vertexai=False, api_key="test-key", http_options=options)


def _tag() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Any]:
    """Two single-threaded worker processes (a few seconds to start); shared by this module's tests."""
    with distributed.LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        dashboard_address=None,
        silence_logs=logging.WARNING,
    ) as cluster:
        yield cluster


def worker_pids(cluster: Any) -> dict[str, int]:
    """Worker address -> pid of each live worker process."""
    with distributed.Client(cluster.scheduler_address, timeout=60) as client:
        return dict(client.run(os.getpid))


def on_dask(cluster: Any) -> Any:
    return run_batch.with_options(task_runner=prefect_dask.DaskTaskRunner(address=cluster.scheduler_address))


# --------------------------------------------------------------------------------------------------
# (a) + (c) the same BatchResult in-process and on two worker processes; one shared context cache


FAULTY = {  # item index -> the fault its prompt draws (the rest answer at once)
    **{i: "t503" for i in range(7, 400, 41)},  # ten transient 503s: one retry each
    123: "bad400",  # not retried
    222: "blocked",  # safety block, not retried
    **{i: "badjson" for i in (55, 301)},  # invalid JSON, then valid after the correction note
}


def _install_faults(emulator: GeminiEmulator) -> None:
    """Per-item rules, so which attempt fails does not depend on how the workers interleave."""
    for index, kind in FAULTY.items():
        marker = f"[{kind}:{index}]"
        if kind == "t503":
            emulator.faults.add(Fault.status(503), contains=marker, times=1)
        elif kind == "bad400":
            emulator.faults.add(Fault.status(400), contains=marker, times=None)
        elif kind == "blocked":
            emulator.faults.add(Fault.safety_block(), contains=marker, times=None)
        else:
            emulator.faults.add(Fault.invalid_json(), contains=marker, times=1)


def _faulty_items(model: GeminiModel, tag: str, count: int = 400) -> list[LLMWorkItem[Any, Any]]:
    strategy = WhereStrategy(model, response_schema=Summary)
    return [
        LLMWorkItem(f"d-{i:03d}", strategy, f"({tag}) book {i} [{FAULTY.get(i, 'ok')}:{i}] summarize")
        for i in range(count)
    ]


def _comparable(result: Any) -> dict[str, Any]:
    rows = [
        (
            r.item_id,
            r.success,
            r.output.model_dump() if r.output is not None else None,
            r.error_category,
            r.attempts,
            dict(r.token_usage),
        )
        for r in result.results
    ]
    totals = (result.total_items, result.succeeded, result.failed)
    tokens = (result.total_input_tokens, result.total_output_tokens, result.total_cached_tokens)
    return {"rows": rows, "totals": totals, "tokens": tokens}


async def _faulty_run(emulator: GeminiEmulator, batch: Any) -> tuple[Any, GeminiCachedModel]:
    _install_faults(emulator)
    model = GeminiCachedModel(MODEL, _client(emulator.base_url), ["the shared catalogue"] * 20)
    # The same prompts in both runs (the tag is in the cached content, not the prompts), so answers and
    # token counts can be compared item by item.
    config = ProcessorConfig(max_workers=8, chunk_size=50, retry=FAST_RETRY, persist_results=False)
    result = await batch(_faulty_items(model, "same"), config)
    return result, model


async def test_dask_gives_the_same_batch_result_and_runs_in_the_workers(
    prefect_api: str, dask_cluster: Any
) -> None:
    with GeminiEmulator() as local_emulator:
        local, _ = await _faulty_run(local_emulator, run_batch)
    with GeminiEmulator() as dask_emulator:
        remote, model = await _faulty_run(dask_emulator, on_dask(dask_cluster))

    expected = _comparable(local)
    assert _comparable(remote) == expected
    # The faults fired as designed (so the comparison covers retries, corrections and failures).
    by_id = {r.item_id: r for r in remote.results}
    assert by_id["d-007"].attempts == 2 and by_id["d-007"].success
    assert by_id["d-055"].attempts == 2 and by_id["d-055"].success
    assert by_id["d-123"].error_category == "fatal" and by_id["d-123"].attempts == 1
    assert by_id["d-222"].error_category == "blocked" and by_id["d-222"].attempts == 1
    assert expected["totals"] == (400, 398, 2)

    # Where the model was called: in the flow's process locally, in both worker processes on Dask.
    workers = set(worker_pids(dask_cluster).values())
    local_pids = {r.metadata.get(PID) for r in local.results if r.success}
    remote_pids = {r.metadata.get(PID) for r in remote.results if r.success}
    assert local_pids == {os.getpid()}
    assert remote_pids == workers and os.getpid() not in remote_pids
    # The product's own record of where an item was answered ("worker": host:pid), set only in a worker.
    recorded = {int(r.metadata["worker"].rsplit(":", 1)[1]) for r in remote.results if r.success}
    assert recorded == workers
    assert not any("worker" in r.metadata for r in local.results)

    # (c) One context cache for every worker: the driver's prepare created it, every request used it.
    assert dask_emulator.count("cachedContents.create") == 1
    generated = dask_emulator.requests_for("generateContent")
    assert {r.cached_content for r in generated} == {model.cache_name}
    assert len(generated) == local_emulator.count("generateContent")


async def test_chunk_task_runs_are_recorded_for_the_dask_run(prefect_api: str, dask_cluster: Any) -> None:
    """The Prefect API has one Completed task run per chunk of the Dask flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with GeminiEmulator() as emulator:
        strategy = WhereStrategy(GeminiModel(MODEL, _client(emulator.base_url)))
        items = [LLMWorkItem(f"c-{i}", strategy, f"chunk item {i}") for i in range(24)]
        config = ProcessorConfig(max_workers=4, chunk_size=6, persist_results=False)
        state = await on_dask(dask_cluster)(items, config, return_state=True)
        result = await state.aresult()
    assert result.succeeded == 24
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    chunks = [run for run in runs if run.name.startswith("chunk-")]
    assert len(chunks) == 4, [run.name for run in runs]
    assert {run.state_type.value for run in chunks if run.state_type} == {"COMPLETED"}
    assert {r.metadata[PID] for r in result.results} <= set(worker_pids(dask_cluster).values())


# --------------------------------------------------------------------------------------------------
# (b) one quota across the workers


async def test_two_workers_share_one_quota_with_zero_429s(prefect_api: str, dask_cluster: Any) -> None:
    # 12 requests per 3 s window, shared by both workers: each alone could send far more.
    rpm, window, count = 240, 3.0, 48
    allowance = int(rpm * window / 60)
    with GeminiEmulator(latency=0.05, rpm=rpm, quota_window_s=window) as emulator:
        strategy = WhereStrategy(GeminiModel(MODEL, _client(emulator.base_url)))
        items = [LLMWorkItem(f"q-{i}", strategy, f"quota item {i}") for i in range(count)]
        limits = RateLimitConfig(
            requests_per_minute=rpm, limit_prefix=f"dist-{_tag()}", quota_window_seconds=window
        )
        config = ProcessorConfig(max_workers=8, chunk_size=8, persist_results=False, rate_limit=limits)
        result = await on_dask(dask_cluster)(items, config)

        assert result.succeeded == count
        assert emulator.count("generateContent", status=429) == 0
        assert emulator.max_in_window(window) <= allowance
        assert max(emulator.window_counts(window)) <= allowance
    pids = {r.metadata[PID] for r in result.results}
    assert pids == set(worker_pids(dask_cluster).values())  # both worker processes sent requests


async def test_a_429_pauses_every_worker(prefect_api: str, dask_cluster: Any) -> None:
    """One 429 (retryDelay 6 s) seen by one worker: the other worker stops sending too, until it ends."""
    delay = 6.0
    with GeminiEmulator(latency=0.1) as emulator:
        emulator.faults.add(Fault.rate_limit(retry_delay_s=delay), times=1, after=32)
        strategy = WhereStrategy(GeminiModel(MODEL, _client(emulator.base_url)))
        items = [LLMWorkItem(f"p-{i:02d}", strategy, f"<p-{i:02d}> pause item") for i in range(64)]
        limits = RateLimitConfig(
            requests_per_minute=6000, limit_prefix=f"dist-{_tag()}", cooldown_seconds=0.5
        )
        config = ProcessorConfig(max_workers=4, chunk_size=8, persist_results=False, rate_limit=limits)
        result = await on_dask(dask_cluster)(items, config)
        requests = emulator.requests_for("generateContent")

    assert result.succeeded == 64
    limited = [r for r in requests if r.status == 429]
    assert len(limited) == 1
    hit = limited[0].finished_at
    pid_of = {r.item_id: r.metadata[PID] for r in result.results}
    by_worker: dict[int, list[float]] = {}
    for r in requests:
        item_id = r.prompt_text.split("<", 1)[1].split(">", 1)[0]
        by_worker.setdefault(pid_of[item_id], []).append(r.started_at)
    assert len(by_worker) == 2, by_worker.keys()
    for pid, starts in by_worker.items():
        # Busy before the 429 (after 32 answers both workers are) and after the pause ...
        assert min(starts) < hit and max(starts) > hit + delay * 0.95, (pid, min(starts) - hit)
        # ... and silent in the pause, once the published pause had time to reach it (one poll + a GET).
        during = [t for t in starts if hit + 2.5 < t < hit + delay * 0.95]
        assert during == [], (pid, [round(t - hit, 2) for t in during])


# --------------------------------------------------------------------------------------------------
# (d) a worker process killed mid-run


async def test_a_killed_worker_loses_no_item_and_repays_nothing(prefect_api: str) -> None:
    count, latency, tag = 120, 0.3, _tag()
    with (
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        ) as cluster,
        GeminiEmulator(latency=latency) as emulator,
    ):
        strategy = WhereStrategy(GeminiModel(MODEL, _client(emulator.base_url)))
        items = [LLMWorkItem(f"k-{i:03d}", strategy, f"<k-{i:03d}> survive {tag}") for i in range(count)]
        config = ProcessorConfig(
            max_workers=4,
            chunk_size=20,
            persist_results=True,  # the result store is what a re-run chunk replays from
            retry=FAST_RETRY,
        )
        victim = sorted(worker_pids(cluster).values())[0]
        killed: list[float] = []

        def kill_when_busy() -> None:  # a thread: independent of how the flow uses the event loop
            deadline = time.monotonic() + 240
            while emulator.count("generateContent", status=200) < 60 and time.monotonic() < deadline:
                time.sleep(0.02)
            killed.append(time.monotonic())
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_busy, daemon=True)
        killer.start()
        result = await on_dask(cluster)(items, config)
        killer.join(timeout=240)
        assert killed and result.total_items == count
        killed_at = killed[0]
        assert emulator.count("generateContent", status=200) > 60  # the run went on after the kill
        first_failed = result.failed
        if first_failed:  # the lost chunk's task run failed: a rerun finishes the batch
            result = await on_dask(cluster)(items, config)
        requests = emulator.requests_for("generateContent", status=200)

    assert [r.item_id for r in result.results] == [i.item_id for i in items]
    assert result.succeeded == count
    answered: dict[str, list[Any]] = {}
    for r in requests:
        answered.setdefault(r.prompt_text.split("<", 1)[1].split(">", 1)[0], []).append(r)
    assert set(answered) == {i.item_id for i in items}
    # The victim had answered items (its chunk was lost mid-way) ...
    assert any(r.metadata.get(PID) == victim for r in result.results)
    # ... yet items answered before the kill were not paid for again, once their result had time to be
    # written: the result log flushes at least every ResultLog.flush_interval_s (1 s) (+1 s of slack).
    written = ResultLog(None).flush_interval_s + 1.0
    early = [key for key, rs in answered.items() if min(r.finished_at for r in rs) < killed_at - written]
    assert early, "no item finished before the kill"
    repaid = [key for key in early if len(answered[key]) > 1]
    assert repaid == [], repaid
    again = sorted(key for key, rs in answered.items() if len(rs) > 1)  # in flight at the kill
    print(f"first run failed {first_failed}; early {len(early)}; answered twice: {again}")


# --------------------------------------------------------------------------------------------------
# (e) Ray: the same equivalence on a local Ray instance, when the [ray] extra is installed


async def test_ray_gives_the_same_batch_result(prefect_api: str) -> None:
    prefect_ray = pytest.importorskip(
        "prefect_ray", reason="prefect-ray is not installed: pip install 'prefect-batchllm[ray]'"
    )
    here = str(TESTS)
    runner = prefect_ray.RayTaskRunner(
        init_kwargs={
            "num_cpus": 2,
            "include_dashboard": False,
            "log_to_driver": False,
            # Ray's workers import this module (the test strategy) by name, like Dask's do.
            "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join([here, str(TESTS.parent)])}},
        }
    )
    with GeminiEmulator() as local_emulator:
        local, _ = await _faulty_run(local_emulator, run_batch)
    with GeminiEmulator() as ray_emulator:
        remote, model = await _faulty_run(ray_emulator, run_batch.with_options(task_runner=runner))
    assert _comparable(remote) == _comparable(local)
    remote_pids = {r.metadata.get(PID) for r in remote.results if r.success}
    assert remote_pids and os.getpid() not in remote_pids
    assert ray_emulator.count("cachedContents.create") == 1
    assert {r.cached_content for r in ray_emulator.requests_for("generateContent")} == {model.cache_name}
