"""ResultLog: per-flush storage objects of item results, replayed per item (no Prefect server needed,
except the one test that loads a saved storage block by slug)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import pydantic
import pytest

from prefect_batchllm.core.config import ProcessorConfig
from prefect_batchllm.core.items import WorkItemResult
from prefect_batchllm.core.strategy import LLMCallStrategy, RetryState
from prefect_batchllm.prefect import result_log
from prefect_batchllm.prefect.result_log import ResultLog, location_for, resolve_location


class Summary(pydantic.BaseModel):
    title: str
    score: float


def ok(item_id: str, output: Any = None, **kwargs: Any) -> WorkItemResult[Any, Any]:
    return WorkItemResult(
        item_id=item_id, success=True, output=output if output is not None else item_id, **kwargs
    )


@pytest.fixture(autouse=True)
def fresh_process_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts like a new process: no location index loaded yet."""
    monkeypatch.setattr(result_log, "_INDEXES", {})


def forget_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a new process sees: the index is loaded again from the stored objects."""
    monkeypatch.setattr(result_log, "_INDEXES", {})


def stored_bytes(log: ResultLog) -> bytes:
    return b"".join(p.read_bytes() for p in Path(log.records_dir).iterdir())


def record_files(log: ResultLog) -> list[str]:
    return sorted(p.name for p in Path(log.records_dir).iterdir() if p.name.endswith(".blr"))


async def test_round_trip_strips_context_and_keeps_pydantic_output(tmp_path: Path, monkeypatch) -> None:
    log = ResultLog(f"file://{tmp_path}")
    first = ok("a", Summary(title="Dune", score=0.9), context={"secret": "s3cr3t"}, attempts=2)
    await log.add("key-a", first)
    await log.add("key-b", ok("b", [1, 2, 3]))
    first.context = {"re-attached": "after add"}  # the caller re-attaches context to its own object
    buffered = await log.lookup(["key-a", "key-b", "key-missing"])  # served from the buffer
    assert set(buffered) == {"key-a", "key-b"} and buffered["key-a"].context is None
    await log.aclose()
    assert log.objects_written == 1
    assert (await log.lookup(["key-a"]))["key-a"].output == Summary(title="Dune", score=0.9)

    forget_index(monkeypatch)
    again = ResultLog(f"file://{tmp_path}")
    found = await again.lookup(["key-a", "key-b", "key-missing"])
    assert set(found) == {"key-a", "key-b"}
    assert found["key-a"].output == Summary(title="Dune", score=0.9)
    assert found["key-a"].attempts == 2 and found["key-a"].context is None and not found["key-a"].replayed
    assert found["key-b"].output == [1, 2, 3]
    raw = stored_bytes(again)
    assert b"s3cr3t" not in raw and b"re-attached" not in raw


async def test_only_successes_are_persisted(tmp_path: Path) -> None:
    log = ResultLog(str(tmp_path))
    with pytest.raises(ValueError, match="only successful results"):
        await log.add("k", WorkItemResult(item_id="x", success=False, error="boom"))
    assert await log.lookup(["k"]) == {}


async def test_5000_adds_write_at_most_one_object_per_100_items(tmp_path: Path, monkeypatch) -> None:
    log = ResultLog(f"file://{tmp_path}", flush_items=100, flush_interval_s=60)

    async def chunk(start: int) -> None:  # concurrent writers, as the items of chunks finish
        for i in range(start, start + 500):
            await log.add(f"k{i}", ok(f"i{i}"))
            if i % 7 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(chunk(s) for s in range(0, 5000, 500)))
    await log.aclose()
    assert 1 <= log.objects_written <= 5000 // 100
    assert len(record_files(log)) == log.objects_written

    forget_index(monkeypatch)
    found = await ResultLog(f"file://{tmp_path}").lookup([f"k{i}" for i in range(5000)])
    assert len(found) == 5000 and found["k4321"].item_id == "i4321"


async def test_newest_record_wins_at_load_and_after_load(tmp_path: Path, monkeypatch) -> None:
    url = f"file://{tmp_path}"
    old, new = ResultLog(url), ResultLog(url)
    await old.add("k", ok("x", "old"))
    await old.aclose()
    await new.add("k", ok("x", "refreshed"))  # refresh_cache: a later run overwrites
    await new.aclose()
    forget_index(monkeypatch)
    assert (await ResultLog(url).lookup(["k"]))["k"].output == "refreshed"  # index built from both records

    reader = ResultLog(url)
    assert (await reader.lookup(["k"]))["k"].output == "refreshed"  # index loaded in this process
    newest = ResultLog(url)
    await newest.add("k", ok("x", "newest"))
    await newest.aclose()
    assert (await ResultLog(url).lookup(["k"]))["k"].output == "newest"  # a later record joins the index


async def test_expired_entries_are_not_returned(tmp_path: Path, monkeypatch) -> None:
    url = f"file://{tmp_path}"
    expiring = ResultLog(url, expiration_s=3600)
    await expiring.add("short", ok("s"))
    await expiring.aclose()
    forever = ResultLog(url)
    await forever.add("long", ok("l"))
    await forever.aclose()
    pending = ResultLog(url, expiration_s=3600)
    await pending.add("buffered", ok("b"))
    assert set(await ResultLog(url).lookup(["short", "long"])) == {"short", "long"}

    real_now = time.time
    monkeypatch.setattr(result_log, "_now", lambda: real_now() + 7200)
    assert set(await ResultLog(url).lookup(["short", "long"])) == {"long"}  # index loaded earlier
    assert await pending.lookup(["buffered"]) == {}
    await pending.aclose()
    forget_index(monkeypatch)
    assert set(await ResultLog(url).lookup(["short", "long", "buffered"])) == {"long"}  # fresh load


async def test_torn_and_corrupt_objects_are_skipped(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    log = ResultLog(url)
    for key in ("a", "b", "c"):
        await log.add(key, ok(key))
    await log.flush()
    torn_log = ResultLog(url)
    await torn_log.add("torn", ok("t"))
    await torn_log.flush()
    records = Path(log.records_dir)
    good, torn = (records / name for name in sorted(record_files(log)))
    data = torn.read_bytes()
    torn.write_bytes(data[: len(data) // 2])  # a killed writer on a store without atomic writes
    (records / "99999999999999999999-garbage-000001.blr").write_bytes(b"not a record")
    (records / ".99999999999999999999-x-000001.blr.tmp").write_bytes(data[:10])  # temp of a killed writer
    body = bytearray(good.read_bytes())
    body[-3] ^= 0xFF  # flip a byte inside the last body ("c"): its CRC no longer matches
    good.write_bytes(bytes(body))

    found = await ResultLog(url).lookup(["a", "b", "c", "torn"])
    assert set(found) == {"a", "b"}


def _child_writes(log: ResultLog, count: int) -> None:
    async def main() -> None:
        for i in range(count):
            await log.add(f"child-{i}", ok(f"child-{i}", {"pid": os.getpid()}))
            await asyncio.sleep(0)
        await log.aclose()
        assert log.objects_written >= 1

    asyncio.run(main())


async def test_pickled_log_writes_from_a_spawned_process_alongside_the_parent(tmp_path: Path) -> None:
    log = ResultLog(f"file://{tmp_path}", flush_items=50)
    await log.add("parent-0", ok("parent-0"))  # buffered state must not travel
    state = pickle.dumps(log)
    assert b"parent-0" not in state and len(state) < 1000
    child = multiprocessing.get_context("spawn").Process(target=_child_writes, args=(log, 300))
    child.start()
    for i in range(1, 300):  # the parent keeps writing while the child does
        await log.add(f"parent-{i}", ok(f"parent-{i}"))
        await asyncio.sleep(0)
    await log.flush()
    await asyncio.to_thread(child.join, 240)
    assert child.exitcode == 0

    keys = [f"parent-{i}" for i in range(300)] + [f"child-{i}" for i in range(300)]
    found = await ResultLog(f"file://{tmp_path}").lookup(keys)
    assert set(found) == set(keys)
    assert found["child-7"].output["pid"] == child.pid
    await log.aclose()


def _child_killed_mid_run(url: str, ready: Path) -> None:
    async def main() -> None:
        log = ResultLog(url, flush_items=100, flush_interval_s=3600)
        for i in range(100):
            await log.add(f"k{i}", ok(f"k{i}"))
        await log.flush()
        assert log.objects_written == 1
        for i in range(100, 130):
            await log.add(f"k{i}", ok(f"k{i}"))  # buffered: lost on SIGKILL, at most flush_items
        await asyncio.to_thread(ready.write_text, "ready")
        await asyncio.sleep(3600)

    asyncio.run(main())


async def test_sigkill_loses_at_most_the_buffer(tmp_path: Path) -> None:
    url, ready = f"file://{tmp_path / 'log'}", tmp_path / "ready"
    child = multiprocessing.get_context("spawn").Process(target=_child_killed_mid_run, args=(url, ready))
    child.start()
    try:
        for _ in range(2400):
            if ready.exists() or not child.is_alive():
                break
            await asyncio.sleep(0.1)
        assert ready.exists()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        await asyncio.to_thread(child.join, 60)
    found = await ResultLog(url).lookup([f"k{i}" for i in range(130)])
    assert set(found) == {f"k{i}" for i in range(100)}


async def test_background_flusher_writes_after_the_interval(tmp_path: Path, monkeypatch) -> None:
    log = ResultLog(f"file://{tmp_path}", flush_interval_s=0.05, flush_items=1000)
    for i in range(3):
        await log.add(f"k{i}", ok(f"k{i}"))
    for _ in range(600):
        if log.objects_written:
            break
        await asyncio.sleep(0.05)
    assert log.objects_written == 1  # no flush() call: the timer wrote the three results as one object
    forget_index(monkeypatch)
    assert len(await ResultLog(f"file://{tmp_path}").lookup(["k0", "k1", "k2"])) == 3
    await log.aclose()


async def test_memory_url_and_storage_options(monkeypatch) -> None:
    url = "memory://batchllm-test-result-log"
    log = ResultLog(url, storage_options={"skip_instance_cache": False})
    await log.add("m", ok("m", {"x": 1}))
    await log.aclose()
    forget_index(monkeypatch)
    assert (await ResultLog(url).lookup(["m"]))["m"].output == {"x": 1}


def test_locations_of_urls_and_block_objects(tmp_path: Path) -> None:
    from prefect.blocks.system import Secret
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    assert location_for("s3://bucket/prefix/") == ("s3://bucket/prefix/batchllm-results", {})
    assert location_for(LocalFileSystem(basepath=str(tmp_path))) == (f"{tmp_path}/batchllm-results", {})
    remote = RemoteFileSystem(basepath="memory://remote-base", settings={"anon": True})
    assert location_for(remote) == ("memory://remote-base/batchllm-results", {"anon": True})
    default, _ = location_for(None)
    assert default == os.path.join(os.environ["PREFECT_LOCAL_STORAGE_PATH"], "batchllm-results")
    with pytest.raises(ValueError, match=r"result_storage.*Secret.*remote-file-system.*s3://"):
        location_for(Secret(value="x"))


async def test_local_file_system_block_object_round_trip(tmp_path: Path, monkeypatch) -> None:
    from prefect.filesystems import LocalFileSystem

    url, options = await resolve_location(LocalFileSystem(basepath=str(tmp_path)))
    log = ResultLog(url, storage_options=options)
    await log.add("k", ok("k"))
    await log.aclose()
    assert Path(log.records_dir).is_relative_to(tmp_path / "batchllm-results" / "v1")
    forget_index(monkeypatch)
    assert set(await ResultLog(url).lookup(["k"])) == {"k"}


async def test_for_config(tmp_path: Path) -> None:
    assert await ResultLog.for_config(ProcessorConfig(persist_results=False)) is None
    assert await ResultLog.for_config(ProcessorConfig(dry_run=True)) is None
    log = await ResultLog.for_config(
        ProcessorConfig(result_storage=f"file://{tmp_path}", cache_expiration_s=60)
    )
    assert log is not None and log.expiration_s == 60
    assert log.url == f"file://{tmp_path}/batchllm-results"
    default = await ResultLog.for_config(ProcessorConfig())
    assert default is not None and default.url.endswith("/batchllm-results")


@pytest.mark.parametrize(
    "value", ["s3://bucket/prefix", "file:///data/results", "memory://x", "remote-file-system/r"]
)
def test_config_accepts_block_slugs_and_fsspec_urls(value: str) -> None:
    assert ProcessorConfig(result_storage=value).result_storage == value


@pytest.mark.parametrize("value", ["nope", "s4://bucket/x", "a/b/c", "/abs/path"])
def test_config_rejects_other_result_storage(value: str) -> None:
    with pytest.raises(ValueError, match=r"result_storage.*block slug.*fsspec URL"):
        ProcessorConfig(result_storage=value)


async def test_saved_block_slug(prefect_api: str, tmp_path: Path, monkeypatch) -> None:
    from prefect.filesystems import LocalFileSystem

    await LocalFileSystem(basepath=str(tmp_path)).save("result-log-test", overwrite=True)
    log = await ResultLog.for_config(ProcessorConfig(result_storage="local-file-system/result-log-test"))
    assert log is not None and log.url == f"{tmp_path}/batchllm-results"
    await log.add("k", ok("k"))
    await log.aclose()
    forget_index(monkeypatch)
    assert set(await ResultLog(log.url).lookup(["k"])) == {"k"}
    with pytest.raises(ValueError, match=r"result_storage.*'local-file-system/not-saved'.*s3://"):
        await ResultLog.for_config(ProcessorConfig(result_storage="local-file-system/not-saved"))


@pytest.mark.parametrize("scheme", ["file", "memory"])
async def test_fsspec_urls_work_as_prefect_result_storage(
    prefect_api: str, tmp_path: Path, scheme: str
) -> None:
    """Prefect's own persisted results (batch-job names) take the same result_storage values."""
    from prefect import flow, task

    from prefect_batchllm.prefect.result_log import prefect_result_storage

    url = f"file://{tmp_path}" if scheme == "file" else f"memory://batchllm-prefect-{tmp_path.name}"
    calls: list[int] = []

    @task(persist_result=True, cache_key_fn=lambda *_: f"result-log-{scheme}-{tmp_path.name}")
    def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    @flow
    async def run() -> int:
        return double.with_options(result_storage=await prefect_result_storage(url))(21)

    assert await run() == 42 and await run() == 42
    assert calls == [21]  # the second run loaded the persisted result
    if scheme == "file":
        assert os.listdir(tmp_path)


