"""Streaming table runs: slices in, part files out, one atomic Parquet output (issue 9).

The IO pieces (``prefect_batchllm.tables``) are tested on their own here, with no Prefect API; the
streaming ``enrich_table_file`` runs go through the real SDK to the bundled server and the real Prefect API.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from _prefect_server import prefect_env
from pydantic import BaseModel

from prefect_batchllm import ProcessorConfig, RetryConfig
from prefect_batchllm.dataframe import RESULT_COLUMNS, UniqueIds, enrich_dataframe, row_ids
from prefect_batchllm.models.gemini import GeminiModel
from prefect_batchllm.strategies.gemini import GeminiStrategy
from prefect_batchllm.streaming import TableBatchResult, TableChunk, enrich_table_file, failed_rows_path
from prefect_batchllm.tables import StagedOutput, plan_slices, read_table, stage_csv, write_table
from prefect_batchllm.testing import Fault, GeminiEmulator


def _table(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "title": [f"book {i}" if i % 7 else None for i in range(n)],
            "pages": np.arange(n, dtype="int64"),
            "score": [float(i) / 3 if i % 5 else np.nan for i in range(n)],
            "maybe": pd.array([i if i % 4 else None for i in range(n)], dtype="Int64"),
            "flag": [i % 2 == 0 for i in range(n)],
            "when": pd.date_range("2024-01-01", periods=n, freq="h"),
            "kind": pd.Categorical(["a", "b", "c"] * (n // 3) + ["a"] * (n % 3)),
            "tags": [[f"t{i}"] if i % 3 == 0 else None for i in range(n)],
        }
    )


@pytest.mark.parametrize(
    "index",
    [None, "named", "stepped"],
)
def test_slices_read_exactly_the_rows_of_the_whole_table(tmp_path: Path, index: str | None) -> None:
    df = _table(53)
    if index == "named":
        df.index = pd.Index([f"r{i}" for i in range(53)], name="rid")
    elif index == "stepped":
        df.index = pd.RangeIndex(100, 100 + 3 * 53, 3)
    path = tmp_path / "in.parquet"
    df.to_parquet(path, row_group_size=10)
    whole = read_table(path)

    total, slices = plan_slices(str(path), 7)
    assert total == 53 and [len(s) for s in slices] == [7] * 7 + [4]
    assert slices[1].groups == (0, 1) and slices[1].group_start == 0  # rows 7..13 span groups 0 and 1
    assert slices[2].groups == (1, 2)
    parts = [s.read() for s in slices]
    for part, piece in zip(parts, slices, strict=True):
        pd.testing.assert_frame_equal(part, whole.iloc[piece.start : piece.stop])
    pd.testing.assert_frame_equal(pd.concat(parts), whole)


def test_one_huge_row_group_is_restaged_so_each_slice_reads_one_group(tmp_path: Path) -> None:
    df = _table(300)
    path = tmp_path / "in.parquet"
    df.to_parquet(path)  # pandas writes one row group
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    total, slices = plan_slices(str(path), 20, staging_dir=str(tmp_path / "staging"))
    assert total == 300 and all(len(s.groups) == 1 for s in slices)
    assert all(s.path.endswith("staging/input.parquet") for s in slices)
    pd.testing.assert_frame_equal(pd.concat([s.read() for s in slices]), read_table(path))


def test_csv_is_staged_streaming_with_pandas_types(tmp_path: Path) -> None:
    rows = ["title,pages,score,day,note"]
    for i in range(400):
        score = "" if i % 9 == 0 else f"{i / 4}"
        pages = f"{i}" if i < 350 else f"{i}.5"  # ints in the first blocks, floats later: widened
        note = "n/a" if i == 399 else ("" if i % 2 else f"note {i}")
        rows.append(f'"book, {i}",{pages},{score},2024-01-{1 + i % 28:02d},{note}')
    path = tmp_path / "in.csv"
    path.write_text("\n".join(rows) + "\n")
    staged = stage_csv(str(path), str(tmp_path / "s" / "input.parquet"), 50, block_size=1024)
    assert pq.ParquetFile(staged).metadata.num_row_groups >= 8
    total, slices = plan_slices(str(path), 64, staging_dir=str(tmp_path / "s2"))
    assert total == 400
    got = pd.concat([s.read() for s in slices])
    pd.testing.assert_frame_equal(got, read_table(path))  # pandas.read_csv of the whole file


def test_staged_output_commits_one_parquet_file_with_unified_schema(tmp_path: Path) -> None:
    df = _table(40)
    df["output"] = [None] * 20 + [{"k": i} for i in range(20)]  # all-null in the first parts
    df.index = pd.Index([f"r{i}" for i in range(40)], name="rid")
    out = tmp_path / "sub" / "out.parquet"
    staged = StagedOutput(str(out), "run1")
    assert Path(staged.staging_dir) == tmp_path / "sub" / ".out.parquet.staging-run1"
    for number, start in enumerate(range(0, 40, 10)):
        staged.write_part(number, df.iloc[start : start + 10])
    staged.commit(4, attrs={"batchllm": {"rows": 40}})
    assert not Path(staged.staging_dir).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.parquet"]  # no temp file left
    got = read_table(out)
    write_table(df, tmp_path / "ref.parquet")
    pd.testing.assert_frame_equal(got, read_table(tmp_path / "ref.parquet"))
    assert got.attrs == {"batchllm": {"rows": 40}}
    assert pq.ParquetFile(out).metadata.num_row_groups == 4


def test_staged_output_range_index_and_csv_and_memory_filesystem(tmp_path: Path) -> None:
    df = _table(25)[["title", "pages", "score"]]
    for target in (str(tmp_path / "o.parquet"), "memory://stream-test/o.parquet", str(tmp_path / "o.csv")):
        staged = StagedOutput(target)
        for number, start in enumerate(range(0, 25, 10)):
            staged.write_part(number, df.iloc[start : start + 10])
        with pytest.raises(FileNotFoundError, match="1 part file"):
            staged.commit(4)
        staged.commit(3)
        got = read_table(target)
        write_table(df, target + ".ref" + target[-8:])
        pd.testing.assert_frame_equal(got, read_table(target + ".ref" + target[-8:]))
        if target.endswith(".parquet") and not target.startswith("memory"):
            meta = json.loads(pq.read_schema(target).metadata[b"pandas"])
            assert meta["index_columns"] == [
                {"kind": "range", "name": None, "start": 0, "stop": 25, "step": 1}
            ]


def test_unique_ids_streaming_check(tmp_path: Path) -> None:
    check = UniqueIds("id")
    batches = [[f"id-{i}" for i in range(j, j + 1000)] for j in range(0, 5000, 1000)]
    for ids in batches:
        check.add(ids)
    assert check.duplicate_hashes() == set()
    again = UniqueIds("id")
    for ids in [*batches, ["id-17", "new"]]:
        again.add(ids)
    suspects = again.duplicate_hashes()
    assert len(suspects) == 1
    with pytest.raises(ValueError, match=r"id_column 'id' has duplicate ids \('id-17'\)"):
        again.confirm(suspects, [*batches, ["id-17", "new"]])
    with pytest.raises(ValueError, match="missing or empty id at row position 12"):
        row_ids(pd.DataFrame({"id": ["a", None]}), "id", offset=11)


# ------------------------------------------------------------------------------------------------------
# Streaming runs: the real SDK to the bundled server, the real Prefect API


def _fast(**overrides: Any) -> ProcessorConfig:
    return ProcessorConfig(
        max_workers=32,
        retry=RetryConfig(max_attempts=2, initial_wait=0.01, jitter=False),
        fail_on_item_failure=False,
        **overrides,
    )


def _books(n: int, tag: str) -> pd.DataFrame:
    titles: list[str | None] = []
    for i in range(n):
        if i % 41 == 5:
            titles.append(None)  # invalid_input: never sent
        elif i % 53 == 7:
            titles.append(f"FAIL400 {i}")  # a 400 every time: failed, not retried
        else:
            titles.append(f"book {i}")
    return pd.DataFrame(
        {
            "isbn": [f"isbn-{tag}-{i:05d}" for i in range(n)],
            "title": titles,
            "year": pd.array([1900 + i % 120 if i % 13 else None for i in range(n)], dtype="Int64"),
            "price": [i / 7 for i in range(n)],
        },
        index=pd.Index([f"row-{i}" for i in range(n)], name="rid"),
    )


def _faults(emulator: GeminiEmulator, n: int) -> None:
    """The same faults for every run: 400 for FAIL400 titles, one 503 for every 97th row."""
    emulator.faults.clear()
    emulator.faults.add(Fault.status(400), contains="FAIL400", times=None)
    for i in range(3, n, 97):
        emulator.faults.add(Fault.status(503), contains=f"book {i}.", times=1)


def test_streaming_run_matches_in_memory_enrich_dataframe(
    prefect_api: str, emulator: GeminiEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same rows, order, index, columns, dtypes and attrs as ``enrich_dataframe`` + ``write_table``, and the
    rows held at once stay within the open chunks (counted, not RSS)."""
    n = 2000
    df = _books(n, uuid.uuid4().hex[:6])
    source = tmp_path / "books.parquet"
    write_table(df, source)
    strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", emulator.client()))
    template = "Summarize {title}. ({year})"

    _faults(emulator, n)
    frame = enrich_dataframe(
        read_table(source), template, strategy, "isbn", _fast(chunk_size=100, refresh_cache=True)
    )
    write_table(frame, tmp_path / "memory.parquet")
    in_memory_requests = emulator.count("generateContent")

    held = {"now": 0, "peak": 0}
    load, finish = TableChunk.load, TableChunk.finish

    async def counting_load(self: TableChunk) -> Any:
        items = await load(self)
        held["now"] += len(items)
        held["peak"] = max(held["peak"], held["now"])
        return items

    async def counting_finish(self: TableChunk, items: Any, results: Any) -> Any:
        out = await finish(self, items, results)
        held["now"] -= len(items)
        return out

    monkeypatch.setattr(TableChunk, "load", counting_load)
    monkeypatch.setattr(TableChunk, "finish", counting_finish)
    _faults(emulator, n)
    out = tmp_path / "out" / "streamed.parquet"
    result = enrich_table_file(
        source, out, template, strategy, "isbn", _fast(chunk_size=150, refresh_cache=True)
    )

    expected = read_table(tmp_path / "memory.parquet")
    got = read_table(out)
    pd.testing.assert_frame_equal(got, expected)
    assert got.attrs["batchllm"] == expected.attrs["batchllm"]
    assert emulator.count("generateContent") == 2 * in_memory_requests  # same requests, same retries

    failures = expected.loc[~expected["success"]]
    categories = failures["error_category"].value_counts().to_dict()
    assert categories["invalid_input"] == int((df["title"].isna() | df["year"].isna()).sum())
    sent_400 = df["title"].str.startswith("FAIL400", na=False) & df["year"].notna()
    assert categories["fatal"] == int(sent_400.sum())
    assert int(expected["attempts"].eq(2).sum()) >= 15  # the 503s were retried
    assert isinstance(result, TableBatchResult) and result.summary is not None
    assert (result.total_items, result.failed, result.succeeded) == (n, len(failures), n - len(failures))
    assert result.error_categories() == categories
    assert result.failed_ids == failures["isbn"].tolist()  # only the failed rows, in input order
    assert all(r.output is None and not r.success for r in result.results)
    assert result.total_attempts == int(expected["attempts"].sum())
    assert result.total_input_tokens == int(expected["input_tokens"].sum()) > 0
    failed = read_table(failed_rows_path(out))
    assert failed["item_id"].tolist() == expected.loc[~expected["success"], "isbn"].tolist()
    assert failed["item_id"].tolist() == result.failed_ids
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "streamed.parquet",
        "streamed.parquet.failed.parquet",
    ]
    # Rows in memory at once: the chunks open to keep 32 workers busy (ceil(32/150) + 1 = 2), not the table.
    assert held["now"] == 0 and 0 < held["peak"] <= 2 * 150, held


