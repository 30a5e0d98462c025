"""Rate-limiter efficiency: achieved requests/min as a ratio of the ideal ``min(quota, concurrency/latency)``.

Every case drives the real google-genai SDK against the bundled Gemini-compatible server, which enforces
the same quota over a sliding 60 s window and answers 429 beyond it. Cases (the issue's):

* ``a``: 600 RPM, 1,000 items, 200 ms latency
* ``b``: 3,000 RPM, 5,000 items, 200 ms latency
* ``c``: TPM-bound: 60,000 input tokens/min, 100-token prompts (600 requests/min), 1,000 items

Modes. ``run_batch-chunked`` (default) is the product end to end: the library's ``run_batch`` flow with
``GeminiStrategy`` and ``ProcessorConfig(chunk_size=100)``, limits from ``ProcessorConfig.rate_limit``.
``run_batch`` is the same with one task run per item (on 2 vCPUs Prefect's per-task-run cost, not the
limiter, caps case b there). ``limiter`` admits one bare task run per item with the
:class:`GlobalRateLimiter` (limit writes compete with task-run event writes); ``limiter-no-tasks`` admits
plain coroutines inside one flow run: the limiter alone. ``naive`` is the baseline the issue warns about:
``rate_limit()`` + ``concurrency()`` around every call.

The clock is the provider's: from the first request it receives to the last response it sends (flow
start-up is not counted); the ratio is achieved/ideal requests per minute. ``--server`` also runs
everything against a real ``prefect server start`` (SQLite; or the URL in ``--api-url``,
e.g. a PostgreSQL-backed server). ``--scale 0.2`` shrinks item counts for a quick look.

    python -m benchmarks.run                   # a, b, c on the ephemeral API
    python -m benchmarks.run --server          # ... and on a real server (what `make bench-limits` runs)
    python -m benchmarks.run --mode run_batch  # one task run per item
    python -m benchmarks.run --cases a --mode naive --scale 0.15
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Environment of a benchmark process: quiet Prefect, no telemetry, a patient ephemeral API start-up.
BENCH_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "ERROR",
    "PREFECT_SERVER_LOGGING_LEVEL": "ERROR",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "BATCHLLM_PROGRESS": "0",
}
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="batchllm-bench-")
for _key, _value in BENCH_ENV.items():
    os.environ.setdefault(_key, _value)

MODEL = "gemini-2.5-flash"


@dataclass(frozen=True)
class Case:
    """One benchmark scenario."""

    key: str
    label: str
    items: int
    workers: int
    latency: float
    rpm: int | None
    tpm: int | None = None
    prompt_chars: int = 40

    def prompt_tokens(self) -> int:
        return max(1, -(-self.prompt_chars // 4))  # the emulator counts ceil(chars / 4)

    def ideal_rpm(self) -> float:
        bounds = [self.workers / self.latency * 60.0]
        if self.rpm is not None:
            bounds.append(float(self.rpm))
        if self.tpm is not None:
            bounds.append(self.tpm / self.prompt_tokens())
        return min(bounds)


CASES = {
    "a": Case("a", "600 RPM, 1,000 items, 200 ms", 1000, 16, 0.2, 600),
    "b": Case("b", "3,000 RPM, 5,000 items, 200 ms", 5000, 32, 0.2, 3000),
    "c": Case("c", "TPM-bound: 60k TPM, 100-token prompts", 1000, 16, 0.2, 3000, 60_000, 400),
}


@dataclass
class Outcome:
    case: Case
    backend: str
    mode: str
    items: int
    seconds: float
    ok: int
    rejected_429: int
    max_window: int
    stats: Any = None

    @property
    def achieved_rpm(self) -> float:
        return self.ok / self.seconds * 60.0 if self.seconds > 0 else 0.0

    @property
    def ratio(self) -> float:
        return self.achieved_rpm / self.case.ideal_rpm()


def _prompt(case: Case, i: int) -> str:
    head = f"item {i}: "
    return head + "x" * max(0, case.prompt_chars - len(head))


def _config(case: Case, prefix: str) -> Any:
    from prefect_batchllm.core.config import RateLimitConfig

    return RateLimitConfig(
        requests_per_minute=case.rpm,
        tokens_per_minute=case.tpm,
        max_in_flight=case.workers,
        limit_prefix=prefix,
    )


async def _drive_limiter(case: Case, items: int, emulator: Any, task_runs: bool = True) -> tuple[int, Any]:
    """One task run per item (or plain coroutines), each attempt run by ``core.attempt.run_attempt`` and
    admitted by the GlobalRateLimiter (no run_batch flow around it)."""
    from prefect import flow, task

    from prefect_batchllm.core.attempt import ItemLedger, run_attempt
    from prefect_batchllm.core.config import ProcessorConfig
    from prefect_batchllm.core.errors import DefaultErrorClassifier
    from prefect_batchllm.core.strategy import LLMCallStrategy
    from prefect_batchllm.models.gemini import usage_from_response
    from prefect_batchllm.prefect.limits import GlobalRateLimiter

    limiter = GlobalRateLimiter(_config(case, f"bench-{uuid.uuid4().hex[:8]}"))
    client = emulator.client()
    config = ProcessorConfig(max_workers=case.workers, rate_limit=limiter.config)
    classifier = DefaultErrorClassifier()

    class Call(LLMCallStrategy[str]):
        def estimate_tokens(self, prompt: Any) -> int:
            return case.prompt_tokens()

        async def execute(self, prompt: Any, attempt: int, timeout: float, state: Any = None) -> Any:
            response = await client.aio.models.generate_content(model=MODEL, contents=prompt)
            return response.text or "", usage_from_response(response)

    strategy = Call()

    async def call(i: int) -> bool:
        ledger = ItemLedger(f"i{i}")
        await run_attempt(
            strategy, _prompt(case, i), 1, ledger, config=config, admission=limiter, classifier=classifier
        )
        return True

    item = task(name="bench-item", persist_result=False, cache_policy=None)(call) if task_runs else call

    @flow(name="bench-limiter", persist_result=False)
    async def bench() -> int:
        await limiter.start()
        gate = asyncio.Semaphore(case.workers)

        async def one(i: int) -> bool:
            async with gate:
                return await item(i)

        return sum(await asyncio.gather(*(one(i) for i in range(items))))

    try:
        ok = await bench()
    finally:
        await limiter.aclose()
        await client.aio.aclose()
    return ok, limiter.stats


async def _drive_naive(case: Case, items: int, emulator: Any) -> tuple[int, Any]:
    """The baseline: one ``rate_limit`` and one ``concurrency`` acquisition per call."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.concurrency.asyncio import concurrency, rate_limit

    prefix = f"naive-{uuid.uuid4().hex[:8]}"
    client = emulator.client()
    async with get_client() as api:
        await api.upsert_global_concurrency_limit_by_name(
            f"{prefix}-rpm", max(1, (case.rpm or 60) // 60), slot_decay_per_second=(case.rpm or 60) / 60
        )
        await api.upsert_global_concurrency_limit_by_name(f"{prefix}-inflight", case.workers)

    @task(name="naive-item", persist_result=False, cache_policy=None)
    async def call(i: int) -> bool:
        await rate_limit(f"{prefix}-rpm", strict=True)
        async with concurrency(f"{prefix}-inflight", strict=True):
            await client.aio.models.generate_content(model=MODEL, contents=_prompt(case, i))
        return True

    @flow(name="bench-naive", persist_result=False)
    async def bench() -> int:
        done = await asyncio.gather(*(call(i) for i in range(items)), return_exceptions=True)
        return sum(1 for d in done if d is True)

    try:
        ok = await bench()
    finally:
        await client.aio.aclose()
    return ok, None


async def _drive_run_batch(
    case: Case, items: int, emulator: Any, chunk_size: int | None = None
) -> tuple[int, Any]:
    """The library's own flow (per-item or chunked task runs), limits from ProcessorConfig.rate_limit."""
    from prefect_batchllm import GeminiModel, GeminiStrategy, ProcessorConfig, run_batch
    from prefect_batchllm.core.items import LLMWorkItem

    client = emulator.client()
    strategy = GeminiStrategy(GeminiModel(MODEL, client))
    limits = _config(case, f"bench-{uuid.uuid4().hex[:8]}")
    config = ProcessorConfig(
        max_workers=case.workers, rate_limit=limits, persist_results=False, chunk_size=chunk_size
    )
    work = [LLMWorkItem(item_id=f"i{i}", strategy=strategy, prompt=_prompt(case, i)) for i in range(items)]
    try:
        result = await run_batch(work, config=config)
    finally:
        await client.aio.aclose()
    return result.succeeded, None


async def _drive_limiter_no_tasks(case: Case, items: int, emulator: Any) -> tuple[int, Any]:
    return await _drive_limiter(case, items, emulator, task_runs=False)


async def _drive_run_batch_chunked(case: Case, items: int, emulator: Any) -> tuple[int, Any]:
    return await _drive_run_batch(case, items, emulator, chunk_size=CHUNK_SIZE)


CHUNK_SIZE = 100

DRIVERS = {
    "limiter": _drive_limiter,
    "limiter-no-tasks": _drive_limiter_no_tasks,
    "naive": _drive_naive,
    "run_batch": _drive_run_batch,
    "run_batch-chunked": _drive_run_batch_chunked,
}


async def run_case(case: Case, mode: str, backend: str, scale: float) -> Outcome:
    from prefect_batchllm.testing import GeminiEmulator

    items = max(10, int(case.items * scale))
    with GeminiEmulator(latency=case.latency, rpm=case.rpm, tpm=case.tpm, quota_window_s=60.0) as emulator:
        ok, stats = await DRIVERS[mode](case, items, emulator)
        return Outcome(
            case,
            backend,
            mode,
            items,
            _busy_seconds(emulator),
            ok,
            emulator.count("generateContent", status=429),
            emulator.max_in_window(60.0),
            stats,
        )


def _busy_seconds(emulator: Any) -> float:
    """First request received to last response sent, as the provider saw it (excludes flow start-up)."""
    calls = emulator.requests_for("generateContent")
    if not calls:
        return 0.0
    return max(r.finished_at for r in calls) - min(r.started_at for r in calls)


def _report(outcome: Outcome) -> str:
    c = outcome.case
    line = (
        f"[{outcome.backend:9s}] ({c.key}) {c.label:38s} mode={outcome.mode:9s} items={outcome.items:5d} "
        f"ideal={c.ideal_rpm():7.0f} rpm achieved={outcome.achieved_rpm:7.0f} rpm "
        f"ratio={outcome.ratio:5.3f} 429s={outcome.rejected_429} ok={outcome.ok} "
        f"max/60s={outcome.max_window}"
    )
    s = outcome.stats
    if s is not None:
        line += (
            f"  | server calls: {s.gcl_reads} reads, {s.gcl_increments} increments "
            f"({s.gcl_denied} denied), {s.gcl_returns} returns, {s.leases_acquired} leases; "
            f"{s.gcl_read_seconds:.1f}s in reads, {s.gcl_seconds:.1f}s in increments, "
            f"slowest {s.gcl_max_seconds * 1000:.0f} ms"
        )
    return line


@contextlib.contextmanager
def _real_server(api_url: str | None) -> Iterator[str]:
    if api_url:
        yield api_url
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _prefect_server import prefect_server  # type: ignore[import-not-found]

    with prefect_server() as url:
        yield url


async def _run_all(cases: list[Case], mode: str, backend: str, scale: float) -> list[Outcome]:
    outcomes = []
    for case in cases:
        outcome = await run_case(case, mode, backend, scale)
        print(_report(outcome), flush=True)
        outcomes.append(outcome)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="a,b,c", help="comma-separated subset of a,b,c")
    parser.add_argument("--mode", choices=sorted(DRIVERS), default="run_batch-chunked")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply item counts (quick runs)")
    parser.add_argument("--server", action="store_true", help="also run against `prefect server start`")
    parser.add_argument("--server-only", action="store_true", help="only the real server")
    parser.add_argument("--api-url", default=None, help="use this server instead of starting one")
    parser.add_argument("--trace", action="store_true", help="log every limit reservation (debug)")
    args = parser.parse_args(argv)
    if args.trace:
        import logging

        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(relativeCreated)8.0f %(message)s"))
        trace = logging.getLogger("prefect_batchllm.limits")
        trace.addHandler(handler)
        trace.setLevel(logging.DEBUG)
    cases = [CASES[key.strip()] for key in args.cases.split(",") if key.strip()]

    outcomes: list[Outcome] = []
    if not args.server_only:
        os.environ.pop("PREFECT_API_URL", None)
        outcomes += asyncio.run(_run_all(cases, args.mode, "ephemeral", args.scale))
    if args.server or args.server_only or args.api_url:
        with _real_server(args.api_url) as url:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: url}):
                backend = "server" if not args.api_url else "api-url"
                outcomes += asyncio.run(_run_all(cases, args.mode, backend, args.scale))
    print()
    for outcome in outcomes:
        verdict = "OK " if outcome.ratio >= 0.9 and outcome.rejected_429 == 0 else "LOW"
        print(
            f"{verdict} {outcome.backend:9s} ({outcome.case.key}) mode={outcome.mode} "
            f"ratio {outcome.ratio:.3f}, 429s {outcome.rejected_429}"
        )
    return 0 if all(o.rejected_429 == 0 for o in outcomes if o.mode != "naive") else 1


if __name__ == "__main__":
    sys.exit(main())
