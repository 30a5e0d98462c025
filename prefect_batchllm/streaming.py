"""Streaming table runs: a Parquet / CSV file in, the enriched table out, in memory bounded by concurrency.

``enrich_table_file(input_path, output_path, prompt_template, ...)`` is :func:`~prefect_batchllm.dataframe.
enrich_dataframe` for tables too big to hold (100k-10M rows), path in / path out, local or fsspec URLs:

* **Input** is read by reference: the flow plans slices of ``config.chunk_size`` rows from the Parquet
  footer (:func:`~prefect_batchllm.tables.plan_slices`); each chunk task reads only its own slice. A CSV
  input (or a Parquet file with huge row groups) is first converted once, streaming, into a staging
  Parquet file next to the output so that slices are random-access.
* **Output** is ONE Parquet file at ``output_path`` (CSV when it ends in ``.csv``): each finished chunk
  writes its rows (input columns + the columns ``enrich_dataframe`` adds) as a part file in
  ``.<name>.staging-<run>/`` next to the output; at the end the parts are streamed in order into the
  output through a temp sibling and an atomic rename. Row order, index, columns and dtypes are exactly
  those of ``enrich_dataframe`` on the whole table written with ``write_table`` (the index is kept in the
  Parquet pandas metadata the same way). A run that dies leaves the old output untouched.
* **Memory**: the flow holds the rows of the chunks in flight (about ``max_workers + chunk_size``) and
  an 8-byte hash per row for the whole-table unique-id check, never the table or its outputs. Its
  :class:`TableBatchResult` keeps counts, token totals, cost, error categories and the failed ids; the
  failed rows (``item_id``, ``error_category``, ``error``) are also written to ``<output>.failed.parquet``.
* **Reruns**: results are persisted per item as in every batch run, so a rerun after a crash (or the UI's
  Retry) replays what finished and requests only the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from prefect.context import FlowRunContext
from prefect.utilities.callables import get_call_parameters
from pydantic import BaseModel

from prefect_batchllm.core.config import ProcessorConfig
from prefect_batchllm.core.errors import DefaultErrorClassifier
from prefect_batchllm.core.items import BatchResult, BatchTally, LLMWorkItem, WorkItemResult
from prefect_batchllm.core.strategy import LLMCallStrategy
from prefect_batchllm.core.templates import PromptTemplate, TemplateRef, load_prompt_template
from prefect_batchllm.dataframe import (
    INVALID_INPUT,
    PromptFn,
    UniqueIds,
    _describe,
    _model_type,
    _normalize,
    _strategy,
    build_items,
    check_columns,
    output_model,
    result_frame,
    row_ids,
)
from prefect_batchllm.prefect.artifacts import publish_batch_artifacts
from prefect_batchllm.prefect.execution import BatchExecution
from prefect_batchllm.prefect.flow_base import BatchLLMFlow
from prefect_batchllm.prefect.flows import BatchItemsFailed, announce_completed, drive_batch
from prefect_batchllm.prefect.result_log import ResultLog
from prefect_batchllm.tables import (
    StagedOutput,
    TableSlice,
    arrow_to_pandas,
    iter_id_frames,
    plan_slices,
    release_freed_memory,
    table_attrs,
    table_columns,
    with_columns,
    write_table,
)

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "FAILED_SUFFIX",
    "ResolvedRow",
    "RowSpec",
    "TableBatchResult",
    "TableChunk",
    "TableExecution",
    "check_table_ids",
    "enrich_table_file",
    "failed_rows_path",
]

#: Rows per chunk (task run) when ``config.chunk_size`` is not set: a streaming run is always chunked.
DEFAULT_CHUNK_ROWS = 500
#: The failed rows of a run are written to ``<output_path><FAILED_SUFFIX>``.
FAILED_SUFFIX = ".failed.parquet"
_NOT_SENT = "(not sent: invalid input)"


def failed_rows_path(output_path: str | os.PathLike[str]) -> str:
    """Where a streaming run writes its failed rows (``item_id``, ``error_category``, ``error``)."""
    return os.fspath(output_path) + FAILED_SUFFIX


# --------------------------------------------------------------------------------------------------
# A chunk of a table, as a reference to its rows


@dataclass
class ResolvedRow(LLMWorkItem[Any, Any, Any]):
    """A row whose result is known without a request (``invalid_input``: missing value, unfillable
    template); it keeps its position in the chunk, so every row of the table has a result in order."""

    resolved: WorkItemResult[Any, Any] | None = None


class TableExecution(BatchExecution):
    """:class:`BatchExecution` that passes a :class:`ResolvedRow`'s result through instead of sending it."""

    async def run_item(
        self, item: LLMWorkItem[Any, Any], persisted: dict[str, WorkItemResult[Any, Any]] | None = None
    ) -> WorkItemResult[Any, Any]:
        if isinstance(item, ResolvedRow) and item.resolved is not None:
            return item.resolved
        return await super().run_item(item, persisted)

    async def _lookup(self, items: Any) -> dict[str, WorkItemResult[Any, Any]]:
        return await super()._lookup([i for i in items if not isinstance(i, ResolvedRow)])