def test_sigkill_mid_run_then_a_fresh_run_loses_and_duplicates_nothing(
    prefect_api: str, tmp_path: Path
) -> None:
    """The flow process is SIGKILLed mid-run; a fresh run completes the table. Rows the server answered
    in the killed run are requested again only if their result was not flushed yet: at most the result
    log's flush bound (200 items) plus the calls in flight."""
    n, chunk, workers = 1200, 100, 16
    tag = uuid.uuid4().hex[:8]
    df = _books(n, tag).assign(title=[f"book {i}" for i in range(n)], year=1900)
    source, out = tmp_path / "in.parquet", tmp_path / "out" / "t.parquet"
    write_table(df, source)
    template = "[{isbn}] Summarize {title}."
    env = prefect_env(prefect_api, tmp_path / "home")
    job = [sys.executable, str(Path(__file__).with_name("_stream_job.py")), str(source), str(out)]
    with GeminiEmulator(latency=(0.02, 0.08), seed=5) as emu:
        args = [*job, emu.base_url, template, str(chunk), str(workers)]
        first = subprocess.Popen(args, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while emu.count("generateContent") < n // 2:
                assert first.poll() is None, "the first run ended before it could be killed"
                assert time.monotonic() < deadline, "the first run made no progress"
                time.sleep(0.02)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        killed_at = time.monotonic()
        assert not out.exists()  # nothing committed by the killed run
        done_before = {
            r.prompt_text.split("]")[0][1:] for r in emu.requests_for("generateContent", status=200)
        }
        assert n // 2 <= len(done_before) < n

        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
        again = [
            r.prompt_text.split("]")[0][1:]
            for r in emu.requests_for("generateContent")
            if r.started_at > killed_at
        ]

    got = read_table(out)
    assert got["isbn"].tolist() == df["isbn"].tolist()  # every row once, in input order
    assert got.index.tolist() == df.index.tolist()
    assert bool(got["success"].all())
    re_requested = done_before & set(again)
    assert len(again) == len(set(again))  # the fresh run asked for each missing row once
    assert set(again) | done_before == set(df["isbn"])  # and for every row still missing
    print(f"rows answered before the kill: {len(done_before)}, re-requested after it: {len(re_requested)}")
    assert len(re_requested) <= 200 + workers, len(re_requested)
    assert int(got["replayed"].sum()) == n - len(again)
    assert sorted(p.name for p in out.parent.iterdir()) == ["t.parquet", "t.parquet.failed.parquet"]


class Card(BaseModel):
    genre: Literal["novel", "poetry", "drama"]
    pages: int
    rating: float
    classic: bool


def test_csv_input_with_an_output_type_matches_in_memory(
    prefect_api: str, emulator: GeminiEmulator, tmp_path: Path
) -> None:
    """A CSV input is staged as Parquet (streaming) and sliced; typed output columns (categorical,
    nullable ints/floats/booleans) come out as the in-memory run's, also for chunks where every row failed;
    a ``.csv`` output is the same table as ``write_table`` writes."""
    n, tag = 240, uuid.uuid4().hex[:6]
    lines = ["code,title,pages_hint,note"]
    for i in range(n):
        title = "" if i % 37 == 4 else (f"FAIL400 {tag} {i}" if 40 <= i < 80 else f"{tag} book {i}")
        lines.append(f"c{i:04d},{title},{i if i % 9 else ''},{'x' if i % 2 else ''}")
    source = tmp_path / "in.csv"
    source.write_text("\n".join(lines) + "\n")
    model = GeminiModel("gemini-2.5-flash", emulator.client())
    template = "Catalogue {title} ({code})."

    emulator.faults.add(Fault.status(400), contains="FAIL400", times=None)
    frame = enrich_dataframe(
        read_table(source),
        template,
        model_block=model,
        id_column="code",
        output_type=Card,
        config=_fast(chunk_size=40, refresh_cache=True),
    )
    write_table(frame, tmp_path / "memory.parquet")
    write_table(frame, tmp_path / "memory.csv")

    for name in ("out.parquet", "out.csv"):
        out = tmp_path / name
        result = enrich_table_file(
            source,
            out,
            template,
            id_column="code",
            model_block=model,
            output_type=Card,
            config=_fast(chunk_size=40, refresh_cache=True),
        )
        expected = read_table(tmp_path / ("memory" + out.suffix))
        pd.testing.assert_frame_equal(read_table(out), expected)
        assert result.failed == int((~frame["success"]).sum()) >= 40
    assert str(read_table(tmp_path / "out.parquet")["genre"].dtype) == "category"


async def _echo(prompt: str, attempt: int, timeout: float) -> tuple[str, dict[str, int]]:
    return f"echo {prompt}", {"input_tokens": 1, "output_tokens": 1}


def test_a_chunk_is_self_contained_and_pickles(tmp_path: Path) -> None:
    """What travels to a task-runner worker: the chunk pickles without its rows; unpickled elsewhere it
    reads its slice, builds its items (invalid rows keep their place), writes its part file and returns
    results without outputs."""
    import asyncio
    import pickle

    from prefect_batchllm.core.items import WorkItemResult
    from prefect_batchllm.strategies.direct import DirectCallStrategy
    from prefect_batchllm.streaming import ResolvedRow, RowSpec

    df = pd.DataFrame(
        {"code": [f"c{i}" for i in range(30)], "title": [None if i == 12 else f"t{i}" for i in range(30)]}
    )
    write_table(df, tmp_path / "in.parquet")
    _, slices = plan_slices(str(tmp_path / "in.parquet"), 10)
    spec = RowSpec("Say {title}", None, "code", DirectCallStrategy(_echo))
    staged = StagedOutput(str(tmp_path / "out.parquet"), "r")
    chunk = TableChunk(slices[1], 2, spec, staged)
    assert (chunk.start, len(chunk), chunk.label()) == (10, 10, "chunk-2: rows 10..19")
    asyncio.run(chunk.load())
    wire = pickle.dumps(chunk)
    assert b"t15" not in wire  # the loaded rows never travel
    worker_copy = pickle.loads(wire)
    items = asyncio.run(worker_copy.load())
    assert [i.item_id for i in items] == [f"c{i}" for i in range(10, 20)]
    assert isinstance(items[2], ResolvedRow) and items[2].resolved.error_category == "invalid_input"
    results = [
        i.resolved if isinstance(i, ResolvedRow) else WorkItemResult(i.item_id, True, output=f"o-{i.item_id}")
        for i in items
    ]
    back = asyncio.run(worker_copy.finish(items, results))
    assert [r.item_id for r in back] == [i.item_id for i in items] and all(r.output is None for r in back)
    part = read_table(staged.part_path(1))
    assert part["code"].tolist() == [f"c{i}" for i in range(10, 20)] and part.index.tolist() == list(
        range(10, 20)
    )
    assert part["output"].tolist()[:2] == ["o-c10", "o-c11"] and pd.isna(part["output"].iloc[2])
    assert part["error_category"].tolist()[2] == "invalid_input"


def test_whole_table_checks_fail_before_any_request(
    prefect_api: str, emulator: GeminiEmulator, tmp_path: Path
) -> None:
    """Ids are unique across slices, the id column and template fields exist: checked on the whole table
    (streaming, before any chunk runs), with the in-memory path's messages."""
    strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", emulator.client()))
    df = pd.DataFrame({"code": [f"c{i}" for i in range(50)] + ["c7"], "title": ["t"] * 51})
    write_table(df, tmp_path / "dupes.parquet")
    config = _fast(chunk_size=10)
    with pytest.raises(ValueError, match=r"id_column 'code' has duplicate ids \('c7'\)"):
        enrich_table_file(
            tmp_path / "dupes.parquet", tmp_path / "o.parquet", "Say {title}", strategy, "code", config
        )
    with pytest.raises(ValueError, match=r"'titel' \(did you mean 'title'\?\)"):
        enrich_table_file(
            tmp_path / "dupes.parquet", tmp_path / "o.parquet", "Say {titel}", strategy, None, config
        )
    with pytest.raises(ValueError, match="id_column uses column"):
        enrich_table_file(
            tmp_path / "dupes.parquet", tmp_path / "o.parquet", "Say {title}", strategy, "key", config
        )
    named = df.set_index("code")
    write_table(named, tmp_path / "named.parquet")
    with pytest.raises(ValueError, match=r"the index has duplicate ids \('c7'\)"):
        enrich_table_file(
            tmp_path / "named.parquet", tmp_path / "o.parquet", "Say {title}", strategy, None, config
        )
    assert emulator.count() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dupes.parquet", "named.parquet"]  # no staging left


def test_empty_tables_give_an_empty_output_with_every_column(
    prefect_api: str, emulator: GeminiEmulator, tmp_path: Path
) -> None:
    """Also: ``task_runner=`` takes a Prefect task runner (applied with ``with_options``) or a runner
    string (``prefect_batchllm.prefect.runners.task_runner_from``)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", emulator.client()))
    empty = pd.DataFrame({"code": pd.Series([], dtype="str"), "title": pd.Series([], dtype="str")})
    write_table(empty, tmp_path / "e.parquet")
    (tmp_path / "e.csv").write_text("code,title\n")
    with pytest.raises(ValueError, match="task_runner"):  # a runner string that names no runner
        enrich_table_file(
            tmp_path / "e.parquet", tmp_path / "x.parquet", "Say {title}", strategy, task_runner="nope"
        )
    for source, runner in (("e.parquet", ThreadPoolTaskRunner(max_workers=2)), ("e.csv", None)):
        result = enrich_table_file(
            tmp_path / source, tmp_path / f"{source}.out.parquet", "Say {title}", strategy, task_runner=runner
        )
        got = read_table(tmp_path / f"{source}.out.parquet")
        assert len(got) == 0 and result.total_items == 0
        assert list(got.columns) == ["code", "title", "output", *RESULT_COLUMNS]
    assert emulator.count() == 0


@pytest.mark.heavy  # a Dask cluster: on the newest Prefect only (Makefile)
def test_streaming_on_dask_worker_processes_matches_in_process(
    prefect_api: str, emulator: GeminiEmulator, tmp_path: Path
) -> None:
    """Chunk tasks on a ``distributed.LocalCluster`` (2 worker processes): each worker reads its own slice
    and writes its own part file; the output equals the in-process run's."""
    import logging

    distributed = pytest.importorskip("distributed", reason="the [dask] extra is not installed")
    prefect_dask = pytest.importorskip("prefect_dask", reason="the [dask] extra is not installed")
    n = 400
    df = _books(n, uuid.uuid4().hex[:6])
    write_table(df, tmp_path / "in.parquet")
    strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", emulator.client()))
    template = "Summarize {title}. ({year})"
    _faults(emulator, n)
    enrich_table_file(
        tmp_path / "in.parquet",
        tmp_path / "local.parquet",
        template,
        strategy,
        "isbn",
        _fast(chunk_size=50, refresh_cache=True),
    )
    _faults(emulator, n)
    with distributed.LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        dashboard_address=None,
        silence_logs=logging.WARNING,
    ) as cluster:
        result = enrich_table_file(
            tmp_path / "in.parquet",
            tmp_path / "dask.parquet",
            template,
            strategy,
            "isbn",
            _fast(chunk_size=50, refresh_cache=True),
            task_runner=prefect_dask.DaskTaskRunner(address=cluster.scheduler_address),
        )
    pd.testing.assert_frame_equal(
        read_table(tmp_path / "dask.parquet"), read_table(tmp_path / "local.parquet")
    )
    assert result.total_items == n and result.failed == int(
        (~read_table(tmp_path / "local.parquet")["success"]).sum()
    )


