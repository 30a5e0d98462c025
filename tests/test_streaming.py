"""Streaming table runs: slices in, part files out, one atomic Parquet output (issue 9).

The IO pieces (``prefect_batchllm.tables``) are tested on their own here, with no Prefect API; the
streaming ``enrich_table_file`` runs go through the real SDK to the bundled server and the real Prefect API.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from prefect_batchllm.dataframe import UniqueIds, row_ids
from prefect_batchllm.tables import StagedOutput, plan_slices, read_table, stage_csv, write_table


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
