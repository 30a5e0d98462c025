"""Chaos soak: a table through the deployable ``enrich_table`` flow under random faults and SIGKILLs.

The flow runs in its own process (``python -m flows.enrich_table``, chunked) against a real
``prefect server start`` and the bundled Gemini-compatible server, which injects random faults (503, 500,
429 with ``RetryInfo``, hangs past the item timeout, invalid JSON, safety blocks) and is itself stopped for
a few seconds at random times. The flow process is SIGKILLed at random points ``kills`` times, each kill
followed by a fresh run, then runs continue until every row has succeeded. Reported, from the output table
and the server's request log:

* rows lost and duplicated in the output (both must be 0);
* finished rows re-requested after a kill (a row the server answered successfully in a killed run and that
  a later run requested again): bounded per kill by the rows in flight when the process died
  (``max_workers``) plus the rows the server finished in the last result-log flush interval before the kill
  (``FLUSH_WINDOW_S``: the log's 1 s interval plus slack for a loaded event loop), since successes are
  persisted in per-chunk records flushed at least every second;
* requests per fault kind, server outages;
* the tokens the last run's table reports vs the server's usage for that run's requests.

    make soak                                    # 5,000 rows, 10 kills
    python -m benchmarks.soak --rows 300 --kills 3 --seed 7
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "soak-model"
SCHEMA = {"genre": "str", "pages": "int"}


@dataclass
class SoakReport:
    """What the soak measured (see the module docstring)."""

    rows: int
    kills: int
    runs: int
    lost: int
    duplicated: int
    failed_at_end: int
    re_requested_after_kill: int
    re_request_bound: int
    requests_by_fault: dict[str, int] = field(default_factory=dict)
    outages: int = 0
    last_run_table_tokens: dict[str, int] = field(default_factory=dict)
    last_run_server_tokens: dict[str, int] = field(default_factory=dict)
    server_tokens_all_runs: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.failed_at_end == 0
            and self.re_requested_after_kill <= self.re_request_bound
        )


def _install_faults(emu: Any, timeout_s: float) -> None:
    from prefect_batchllm.testing import Fault

    for fault, rate in (
        (Fault.status(503), 0.02),
        (Fault.status(500), 0.01),
        (Fault.rate_limit(0.5), 0.02),
        (Fault.hang(timeout_s + 2.0), 0.005),
        (Fault.invalid_json(), 0.02),
        (Fault.safety_block(), 0.005),
    ):
        emu.faults.add(fault, rate=rate, times=None)


class _Outages:
    """Stops the emulator for ``down`` seconds at random intervals (same port) until stopped."""

    def __init__(self, emu: Any, rng: random.Random, every: tuple[float, float], down: tuple[float, float]):
        self.emu, self.rng, self.every, self.down = emu, rng, every, down
        self.count = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-outages", daemon=True)

    def __enter__(self) -> _Outages:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._done.wait(self.rng.uniform(*self.every)):
            self.emu.stop()
            self.count += 1
            self._done.wait(self.rng.uniform(*self.down))
            self.emu.start()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


#: Rows finished this long before a kill may still be in the result log's buffer: its flush interval (1 s)
#: plus 2 s for a flush delayed by a busy event loop or disk.
FLUSH_WINDOW_S = 3.0


def _finished(record: Any) -> bool:
    """A generate request the server answered with a usable answer (the row succeeded there)."""
    return record.status == 200 and record.fault in (None, "delay")


def _kind(record: Any) -> str:
    """A request's label: its fault kind (``http-503`` for status faults), ``ok`` or ``http-<code>``."""
    if record.fault == "status":
        return f"http-{record.status}"
    if record.fault:
        return str(record.fault)
    return "ok" if record.status == 200 else f"http-{record.status or 'dropped'}"


