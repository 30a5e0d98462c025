"""Frames in, frames out: ``enrich_dataframe`` (a Prefect flow). Table files: :mod:`prefect_batchllm.tables`.

Row ``i`` of the returned frame is row ``i`` of the input (same index, same order), with these columns
added: ``output`` (or one column per field of a pydantic output type), ``success``, ``error``,
``error_category``, ``attempts``, ``input_tokens``, ``output_tokens``, ``cached_tokens`` and ``replayed``.

Missing values (the policy, chosen so that nothing is silently dropped and nothing is paid for in vain):

* A template field that names no column is a ``ValueError`` raised before any request is made.
* A row whose used field is missing (``None``, ``NaN``, ``NaT``, ``pd.NA``) is never sent. It fails with
  ``error_category="invalid_input"``, ``attempts=0`` and an error naming the column(s). The same holds
  for a value the template's format spec rejects (``{year:.0f}`` on text) and for a ``prompt_fn`` that
  raises or returns an empty prompt for a row. Columns the template does not use may hold anything.
* Item ids come from ``id_column`` (values must be present and unique) or from the index (must be
  unique); a violation is a ``ValueError`` before any request. Stable ids plus the persisted item results
  are what make reruns cheap: a row whose id and prompt did not change is loaded, not requested again.

Token columns count what *this* run was billed: a row replayed from an earlier run's persisted result has
``replayed=True``, ``attempts=0`` and zero tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import enum
import importlib
import inspect
import os
import string
import types as _pytypes
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import pandas as pd
from prefect.utilities.asyncutils import run_coro_as_sync
from pydantic import BaseModel, create_model

from prefect_batchllm.core.config import ProcessorConfig
from prefect_batchllm.core.items import BatchResult, LLMWorkItem, WorkItemResult
from prefect_batchllm.core.strategy import LLMCallStrategy
from prefect_batchllm.core.templates import PromptTemplate, TemplateRef, load_prompt_template
from prefect_batchllm.prefect.flow_base import BatchLLMFlow

if TYPE_CHECKING:
    pass

__all__ = [
    "INVALID_INPUT",
    "RESULT_COLUMNS",
    "EnrichmentFailed",
    "UniqueIds",
    "build_items",
    "check_columns",
    "enrich_dataframe",
    "enrich_frame",
    "merge_rows",
    "output_columns",
    "output_model",
    "result_frame",
    "row_ids",
    "template_fields",
]

#: Columns added after the output column(s), in this order.
RESULT_COLUMNS: tuple[str, ...] = (
    "success",
    "error",
    "error_category",
    "attempts",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "replayed",
)
#: ``error_category`` of a row that was never sent (missing value, bad prompt).
INVALID_INPUT = "invalid_input"

PromptFn = Callable[[pd.Series], Any]


class EnrichmentFailed(Exception):
    """Rows failed and ``config.fail_on_item_failure`` is set; the complete frame is on ``.frame``."""

    def __init__(self, frame: pd.DataFrame, result: BatchResult[Any, Any] | None) -> None:
        super().__init__(frame)
        self.frame = frame
        self.result = result

    def __str__(self) -> str:
        failed = int((~self.frame["success"]).sum())
        counts = self.frame.loc[~self.frame["success"], "error_category"].value_counts()
        categories = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        return f"{failed}/{len(self.frame)} rows failed ({categories})"


# --------------------------------------------------------------------------------------------------
# Rows -> work items


def template_fields(template: str) -> list[str]:
    """Column names a ``str.format`` template uses (``"{title!r:>10}"`` and ``"{meta[k]}"`` included)."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("prompt_template must be a non-empty string")
    names: list[str] = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is None:
            continue
        base = field_name.split(".", 1)[0].split("[", 1)[0]
        if base == "" or base.isdigit():
            raise ValueError(
                f"prompt_template uses a positional field {{{field_name}}}; name a column instead, "
                "e.g. {title}"
            )
        if base not in names:
            names.append(base)
    return names


def _check_columns(used: Sequence[str], columns: Sequence[Any], what: str) -> None:
    import difflib

    available = [str(c) for c in columns]
    missing = [name for name in used if name not in available]
    if missing:
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, available, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"{what} uses column(s) not in the table: {', '.join(hints)}; columns are: {', '.join(available)}"
        )