@dataclass
class RowSpec:
    """How a chunk turns its rows into work items and its results into columns (picklable).

    A model built from an ``output_schema`` dict is rebuilt where the spec is unpickled (a generated
    class cannot be pickled by reference).
    """

    template: str | None
    prompt_fn: PromptFn | None
    id_column: str | None
    strategy: LLMCallStrategy[Any]
    template_ref: TemplateRef | None = None
    output_type: type[BaseModel] | None = None
    output_schema: dict[str, str] | str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.output_schema is not None:
            state["output_type"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.output_type is None and self.output_schema is not None:
            self.output_type = output_model(self.output_schema)


@dataclass
class TableChunk:
    """One chunk of a streaming table run (a :class:`~prefect_batchllm.prefect.execution.ChunkSource`).

    Travels to the worker as (slice, spec, staging location); ``load`` reads the slice and builds its
    items there, ``finish`` writes the chunk's part file (input columns + result columns) and returns the
    results without their outputs (those are in the part file).
    """

    slice: TableSlice
    number: int
    spec: RowSpec
    output: StagedOutput
    _loaded: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def start(self) -> int:
        """Table position of the chunk's first row."""
        return self.slice.start

    def __len__(self) -> int:
        return len(self.slice)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_loaded"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._loaded = None

    def label(self) -> str:
        return f"chunk-{self.number}: rows {self.slice.start:,}..{self.slice.stop - 1:,}"

    async def load(self) -> list[LLMWorkItem[Any, Any]]:
        table = await asyncio.to_thread(self.slice.read_arrow)
        frame = await asyncio.to_thread(arrow_to_pandas, table)
        spec = self.spec
        ids = row_ids(frame, spec.id_column, offset=self.slice.start, unique=False)
        entries = build_items(frame, ids, spec.template, spec.prompt_fn, spec.strategy, spec.template_ref)
        self._loaded = (table, frame.index)
        return [
            e
            if isinstance(e, LLMWorkItem)
            else ResolvedRow(item_id=e.item_id, strategy=spec.strategy, prompt=_NOT_SENT, resolved=e)
            for e in entries
        ]

    async def finish(
        self, items: list[LLMWorkItem[Any, Any]], results: list[WorkItemResult[Any, Any]]
    ) -> list[WorkItemResult[Any, Any]]:
        if self._loaded is None:  # finish without load in this process: read the slice again
            await self.load()
        table, index = self._loaded
        self._loaded = None
        columns = result_frame(index, results, self.spec.output_type)
        part = with_columns(table, columns)
        await asyncio.to_thread(self.output.write_part, self.number - 1, part)
        del table, index, columns, part
        await asyncio.to_thread(release_freed_memory)  # the chunk's buffers, freed above, go back to the OS
        return [dataclasses.replace(r, output=None, context=None) for r in results]


# --------------------------------------------------------------------------------------------------
# The driver's tally and result


@dataclass
class TableBatchResult(BatchResult[Any, Any]):
    """The :class:`BatchResult` of a streaming table run (``summary`` mode): counts, token totals, cost,
    error categories and templates over every row, but ``results`` holds only the failed rows (in input
    order, without outputs); every row is in ``output_path``, the failed ones also in ``failed_path``."""

    output_path: str = ""
    failed_path: str | None = None
    #: The output's ``attrs["batchllm"]`` (the counts ``enrich_dataframe`` stores).
    table_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_ids(self) -> list[str]:
        return [r.item_id for r in self.results]

    @property
    def failed_categories(self) -> list[str]:
        return [r.error_category or "unknown" for r in self.results]


class _Tally:
    """What the driver keeps of each finished row: a :class:`BatchTally` (counters; the failed rows
    without their outputs) and the positions of the failed rows, to list them in input order."""

    def __init__(self) -> None:
        self.tally = BatchTally()
        self.invalid_input = 0
        self._positions: dict[str, int] = {}

    async def add(self, position: int, result: WorkItemResult[Any, Any]) -> None:
        if result.success:
            self.tally.add(result)
            return
        self.tally.add(dataclasses.replace(result, output=None, context=None))
        self._positions[result.item_id] = position
        if result.error_category == INVALID_INPUT:
            self.invalid_input += 1

    def close(self) -> BatchTally:
        """The tally with its failed rows in input order."""
        self.tally.failed.sort(key=lambda r: self._positions.get(r.item_id, -1))
        return self.tally

    def summary(self, template: TemplateRef | None) -> dict[str, Any]:
        """The ``frame.attrs["batchllm"]`` counts ``enrich_dataframe`` stores, for the whole table."""
        t = self.tally
        summary: dict[str, Any] = {
            "rows": t.total_items,
            "succeeded": t.succeeded,
            "failed": len(t.failed),
            "replayed": t.replayed,
            "invalid_input": self.invalid_input,
            "input_tokens": t.input_tokens,
            "output_tokens": t.output_tokens,
            "cached_tokens": t.cached_tokens,
        }
        if template is not None:
            summary["prompt_template"] = template.as_dict()
        return summary

    def failed_frame(self) -> pd.DataFrame:
        failed = self.close().failed
        return pd.DataFrame(
            {
                "item_id": pd.Series([r.item_id for r in failed], dtype="string"),
                "error_category": pd.Series([r.error_category or "unknown" for r in failed], dtype="string"),
                "error": pd.Series([r.error or "" for r in failed], dtype="string"),
            }
        )


def check_table_ids(path: str, id_column: str | None) -> None:
    """Whole-table id check, streaming: missing / empty ids and duplicates raise ``ValueError`` (the same
    messages as ``row_ids``). Reads only the id column (or the index columns; a ``RangeIndex`` needs
    nothing) and holds 8 bytes per row."""
    check = UniqueIds(id_column)
    position = 0
    for frame in iter_id_frames(path, id_column):
        check.add(row_ids(frame, id_column, offset=position, unique=False))
        position += len(frame)
    suspects = check.duplicate_hashes()
    if suspects:
        check.confirm(
            suspects, (row_ids(f, id_column, unique=False) for f in iter_id_frames(path, id_column))
        )


# --------------------------------------------------------------------------------------------------
# The flow


def _task_runner(spec: Any) -> Any:
    """A Prefect task runner from a runner object or a string such as ``"dask://host:8786"``."""
    if spec is None or not isinstance(spec, str):
        return spec
    try:
        from prefect_batchllm.prefect.runners import task_runner_from
    except ImportError as exc:  # pragma: no cover - runners ship with the package
        raise ValueError(f"task_runner {spec!r}: prefect_batchllm.prefect.runners is not available") from exc
    return task_runner_from(spec)


async def _enrich_table_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    prompt_template: str | PromptTemplate | os.PathLike[str] | PromptFn | None = None,
    strategy: Any = None,
    id_column: str | None = None,
    config: ProcessorConfig | None = None,
    *,
    prompt_fn: PromptFn | None = None,
    model_block: Any = None,
    output_type: type[BaseModel] | None = None,
    task_runner: Any = None,
    output_schema: dict[str, str] | str | None = None,
) -> TableBatchResult:
    """Add LLM output columns to every row of the table at ``input_path`` and write it to ``output_path``,
    streaming (see the module docstring); returns the run's :class:`TableBatchResult`.

    Arguments are those of ``enrich_dataframe`` with paths in place of the frame; ``config.chunk_size``
    is the rows per chunk task (default 500). ``task_runner`` (a Prefect task runner, or a string such as
    ``"dask://host:8786"``) runs the chunk tasks there, each reading its own slice. ``output_schema``
    (``{"field": "type"}`` or ``"module:Model"``) is ``output_type`` in a form workers rebuild.
    """
    input_url, output_url = os.fspath(input_path), os.fspath(output_path)
    if isinstance(prompt_template, os.PathLike):
        prompt_template = load_prompt_template(prompt_template)
    template_ref = prompt_template.ref if isinstance(prompt_template, PromptTemplate) else None
    if output_type is None and output_schema is not None:
        output_type = output_model(output_schema)
    template, prompt_fn, config, output_type = _normalize(
        None, prompt_template, prompt_fn, config, output_type
    )
    if config.execution != "online":
        raise ValueError(
            f"enrich_table_file streams online requests; execution={config.execution!r} needs the whole "
            "table: use enrich_dataframe"
        )
    if isinstance(model_block, str):  # a saved block's name (Block.load would return a coroutine here)
        from prefect_batchllm.prefect.blocks import GeminiCachedModelBlock

        model_block = await GeminiCachedModelBlock.aload(model_block)
    resolved = _strategy(strategy, model_block, output_type)
    output_type = output_type or _model_type(getattr(resolved, "response_schema", None))
    if config.chunk_size is None:
        config = dataclasses.replace(config, chunk_size=DEFAULT_CHUNK_ROWS)
    ctx = FlowRunContext.get()
    run = str(ctx.flow_run.id)[:8] if ctx is not None and ctx.flow_run is not None else uuid.uuid4().hex[:8]
    staged = StagedOutput(output_url, run)
    spec = RowSpec(template, prompt_fn, id_column, resolved, template_ref, output_type, output_schema)
    tally = _Tally()
    try:
        total, slices = await asyncio.to_thread(
            plan_slices, input_url, int(config.chunk_size), staging_dir=staged.staging_dir
        )
        source = slices[0].path  # the staged Parquet file for a CSV input
        check_columns(await asyncio.to_thread(table_columns, source), template, id_column, output_type)
        await asyncio.to_thread(check_table_ids, source, id_column)
        if total == 0:  # an empty table: its (empty) output still gets every column
            empty = TableChunk(slices[0], 1, spec, staged)
            await empty.finish(await empty.load(), [])
            n_parts, drive = 1, None
        else:
            execution = TableExecution(
                config, DefaultErrorClassifier(), [], await ResultLog.for_config(config)
            )
            chunks: Iterable[TableChunk] = (TableChunk(s, n, spec, staged) for n, s in enumerate(slices, 1))
            drive = await drive_batch(
                execution,
                total=total,
                strategies=[resolved],
                dispatch=lambda: execution.dispatch_chunks(chunks),
                collect=tally.add,
            )
            n_parts = len(slices)
        if tally.tally.total_items != total:  # defensive: every row must be accounted for
            raise RuntimeError(f"internal error: {total - tally.tally.total_items} rows have no result")
        attrs = {**(await asyncio.to_thread(table_attrs, source)), "batchllm": tally.summary(template_ref)}
        await asyncio.to_thread(staged.commit, n_parts, attrs=attrs)
    except BaseException:
        await asyncio.to_thread(staged.discard)
        raise
    failed_path = failed_rows_path(output_url)
    await asyncio.to_thread(write_table, tally.failed_frame(), failed_path)
    batch = TableBatchResult(
        results=[],
        wall_time_s=drive.wall_time_s if drive is not None else 0.0,
        summary=tally.close(),
        output_path=output_url,
        failed_path=failed_path,
        table_summary=attrs["batchllm"],
    )
    if drive is not None:
        await publish_batch_artifacts(
            batch, drive.artifact_prefix, title=f"Table summary: {drive.artifact_prefix}"
        )
        await announce_completed(batch, drive)
    if config.fail_on_item_failure and batch.failed:
        raise BatchItemsFailed(batch)
    return batch