def test_each_finished_chunk_hands_its_freed_memory_back_and_keeps_no_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once per finished chunk the freed heap goes back to the OS (glibc otherwise keeps ~70 MB of freed
    pages per 1M rows), and the chunk keeps no reference to its rows afterwards."""
    import asyncio

    from prefect_batchllm import streaming
    from prefect_batchllm.core.items import WorkItemResult
    from prefect_batchllm.strategies.direct import DirectCallStrategy
    from prefect_batchllm.streaming import RowSpec

    calls: list[int] = []
    monkeypatch.setattr(streaming, "release_freed_memory", lambda: calls.append(1))
    write_table(
        pd.DataFrame({"code": [f"c{i}" for i in range(30)], "title": ["t"] * 30}), tmp_path / "in.parquet"
    )
    _, slices = plan_slices(str(tmp_path / "in.parquet"), 10)
    spec = RowSpec("Say {title}", None, "code", DirectCallStrategy(_echo))
    staged = StagedOutput(str(tmp_path / "out.parquet"), "r")
    for number, piece in enumerate(slices, 1):
        chunk = TableChunk(piece, number, spec, staged)
        items = asyncio.run(chunk.load())
        asyncio.run(chunk.finish(items, [WorkItemResult(i.item_id, True, output="o") for i in items]))
        assert chunk._loaded is None
    assert len(calls) == len(slices) == 3


def test_a_table_run_inside_a_parent_flow_names_its_artifacts_after_the_caller(
    prefect_api: str, emulator: GeminiEmulator, tmp_path: Path
) -> None:
    """Like ``run_batch``, a table run called from a pipeline's own flow publishes under that flow's name
    (one key per pipeline, not one shared ``enrich-table-file`` key for every pipeline)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.utilities.asyncutils import run_coro_as_sync

    from prefect_batchllm.prefect.artifacts import artifact_keys

    tag = uuid.uuid4().hex[:6]
    source = tmp_path / "in.parquet"
    pd.DataFrame({"title": [f"{tag} book {i}" for i in range(6)]}).to_parquet(source)
    model = GeminiModel("gemini-2.5-flash", emulator.client())

    @flow(name=f"Nightly catalogue {tag}")
    def nightly() -> TableBatchResult:
        return enrich_table_file(
            source,
            tmp_path / "out.parquet",
            "Catalogue {title}.",
            model_block=model,
            config=_fast(chunk_size=3),
        )

    assert nightly().succeeded == 6

    async def keys() -> set[str]:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=tag))
            )
        return {a.key for a in found if a.key}

    assert run_coro_as_sync(keys()) == set(artifact_keys(f"nightly-catalogue-{tag}").values())