def row_ids(
    df: pd.DataFrame, id_column: str | None = None, *, offset: int = 0, unique: bool = True
) -> list[str]:
    """The item id of every row: ``str`` of ``id_column``'s value, else of the index label.

    Raises ``ValueError`` for missing, empty or (with ``unique``) duplicate ids: they would merge rows or
    break reruns. ``offset`` is the table position of ``df``'s first row (errors name table positions).
    """
    if id_column is not None:
        if id_column not in df.columns:
            _check_columns([id_column], list(df.columns), "id_column")
        values = df[id_column].tolist()
    else:
        values = df.index.tolist()
    source = _id_source(id_column)
    ids: list[str] = []
    for position, value in enumerate(values, start=offset):
        if _is_missing(value) or not str(value).strip():
            raise ValueError(f"{source} has a missing or empty id at row position {position}")
        ids.append(str(value))
    if unique and len(set(ids)) != len(ids):
        _raise_duplicates(source, sorted(i for i, n in Counter(ids).items() if n > 1))
    return ids


def _id_source(id_column: str | None) -> str:
    return f"id_column {id_column!r}" if id_column is not None else "the index"


def _raise_duplicates(source: str, dupes: list[str]) -> None:
    shown = ", ".join(repr(d) for d in dupes[:5])
    raise ValueError(
        f"{source} has duplicate ids ({shown}{' ...' if len(dupes) > 5 else ''}); every row needs a "
        "unique id (pass id_column= or reset_index())"
    )


class UniqueIds:
    """Whole-table id check for tables read in slices: ``add`` each slice's ids (missing / empty ids
    fail at once), then ``duplicate_hashes()``. Holds one 8-byte hash per row (8 MB per million rows),
    never the ids; a hash seen twice is confirmed against the real ids by :meth:`confirm` (a second
    pass over the id column only, keeping the ids of those hashes)."""

    def __init__(self, id_column: str | None = None) -> None:
        self.source = _id_source(id_column)
        self._hashes: list[Any] = []
        self._rows = 0

    @staticmethod
    def hashes(ids: Sequence[str]) -> Any:
        import numpy as np

        return pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False)

    def add(self, ids: Sequence[str]) -> None:
        self._hashes.append(self.hashes(ids))
        self._rows += len(ids)

    def duplicate_hashes(self) -> set[int]:
        """Hashes that occur more than once (empty: the ids are unique)."""
        import numpy as np

        if not self._hashes:
            return set()
        merged = np.sort(np.concatenate(self._hashes))
        self._hashes = [merged]
        same = merged[1:] == merged[:-1]
        return {int(h) for h in merged[1:][same]}

    def confirm(self, suspects: set[int], id_batches: Iterable[Sequence[str]]) -> None:
        """Raise the duplicate-id ``ValueError`` if ids with the ``suspects`` hashes really repeat."""
        seen: Counter[str] = Counter()
        for ids in id_batches:
            for item_id, h in zip(ids, self.hashes(ids), strict=True):
                if int(h) in suspects:
                    seen[item_id] += 1
        dupes = sorted(i for i, n in seen.items() if n > 1)
        if dupes:
            _raise_duplicates(self.source, dupes)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.api.types.is_scalar(value) and pd.isna(value))
    except (TypeError, ValueError):
        return False


def _invalid(item_id: str, message: str) -> WorkItemResult[Any, Any]:
    return WorkItemResult(item_id=item_id, success=False, error=message, error_category=INVALID_INPUT)


def _prompts(
    df: pd.DataFrame,
    ids: list[str],
    template: str | None,
    prompt_fn: PromptFn | None,
) -> list[Any | WorkItemResult[Any, Any]]:
    """Per row: its prompt, or an ``invalid_input`` result when the row cannot be sent."""
    out: list[Any | WorkItemResult[Any, Any]] = []
    if template is not None:
        used = template_fields(template)
        records = df[used].to_dict("records") if used else [{} for _ in range(len(df))]
        for item_id, record in zip(ids, records, strict=True):
            missing = [name for name in used if _is_missing(record[name])]
            if missing:
                cols = ", ".join(repr(m) for m in missing)
                out.append(_invalid(item_id, f"missing value in column(s) {cols}; the row was not sent"))
                continue
            try:
                prompt = template.format(**record)
            except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
                out.append(_invalid(item_id, f"prompt_template could not be filled: {exc!r}"))
                continue
            out.append(prompt if prompt.strip() else _invalid(item_id, "the prompt is empty"))
        return out
    assert prompt_fn is not None
    for item_id, (_, row) in zip(ids, df.iterrows(), strict=True):
        try:
            prompt = prompt_fn(row)
        except Exception as exc:
            out.append(_invalid(item_id, f"prompt_fn failed: {type(exc).__name__}: {exc}"))
            continue
        if not isinstance(prompt, str | list):
            out.append(_invalid(item_id, f"prompt_fn returned {type(prompt).__name__}, not str or list"))
        elif not (prompt.strip() if isinstance(prompt, str) else prompt):
            out.append(_invalid(item_id, "prompt_fn returned an empty prompt"))
        else:
            out.append(prompt)
    return out