async def test_new_logs_list_again_but_copies_of_an_older_log_reuse_the_process_index(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    log = ResultLog(url)
    await log.add("mine", ok("mine"))
    await log.aclose()
    assert set(await log.lookup(["mine"])) == {"mine"}  # loads this process's index
    # another process writes a record after that load
    foreign = result_log.encode_record([("theirs", ok("theirs"), 0.0)])
    write_record(Path(log.records_dir) / f"{time.time_ns():020d}-otherwriter00000-000001.blr", foreign)

    copy_of_old = pickle.loads(pickle.dumps(log))  # a Dask chunk's copy of a log made long before
    copy_of_old._since = time.time() - 3600
    assert set(await copy_of_old.lookup(["mine", "theirs"])) == {"mine"}  # no listing: index reused
    assert set(await ResultLog(url).lookup(["mine", "theirs"])) == {"mine", "theirs"}  # a new log lists


def write_record(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def test_one_log_used_from_two_threads_with_their_own_loops(tmp_path: Path, monkeypatch) -> None:
    """Prefect may run async tasks on other threads' loops: one log still persists every result."""
    import threading

    log = ResultLog(f"file://{tmp_path}", flush_items=50)

    def worker(prefix: str) -> None:
        async def main() -> None:
            for i in range(120):
                await log.add(f"{prefix}-{i}", ok(f"{prefix}-{i}"))
                await asyncio.sleep(0)
            await log.flush()

        asyncio.run(main())

    threads = [threading.Thread(target=worker, args=(p,)) for p in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    asyncio.run(log.aclose())
    forget_index(monkeypatch)
    keys = [f"{p}-{i}" for p in ("a", "b") for i in range(120)]
    assert set(asyncio.run(ResultLog(f"file://{tmp_path}").lookup(keys))) == set(keys)
    assert log.objects_written <= 240 // 10  # batched, whichever loop flushes


async def test_index_snapshot_replaces_reading_every_header(tmp_path: Path, monkeypatch) -> None:
    url = f"file://{tmp_path}"
    monkeypatch.setattr(result_log, "_SNAPSHOT_RECORDS", 3)
    for i in range(4):  # four records of two results each
        log = ResultLog(url)
        await log.add(f"k{i}", ok(f"k{i}", "v1"))
        await log.add(f"shared-{i}", ok("shared", i))
        await log.aclose()
    await ResultLog(url).lookup(["k0"])  # first load: reads 4 headers, writes a snapshot
    index_dir = Path(log.records_dir).parent / "index"
    assert len(os.listdir(index_dir)) == 1

    newer = ResultLog(url)
    await newer.add("k1", ok("k1", "refreshed"))  # a record the snapshot does not cover
    await newer.aclose()
    read: list[str] = []
    real_read = result_log._read_headers

    def counting(fs: Any, records_dir: str, records: Any) -> Any:
        read.extend(name for name, _ in records)
        return real_read(fs, records_dir, records)

    monkeypatch.setattr(result_log, "_read_headers", counting)
    forget_index(monkeypatch)
    keys = [f"k{i}" for i in range(4)] + [f"shared-{i}" for i in range(4)]
    found = await ResultLog(url).lookup(keys)
    assert read == [record_files(log)[-1]]  # only the record newer than the snapshot
    assert set(found) == set(keys) and found["k1"].output == "refreshed" and found["k2"].output == "v1"

    snapshot = index_dir / os.listdir(index_dir)[0]
    corrupt = bytearray(snapshot.read_bytes())
    corrupt[-1] ^= 0xFF
    snapshot.write_bytes(bytes(corrupt))
    read.clear()
    forget_index(monkeypatch)
    found = await ResultLog(url).lookup(keys)  # a corrupt snapshot is skipped: headers again
    assert len(read) == 5 and set(found) == set(keys) and found["k1"].output == "refreshed"


async def test_an_unpicklable_result_is_left_out_without_failing_the_flush(
    tmp_path: Path, monkeypatch
) -> None:
    import threading

    log = ResultLog(f"file://{tmp_path}")
    await log.add("good", ok("good"))
    await log.add("bad", ok("bad", {"lock": threading.Lock()}))
    await log.aclose()  # does not raise
    assert log.objects_written == 1
    forget_index(monkeypatch)
    assert set(await ResultLog(f"file://{tmp_path}").lookup(["good", "bad"])) == {"good"}


class Echo(LLMCallStrategy[str]):
    """Answers instantly: the run's cost is the product's own, and its results are what is persisted."""

    def __init__(self) -> None:
        self.calls = 0

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> Any:
        self.calls += 1
        return prompt.upper(), {"input_tokens": 3, "output_tokens": 2}

    def fingerprint(self) -> str:
        return "echo-v1"


async def test_a_5000_item_chunked_run_stores_its_results_in_o_chunks_objects(
    prefect_api: str, tmp_path: Path
) -> None:
    from prefect_batchllm import run_batch
    from prefect_batchllm.core.items import LLMWorkItem
    from prefect_batchllm.prefect.tasks import item_cache_key

    strategy = Echo()
    items = [LLMWorkItem(f"row-{i}", strategy, f"[row-{i}] describe book {i}") for i in range(5000)]
    config = ProcessorConfig(max_workers=100, chunk_size=500, result_storage=f"file://{tmp_path}")
    result = await run_batch(items, config)
    assert result.succeeded == 5000 and strategy.calls == 5000
    records = tmp_path / "batchllm-results" / "v1" / "records"
    objects = await asyncio.to_thread(lambda: len(list(records.glob("*.blr"))))
    assert 1 <= objects <= 5000 // 100  # O(chunks), not one per item (10 measured here)
    log = await ResultLog.for_config(config)
    assert log is not None
    stored = await log.lookup([item_cache_key(item) for item in items])
    assert len(stored) == 5000 and stored[item_cache_key(items[42])].output == items[42].prompt.upper()


def test_the_index_delta_dict_stays_bounded_however_large_the_index(monkeypatch) -> None:
    """Records added after the first load go to a dict (~270 bytes per entry) that is merged into the
    sorted arrays (~32 bytes per entry) at a fixed size, not at a fraction of the index: a 1M-row table
    run must not hold a quarter of its keys in the dict."""
    import numpy as np

    monkeypatch.setattr(result_log, "_DELTA_MAX", 100)
    index = result_log._Index()
    index.loaded = True
    per_record = 30
    largest = 0
    for rec in range(200):  # 6,000 keys: the arrays grow far beyond 4 x the delta bound
        header = np.zeros(per_record, result_log._DISK)
        header["hash"] = np.arange(rec * per_record, (rec + 1) * per_record, dtype=np.uint64) + 1
        index.add(f"{rec:020d}-w-{rec}.blr", header.tobytes())
        largest = max(largest, len(index.delta))
    assert largest <= 100 + per_record
    assert len(index.hashes) + len(index.delta) == 200 * per_record
    found = index.find([1, 3000, 6000, 6001])
    assert [f is not None for f in found] == [True, True, True, False]
