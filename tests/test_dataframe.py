"""``enrich_dataframe`` and the table readers/writers, over the real genai SDK and the bundled Gemini server.

Flow tests use this module's own ``prefect server start`` (the 1,000-row test leaves the server busy
recording task runs for a while; a private server keeps that from slowing other modules). Checks that
must fail before anything runs need no API at all. Every test's prompts carry a unique tag, so item
results persisted by other tests (same storage, keys from id + prompt + model) are never replayed here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pytest
from _prefect_server import connected, prefect_server
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from pydantic import BaseModel, SecretStr

from prefect_batchllm import ProcessorConfig, RetryConfig
from prefect_batchllm.dataframe import (
    RESULT_COLUMNS,
    EnrichmentFailed,
    enrich_dataframe,
    merge_rows,
    output_model,
    row_ids,
    template_fields,
)
from prefect_batchllm.models.gemini import GeminiModel
from prefect_batchllm.strategies.gemini import GeminiStrategy
from prefect_batchllm.tables import read_table, write_table
from prefect_batchllm.testing import Fault, GeminiEmulator


class Card(BaseModel):
    genre: Literal["novel", "poetry", "drama"]
    pages: int
    rating: float
    summary: str
    classic: bool


CARD_DTYPES = {
    "genre": pd.CategoricalDtype(["novel", "poetry", "drama"]),
    "pages": pd.Int64Dtype(),
    "rating": pd.Float64Dtype(),
    "summary": pd.StringDtype(),
    "classic": pd.BooleanDtype(),
    "success": np.dtype(bool),
    "error": pd.StringDtype(),
    "error_category": pd.StringDtype(),
    "attempts": np.dtype("int64"),
    "input_tokens": np.dtype("int64"),
    "output_tokens": np.dtype("int64"),
    "cached_tokens": np.dtype("int64"),
    "replayed": np.dtype(bool),
}


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    """A real Prefect server for this module, and this process pointed at it."""
    with prefect_server() as url, connected(url):
        yield url


def fast(**overrides: Any) -> ProcessorConfig:
    return ProcessorConfig(
        max_workers=16, retry=RetryConfig(max_attempts=2, initial_wait=0.01, jitter=False), **overrides
    )


def tag() -> str:
    return uuid.uuid4().hex[:8]


def text_strategy(emulator: GeminiEmulator) -> GeminiStrategy[str]:
    return GeminiStrategy(GeminiModel("gemini-2.5-flash", emulator.client()))


# ------------------------------------------------------------------------------------------------------
# Checked before anything runs (no Prefect API, no request)


def test_template_fields() -> None:
    assert template_fields("[{id}] {title!r:>10} by {author} ({meta[year]}) {title}") == [
        "id",
        "title",
        "author",
        "meta",
    ]
    with pytest.raises(ValueError, match="positional"):
        template_fields("Summarize {}")
    with pytest.raises(ValueError, match="non-empty"):
        template_fields("  ")


def test_missing_template_column_fails_before_any_request(emulator: GeminiEmulator) -> None:
    df = pd.DataFrame({"title": ["Emma"], "author": ["Austen"]})
    with pytest.raises(ValueError, match=r"'auther' \(did you mean 'author'\?\)"):
        enrich_dataframe(df, "Summarize {title} by {auther}", text_strategy(emulator))
    assert emulator.count() == 0


@pytest.mark.parametrize(
    ("frame", "id_column", "message"),
    [
        (pd.DataFrame({"t": ["a", "b"]}, index=[1, 1]), None, "the index has duplicate ids"),
        (pd.DataFrame({"t": ["a", "b"], "k": ["x", "x"]}), "k", "id_column 'k' has duplicate ids"),
        (pd.DataFrame({"t": ["a", "b"], "k": ["x", None]}), "k", "missing or empty id at row position 1"),
        (pd.DataFrame({"t": ["a", "b"], "k": ["x", " "]}), "k", "missing or empty id"),
        (pd.DataFrame({"t": ["a"]}), "key", "id_column uses column"),
        (pd.DataFrame({"t": ["a"], "success": [1]}), None, "already has column"),
    ],
)
def test_bad_ids_and_column_clashes_fail_before_any_request(
    emulator: GeminiEmulator, frame: pd.DataFrame, id_column: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        enrich_dataframe(frame, "Say {t}", text_strategy(emulator), id_column)
    assert emulator.count() == 0


def test_argument_errors(emulator: GeminiEmulator) -> None:
    df = pd.DataFrame({"t": ["a"]})
    with pytest.raises(TypeError, match="exactly one of prompt_template"):
        enrich_dataframe(df, None, text_strategy(emulator))
    with pytest.raises(TypeError, match="prompt_fn once"):
        enrich_dataframe(df, lambda row: "x", text_strategy(emulator), prompt_fn=lambda row: "y")
    with pytest.raises(TypeError, match="DataFrame"):
        enrich_dataframe([{"t": "a"}], "Say {t}", text_strategy(emulator))
    with pytest.raises(TypeError, match="pydantic BaseModel"):
        enrich_dataframe(df, "Say {t}", text_strategy(emulator), output_type=dict)


# ------------------------------------------------------------------------------------------------------
# Real runs


@pytest.mark.prefect
def test_missing_values_fail_their_row_and_are_never_sent(api_url: str, emulator: GeminiEmulator) -> None:
    t = tag()
    df = pd.DataFrame(
        {
            "title": ["Emma", None, "Ulysses", "Beloved", "Dracula"],
            "year": [1815, 1813, np.nan, 1987, 1897],
            "notes": [np.nan, "x", "y", np.nan, "z"],  # not in the template: NaN is fine
        },
        index=pd.Index(["a", "b", "c", "d", "e"]),
    )
    out = enrich_dataframe(df, f"[{{title}}] ({t}) {{title}} from {{year:.0f}}", text_strategy(emulator))

    assert out["success"].tolist() == [True, False, False, True, True]
    assert out.loc["b", "error_category"] == "invalid_input"
    assert out.loc["b", "error"] == "missing value in column(s) 'title'; the row was not sent"
    assert out.loc["c", "error"] == "missing value in column(s) 'year'; the row was not sent"
    assert out.loc[["b", "c"], "attempts"].tolist() == [0, 0]
    assert out.loc["a", "output"] == f"echo: [Emma] ({t}) Emma from 1815"
    assert pd.isna(out.loc["b", "output"])
    assert emulator.count("generateContent") == 3
    assert emulator.count(contains="Ulysses") == 0
    assert out.attrs["batchllm"]["invalid_input"] == 2


@pytest.mark.prefect
def test_prompt_fn_and_model_block_positionally(api_url: str, emulator: GeminiEmulator) -> None:
    """A callable as 2nd argument is ``prompt_fn``; a ``GeminiCachedModelBlock`` as 3rd builds a
    GeminiStrategy over its shared cached model, asking for ``output_type`` as JSON."""
    from prefect_batchllm.prefect.blocks import GeminiCachedModelBlock, GeminiCredentials

    t = tag()
    block = GeminiCachedModelBlock(
        model="gemini-2.5-flash",
        credentials=GeminiCredentials(
            api_key=SecretStr("test-key"), base_url=emulator.base_url, api_version="v1beta"
        ),
        system_instruction=f"You catalogue books ({t}).",
    )

    def prompt(row: pd.Series) -> str:
        if row["title"] == "bad":
            raise ValueError("no such book")
        return f"[{row.name}] ({t}) Catalogue {row['title']}"

    df = pd.DataFrame({"title": ["Emma", "bad", "Dracula"]}, index=[10, 20, 30])
    out = enrich_dataframe(df, prompt, block, output_type=Card)

    assert out["success"].tolist() == [True, False, True]
    assert out.loc[20, "error"] == "prompt_fn failed: ValueError: no such book"
    assert out.loc[20, "error_category"] == "invalid_input"
    assert out.loc[[10, 30], "genre"].isin(["novel", "poetry", "drama"]).all()
    assert out["pages"].dtype == "Int64" and pd.isna(out.loc[20, "pages"])
    requests = emulator.requests_for("generateContent")
    assert len(requests) == 2 and all(r.cached_content for r in requests)  # the block's context cache
    assert emulator.count("cachedContents.create") == 1


@pytest.mark.prefect
def test_fail_on_item_failure_raises_with_the_complete_frame(api_url: str, emulator: GeminiEmulator) -> None:
    t = tag()
    emulator.faults.add(Fault.status(400), contains="[k2]", times=None)
    df = pd.DataFrame({"key": ["k1", "k2", "k3"], "title": ["A", "B", "C"]})
    with pytest.raises(EnrichmentFailed, match=r"1/3 rows failed \(fatal=1\)") as caught:
        enrich_dataframe(
            df, f"[{{key}}] ({t}) {{title}}", text_strategy(emulator), "key", fast(fail_on_item_failure=True)
        )
    frame = caught.value.frame
    assert frame["success"].tolist() == [True, False, True]
    assert frame.loc[1, "error_category"] == "fatal" and frame.loc[1, "attempts"] == 1
    assert frame.loc[0, "output"] == f"echo: [k1] ({t}) A"


@pytest.mark.prefect
def test_enrich_dataframe_as_a_subflow(api_url: str, emulator: GeminiEmulator) -> None:
    from prefect import flow

    t = tag()

    @flow
    def pipeline() -> pd.DataFrame:
        df = pd.DataFrame({"title": ["Emma", "Dracula"]})
        return enrich_dataframe(df, f"[{{title}}] ({t})", text_strategy(emulator))

    out = pipeline()
    assert out["output"].tolist() == [f"echo: [Emma] ({t})", f"echo: [Dracula] ({t})"]
    # The stored flow-run parameters describe the frame; they never carry its rows (512 KiB cap).
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["enrich-dataframe"])))
    params = [r.parameters for r in runs if r.parameters.get("prompt_template") == f"[{{title}}] ({t})"]
    assert len(params) == 1
    assert params[0]["df"] == {"rows": 2, "columns": ["title"]}
    assert params[0]["strategy"].startswith("GeminiStrategy(")


# ------------------------------------------------------------------------------------------------------
# Files and helpers


def test_write_table_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.parquet"
    old = pd.DataFrame({"a": [1, 2]})
    write_table(old, path)

    def torn(self: pd.DataFrame, handle: Any, **kwargs: Any) -> None:
        handle.write(b"PAR1 half a table")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", torn)
    with pytest.raises(OSError, match="disk full"):
        write_table(pd.DataFrame({"a": [3]}), path)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(read_table(path), old)
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_read_write_formats_and_fsspec_urls(tmp_path: Path) -> None:
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}, index=pd.Index(["p", "q"], name="k"))
    write_table(df, tmp_path / "nested" / "t.parquet")
    pd.testing.assert_frame_equal(read_table(tmp_path / "nested" / "t.parquet"), df)
    write_table(df, tmp_path / "t.csv")  # a non-default index is written to CSV
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.csv", index_col="k"), df, check_dtype=False)
    plain = df.reset_index(drop=True)
    write_table(plain, tmp_path / "t.tsv")
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.tsv"), plain, check_dtype=False)
    url = f"memory://batchllm-{tag()}/t.parquet"
    write_table(df, url)
    pd.testing.assert_frame_equal(read_table(url), df)
    write_table(plain, f"file://{tmp_path}/u.csv")
    assert read_table(tmp_path / "u.csv")["a"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="table format"):
        write_table(df, tmp_path / "t.xlsx")


def test_output_model_specs() -> None:
    model = output_model({"genre": "str", "pages": "int", "tags": "list[str]"})
    assert model is not None
    assert model(genre="x", pages=3, tags=["a"]).pages == 3
    assert output_model(f"{Card.__module__}:Card") is Card
    assert output_model(Card) is Card and output_model(None) is None
    with pytest.raises(ValueError, match="unknown type"):
        output_model({"a": "complex"})
    with pytest.raises(ValueError, match="module:ModelName"):
        output_model("Card")


def test_merge_rows_keeps_order_and_dtypes() -> None:
    base = pd.DataFrame(
        {"k": ["a", "b", "c"], "n": pd.array([1, None, 3], dtype="Int64"), "ok": [True, False, True]}
    )
    update = pd.DataFrame({"k": ["b"], "n": pd.array([2], dtype="Int64"), "ok": [True]}, index=[1])
    merged = merge_rows(base, update, "k")
    assert merged["n"].tolist() == [1, 2, 3] and merged["ok"].all()
    assert (merged.dtypes == base.dtypes).all()
    assert row_ids(merged, "k") == ["a", "b", "c"]
    with pytest.raises(ValueError, match="ids not in the table"):
        merge_rows(base, pd.DataFrame({"k": ["z"]}), "k")


# Last in the module: the server is still recording its 1,000 task runs for a while afterwards.
@pytest.mark.prefect
def test_round_trip_1000_rows_with_pydantic_output(
    api_url: str, emulator: GeminiEmulator, tmp_path: Path
) -> None:
    """1,000 rows, shuffled index: shape, index, order and dtypes hold, row i is answered for row i,
    and the table survives Parquet exactly (CSV keeps shape, order and values)."""
    n = 1000
    rng = np.random.default_rng(7)
    labels = rng.permutation(n) * 3 + 11
    df = pd.DataFrame(
        {
            "code": [f"r{label}" for label in labels],
            "title": [f"Book {label}" for label in labels],
            "year": rng.integers(1700, 2000, n),
            "price": rng.random(n) * 30,
        },
        index=pd.Index(labels, name="rid"),
    )
    t = tag()
    strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", emulator.client()), response_schema=Card)
    out = enrich_dataframe(df, f"[{{code}}] ({t}) Catalogue {{title}}, {{year}}.", strategy, config=fast())

    assert out.shape == (n, 4 + len(Card.model_fields) + len(RESULT_COLUMNS))
    assert out.index.equals(df.index) and out.index.name == "rid"
    pd.testing.assert_frame_equal(out[df.columns], df)
    assert list(out.columns) == [*df.columns, *Card.model_fields, *RESULT_COLUMNS]
    assert dict(out.dtypes[list(CARD_DTYPES)]) == CARD_DTYPES
    assert out["success"].all() and (out["attempts"] == 1).all() and not out["replayed"].any()
    assert out.attrs["batchllm"]["succeeded"] == n

    # Row i got the answer to row i's request: token counts per row match that request's usage.
    usage = {r.prompt_text.split("]", 1)[0][1:]: r.usage for r in emulator.requests_for("generateContent")}
    assert len(usage) == n
    assert out["input_tokens"].tolist() == [usage[c]["promptTokenCount"] for c in out["code"]]
    assert out["output_tokens"].tolist() == [usage[c]["candidatesTokenCount"] for c in out["code"]]
    assert out["output_tokens"].nunique() > 1  # answers differ in length, so the check has teeth

    parquet = tmp_path / "cards.parquet"
    write_table(out, parquet)
    pd.testing.assert_frame_equal(read_table(parquet), out)

    csv = tmp_path / "cards.csv"
    write_table(out, csv)
    back = read_table(csv, index_col="rid")
    assert back.shape == out.shape and back.index.equals(out.index)
    assert back["code"].tolist() == out["code"].tolist()
    assert back["pages"].tolist() == out["pages"].tolist()