def build_items(
    df: pd.DataFrame,
    ids: list[str],
    template: str | None,
    prompt_fn: PromptFn | None,
    strategy: LLMCallStrategy[Any],
    template_ref: TemplateRef | None = None,
) -> list[LLMWorkItem[Any, Any] | WorkItemResult[Any, Any]]:
    """Per row, in order: its work item, or the ``invalid_input`` result of a row that cannot be sent
    (missing value, unfillable template, bad ``prompt_fn`` result). Works on a whole frame or a slice."""
    out: list[LLMWorkItem[Any, Any] | WorkItemResult[Any, Any]] = []
    for item_id, prompt in zip(ids, _prompts(df, ids, template, prompt_fn), strict=True):
        if isinstance(prompt, WorkItemResult):
            if template_ref is not None:  # rows never sent record the template too
                prompt.metadata = {**prompt.metadata, "prompt_template": template_ref.as_dict()}
            out.append(prompt)
        else:
            out.append(LLMWorkItem(item_id=item_id, strategy=strategy, prompt=prompt, template=template_ref))
    return out


# --------------------------------------------------------------------------------------------------
# Results -> columns


def _unwrap(annotation: Any) -> Any:
    """``Optional[X]`` / ``Annotated[X, ...]`` -> ``X`` (other unions stay as they are)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (Union, _pytypes.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return annotation


def _dtype_for(annotation: Any) -> Any:
    """A pandas dtype that holds a field's values plus NA for failed rows; ``None`` means object."""
    tp = _unwrap(annotation)
    if get_origin(tp) is Literal:
        values = get_args(tp)
        if values and all(isinstance(v, str) for v in values):
            return pd.CategoricalDtype(list(values))
        return None
    if not isinstance(tp, type):
        return None
    if issubclass(tp, enum.Enum):
        values = [member.value for member in tp]
        return pd.CategoricalDtype(values) if all(isinstance(v, str) for v in values) else None
    if issubclass(tp, bool):
        return "boolean"
    if issubclass(tp, int):
        return "Int64"
    if issubclass(tp, float):
        return "Float64"
    if issubclass(tp, str):
        return "string"
    if issubclass(tp, _dt.datetime):
        return "datetime"
    return None


def _plain(value: Any) -> Any:
    """Field values as plain Python (nested models -> dicts, enums -> values) so Parquet can store them."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="python")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _series(values: list[Any], index: pd.Index, dtype: Any) -> pd.Series:
    if dtype == "datetime":
        with contextlib.suppress(Exception):
            return pd.Series(pd.to_datetime(values), index=index)
        dtype = None
    if dtype is not None:
        with contextlib.suppress(Exception):
            return pd.Series(values, index=index, dtype=dtype)
    return pd.Series(values, index=index, dtype=object)


def output_columns(output_type: type[BaseModel] | None) -> list[str]:
    """The output column names: the model's fields, else ``["output"]``."""
    return list(output_type.model_fields) if output_type is not None else ["output"]


