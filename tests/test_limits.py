"""The Prefect global-concurrency-limit rate limiter, through the real Prefect API and the real genai SDK.

The bundled Gemini-compatible server enforces an RPM/TPM quota over a sliding window and answers 429
beyond it, and logs every request: the assertions are on its counts (zero 429s, per-window counts within
quota, in-flight peak), never on wall time. Windows are a few seconds long (``quota_window_s``) so the
quota binds within a short test; the limiter is told the same window (``quota_window_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefect_batchllm.core.admission import Unlimited
from prefect_batchllm.core.config import ProcessorConfig, RateLimitConfig
from prefect_batchllm.prefect.limits import (
    HOLD_SECONDS,
    GlobalRateLimiter,
    RateLimitConfigurationError,
    admission_for,
    aensure_rate_limits,
    limit_names,
    limit_specs,
)

MODEL = "gemini-2.5-flash"
TESTS = Path(__file__).resolve().parent


def _prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _genai_client(base_url: str) -> Any:
    from google import genai
    from google.genai import types

    options = types.HttpOptions(base_url=base_url, api_version="v1beta", retry_options=None)
    return genai.Client(vertexai=False, api_key="test-key", http_options=options)


async def drive(
    limiter: Any, client: Any, prompts: list[str], *, workers: int, together: bool = False
) -> list[str]:
    """What the executor does per attempt (``core.attempt.run_attempt``: admit, call, reconcile, release; a
    429 pauses every worker and the attempt is repeated), with ``workers`` items in flight.

    ``together``: every worker's first call waits until all workers are admitted, so the first wave of
    requests reaches the provider at once (a burst of concurrent 429s).
    """
    from prefect_batchllm.core.attempt import ItemLedger, run_attempt
    from prefect_batchllm.core.errors import DefaultErrorClassifier
    from prefect_batchllm.core.strategy import LLMCallStrategy
    from prefect_batchllm.models.gemini import usage_from_response

    barrier = asyncio.Barrier(workers) if together else None

    class Call(LLMCallStrategy[str]):
        async def execute(self, prompt: Any, attempt: int, timeout: float, state: Any = None) -> Any:
            nonlocal barrier
            if barrier is not None:  # admitted: wait for the whole first wave
                await barrier.wait()
                barrier = None
            response = await client.aio.models.generate_content(model=MODEL, contents=prompt)
            return response.text or "", usage_from_response(response)

    strategy, classifier = Call(), DefaultErrorClassifier()
    config = ProcessorConfig(max_workers=workers, rate_limit=limiter.config)
    queue = list(enumerate(prompts))
    out: list[str] = [""] * len(prompts)

    async def worker() -> None:
        while queue:
            index, prompt = queue.pop(0)
            ledger = ItemLedger(f"p{index}")
            done = await run_attempt(
                strategy, prompt, 1, ledger, config=config, admission=limiter, classifier=classifier
            )
            out[index] = done.output

    await asyncio.gather(*(worker() for _ in range(workers)))
    return out


async def run_in_flow(
    limiter: Any, client: Any, prompts: list[str], *, workers: int, together: bool = False
) -> list[str]:
    """Run :func:`drive` inside an async Prefect flow run (the limiter is used from the flow's loop)."""
    from prefect import flow

    @flow(name="limits-test-batch", persist_result=False)
    async def limited_batch() -> list[str]:
        return await drive(limiter, client, prompts, workers=workers, together=together)

    try:
        return await limited_batch()
    finally:
        await limiter.aclose()


@contextlib.contextmanager
def _limiter_summary() -> Iterator[io.StringIO]:
    """Collect the limiter's log lines (its closing summary is INFO) into a string buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    limiter_log = logging.getLogger("prefect_batchllm.limits")
    level = limiter_log.level
    limiter_log.setLevel(logging.INFO)
    limiter_log.addHandler(handler)
    try:
        yield buffer
    finally:
        limiter_log.removeHandler(handler)
        limiter_log.setLevel(level)


def _quota_was_binding(log: str) -> bool:
    """From a limiter's closing summary line: did callers wait for the quota (bucket full or denied)?"""
    found = re.search(r"\((\d+) denied\), bucket full (\d+) times", log)
    assert found, f"no rate limiter summary in: {log[-2000:]}"
    return int(found[1]) + int(found[2]) > 0


def _peak_in_flight(emulator: Any) -> int:
    edges = []
    for r in emulator.requests_for("generateContent"):
        edges += [(r.started_at, 1), (r.finished_at, -1)]
    peak = level = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        level += step
        peak = max(peak, level)
    return peak


# --------------------------------------------------------------------------------------------------
# Pure sizing and wiring (no API)


@pytest.mark.parametrize("window", [5.0, 10.0, 60.0])
@pytest.mark.parametrize("per_minute", [30, 600, 3000, 250_000])
def test_decaying_limits_never_exceed_a_provider_window(window: float, per_minute: int) -> None:
    """Capacity + decay * (window + hold) fits the window's allowance: no provider window overflows."""
    config = RateLimitConfig(
        requests_per_minute=per_minute, tokens_per_minute=per_minute, quota_window_seconds=window
    )
    allowance = per_minute * window / 60
    for spec in limit_specs(config):
        assert spec.slot_decay_per_second > 0
        assert 1 <= spec.limit <= max(1, allowance)
        assert spec.limit + spec.slot_decay_per_second * (window + HOLD_SECONDS) <= allowance + 1e-6
        if window == 60 and per_minute >= 600:  # per-minute quotas keep >= 90 % of the nominal rate
            assert spec.slot_decay_per_second * 60 >= 0.9 * per_minute


def test_limit_names_and_kinds() -> None:
    config = RateLimitConfig(
        requests_per_minute=600, tokens_per_minute=10_000, max_in_flight=8, limit_prefix="acme"
    )
    specs = {spec.kind: spec for spec in limit_specs(config)}
    assert {s.name for s in specs.values()} == set(limit_names("acme").values())
    assert specs["inflight"].limit == 8 and specs["inflight"].slot_decay_per_second == 0
    assert specs["rpm"].name == "acme-rpm" and specs["tpm"].name == "acme-tpm"
    assert [s.kind for s in limit_specs(RateLimitConfig(max_in_flight=2))] == ["inflight"]


def test_admission_for_picks_the_limiter_only_when_a_limit_is_set() -> None:
    assert isinstance(admission_for(ProcessorConfig()), Unlimited)
    assert isinstance(admission_for(ProcessorConfig(max_requests_per_minute=60, dry_run=True)), Unlimited)
    limiter = admission_for(ProcessorConfig(max_requests_per_minute=60))
    assert isinstance(limiter, GlobalRateLimiter)
    assert limiter.names == ["batchllm-rpm"]
    with pytest.raises(ValueError):
        GlobalRateLimiter(RateLimitConfig())


# --------------------------------------------------------------------------------------------------
# Through the Prefect API (session test harness) and the emulator


@pytest.mark.prefect
async def test_an_admission_cancelled_after_its_grant_gives_its_in_flight_slot_back() -> None:
    """The race behind a stuck in-flight lease: the grant lands, the waiting caller is cancelled before it
    resumes. The permit exists only inside the cancelled task; its slot must still be returned."""
    from prefect_batchllm.prefect.limits import LimiterStats, _Core, _Lease

    config = RateLimitConfig(max_in_flight=2, limit_prefix=_prefix())
    core = _Core(config, LimiterStats(), asyncio.get_running_loop())
    assert core.inflight is not None
    lease = _Lease(uuid.uuid4(), 2)
    core.inflight.leases.append(lease)

    caller = asyncio.create_task(core.admit(0))
    await asyncio.sleep(0)  # the caller now waits for its grant
    core._grant(core.waiters.popleft(), time.monotonic())
    assert lease.used == 1
    caller.cancel()  # before the caller ever resumed with its permit
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert lease.used == 0


async def test_ensure_rate_limits_is_idempotent_and_updates(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client

    prefix = _prefix()
    config = RateLimitConfig(requests_per_minute=600, max_in_flight=4, limit_prefix=prefix)
    first = await aensure_rate_limits(config)
    again = await aensure_rate_limits(config)
    assert first == again == [f"{prefix}-rpm", f"{prefix}-inflight"]
    bigger = RateLimitConfig(requests_per_minute=1200, max_in_flight=9, limit_prefix=prefix)
    await aensure_rate_limits(bigger)
    async with get_client() as client:
        rpm = await client.read_global_concurrency_limit_by_name(f"{prefix}-rpm")
        inflight = await client.read_global_concurrency_limit_by_name(f"{prefix}-inflight")
    expected = {s.kind: s for s in limit_specs(bigger)}
    assert rpm.limit == expected["rpm"].limit
    assert rpm.slot_decay_per_second == pytest.approx(expected["rpm"].slot_decay_per_second)
    assert inflight.limit == 9 and inflight.slot_decay_per_second == 0


@pytest.mark.prefect
@pytest.mark.heavy  # paced by a quota window; the shorter limit tests cover 3.8.8's API
async def test_batch_at_the_quota_has_zero_429s_and_every_window_within_quota(prefect_api: str) -> None:
    from prefect_batchllm.testing import GeminiEmulator

    rpm, window = 2400, 5.0  # 200 requests per 5 s window
    allowance = int(rpm * window / 60)
    prompts = [f"quota item {i}" for i in range(420)]
    config = RateLimitConfig(
        requests_per_minute=rpm, max_in_flight=24, limit_prefix=_prefix(), quota_window_seconds=window
    )
    with GeminiEmulator(latency=0.05, rpm=rpm, quota_window_s=window) as emulator:
        limiter = GlobalRateLimiter(config)
        texts = await run_in_flow(limiter, emulator.client(), prompts, workers=32)

        assert all(texts) and len(texts) == len(prompts)
        assert emulator.count("generateContent", status=429) == 0
        assert emulator.count("generateContent", status=200) == len(prompts)
        assert emulator.max_in_window(window) <= allowance
        assert max(emulator.window_counts(window)) <= allowance
        # The quota was the bottleneck (32 workers x 20 calls/s each would be far above it) ...
        assert emulator.max_in_window(window) >= allowance // 2
        assert _peak_in_flight(emulator) <= 24
    # ... and slots came in blocks: far fewer limit writes than calls.
    stats = limiter.stats
    assert stats.admitted == len(prompts)
    assert stats.gcl_increments <= len(prompts) // 4, stats
    assert stats.pauses == 0


@pytest.mark.prefect
@pytest.mark.heavy  # paced by a quota window; the shorter limit tests cover 3.8.8's API
async def test_tpm_quota_with_reconciled_estimates(prefect_api: str) -> None:
    """Tokens are reserved from the estimate and reconciled; no token window exceeds the quota."""
    from prefect_batchllm.testing import GeminiEmulator

    tpm, window = 60_000, 5.0  # 5,000 input tokens per 5 s window
    prompts = [f"tokens {i} " + "x" * 380 for i in range(150)]  # ~100 tokens each
    config = RateLimitConfig(
        tokens_per_minute=tpm,
        requests_per_minute=100_000,
        limit_prefix=_prefix(),
        quota_window_seconds=window,
    )
    with GeminiEmulator(latency=0.05, tpm=tpm, quota_window_s=window) as emulator:
        limiter = GlobalRateLimiter(config)
        texts = await run_in_flow(limiter, emulator.client(), prompts, workers=16)
        assert all(texts)
        assert emulator.count("generateContent", status=429) == 0
        accepted = sorted(
            (r.started_at, r.usage["promptTokenCount"])
            for r in emulator.requests_for("generateContent", status=200)
        )
    allowance = tpm * window / 60
    for i, (start, _) in enumerate(accepted):
        in_window = sum(tokens for t, tokens in accepted[i:] if t - start < window)
        assert in_window <= allowance
    assert limiter.stats.reserved["tpm"] >= sum(tokens for _, tokens in accepted)


@pytest.mark.prefect
async def test_a_429_storm_pauses_once_and_loses_no_item(prefect_api: str) -> None:
    from prefect_batchllm.testing import Fault, GeminiEmulator

    workers, delay = 8, 1.0
    prompts = [f"storm item {i}" for i in range(40)]
    config = RateLimitConfig(
        requests_per_minute=6000,
        max_in_flight=workers,
        limit_prefix=_prefix(),
        cooldown_seconds=0.5,
        slow_start_items=4,
        slow_start_initial_delay=0.05,
    )
    with GeminiEmulator(latency=0.2) as emulator:
        emulator.faults.add(Fault.rate_limit(retry_delay_s=delay), times=workers)
        limiter = GlobalRateLimiter(config)
        texts = await run_in_flow(limiter, emulator.client(), prompts, workers=workers, together=True)

        assert all(texts) and len(texts) == len(prompts)  # no item lost
        limited = emulator.requests_for("generateContent", status=429)
        assert len(limited) == workers
        ok = emulator.requests_for("generateContent", status=200)
        assert len(ok) == len(prompts)
        # Every worker paused: nothing was sent until the server-given delay had passed.
        first_429 = min(r.finished_at for r in limited)
        resumed = min(r.started_at for r in ok)
        assert resumed - first_429 >= delay * 0.95
    stats = limiter.stats
    assert stats.rate_limit_reports == workers
    assert stats.pauses == 1, stats  # one shared pause for the whole wave, not one per 429
    assert limiter.generation == 1


@pytest.mark.prefect
async def test_a_pause_is_shared_with_other_processes(prefect_api: str) -> None:
    """A 429 seen by one limiter pauses another one on the same prefix (via the shared variable)."""
    prefix = _prefix()
    config = RateLimitConfig(requests_per_minute=6000, limit_prefix=prefix, cooldown_seconds=0.1)
    first, second = GlobalRateLimiter(config), GlobalRateLimiter(config)
    try:
        await first.start()
        await second.start()
        permit = await first.admit(1)
        await permit.release()
        await first.report_rate_limit(3.0)
        await asyncio.sleep(0.3)  # let the publication land
        started = time.monotonic()
        permit = await second.admit(1)  # waits for the pause the other limiter published
        waited = time.monotonic() - started
        await permit.release()
    finally:
        await first.aclose()
        await second.aclose()
    assert first.stats.pauses == 1
    assert second.stats.remote_pauses == 1 and second.stats.pauses == 0
    assert waited >= 1.5  # the 3 s pause, less the time until `second` asked


@pytest.mark.prefect
async def test_missing_limit_raises_instead_of_running_unlimited(prefect_api: str) -> None:
    limiter = GlobalRateLimiter(RateLimitConfig(requests_per_minute=60, limit_prefix=_prefix()), ensure=False)
    try:
        with pytest.raises(RateLimitConfigurationError, match="does not exist"):
            await limiter.admit(1)
        with pytest.raises(RateLimitConfigurationError):  # and keeps refusing
            await limiter.admit(1)
    finally:
        await limiter.aclose()


@pytest.mark.prefect
async def test_disabled_or_wrong_kind_limits_are_configuration_errors(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError

    disabled = RateLimitConfig(max_in_flight=2, limit_prefix=_prefix())
    await aensure_rate_limits(disabled)
    no_decay = RateLimitConfig(requests_per_minute=60, limit_prefix=_prefix())
    async with get_client() as client:
        await client.update_global_concurrency_limit(
            f"{disabled.limit_prefix}-inflight", GlobalConcurrencyLimitUpdate(active=False)
        )
        await client.upsert_global_concurrency_limit_by_name(f"{no_decay.limit_prefix}-rpm", 5)
    for config, match in ((disabled, "disabled"), (no_decay, "slot decay")):
        limiter = GlobalRateLimiter(config, ensure=False)
        try:
            with pytest.raises(ConcurrencySlotAcquisitionError, match=match):
                await limiter.admit(1)
        finally:
            await limiter.aclose()


@pytest.mark.prefect
async def test_a_limit_deleted_mid_run_fails_waiting_callers(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client

    config = RateLimitConfig(requests_per_minute=60, quota_window_seconds=60, limit_prefix=_prefix())
    limiter = GlobalRateLimiter(config)
    try:
        await limiter.start()
        async with get_client() as client:
            await client.delete_global_concurrency_limit_by_name(f"{config.limit_prefix}-rpm")
        with pytest.raises(RateLimitConfigurationError):
            for _ in range(10):  # the burst may still be held locally; then it must fail
                permit = await asyncio.wait_for(limiter.admit(1), timeout=30)
                await permit.release()
    finally:
        await limiter.aclose()


@pytest.mark.prefect
async def test_in_flight_leases_are_returned_when_idle(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client

    config = RateLimitConfig(max_in_flight=5, limit_prefix=_prefix())
    limiter = GlobalRateLimiter(config)
    try:
        permits = [await limiter.admit(0) for _ in range(5)]
        async with get_client() as client:
            held = await client.read_global_concurrency_limit_by_name(f"{config.limit_prefix}-inflight")
            assert held.active_slots == 5
            blocked = asyncio.ensure_future(limiter.admit(0))
            await asyncio.sleep(0.3)
            assert not blocked.done()  # a sixth caller waits for a slot
            await permits[0].release()
            sixth = await asyncio.wait_for(blocked, timeout=10)
            for permit in [*permits[1:], sixth]:
                await permit.release()
                await permit.release()  # idempotent
            for _ in range(50):  # returned after IDLE_LEASE_SECONDS without waiters
                await asyncio.sleep(0.1)
                lim = await client.read_global_concurrency_limit_by_name(f"{config.limit_prefix}-inflight")
                if lim.active_slots == 0:
                    break
            assert lim.active_slots == 0
    finally:
        await limiter.aclose()
    assert limiter.stats.leases_released == limiter.stats.leases_acquired


@pytest.mark.prefect
def test_cli_limits_apply_show_delete(prefect_api: str, capsys: pytest.CaptureFixture[str]) -> None:
    from prefect_batchllm.cli import main

    prefix = _prefix()
    assert main(["limits", "apply", "--prefix", prefix, "--rpm", "600", "--in-flight", "4"]) == 0
    assert main(["limits", "apply", "--prefix", prefix, "--rpm", "600", "--in-flight", "4"]) == 0
    assert main(["limits", "show", "--prefix", prefix]) == 0
    shown = capsys.readouterr().out
    assert f"{prefix}-rpm" in shown and f"{prefix}-inflight" in shown and "active" in shown
    assert main(["limits", "delete", "--prefix", prefix]) == 0
    assert main(["limits", "show", "--prefix", prefix]) == 0
    assert "no limits" in capsys.readouterr().out
    assert main(["limits", "apply", "--prefix", prefix]) == 2  # no limit given
    assert main(["limits", "apply", "--prefix", "Not Valid", "--rpm", "5"]) == 2


# --------------------------------------------------------------------------------------------------
# Two OS processes, one real `prefect server start`, one quota


SHARD = """
import asyncio, sys
sys.path.insert(0, {tests!r})
import test_limits
sys.exit(test_limits.shard_main(sys.argv[1:]))
"""


def _dump_state() -> None:
    """Print every thread's stack and each live limiter's state (a shard that hangs explains itself)."""
    import faulthandler
    import gc

    from prefect_batchllm.prefect import limits

    faulthandler.dump_traceback(all_threads=True)
    for core in [obj for obj in gc.get_objects() if isinstance(obj, limits._Core)]:
        now = time.monotonic()
        leases = [(le.size, le.used, round(le.rotate_at - now, 1)) for le in core.inflight.leases]
        waiting = sum(not w.future.done() for w in core.waiters)
        print(f"limiter: {waiting} waiting, leases {leases}, {core.stats}", flush=True)
        for task in asyncio.all_tasks(core.loop):
            task.print_stack(limit=6)
    sys.stdout.flush()


def shard_main(argv: list[str]) -> int:
    """Subprocess entry: one ``run_batch`` flow run pushing ``count`` items through the shared limits."""
    from prefect_batchllm import GeminiModel, GeminiStrategy, LLMWorkItem, run_batch

    base_url, prefix, tag, count, rpm, window, workers = argv
    config = ProcessorConfig(
        max_workers=int(workers),
        persist_results=False,
        rate_limit=RateLimitConfig(
            requests_per_minute=float(rpm),
            max_in_flight=int(workers),
            limit_prefix=prefix,
            quota_window_seconds=float(window),
        ),
    )
    strategy = GeminiStrategy(GeminiModel(MODEL, lambda: _genai_client(base_url)), lambda r: r.text)
    items = [LLMWorkItem(f"{tag}-{i}", strategy, f"{tag} item {i}") for i in range(int(count))]
    watchdog = threading.Timer(120, _dump_state)  # a hung shard says where it hangs, in its output
    watchdog.daemon = True
    watchdog.start()
    with _limiter_summary() as summary:  # its closing line says whether the quota bound this process
        result = run_batch(items, config)  # the product path, called from plain sync code
    watchdog.cancel()
    print(summary.getvalue(), flush=True)
    print(f"{tag}: {result.succeeded}/{result.total_items} ok", flush=True)
    return 0 if result.failed == 0 else 1


@pytest.mark.heavy  # paced by a quota window; the shorter limit tests cover 3.8.8's API
@pytest.mark.parametrize("chunk_size", [None, 16], ids=["per-item", "chunked"])
async def test_run_batch_at_the_quota_has_zero_429s(prefect_api: str, chunk_size: int | None) -> None:
    """The limiter through the real flow: every item admitted by the global limits before its attempt."""
    from prefect_batchllm import GeminiModel, GeminiStrategy, LLMWorkItem, run_batch
    from prefect_batchllm.testing import GeminiEmulator

    # 12 requests per 3 s window: below what run_batch sustains on the SQLite test API (~6 items/s
    # with 16 workers), so the quota, not Prefect's per-task cost, is what binds.
    rpm, window, count = 240, 3.0, 60
    allowance = int(rpm * window / 60)
    with GeminiEmulator(latency=0.05, rpm=rpm, quota_window_s=window) as emulator:
        strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client), lambda r: r.text)
        tag = _prefix()
        items = [LLMWorkItem(f"q-{i}", strategy, f"[{tag}-{i}] quota") for i in range(count)]
        config = ProcessorConfig(
            max_workers=16,
            persist_results=False,
            chunk_size=chunk_size,
            rate_limit=RateLimitConfig(
                requests_per_minute=rpm, limit_prefix=_prefix(), quota_window_seconds=window
            ),
        )
        with _limiter_summary() as summary:
            result = await run_batch(items, config)
        assert result.succeeded == count and [r.item_id for r in result.results] == [i.item_id for i in items]
        assert emulator.count("generateContent", status=429) == 0
        assert emulator.max_in_window(window) <= allowance
        assert _quota_was_binding(summary.getvalue())  # the quota, not the workers, was the bound


async def test_run_batch_with_a_missing_operator_managed_limit_fails_before_any_item(
    prefect_api: str,
) -> None:
    from prefect_batchllm import LLMWorkItem, run_batch
    from prefect_batchllm.strategies.direct import DirectCallStrategy

    calls: list[str] = []

    async def call(prompt: str, attempt: int, timeout: float) -> tuple[str, dict[str, int]]:
        calls.append(prompt)
        return prompt, {}

    # manage_limits=False: the limits must already exist (an operator manages them); they do not.
    limits = RateLimitConfig(requests_per_minute=60, limit_prefix=_prefix(), manage_limits=False)
    with pytest.raises(RateLimitConfigurationError, match=r"does not exist \(strict\)"):
        await run_batch(
            [LLMWorkItem("m-1", DirectCallStrategy(call), "hello")], ProcessorConfig(rate_limit=limits)
        )
    assert calls == []


async def test_run_batch_uses_operator_managed_limits_without_changing_them(prefect_api: str) -> None:
    from prefect_batchllm import LLMWorkItem, run_batch
    from prefect_batchllm.prefect.limits import read_rate_limits
    from prefect_batchllm.strategies.direct import DirectCallStrategy

    async def call(prompt: str, attempt: int, timeout: float) -> tuple[str, dict[str, int]]:
        return prompt.upper(), {}

    prefix = _prefix()
    operator = RateLimitConfig(requests_per_minute=600, max_in_flight=4, limit_prefix=prefix)
    await aensure_rate_limits(operator)
    before = {lim.name: (lim.limit, lim.slot_decay_per_second) for lim in await read_rate_limits(prefix)}

    job = RateLimitConfig(
        requests_per_minute=6000, max_in_flight=64, limit_prefix=prefix, manage_limits=False
    )
    items = [LLMWorkItem(f"o-{i}", DirectCallStrategy(call), f"op {i}") for i in range(12)]
    result = await run_batch(items, ProcessorConfig(max_workers=8, persist_results=False, rate_limit=job))

    assert result.succeeded == 12
    after = {lim.name: (lim.limit, lim.slot_decay_per_second) for lim in await read_rate_limits(prefix)}
    assert after == before and len(before) == 2  # the job's own numbers never reached the server


@pytest.fixture(scope="module")
def real_server() -> Iterator[str]:
    sys.path.insert(0, str(TESTS))
    from _prefect_server import prefect_server

    with prefect_server() as api_url:
        yield api_url


@pytest.mark.heavy  # paced by a quota window; the shorter limit tests cover 3.8.8's API
@pytest.mark.prefect
def test_two_processes_share_one_quota(real_server: str, tmp_path: Path) -> None:
    from _prefect_server import prefect_env

    from prefect_batchllm.testing import GeminiEmulator

    # 30 per 5 s window, shared: each run_batch process alone sustains more (~6 items/s on SQLite).
    rpm, window, per_process, workers = 360, 5.0, 60, 16
    allowance = int(rpm * window / 60)
    prefix = _prefix()
    env = prefect_env(real_server, home=os.environ.get("PREFECT_HOME"))
    with GeminiEmulator(latency=0.05, rpm=rpm, quota_window_s=window) as emulator:
        # Output goes to files, not pipes: a shard blocked on a full pipe that nobody reads yet (we wait
        # for the shards one after the other) would hold its in-flight slots and starve the other one.
        logs = [tmp_path / f"{tag}.log" for tag in ("shard-a", "shard-b")]
        procs = []
        for tag, log in zip(("shard-a", "shard-b"), logs, strict=True):
            with log.open("w") as sink:
                argv = [tag, str(per_process), str(rpm), str(window), str(workers)]
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            SHARD.format(tests=str(TESTS)),
                            emulator.base_url,
                            prefix,
                            *argv,
                        ],
                        env=env,
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + 300
        try:
            for proc in procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for proc in procs:
                proc.kill()
                proc.wait()
        outputs = [log.read_text() for log in logs]
        if any(proc.returncode is None or proc.returncode < 0 for proc in procs):
            pytest.fail("a shard hung:\n" + "\n".join(out[-8000:] for out in outputs))
        print(*outputs, sep="\n")  # the limiters' summaries (shown with -rP, or on failure)
        for proc, output in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, output[-3000:]

        assert emulator.count("generateContent", status=429) == 0
        assert emulator.count("generateContent", status=200) == 2 * per_process
        assert emulator.max_in_window(window) <= allowance
        assert max(emulator.window_counts(window)) <= allowance
        # Both processes were sending at the same time (else the test would prove nothing) ...
        spans = []
        for tag in ("shard-a", "shard-b"):
            times = [r.started_at for r in emulator.requests_for("generateContent", contains=tag)]
            spans.append((min(times), max(times)))
        overlap = min(spans[0][1], spans[1][1]) - max(spans[0][0], spans[1][0])
        assert overlap > window, (spans, outputs)
        # ... and the shared quota bound them: each limiter found the bucket full or was refused slots
        # (evidence that holds on a slow machine, unlike a throughput floor), and one in-flight limit
        # held both (each process may use all of it when the other is idle).
        for output in outputs:
            assert _quota_was_binding(output), output[-3000:]
        assert _peak_in_flight(emulator) <= workers