def run_soak(
    *,
    rows: int = 5000,
    kills: int = 10,
    seed: int = 0,
    api_url: str | None = None,
    workdir: str | None = None,
    max_workers: int = 16,
    chunk_size: int = 100,
    timeout_s: float = 3.0,
    outage_every: tuple[float, float] = (8.0, 25.0),
    outage_down: tuple[float, float] = (1.0, 3.0),
    max_extra_runs: int = 10,
    log: Callable[[str], None] = print,
) -> SoakReport:
    """Run the soak and return its report (the caller decides what to assert)."""
    import pandas as pd
    from pydantic import SecretStr

    sys.path.insert(0, str(ROOT / "tests"))
    from _prefect_server import connected, prefect_env, prefect_server  # type: ignore[import-not-found]

    from prefect_batchllm.prefect.blocks import GeminiCachedModelBlock, GeminiCredentials
    from prefect_batchllm.tables import read_table, write_table
    from prefect_batchllm.testing import GeminiEmulator

    rng = random.Random(seed)
    work = Path(workdir or tempfile.mkdtemp(prefix="batchllm-soak-"))
    ids = [f"book-{i}" for i in range(rows)]
    table = pd.DataFrame({"book_id": ids, "title": [f"Title {i}" for i in range(rows)]})
    input_path, output_path = work / "books.parquet", work / "out" / "books_enriched.parquet"
    write_table(table, input_path)
    template = f"[{{book_id}}] (soak {seed} {rng.getrandbits(32):08x}) Catalogue {{title}}."
    started = time.monotonic()

    @contextlib.contextmanager
    def server() -> Iterator[str]:
        if api_url:
            yield api_url
        else:
            with prefect_server() as url:
                yield url

    with server() as url, connected(url), GeminiEmulator(latency=(0.01, 0.06), seed=seed) as emu:
        GeminiCachedModelBlock(
            model="gemini-2.5-flash",
            credentials=GeminiCredentials(
                api_key=SecretStr("soak-key"), base_url=emu.base_url, api_version="v1beta"
            ),
            system_instruction="You catalogue books. Answer with JSON only.",
        ).save(BLOCK, overwrite=True)
        _install_faults(emu, timeout_s)
        env = prefect_env(url)
        args = [sys.executable, "-m", "flows.enrich_table", str(input_path), str(output_path)]
        args += ["--template", template, "--model-block", BLOCK, "--id-column", "book_id"]
        args += ["--output-schema", json.dumps(SCHEMA), "--max-workers", str(max_workers)]
        args += ["--max-attempts", "4", "--chunk-size", str(chunk_size), "--no-fail"]
        args += ["--timeout-per-item", str(timeout_s)]

        runs: list[tuple[float, float, bool]] = []  # (start, end, killed)
        done_kills = 0
        with _Outages(emu, rng, outage_every, outage_down) as outages:
            while True:
                finished_rows = {r.prompt_text.split("]")[0][1:] for r in emu.requests if _finished(r)}
                remaining = max(1, rows - len(finished_rows))
                kill_now = done_kills < kills
                target = len([r for r in emu.requests if r.endpoint == "generateContent"])
                target += max(3, int(remaining * rng.uniform(0.05, 0.3)))
                run_log = work / f"run-{len(runs) + 1}.log"
                begin = time.monotonic()
                with open(run_log, "wb") as out:
                    proc = subprocess.Popen(
                        args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                killed = False
                try:
                    while proc.poll() is None:
                        if kill_now and emu.count("generateContent") >= target:
                            _kill_group(proc)
                            killed = True
                            break
                        time.sleep(0.05)
                finally:
                    if proc.poll() is None:
                        _kill_group(proc)
                runs.append((begin, time.monotonic(), killed))
                if killed:
                    done_kills += 1
                    log(
                        f"run {len(runs)}: SIGKILL {done_kills}/{kills} after {time.monotonic() - begin:.1f}s"
                    )
                    continue
                if proc.returncode != 0:
                    tail = run_log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"run {len(runs)} exited {proc.returncode}:\n{tail}")
                out_frame = read_table(output_path)
                failed = int((~out_frame["success"]).sum())
                log(f"run {len(runs)}: completed, {failed} failed rows, {time.monotonic() - begin:.1f}s")
                if done_kills >= kills and failed == 0:
                    break
                if len(runs) > kills + max_extra_runs:
                    break
        requests = emu.requests

    out_frame = read_table(output_path)
    out_ids = out_frame["book_id"].tolist()
    lost = len(set(ids) - set(out_ids))
    duplicated = len(out_ids) - len(set(out_ids))

    def row_of(record: Any) -> str:
        return str(record.prompt_text.split("]")[0][1:])

    generate = [r for r in requests if r.endpoint == "generateContent"]
    re_requested: set[str] = set()
    re_request_bound = 0
    for begin, end, killed in runs:
        if not killed:
            continue
        finished = [r for r in generate if _finished(r) and begin <= r.started_at and r.finished_at <= end]
        done = {row_of(r) for r in finished}
        later = {row_of(r) for r in generate if r.started_at > end}
        re_requested |= done & later
        unflushed = {row_of(r) for r in finished if r.finished_at > end - FLUSH_WINDOW_S}
        re_request_bound += max_workers + len(unflushed)
    kinds = collections.Counter(_kind(r) for r in generate)

    last_begin, last_end, _ = runs[-1]
    server_last = {"input_tokens": 0, "output_tokens": 0}
    for r in generate:
        if r.usage and r.fault != "hang" and last_begin <= r.started_at and r.finished_at <= last_end:
            server_last["input_tokens"] += int(r.usage.get("promptTokenCount", 0))
            server_last["output_tokens"] += int(r.usage.get("candidatesTokenCount", 0))
    all_runs = {"input_tokens": 0, "output_tokens": 0}
    for r in generate:
        if r.usage:
            all_runs["input_tokens"] += int(r.usage.get("promptTokenCount", 0))
            all_runs["output_tokens"] += int(r.usage.get("candidatesTokenCount", 0))
    return SoakReport(
        rows=rows,
        kills=sum(1 for *_, killed in runs if killed),
        runs=len(runs),
        lost=lost,
        duplicated=duplicated,
        failed_at_end=int((~out_frame["success"]).sum()),
        re_requested_after_kill=len(re_requested),
        re_request_bound=re_request_bound,
        requests_by_fault=dict(sorted(kinds.items())),
        outages=outages.count,
        last_run_table_tokens={
            "input_tokens": int(out_frame["input_tokens"].sum()),
            "output_tokens": int(out_frame["output_tokens"].sum()),
        },
        last_run_server_tokens=server_last,
        server_tokens_all_runs=all_runs,
        wall_s=round(time.monotonic() - started, 1),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-workers", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--api-url", default=None, help="use this Prefect server instead of starting one")
    args = parser.parse_args(argv)
    home = tempfile.mkdtemp(prefix="batchllm-soak-home-")
    os.environ.setdefault("PREFECT_HOME", home)
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", os.path.join(os.environ["PREFECT_HOME"], "storage"))
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }.items():
        os.environ.setdefault(key, value)
    report = run_soak(
        rows=args.rows,
        kills=args.kills,
        seed=args.seed,
        api_url=args.api_url,
        max_workers=args.max_workers,
        chunk_size=args.chunk_size,
    )
    print(json.dumps(asdict(report), indent=2))
    print("OK" if report.ok() else "FAILED: rows lost/duplicated/failed or re-requests above the bound")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