def result_frame(
    index: pd.Index, results: list[WorkItemResult[Any, Any]], output_type: type[BaseModel] | None
) -> pd.DataFrame:
    """The columns enrichment adds, one row per result (results in row order): the same for a whole
    table or any slice of it (the output column is text when every output of the slice is)."""
    success = [r.success for r in results]
    errors: list[str | None] = [r.error for r in results]
    categories: list[str | None] = [r.error_category for r in results]
    columns: dict[str, pd.Series] = {}
    if output_type is not None:
        fields = output_type.model_fields
        values: dict[str, list[Any]] = {name: [] for name in fields}
        for position, r in enumerate(results):
            record: dict[str, Any] | None = None
            if r.success:
                try:
                    value = r.output
                    if isinstance(value, BaseModel) and not isinstance(value, output_type):
                        # Same schema, other class object: e.g. a model built from an output_schema
                        # dict, loaded from a result persisted by another process.
                        value = value.model_dump()
                    model = value if isinstance(value, output_type) else output_type.model_validate(value)
                    record = {name: _plain(getattr(model, name)) for name in fields}
                except Exception as exc:  # a strategy that ignored the schema: the row failed
                    success[position] = False
                    errors[position] = f"output is not a {output_type.__name__}: {type(exc).__name__}: {exc}"[
                        :600
                    ]
                    categories[position] = "invalid_output"
            for name in fields:
                values[name].append(record[name] if record is not None else None)
        for name, field in fields.items():
            columns[name] = _series(values[name], index, _dtype_for(field.annotation))
    else:
        outputs = [_plain(r.output) if ok else None for r, ok in zip(results, success, strict=True)]
        texts = all(isinstance(o, str) for o in outputs if o is not None)
        columns["output"] = _series(outputs, index, "string" if texts else None)
    columns["success"] = pd.Series(success, index=index, dtype=bool)
    columns["error"] = pd.Series(errors, index=index, dtype="string")
    columns["error_category"] = pd.Series(categories, index=index, dtype="string")
    columns["attempts"] = pd.Series([r.attempts for r in results], index=index, dtype="int64")
    for column, key in (
        ("input_tokens", "input_tokens"),
        ("output_tokens", "output_tokens"),
        ("cached_tokens", "cached_input_tokens"),
    ):
        columns[column] = pd.Series(
            [int(r.token_usage.get(key, 0) or 0) for r in results], index=index, dtype="int64"
        )
    columns["replayed"] = pd.Series([r.replayed for r in results], index=index, dtype=bool)
    return pd.DataFrame(columns, index=index)


# --------------------------------------------------------------------------------------------------
# Strategy / output type resolution


def _model_type(value: Any) -> type[BaseModel] | None:
    return value if isinstance(value, type) and issubclass(value, BaseModel) else None


_TYPE_NAMES: dict[str, Any] = {
    "str": str,
    "string": str,
    "int": int,
    "integer": int,
    "float": float,
    "number": float,
    "bool": bool,
    "boolean": bool,
    "list[str]": list[str],
    "list[int]": list[int],
    "list[float]": list[float],
    "date": _dt.date,
    "datetime": _dt.datetime,
}


def output_model(spec: type[BaseModel] | dict[str, str] | str | None) -> type[BaseModel] | None:
    """Resolve an output-type option that a deployment can carry as a JSON parameter.

    ``"package.module:Model"`` imports a pydantic model; ``{"field": "int", ...}`` builds one from type
    names (str, int, float, bool, date, datetime, list[str], list[int], list[float]); a model class is
    returned as is; ``None`` means plain text output.
    """
    if spec is None or _model_type(spec) is not None:
        return spec  # type: ignore[return-value]
    if isinstance(spec, str):
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"output schema {spec!r}: expected 'package.module:ModelName'")
        model = getattr(importlib.import_module(module_name), attr, None)
        if _model_type(model) is None:
            raise TypeError(f"output schema {spec!r} is not a pydantic BaseModel subclass")
        return model
    if isinstance(spec, dict):
        if not spec:
            raise ValueError("output schema must name at least one field")
        fields: dict[str, Any] = {}
        for name, type_name in spec.items():
            tp = _TYPE_NAMES.get(str(type_name).strip().lower().replace(" ", ""))
            if tp is None:
                raise ValueError(
                    f"output schema field {name!r}: unknown type {type_name!r}; use one of "
                    f"{', '.join(sorted(_TYPE_NAMES))}"
                )
            fields[str(name)] = (tp, ...)
        return create_model("TableOutput", **fields)  # type: ignore[call-overload,no-any-return]
    raise TypeError(f"output schema must be a model, 'module:Model' or a dict, got {type(spec).__name__}")


