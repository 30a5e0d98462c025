"""ResultLog benchmark: storage objects per item count, flush cost per item, index load time and memory.

Writes ``--items`` results shaped like real ones (a ~300-character output, token usage, metadata) to a
temp directory, ``--add-items`` of them through the async ``add`` path (client CPU per item, flushes
included) and the rest through the same writer in bulk; then, in a fresh process (so its RSS is the
reader's alone), the first lookup of one chunk's keys (which loads the index) and a second chunk's lookup;
twice: the first load reads every object's header and writes an index snapshot, the second reads that.

    python -m benchmarks.result_log                      # 1M keys
    python -m benchmarks.result_log --items 100000 --add-items 20000
    python -m benchmarks.result_log --kill               # results lost to a SIGKILL at 50/150/600 per s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect_batchllm.core.items import WorkItemResult
from prefect_batchllm.prefect.result_log import ResultLog, encode_record


def vm_rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def result(i: int) -> WorkItemResult[Any, Any]:
    return WorkItemResult(
        item_id=f"row-{i}",
        success=True,
        output=f"Summary of book {i}: " + "lorem ipsum dolor sit amet " * 10,
        token_usage={"input_tokens": 120, "output_tokens": 80, "total_tokens": 200},
        attempts=1,
        duration_s=0.2,
        model="gemini-2.5-flash",
        metadata={"finish_reason": "STOP"},
    )


def key(i: int) -> str:
    return f"{i:064x}"


async def add_path(url: str, count: int) -> dict[str, float]:
    """``count`` results through ``add`` (100 concurrent writers, as in a chunked run) + final ``aclose``."""
    log = ResultLog(url)
    per_writer = count // 100
    cpu0, wall0 = time.process_time(), time.perf_counter()

    async def writer(w: int) -> None:
        for j in range(per_writer):
            i = w * per_writer + j
            await log.add(key(i), result(i))
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(w) for w in range(100)))
    await log.aclose()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    # the same work without the log: building the results and the 100 writers' scheduling
    cpu0 = time.process_time()

    async def bare(w: int) -> None:
        for j in range(per_writer):
            result(w * per_writer + j)
            await asyncio.sleep(0)

    await asyncio.gather(*(bare(w) for w in range(100)))
    base = time.process_time() - cpu0
    n = per_writer * 100
    return {
        "add_items": n,
        "add_objects": log.objects_written,
        "add_cpu_ms_per_item": round(1000 * (cpu - base) / n, 4),
        "add_wall_s": round(wall, 2),
    }


def bulk_write(url: str, start: int, stop: int, flush_items: int) -> int:
    """Results ``[start, stop)`` through the flush writer, ``flush_items`` per object; returns objects."""
    log = ResultLog(url, flush_items=flush_items)
    for lo in range(start, stop, flush_items):
        batch = {key(i): (result(i), 0.0) for i in range(lo, min(stop, lo + flush_items))}
        log._write(batch)
    return log.objects_written


def encode_cost(n: int = 200) -> dict[str, float]:
    """CPU per item of encoding one flush (cloudpickle, as stored) vs plain pickle, for reference."""
    entries = [(key(i), result(i), 0.0) for i in range(n)]
    reps = 20
    t0 = time.process_time()
    for _ in range(reps):
        data = encode_record(entries)
    cloud = (time.process_time() - t0) / (reps * n)
    t0 = time.process_time()
    for _ in range(reps):
        for k, r, _ in entries:
            pickle.dumps((k, r), protocol=5)
    plain = (time.process_time() - t0) / (reps * n)
    return {
        "encode_us_per_item": round(1e6 * cloud, 2),
        "plain_pickle_us_per_item": round(1e6 * plain, 2),
        "bytes_per_item": round(len(data) / n, 1),
    }


def reader(url: str, items: int) -> dict[str, float]:
    """Runs in a fresh process: first lookup (loads the index) and a second chunk's lookup."""
    from prefect_batchllm.prefect import result_log

    rng = random.Random(1)
    rss0 = vm_rss_mb()
    log = ResultLog(url)
    first = [key(rng.randrange(items)) for _ in range(500)]
    t0, c0 = time.perf_counter(), time.process_time()
    found = asyncio.run(log.lookup(first))
    load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    assert len(found) == len(set(first)), (len(found), len(set(first)))
    rss1 = vm_rss_mb()
    second = [key(i) for i in range(items // 2, items // 2 + 500)] + [f"missing-{i}" for i in range(100)]
    t0 = time.perf_counter()
    found = asyncio.run(log.lookup(second))
    chunk_s = time.perf_counter() - t0
    assert len(found) == 500
    t0 = time.perf_counter()
    asyncio.run(ResultLog(url).lookup(second))  # a new instance lists the location again (a Dask chunk)
    relist_s = time.perf_counter() - t0
    (index,) = result_log._INDEXES.values()
    return {
        "index_keys": len(index.hashes) + len(index.delta),
        "index_records": len(index.names),
        "index_load_s": round(load_s, 3),
        "index_load_cpu_s": round(load_cpu, 3),
        "index_array_mb": round(index.nbytes() / 2**20, 1),
        "rss_before_mb": round(rss0, 1),
        "rss_after_load_mb": round(rss1, 1),
        "rss_delta_mb": round(rss1 - rss0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "lookup_500_keys_s": round(chunk_s, 4),
        "new_instance_lookup_500_keys_s": round(relist_s, 4),
    }


def _killed_writer(url: str, rate: float, added: Any) -> None:
    """Adds results at ``rate`` per second with the default flush settings until killed."""

    async def run() -> None:
        log = ResultLog(url)
        i = 0
        start = time.perf_counter()
        while True:
            await log.add(key(i), result(i))
            i += 1
            added.value = i
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))

    asyncio.run(run())


def crash_loss(rates: list[float], trials: int) -> list[dict[str, float]]:
    """SIGKILL a writer at a random moment; count the results it had added that are not stored."""
    import multiprocessing
    import signal

    out = []
    ctx = multiprocessing.get_context("spawn")
    for rate in rates:
        lost = []
        for trial in range(trials):
            tmp = tempfile.mkdtemp(prefix="batchllm-bench-kill-")
            try:
                url = f"file://{tmp}"
                added = ctx.Value("i", 0)
                child = ctx.Process(target=_killed_writer, args=(url, rate, added))
                child.start()
                while added.value == 0:
                    time.sleep(0.01)
                time.sleep(2.0 + random.Random(trial).random() * 2.0)
                assert child.pid is not None
                os.kill(child.pid, signal.SIGKILL)
                child.join()
                count = added.value
                found = asyncio.run(ResultLog(url).lookup([key(i) for i in range(count)]))
                lost.append(count - len(found))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        out.append(
            {"rate_per_s": rate, "trials": trials, "max_lost": max(lost), "mean_lost": sum(lost) / trials}
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--add-items", type=int, default=50_000, help="of them through the async add path")
    parser.add_argument("--flush-items", type=int, default=200)
    parser.add_argument("--kill", action="store_true", help="measure results lost to a SIGKILL instead")
    parser.add_argument("--reader", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader:
        print(json.dumps(reader(args.reader, args.items)))
        return
    if args.kill:
        print(json.dumps(crash_loss([50.0, 150.0, 600.0], trials=5), indent=2))
        return

    tmp = tempfile.mkdtemp(prefix="batchllm-bench-result-log-")
    url = f"file://{tmp}"
    try:
        out: dict[str, Any] = {"items": args.items, "flush_items": args.flush_items}
        out.update(encode_cost(args.flush_items))
        out.update(asyncio.run(add_path(url, min(args.add_items, args.items))))
        t0 = time.perf_counter()
        objects = out["add_objects"] + bulk_write(url, out["add_items"], args.items, args.flush_items)
        out["bulk_write_s"] = round(time.perf_counter() - t0, 1)
        out["objects"] = objects
        out["objects_per_5k_items"] = round(objects * 5000 / args.items, 1)
        out["bytes_on_disk_mb"] = round(sum(f.stat().st_size for f in Path(tmp).rglob("*")) / 2**20, 1)
        for run in ("first_load", "snapshot_load"):  # the first load writes the index snapshot
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.result_log", "--items", str(args.items), "--reader", url],
                capture_output=True,
                text=True,
                check=True,
            )
            out[run] = json.loads(proc.stdout.strip().splitlines()[-1])
        out["python"] = sys.version.split()[0]
        out["cpus"] = os.cpu_count()
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
