"""Side by side, in one run: what each way of running a batch costs against the bare SDK (``make bench``).

Every contender runs in its own subprocess with a fresh ``PREFECT_HOME``, one after another, against ONE
bundled Gemini-compatible server (:class:`~prefect_batchllm.testing.GeminiEmulator`) that runs in its own
process, so its CPU is never counted as the client's:

=================  ========================================================================================
``floor``          plain ``asyncio.gather`` + semaphore over the google-genai SDK (plain string, no config)
``async-batch-llm``  async-batch-llm's ``ParallelBatchProcessor`` (from PyPI: ``make bench-install``)
``per-item``       ``run_batch``, one task run per item (``--per-item-items``, default 2,000)
``chunked``        ``run_batch``, ``ProcessorConfig(max_workers=W, chunk_size=500)``, persisted results on
``streaming``      ``prefect_batchllm.enrich_table_file`` over a generated Parquet table (``--rows``)
``dask``           ``chunked`` on a Dask ``LocalCluster`` of 2 worker processes (prefect-dask)
=================  ========================================================================================

What is measured (a contender that cannot run prints why and is skipped):

* **clock**: first request received to last response sent, at the server (flow start-up not counted);
  items/s = succeeded items / clock; ``x floor`` is the ratio to the floor's items/s in the same run.
* **client CPU**: the contender's process (all its threads) plus the children it reaped (Dask workers),
  from just before the run to just after it, per item.
* **API-server CPU**: the ephemeral Prefect API server (a child process of the contender, found by its
  command line). It is started (and its ~8 s start-up measured apart) before the run.
* **peak RSS**: the client's high-water mark (with any child it reaped during the run) plus the API server's
  (``VmHWM``).
* **storage objects**: files written under ``PREFECT_HOME/storage`` (the default result location).
* **API calls** / **events**: HTTP requests the contender's Prefect client sent during the run and
  Prefect events it emitted (counted in the client; Dask workers' own calls are not seen).

Sizes: ``--items`` (default 10,000), ``--workers`` (100 concurrent), ``--latency`` (0.2 s); ``--rows`` for
the streaming row (default: ``--items``). The machine is shared: each row carries the 1-minute load average
at its end.

    make bench                                        # all contenders, 10k items, 200 ms
    make bench BENCH_ARGS="--items 100000"
    make bench BENCH_ARGS="--only streaming --rows 1000000 --latency 0.005"
    python -m benchmarks.bench --only floor,chunked --items 2000
    python -m benchmarks.bench --only floor,chunked@/work/main,chunked   # before/after: name@CHECKOUT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONTENDERS = ("floor", "async-batch-llm", "per-item", "chunked", "streaming", "dask")
CHUNK_SIZE = 500
PER_ITEM_DEFAULT = 2000
_SERVER_MARK = "prefect.server.api.server:create_app"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CLK = os.sysconf("SC_CLK_TCK")


def _prompt(i: int) -> str:
    head = f"item {i}: "
    return head + "x" * max(0, 40 - len(head))  # ~10 tokens, like benchmarks.run's default case


# ---------------------------------------------------------------------------------------------------------
# /proc readers (Linux): CPU seconds, peak RSS, children


def _proc_stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from "state" on


def proc_cpu_s(pid: int, *, reaped_children: bool = True) -> float:
    """User + system CPU seconds of ``pid`` (and of the children it has waited for)."""
    try:
        f = _proc_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if reaped_children else 0)
    return ticks / _CLK


def proc_hwm_mb(pid: int) -> float:
    """Peak resident set size of ``pid`` in MB (``VmHWM``), 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def proc_descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren, ...)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                with contextlib.suppress(FileNotFoundError):
                    for child in (task / "children").read_text().split():
                        out.append(int(child))
                        todo.append(int(child))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _split_server(pid: int) -> tuple[list[int], list[int]]:
    """Descendants of ``pid``: (the API server and its children, everything else)."""
    descendants = proc_descendants(pid)
    servers = [p for p in descendants if _SERVER_MARK in _cmdline(p)]
    server_tree = set(servers)
    for s in servers:
        server_tree.update(proc_descendants(s))
    return sorted(server_tree), [p for p in descendants if p not in server_tree]


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root)) if root.exists() else 0


# ---------------------------------------------------------------------------------------------------------
# The server process: one GeminiEmulator, driven over stdin/stdout (reset / stats / quit)