def _strategy(strategy: Any, model_block: Any, output_type: type[BaseModel] | None) -> LLMCallStrategy[Any]:
    """A strategy from a strategy, a ``GeminiCachedModelBlock`` (or its saved name) or an ``LLMModel``."""
    if strategy is not None and model_block is not None:
        raise TypeError("give either a strategy or model_block, not both")
    source = strategy if strategy is not None else model_block
    if source is None:
        raise TypeError("enrich_dataframe needs a strategy or a model block (GeminiCachedModelBlock)")
    if isinstance(source, LLMCallStrategy):
        return source
    from prefect_batchllm.prefect.blocks import GeminiCachedModelBlock
    from prefect_batchllm.strategies.gemini import GeminiStrategy

    if isinstance(source, str):
        source = GeminiCachedModelBlock.load(source)
    if isinstance(source, GeminiCachedModelBlock):
        model = source.get_model()
    elif callable(getattr(source, "generate", None)):
        model = source  # an LLMModel such as GeminiModel
    else:
        raise TypeError(
            f"expected an LLMCallStrategy, a GeminiCachedModelBlock (or its name) or an LLMModel, "
            f"got {type(source).__name__}"
        )
    return GeminiStrategy(model, response_schema=output_type)


# --------------------------------------------------------------------------------------------------
# The enrichment


def _normalize(
    df: Any,
    prompt_template: str | PromptTemplate | os.PathLike[str] | PromptFn | None,
    prompt_fn: PromptFn | None,
    config: ProcessorConfig | None,
    output_type: Any,
) -> tuple[str | None, PromptFn | None, ProcessorConfig, type[BaseModel] | None]:
    """Type checks of the arguments; a callable given as ``prompt_template`` becomes ``prompt_fn``
    (``df=None``: a table read in slices, checked elsewhere)."""
    if df is not None and not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if isinstance(prompt_template, os.PathLike):
        prompt_template = load_prompt_template(prompt_template)
    if isinstance(prompt_template, PromptTemplate):
        prompt_template = prompt_template.text
    if callable(prompt_template) and not isinstance(prompt_template, str):
        if prompt_fn is not None:
            raise TypeError("give prompt_fn once: positionally or as prompt_fn=")
        prompt_template, prompt_fn = None, prompt_template
    if (prompt_template is None) == (prompt_fn is None):
        raise TypeError("give exactly one of prompt_template (a str.format template) or prompt_fn")
    if prompt_fn is not None and not callable(prompt_fn):
        raise TypeError(f"prompt_fn must be callable, got {type(prompt_fn).__name__}")
    if config is None:
        config = ProcessorConfig()
    elif not isinstance(config, ProcessorConfig):
        raise TypeError(f"config must be a ProcessorConfig, got {type(config).__name__}")
    if output_type is not None and _model_type(output_type) is None:
        raise TypeError(f"output_type must be a pydantic BaseModel subclass, got {output_type!r}")
    return prompt_template, prompt_fn, config, output_type  # type: ignore[return-value]


def check_columns(
    columns: Sequence[Any],
    prompt_template: str | None,
    id_column: str | None,
    output_type: type[BaseModel] | None,
) -> None:
    """Checks against the table's column names (template fields, id column, column clashes): the part of
    the whole-table validation that needs no rows."""
    if prompt_template is not None:
        _check_columns(template_fields(prompt_template), list(columns), "prompt_template")
    if id_column is not None and id_column not in columns:
        _check_columns([id_column], list(columns), "id_column")
    added = [*output_columns(output_type), *RESULT_COLUMNS]
    clash = [c for c in added if c in columns]
    if clash:
        raise ValueError(
            f"the table already has column(s) {', '.join(map(repr, clash))} that enrichment adds; "
            "rename or drop them first"
        )


def _check_table(
    df: pd.DataFrame, prompt_template: str | None, id_column: str | None, output_type: type[BaseModel] | None
) -> list[str]:
    """Checks against the table itself (template columns, column clashes, ids); returns the row ids."""
    check_columns(list(df.columns), prompt_template, id_column, output_type)
    return row_ids(df, id_column)


