"""Streaming ``enrich_table_file`` at scale: peak RSS and throughput of the flow's process by table size.

The parent writes a generated Parquet table (one row group, as pandas writes it: the run re-stages it into
chunk-sized row groups), runs the bundled Gemini-compatible server, and starts the flow in a child process
with a fresh ``PREFECT_HOME`` (ephemeral API); the child reports its own peak RSS (``ru_maxrss``: the flow's
process, not the API server it starts) and CPU. The clock is the provider's (first request to last response).

    python -m benchmarks.streaming --rows 100000            # one size
    python -m benchmarks.streaming --rows 10000 100000      # side by side
    python -m benchmarks.streaming --rows 1000000 --direct  # no provider: the pipeline's own memory/CPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def _instant(prompt: str, attempt: int, timeout: float) -> tuple[str, dict[str, int]]:
    """``--direct``: an answer with no provider call (the streaming machinery and result log alone)."""
    return f"echo {prompt[:40]}", {"input_tokens": 10, "output_tokens": 5}


def _child(source: str, output: str, base_url: str, chunk: int, workers: int) -> None:
    from google import genai
    from google.genai import types

    from prefect_batchllm import ProcessorConfig
    from prefect_batchllm.core.strategy import LLMCallStrategy
    from prefect_batchllm.models.gemini import GeminiModel
    from prefect_batchllm.strategies.direct import DirectCallStrategy
    from prefect_batchllm.strategies.gemini import GeminiStrategy
    from prefect_batchllm.streaming import enrich_table_file

    strategy: LLMCallStrategy[object]
    if base_url == "direct":
        strategy = DirectCallStrategy(_instant, model_name="gemini-2.5-flash")
    else:
        options = types.HttpOptions(base_url=base_url, api_version="v1beta", retry_options=None)
        client = genai.Client(vertexai=False, api_key="bench-key", http_options=options)
        strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", client))
    config = ProcessorConfig(
        max_workers=workers, chunk_size=chunk, fail_on_item_failure=False, progress_interval=max(1, chunk)
    )
    start = time.process_time()
    result = enrich_table_file(
        source, output, "[{rid}] Summarize {title} by {author}.", strategy, "rid", config
    )
    cpu = time.process_time() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"rows": result.total_items, "failed": result.failed, "cpu_s": cpu, "peak_rss_mb": peak_mb}
        )
    )


def run(rows: int, *, chunk: int, workers: int, latency: float, direct: bool = False) -> dict[str, float]:
    import pandas as pd

    sys.path.insert(0, str(ROOT / "tests"))
    from _prefect_server import prefect_env  # type: ignore[import-not-found]

    from prefect_batchllm.testing import GeminiEmulator

    work = Path(tempfile.mkdtemp(prefix="batchllm-stream-bench-"))
    source, output = work / "in.parquet", work / "out" / "out.parquet"
    pd.DataFrame(
        {
            "rid": [f"r{i:08d}" for i in range(rows)],
            "title": [f"Title number {i}" for i in range(rows)],
            "author": [f"Author {i % 977}" for i in range(rows)],
            "blurb": ["x" * 200] * rows,  # some width, as real tables have
        }
    ).to_parquet(source)
    with GeminiEmulator(latency=latency) as emu:
        env = prefect_env("", work / "home")
        env.pop("PREFECT_API_URL")  # the child's own ephemeral API
        args = [
            sys.executable,
            "-m",
            "benchmarks.streaming",
            "--child",
            str(source),
            str(output),
            "direct" if direct else emu.base_url,  # "direct": answered in-process, no request
        ]
        args += [str(chunk), str(workers)]
        started = time.monotonic()
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-4000:])
        report = json.loads(done.stdout.strip().splitlines()[-1])
        generate = [r for r in emu.requests if r.endpoint == "generateContent"]
        if generate:
            wall = max(r.finished_at for r in generate) - min(r.started_at for r in generate)
        else:  # --direct: the child's whole life (start-up included)
            wall = time.monotonic() - started
    storage = (
        sum(1 for _ in (work / "home" / "storage").rglob("*") if _.is_file())
        if (work / "home").exists()
        else 0
    )
    report.update(
        {
            "items_per_s": round(rows / wall, 1),
            "cpu_ms_per_item": round(1000 * report["cpu_s"] / rows, 2),
            "storage_objects": storage,
            "output_mb": round(output.stat().st_size / 2**20, 1),
        }
    )
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.streaming", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.005)
    parser.add_argument("--direct", action="store_true", help="no provider: instant answers, same pipeline")
    args = parser.parse_args(argv)
    header = ("rows", "items/s", "cpu ms/item", "peak RSS MB", "objects", "output MB")
    print(" ".join(f"{h:>12}" for h in header))
    for rows in args.rows:
        r = run(rows, chunk=args.chunk, workers=args.workers, latency=args.latency, direct=args.direct)
        print(
            f"{rows:>12,} {r['items_per_s']:>12} {r['cpu_ms_per_item']:>12} {r['peak_rss_mb']:>12.0f} "
            f"{r['storage_objects']:>12} {r['output_mb']:>12}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
