"""Dask row: chunked ``run_batch`` in one process vs. on a local Dask cluster of 2 worker processes.

The case where a cluster should help: no quota, low latency, and a client-side CPU cost per item (a
``response_parser`` that burns ``--parse-ms`` of pure-Python CPU, standing in for a slow parser or
post-processing), so the flow's process, not the provider, is the bottleneck. Both runs use the real SDK
against the bundled Gemini-compatible server (in this process) and a real ``prefect server start``. The
clock is the provider's (first request received to last response sent), as in ``benchmarks.run``. A second
pass with a quota checks zero 429s with 2 workers sharing it.

    python -m benchmarks.dask_scaling                     # 3,000 items, 4 ms of parsing per item
    python -m benchmarks.dask_scaling --items 1000 --parse-ms 2

Target (issue 10): >= 1.6x the single-process throughput on 2 workers. On a 2-core machine that also runs
the Prefect server, the emulator and the driver, expect less: the row reports what this machine does.
Measured 2026-11-30 on the shared 2-core machine at load average 12.5 (other jobs running): 43.5 items/s in
one process, 25.0 items/s on 2 Dask workers (0.57x); with a 1,200 rpm quota, 600/600 ok and zero 429s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from typing import Any

from benchmarks.run import _busy_seconds, _real_server

MODEL = "gemini-2.5-flash"


def burn(ms: float) -> None:
    """Pure-Python CPU work for ``ms`` milliseconds (holds the GIL, like real parsing does)."""
    end = time.thread_time() + ms / 1000.0
    x = 0
    while time.thread_time() < end:
        x += 1


class SlowParser:
    """A response parser that costs ``ms`` of CPU per answer (module level: workers import it)."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def __call__(self, response: Any) -> str:
        burn(self.ms)
        return str(response.text)


async def one_run(base_url: str, items: int, parse_ms: float, runner: Any, rpm: int | None) -> dict[str, Any]:
    from google import genai
    from google.genai import types

    from prefect_batchllm import GeminiModel, GeminiStrategy, LLMWorkItem, ProcessorConfig, run_batch
    from prefect_batchllm.core.config import RateLimitConfig

    client = genai.Client(
        api_key="bench", http_options=types.HttpOptions(base_url=base_url, api_version="v1beta")
    )
    strategy = GeminiStrategy(GeminiModel(MODEL, client), SlowParser(parse_ms))
    tag = uuid.uuid4().hex[:6]
    work = [LLMWorkItem(f"i{i}", strategy, f"[{tag}] item {i}") for i in range(items)]
    limits = RateLimitConfig(requests_per_minute=rpm, limit_prefix=f"bench-dask-{tag}") if rpm else None
    config = ProcessorConfig(
        max_workers=32, chunk_size=200, persist_results=False, **({"rate_limit": limits} if limits else {})
    )
    flow = run_batch if runner is None else run_batch.with_options(task_runner=runner)
    try:
        result = await flow(work, config)
    finally:
        await client.aio.aclose()
    return {"ok": result.succeeded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dask_scaling", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--parse-ms", type=float, default=4.0)
    parser.add_argument("--latency", type=float, default=0.01)
    parser.add_argument("--quota-rpm", type=int, default=3000, help="the quota pass (0: skip it)")
    args = parser.parse_args(argv)

    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    from prefect_batchllm.testing import GeminiEmulator

    rows = []
    with _real_server(None) as url, temporary_settings({PREFECT_API_URL: url}):
        with LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster:
            for label, runner in (
                ("1 process, chunked", None),
                ("Dask, 2 workers", DaskTaskRunner(address=cluster.scheduler_address)),
            ):
                with GeminiEmulator(latency=args.latency) as emulator:
                    out = asyncio.run(one_run(emulator.base_url, args.items, args.parse_ms, runner, None))
                    seconds = _busy_seconds(emulator)
                rows.append((label, out["ok"], seconds, out["ok"] / seconds if seconds else 0.0))
                print(f"{label:20s} ok={out['ok']} {seconds:6.1f}s {rows[-1][3]:7.1f} items/s", flush=True)
            if args.quota_rpm:
                rpm, window = args.quota_rpm, 60.0
                with GeminiEmulator(latency=args.latency, rpm=rpm, quota_window_s=window) as emulator:
                    runner = DaskTaskRunner(address=cluster.scheduler_address)
                    n = min(args.items, rpm // 2)
                    out = asyncio.run(one_run(emulator.base_url, n, args.parse_ms, runner, rpm))
                    rejected = emulator.count("generateContent", status=429)
                    print(
                        f"Dask, 2 workers, quota {rpm} rpm: ok={out['ok']}/{n} 429s={rejected} "
                        f"max/60s={emulator.max_in_window(window)}",
                        flush=True,
                    )
    speedup = rows[1][3] / rows[0][3] if rows[0][3] else 0.0
    print(f"\nDask speed-up on {os.cpu_count()} cores: {speedup:.2f}x (target 1.6x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