def enrich_frame(
    df: pd.DataFrame,
    prompt_template: str | PromptTemplate | os.PathLike[str] | PromptFn | None = None,
    strategy: Any = None,
    id_column: str | None = None,
    config: ProcessorConfig | None = None,
    *,
    prompt_fn: PromptFn | None = None,
    model_block: Any = None,
    output_type: type[BaseModel] | None = None,
    only_ids: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, BatchResult[Any, Any] | None]:
    """What ``enrich_dataframe`` does, without its own flow run: returns ``(frame, batch_result)``.

    Runs the rows as one ``run_batch`` flow run (a subflow when called inside a flow). With ``only_ids``
    only those rows are run and returned (in input order); ``batch_result`` is ``None`` when no row
    could be sent. Never raises for failed rows; the caller decides (see ``EnrichmentFailed``).
    A :class:`~prefect_batchllm.core.templates.PromptTemplate` (``load_prompt_template(path)``) is recorded
    in every row's result metadata and the summary artifact, and is part of each row's cache key.
    """
    if isinstance(prompt_template, os.PathLike):  # a template file (or a directory with one name)
        prompt_template = load_prompt_template(prompt_template)
    template_ref = prompt_template.ref if isinstance(prompt_template, PromptTemplate) else None
    prompt_template, prompt_fn, config, output_type = _normalize(
        df, prompt_template, prompt_fn, config, output_type
    )
    resolved = _strategy(strategy, model_block, output_type)
    output_type = output_type or _model_type(getattr(resolved, "response_schema", None))
    ids = _check_table(df, prompt_template, id_column, output_type)
    if only_ids is not None:
        wanted = {str(i) for i in only_ids}
        keep = [i in wanted for i in ids]
        df = df.loc[keep]
        ids = [i for i in ids if i in wanted]

    entries = build_items(df, ids, prompt_template, prompt_fn, resolved, template_ref)
    items = [e for e in entries if isinstance(e, LLMWorkItem)]
    batch = _run(items, config) if items else None
    by_id = batch.by_id() if batch is not None else {}
    results = [e if isinstance(e, WorkItemResult) else by_id[e.item_id] for e in entries]
    frame = pd.concat([df, result_frame(df.index, results, output_type)], axis=1)
    frame.attrs = {**df.attrs, "batchllm": summary_of(frame, template_ref)}
    return frame, batch


def _run(items: list[LLMWorkItem[Any, Any]], config: ProcessorConfig) -> BatchResult[Any, Any]:
    """``run_batch`` from sync code, keeping the result when the batch flow ends Failed."""
    from prefect_batchllm.prefect.flows import BatchItemsFailed, run_batch

    try:
        outcome = run_batch(items, config)
        if inspect.isawaitable(outcome):
            outcome = run_coro_as_sync(outcome)
    except BatchItemsFailed as failed:
        return failed.result
    return outcome  # type: ignore[no-any-return]


def summary_of(frame: pd.DataFrame, template: TemplateRef | None = None) -> dict[str, Any]:
    """Counts stored in ``frame.attrs["batchllm"]`` (and the prompt template, when one was used)."""
    summary: dict[str, Any] = {
        "rows": len(frame),
        "succeeded": int(frame["success"].sum()),
        "failed": int((~frame["success"]).sum()),
        "replayed": int(frame["replayed"].sum()),
        "invalid_input": int((frame["error_category"] == INVALID_INPUT).sum()),
        "input_tokens": int(frame["input_tokens"].sum()),
        "output_tokens": int(frame["output_tokens"].sum()),
        "cached_tokens": int(frame["cached_tokens"].sum()),
    }
    if template is not None:
        summary["prompt_template"] = template.as_dict()
    return summary


def merge_rows(base: pd.DataFrame, update: pd.DataFrame, id_column: str | None = None) -> pd.DataFrame:
    """``base`` with the rows of ``update`` (matched by item id) replaced in place; order and index kept.

    Used to fold re-run rows into an existing output table. Every column of ``update`` must exist in
    ``base`` and every id of ``update`` must be a row of ``base`` (``ValueError`` otherwise); columns keep
    ``base``'s dtype where the new values fit it.
    """
    base_ids = row_ids(base, id_column)
    update_ids = row_ids(update, id_column)
    position = {item_id: i for i, item_id in enumerate(base_ids)}
    missing = [i for i in update_ids if i not in position]
    if missing:
        raise ValueError(f"ids not in the table: {', '.join(map(repr, missing[:5]))}")
    extra = [c for c in update.columns if c not in base.columns]
    if extra:
        raise ValueError(f"columns not in the table: {', '.join(map(repr, extra))}")
    rows = [position[i] for i in update_ids]
    merged = base.copy()
    for column in update.columns:
        values = merged[column].astype(object).tolist()
        for row, value in zip(rows, update[column].astype(object).tolist(), strict=True):
            values[row] = value
        series = pd.Series(values, index=merged.index, dtype=object)
        for dtype in (base[column].dtype, update[column].dtype):
            try:
                series = series.astype(dtype)
                break
            except (TypeError, ValueError):
                continue
        merged[column] = series
    return merged