class _TableFlow(BatchLLMFlow):
    """Stored parameters describe objects instead of serialising them; ``task_runner=`` is applied with
    ``with_options`` before the flow run starts (a run's task runner is fixed when it starts)."""

    def summarize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        out = {k: _describe(v) for k, v in parameters.items()}
        if out.get("task_runner") is not None and not isinstance(out["task_runner"], str):
            out["task_runner"] = type(out["task_runner"]).__name__
        for name in ("input_path", "output_path"):
            if isinstance(out.get(name), os.PathLike):
                out[name] = os.fspath(out[name])
        return out

    def check_call(self, parameters: dict[str, Any]) -> dict[str, Any]:
        _normalize(
            None,
            parameters.get("prompt_template"),
            parameters.get("prompt_fn"),
            parameters.get("config"),
            parameters.get("output_type"),
        )
        return parameters

    def __call__(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
        params = get_call_parameters(self.fn, args, kwargs)
        runner = _task_runner(params.get("task_runner"))
        if runner is not None:
            params["task_runner"] = None
            flow = self.with_options(task_runner=runner)
            return flow(return_state=return_state, wait_for=wait_for, **params)
        return super().__call__(*args, return_state=return_state, wait_for=wait_for, **kwargs)


enrich_table_file: _TableFlow = _TableFlow(
    _enrich_table_file,
    name="enrich-table-file",
    description="Add LLM outputs to every row of a Parquet/CSV table, streaming, into one output file.",
    validate_parameters=False,
    persist_result=False,
    log_prints=False,
)
"""``enrich_table_file(input_path, output_path, prompt_template=None, strategy=None, id_column=None,
config=None, *, prompt_fn=None, model_block=None, output_type=None, task_runner=None) -> TableBatchResult``
- a Prefect flow (see ``_enrich_table_file``)."""