class _Tally(list):  # type: ignore[type-arg]
    """Stands in for the emulator's request log: keeps the clock and counts, not a record per request,
    so a million-request run does not hold a million request bodies in the server process."""

    def __init__(self) -> None:
        super().__init__()
        self.clear()

    def append(self, record: Any) -> None:
        if record.endpoint != "generateContent":
            return
        self.statuses[record.status] += 1
        self.first = min(self.first, record.started_at)
        self.last = max(self.last, record.finished_at)

    def clear(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.first = float("inf")
        self.last = 0.0

    def stats(self) -> dict[str, Any]:
        n = sum(self.statuses.values())
        return {
            "requests": n,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "clock_s": (self.last - self.first) if n else 0.0,
        }


def serve_emulator(latency: float) -> int:
    from prefect_batchllm.testing import GeminiEmulator

    emulator = GeminiEmulator(latency=latency)
    tally = _Tally()
    emulator._log = tally  # benchmark-only: aggregate instead of recording every request
    with emulator:
        print(f"URL {emulator.base_url}", flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "reset":
                with emulator._lock:
                    tally.clear()
                print("OK", flush=True)
            elif command == "stats":
                with emulator._lock:
                    print(json.dumps(tally.stats()), flush=True)
            elif command == "quit":
                break
    return 0


class EmulatorProcess:
    """The parent's handle on the server process."""

    def __init__(self, latency: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench", "--serve-emulator", "--latency", str(latency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        line = self._read()
        if not line.startswith("URL "):
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.base_url = line.split(" ", 1)[1]

    def _read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def reset(self) -> None:
        self._ask("reset")

    def stats(self) -> dict[str, Any]:
        return json.loads(self._ask("stats"))

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ask("quit")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------------------
# Inside a contender's process


class ClientFactory:
    """A picklable zero-argument factory of ``genai.Client``s for the server (Dask workers rebuild it)."""

    def __init__(self, base_url: str, keepalive: int | None = None) -> None:
        self.base_url = base_url
        self.keepalive = keepalive

    def __call__(self) -> Any:
        from google import genai
        from google.genai import types

        extra: dict[str, Any] = {}
        if self.keepalive:  # right-size httpx's pool (default: 100 connections, 20 kept alive)
            import httpx

            limits = httpx.Limits(
                max_connections=max(100, self.keepalive), max_keepalive_connections=self.keepalive
            )
            extra["async_client_args"] = {"limits": limits}
        options = types.HttpOptions(base_url=self.base_url, api_version="v1beta", retry_options=None, **extra)
        return genai.Client(vertexai=False, api_key="bench-key", http_options=options)


class _ApiCounter:
    """Counts the HTTP requests Prefect's clients send and the events they emit (by route / name)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.on = False

    def install(self) -> None:
        from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient
        from prefect.events.clients import EventsClient

        counter = self
        async_send, sync_send, emit = (
            PrefectHttpxAsyncClient.send,
            PrefectHttpxSyncClient.send,
            EventsClient.emit,
        )

        def route(request: Any) -> str:
            return f"{request.method} {_UUID.sub('{id}', request.url.path)}"

        async def counted_async(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            if counter.on:
                counter.calls[route(request)] += 1
            return await async_send(self, request, *args, **kwargs)

        def counted_sync(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            if counter.on:
                counter.calls[route(request)] += 1
            return sync_send(self, request, *args, **kwargs)

        async def counted_emit(self: Any, event: Any) -> None:
            if counter.on:
                counter.events[event.event] += 1
            return await emit(self, event)

        PrefectHttpxAsyncClient.send = counted_async  # type: ignore[method-assign]
        PrefectHttpxSyncClient.send = counted_sync  # type: ignore[method-assign]
        EventsClient.emit = counted_emit  # type: ignore[method-assign]


@dataclass
class Measured:
    """What one contender's process reports back."""

    name: str
    items: int = 0
    succeeded: int = 0
    skipped: str | None = None
    error: str | None = None
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    server_startup_cpu_s: float = 0.0
    client_rss_mb: float = 0.0
    server_rss_mb: float = 0.0
    storage_objects: int = 0
    api_calls: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


class _Skip(Exception):
    """The contender cannot run here (missing package or entry point): say why, run the others."""


def _cpu_now(me: int) -> tuple[float, float]:
    """(client CPU s incl. reaped children and live non-server descendants, API-server CPU s)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    servers, others = _split_server(me)
    client = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    client += sum(proc_cpu_s(p, reaped_children=False) for p in others)
    return client, sum(proc_cpu_s(p, reaped_children=False) for p in servers)


async def _start_api() -> None:
    """Start the ephemeral API server now (its start-up is measured apart from the run)."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        await client.hello()


def _items(args: argparse.Namespace, n: int) -> list[Any]:
    from prefect_batchllm import GeminiModel, GeminiStrategy, LLMWorkItem

    strategy = GeminiStrategy(GeminiModel(args.model, ClientFactory(args.base_url, args.keepalive)))
    return [LLMWorkItem(item_id=f"i{i:07d}", strategy=strategy, prompt=_prompt(i)) for i in range(n)]


async def _run_floor(args: argparse.Namespace, n: int, out: Measured) -> Any:
    client = ClientFactory(args.base_url, args.keepalive)()
    prompts = [_prompt(i) for i in range(n)]

    async def run() -> int:
        gate = asyncio.Semaphore(args.workers)

        async def one(prompt: str) -> bool:
            async with gate:
                response = await client.aio.models.generate_content(model=args.model, contents=prompt)
                return bool(response.text)

        done = await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
        return sum(1 for d in done if d is True)

    return run


async def _run_abl(args: argparse.Namespace, n: int, out: Measured) -> Any:
    try:
        import async_batch_llm as abl
    except ImportError as exc:
        raise _Skip(f"async-batch-llm is not installed ({exc}): run `make bench-install`") from None
    out.notes.append(f"async-batch-llm {getattr(abl, '__version__', '?')}")
    client = ClientFactory(args.base_url, args.keepalive)()
    strategy = abl.GeminiStrategy(abl.GeminiModel(args.model, client))
    prompts = [(f"i{i:07d}", _prompt(i)) for i in range(n)]

    async def run() -> int:
        processor = abl.ParallelBatchProcessor(config=abl.ProcessorConfig(max_workers=args.workers))
        async with processor:
            for item_id, prompt in prompts:
                await processor.add_work(abl.LLMWorkItem(item_id=item_id, strategy=strategy, prompt=prompt))
            result = await processor.process_all()
        return int(result.succeeded)

    return run


def _run_batch_driver(flow: Any, items: list[Any], config: Any) -> Any:
    async def run() -> int:
        result = await flow(items, config)
        return int(result.succeeded)

    return run


async def _run_per_item(args: argparse.Namespace, n: int, out: Measured) -> Any:
    from prefect_batchllm import ProcessorConfig, run_batch

    return _run_batch_driver(run_batch, _items(args, n), ProcessorConfig(max_workers=args.workers))


async def _run_chunked(args: argparse.Namespace, n: int, out: Measured) -> Any:
    from prefect_batchllm import ProcessorConfig, run_batch

    config = ProcessorConfig(max_workers=args.workers, chunk_size=args.chunk_size, persist_results=True)
    return _run_batch_driver(run_batch, _items(args, n), config)


async def _run_dask(args: argparse.Namespace, n: int, out: Measured) -> Any:
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise _Skip(f"prefect-dask is not importable ({exc}): run `make bench-install`") from None
    from prefect_batchllm import ProcessorConfig, run_batch

    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "processes": True, "threads_per_worker": 1})
    config = ProcessorConfig(max_workers=args.workers, chunk_size=args.chunk_size, persist_results=True)
    return _run_batch_driver(run_batch.with_options(task_runner=runner), _items(args, n), config)


def write_parquet_table(path: Path, rows: int, batch_rows: int = 100_000) -> None:
    """A ``rows``-row Parquet table (``id``, ``title``, ``author``) written in bounded batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("author", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, batch_rows):
            stop = min(rows, start + batch_rows)
            ids = [f"row-{i:07d}" for i in range(start, stop)]
            titles = [f"Book {i}" for i in range(start, stop)]
            authors = [f"Author {i % 997}" for i in range(start, stop)]
            writer.write_table(pa.table([ids, titles, authors], schema=schema), row_group_size=50_000)


def _count_output(path: Path) -> tuple[int, int]:
    """(rows, succeeded rows) of a Parquet output file or dataset directory."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(path), format="parquet")
    rows = dataset.count_rows()
    names = dataset.schema.names
    ok = dataset.count_rows(filter=ds.field("success")) if "success" in names else rows
    return rows, ok


async def _run_streaming(args: argparse.Namespace, n: int, out: Measured) -> Any:
    try:
        from prefect_batchllm import enrich_table_file
    except ImportError as exc:
        try:  # not exported at the top yet: its module
            from prefect_batchllm.streaming import enrich_table_file  # type: ignore[import-not-found,no-redef]
        except ImportError:
            raise _Skip(f"prefect_batchllm.enrich_table_file is not importable ({exc})") from None
    from prefect_batchllm import GeminiModel, GeminiStrategy, ProcessorConfig

    work = Path(os.environ["PREFECT_HOME"]).parent / "table"
    work.mkdir(exist_ok=True)
    source, target = work / "input.parquet", work / "output.parquet"
    write_parquet_table(source, n)
    strategy = GeminiStrategy(GeminiModel(args.model, ClientFactory(args.base_url, args.keepalive)))
    config = ProcessorConfig(max_workers=args.workers, chunk_size=args.chunk_size, persist_results=True)
    wanted = {
        "prompt_template": "Summarize {title} by {author}",
        "strategy": strategy,
        "id_column": "id",
        "config": config,
    }
    params = inspect.signature(enrich_table_file).parameters
    missing = [k for k in ("prompt_template", "strategy", "config") if k not in params]
    if missing:
        raise _Skip(f"enrich_table_file{inspect.signature(enrich_table_file)} has no {missing}")
    kwargs = {k: v for k, v in wanted.items() if k in params}

    async def run() -> int:
        result = enrich_table_file(str(source), str(target), **kwargs)
        if inspect.isawaitable(result):
            await result
        return -1  # counted from the output after the clock

    out.notes.append(f"output: {target}")
    return run


RUNNERS = {
    "floor": _run_floor,
    "async-batch-llm": _run_abl,
    "per-item": _run_per_item,
    "chunked": _run_chunked,
    "streaming": _run_streaming,
    "dask": _run_dask,
}
_USES_PREFECT = {"per-item", "chunked", "streaming", "dask"}


async def _contender(args: argparse.Namespace, out: Measured) -> None:
    name = args.contender
    n = out.items
    counter = _ApiCounter()
    me = os.getpid()
    if name in _USES_PREFECT:
        counter.install()
        before = _cpu_now(me)[1]
        await _start_api()
        out.server_startup_cpu_s = _cpu_now(me)[1] - before
    storage = Path(os.environ["PREFECT_HOME"]) / "storage"
    objects_before = count_files(storage)
    run = await RUNNERS[name](args, n, out)
    client0, server0 = _cpu_now(me)
    reaped0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    counter.on = True
    try:
        out.succeeded = await run()
    finally:
        counter.on = False
        out.wall_s = time.monotonic() - started
        client1, server1 = _cpu_now(me)
        out.client_cpu_s, out.server_cpu_s = client1 - client0, server1 - server0
        servers, others = _split_server(me)
        out.server_rss_mb = sum(proc_hwm_mb(p) for p in servers)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        # The client's own peak, plus its other processes (Dask workers): live ones' peaks, and for those
        # reaped during the run the largest one's (all the kernel keeps). A child reaped before the run
        # (Prefect's API start-up reaps a ~125 MB one) is not part of the run's peak.
        out.client_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.client_rss_mb += sum(proc_hwm_mb(p) for p in others)
        if reaped.ru_maxrss > reaped0.ru_maxrss:
            out.client_rss_mb += reaped.ru_maxrss / 1024
        child_cpu = reaped.ru_utime + reaped.ru_stime - reaped0.ru_utime - reaped0.ru_stime
        child_cpu += sum(proc_cpu_s(p) for p in others)
        if child_cpu > 0.05 or others:
            out.notes.append(f"child processes (e.g. Dask workers): {child_cpu:.1f} s CPU in the run")
        out.api_calls = dict(counter.calls.most_common())
        out.events = dict(counter.events.most_common())
        out.storage_objects = count_files(storage) - objects_before
    if name == "streaming":
        target = Path(out.notes[-1].removeprefix("output: "))
        rows, ok = _count_output(target)
        out.notes[-1] = f"output rows {rows:,}"
        out.succeeded = ok


def _describe(exc: BaseException) -> str:
    """``Type: message``; an exception group as its distinct leaf exceptions."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = dict.fromkeys(_describe(e) for e in exc.exceptions)
        return " | ".join(leaves)
    return f"{type(exc).__name__}: {exc}"


def run_contender(args: argparse.Namespace) -> int:
    n = args.rows if args.contender == "streaming" else args.items
    if args.contender == "per-item":
        n = args.per_item_items
    out = Measured(args.contender, items=n)
    try:
        asyncio.run(_contender(args, out))
    except _Skip as skip:
        out.skipped = str(skip)
    except BaseException as exc:  # report, never hide: the table shows the error
        out.error = _describe(exc)[:600]
    Path(args.result_file).write_text(json.dumps(asdict(out)))
    return 0


# ---------------------------------------------------------------------------------------------------------
# The parent: machine, server, one subprocess per contender, the table


@dataclass
class Row:
    measured: Measured
    server: dict[str, Any]
    emulator_cpu_s: float
    load: float

    @property
    def rate(self) -> float:
        clock = self.server.get("clock_s") or 0.0
        return self.measured.succeeded / clock if clock > 0 else 0.0


def _machine() -> str:
    import prefect

    versions = [f"prefect {prefect.__version__}"]
    for dist in ("google-genai", "async-batch-llm", "prefect-dask"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions.append(f"{dist} {version(dist)}")
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(Exception):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"{', '.join(versions)}; load average {_load()}"
    )


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _fmt_row(row: Row, floor_rate: float | None) -> str:
    m = row.measured
    if m.skipped or m.error:
        why = f"skipped: {m.skipped}" if m.skipped else f"error: {m.error}"
        return f"| {m.name} | {m.items:,} | - | - | - | - | - | - | - | {row.load:.2f} |  {why}"
    per = 1000.0 / m.items if m.items else 0.0
    ratio = f"{row.rate / floor_rate:.2f}" if floor_rate else "-"
    server = f"{m.server_cpu_s * per:.2f}" if m.name.partition("@")[0] in _USES_PREFECT else "-"
    rss = m.client_rss_mb + m.server_rss_mb
    items = f"{m.succeeded:,}" if m.succeeded == m.items else f"{m.succeeded:,}/{m.items:,}"
    api = sum(m.api_calls.values())
    events = sum(m.events.values())
    return (
        f"| {m.name} | {items} | {row.rate:.0f} | {ratio} | {m.client_cpu_s * per:.2f} | {server} | "
        f"{rss:.0f} ({m.client_rss_mb:.0f}+{m.server_rss_mb:.0f}) | {m.storage_objects:,} | "
        f"{api:,} / {events:,} | {row.load:.2f} |"
    )


HEADER = (
    "| contender | items | items/s | x floor | client CPU ms/item | API-server CPU ms/item | "
    "peak RSS MB (client+server) | storage objects | API calls / events | load 1m |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def _details(row: Row) -> str:
    m = row.measured
    parts = [f"  {m.name}: clock {row.server.get('clock_s', 0):.1f} s (wall {m.wall_s:.1f} s)"]
    parts.append(f"statuses {row.server.get('statuses')}")
    if m.items:
        parts.append(f"server-side emulator CPU {row.emulator_cpu_s * 1000 / m.items:.2f} ms/item")
    if m.name.partition("@")[0] in _USES_PREFECT and not (m.skipped or m.error):
        parts.append(f"API start-up CPU {m.server_startup_cpu_s:.1f} s")
        top = ", ".join(f"{k} {v}" for k, v in list(m.api_calls.items())[:6])
        parts.append(f"API calls: {top or 'none'}")
        ev = ", ".join(f"{k} {v}" for k, v in list(m.events.items())[:4])
        parts.append(f"events: {ev or 'none'}")
    parts += m.notes
    return "; ".join(parts)


def _run_one(name: str, args: argparse.Namespace, emulator: EmulatorProcess, scratch: Path) -> Row:
    base = Path(tempfile.mkdtemp(prefix=f"{re.sub(r'[^a-z-]', '_', name)}-", dir=scratch))
    home = base / "prefect-home"
    home.mkdir()
    result_file = base / "result.json"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    name, _, code = name.partition("@")  # "chunked@/work/main": that checkout's prefect_batchllm
    if code:
        env["PYTHONPATH"] = str(Path(code).resolve())
    command = [
        sys.executable,
        str(Path(__file__).resolve()),  # as a script, so the cwd's package never shadows PYTHONPATH
        "--contender",
        name,
        "--base-url",
        emulator.base_url,
        "--result-file",
        str(result_file),
        "--items",
        str(args.items),
        "--rows",
        str(args.rows),
        "--per-item-items",
        str(args.per_item_items),
        "--workers",
        str(args.workers),
        "--chunk-size",
        str(args.chunk_size),
        "--model",
        args.model,
        *(["--keepalive", str(args.keepalive)] if args.keepalive else []),
    ]
    emulator.reset()
    emu0 = emulator.cpu_s()
    n = {"streaming": args.rows, "per-item": args.per_item_items}.get(name, args.items)
    timeout = args.timeout or 300 + n * 0.05
    log = base / "stderr.log"
    with log.open("w") as err:
        proc = subprocess.Popen(command, env=env, stdout=err, stderr=err, start_new_session=True, cwd=base)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # stray children (a Dask worker, the API server)
        os.killpg(proc.pid, signal.SIGKILL)
    if result_file.exists():
        measured = Measured(**json.loads(result_file.read_text()))
        if code:
            measured.name = f"{name}@{code}"
    else:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        measured = Measured(name, items=n, error=f"exit {proc.returncode}: " + " | ".join(tail))
    if measured.error and args.verbose:
        print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
    row = Row(measured, emulator.stats(), emulator.cpu_s() - emu0, os.getloadavg()[0])
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=10_000, help="items per contender (default 10,000)")
    parser.add_argument(
        "--rows", type=int, default=None, help="rows of the streaming table (default: --items)"
    )
    parser.add_argument(
        "--per-item-items",
        type=int,
        default=None,
        help=f"items of the per-item row (default {PER_ITEM_DEFAULT:,})",
    )
    parser.add_argument("--workers", type=int, default=100, help="concurrent requests (default 100)")
    parser.add_argument("--latency", type=float, default=0.2, help="server latency in s (default 0.2)")
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="chunk_size of chunked rows")
    parser.add_argument(
        "--only", default=",".join(CONTENDERS), help=f"comma-separated subset of {CONTENDERS}"
    )
    parser.add_argument("--model", default="gemini-2.5-flash")
    parser.add_argument(
        "--keepalive",
        type=int,
        default=None,
        help="httpx keep-alive connections of every contender's genai client (default: the SDK's, 20; "
        "more costs more CPU: httpcore checks every idle connection per request)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per contender (default scales)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--keep", action="store_true", help="keep each contender's PREFECT_HOME and logs")
    parser.add_argument("--verbose", action="store_true", help="print a failing contender's stderr")
    # internal: the server process and the contender processes
    parser.add_argument("--serve-emulator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contender", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rows = args.rows or args.items
    args.per_item_items = args.per_item_items or min(args.items, PER_ITEM_DEFAULT)
    if args.serve_emulator:
        return serve_emulator(args.latency)
    if args.contender:
        return run_contender(args)

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted({n.partition("@")[0] for n in names} - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)}")
    scratch = Path(tempfile.mkdtemp(prefix="batchllm-bench-"))
    os.environ["PREFECT_HOME"] = str(scratch / "unused")
    from benchmarks.run import BENCH_ENV  # the same quiet Prefect settings as the limiter benchmark

    for key, value in BENCH_ENV.items():
        os.environ.setdefault(key, value)
    print(_machine(), flush=True)
    print(
        f"server: GeminiEmulator in its own process, latency {args.latency * 1000:.0f} ms; "
        f"{args.workers} concurrent; chunk_size {args.chunk_size}; "
        f"httpx keep-alive {args.keepalive or 'SDK default (20)'}",
        flush=True,
    )
    emulator = EmulatorProcess(args.latency)
    rows: list[Row] = []
    try:
        print(HEADER, flush=True)
        floor_rate: float | None = None
        for name in names:
            row = _run_one(name, args, emulator, scratch)
            rows.append(row)
            if name == "floor" and row.rate > 0 and floor_rate is None:
                floor_rate = row.rate
            print(_fmt_row(row, floor_rate), flush=True)
    finally:
        emulator.close()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"kept: {scratch}")
    print()
    print(HEADER)
    for row in rows:
        print(_fmt_row(row, floor_rate))
    print()
    for row in rows:
        print(_details(row))
    print(f"load average at the end: {_load()}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    {
                        **asdict(r.measured),
                        "server": r.server,
                        "emulator_cpu_s": r.emulator_cpu_s,
                        "load": r.load,
                    }
                    for r in rows
                ],
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