# --------------------------------------------------------------------------------------------------
# The flow


def _describe(value: Any) -> Any:
    """A small JSON-able stand-in for a flow parameter (the server caps parameters at 512 KiB)."""
    if isinstance(value, pd.DataFrame):
        return {"rows": len(value), "columns": [str(c) for c in value.columns[:100]]}
    if isinstance(value, LLMCallStrategy):
        return repr(value)
    if isinstance(value, type):
        return value.__qualname__
    if isinstance(value, ProcessorConfig):
        return dataclasses.asdict(value)
    if isinstance(value, PromptTemplate):
        return {"name": value.name, "version": value.version, "source": value.source}
    if value is not None and not isinstance(value, str | int | float | bool) and callable(value):
        return getattr(value, "__qualname__", type(value).__qualname__)
    name = getattr(value, "_block_document_name", None)
    if name is not None or hasattr(value, "_block_type_slug"):
        return f"{getattr(value, '_block_type_slug', type(value).__name__)}/{name or '(unsaved)'}"
    return value


class _FrameFlow(BatchLLMFlow):
    """A flow whose stored parameters describe the DataFrame and objects instead of serialising them."""

    def summarize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return {k: _describe(v) for k, v in parameters.items()}

    def check_call(self, parameters: dict[str, Any]) -> dict[str, Any]:
        # Fail on a bad template, id or column clash before a flow run is even created.
        params = parameters
        template, _, _, output_type = _normalize(
            params.get("df"),
            params.get("prompt_template"),
            params.get("prompt_fn"),
            params.get("config"),
            params.get("output_type"),
        )
        strategy = params.get("strategy")
        if output_type is None and isinstance(strategy, LLMCallStrategy):
            output_type = _model_type(getattr(strategy, "response_schema", None))
        _check_table(params["df"], template, params.get("id_column"), output_type)
        return params


def _enrich_dataframe(
    df: pd.DataFrame,
    prompt_template: str | PromptTemplate | os.PathLike[str] | PromptFn | None = None,
    strategy: Any = None,
    id_column: str | None = None,
    config: ProcessorConfig | None = None,
    *,
    prompt_fn: PromptFn | None = None,
    model_block: Any = None,
    output_type: type[BaseModel] | None = None,
) -> pd.DataFrame:
    """Add LLM outputs to every row of ``df``; returns a new frame (same index and order) with
    ``output`` (or one column per field of ``output_type``), ``success``, ``error``, ``error_category``,
    ``attempts``, ``input_tokens``, ``output_tokens``, ``cached_tokens`` and ``replayed``.

    ``prompt_template`` is a ``str.format`` template over column names (checked before anything runs),
    inline, a versioned :class:`~prefect_batchllm.core.templates.PromptTemplate` or a ``pathlib.Path`` to a
    template file; or
    pass ``prompt_fn(row) -> prompt``, also positionally. ``strategy`` is an ``LLMCallStrategy``, a
    ``GeminiCachedModelBlock`` (or ``model_block=``, object or saved block name) or an ``LLMModel``;
    with a block or model, ``output_type`` asks Gemini for JSON of that pydantic type. With
    ``config.fail_on_item_failure`` the flow raises :class:`EnrichmentFailed` (frame on ``.frame``)
    when rows failed; otherwise failed rows are reported in the columns. Counts are in
    ``frame.attrs["batchllm"]``.
    """
    frame, _ = enrich_frame(
        df,
        prompt_template,
        strategy,
        id_column,
        config,
        prompt_fn=prompt_fn,
        model_block=model_block,
        output_type=output_type,
    )
    if config is not None and config.fail_on_item_failure and not frame["success"].all():
        raise EnrichmentFailed(frame, None)
    return frame


enrich_dataframe: _FrameFlow = _FrameFlow(
    _enrich_dataframe,
    name="enrich-dataframe",
    description="Add LLM outputs to every row of a DataFrame (one Prefect task run per row, or per chunk).",
    validate_parameters=False,
    # Not persisted, so a retried parent flow runs this again (completed rows load from their item results).
    persist_result=False,
    log_prints=False,
)
"""``enrich_dataframe(df, prompt_template=None, strategy=None, id_column=None, config=None, *,
prompt_fn=None, model_block=None, output_type=None) -> DataFrame`` - a Prefect flow."""
