"""Deployable table enrichment: read a Parquet/CSV table, add LLM columns to every row, write it atomically.

Parameters are paths and names, never the data (Prefect caps flow parameters at 512 KiB): ``input_path``
and ``output_path`` are local paths or fsspec URLs, ``model_block`` names a saved
``GeminiCachedModelBlock``, the prompt is a ``str.format`` template over column names given inline or as
``prompt_template_path``: a versioned template file, or a directory of them (local or fsspec; format in
``prefect_batchllm.core.templates``: a text/markdown file with a ``---`` header of ``name:`` and
``version:``). The template's name and version are recorded in every row's result metadata, the summary
artifact and each row's cache key: bumping the version re-runs the rows, the same version replays them.

Reruns cost nothing for finished rows: every row's result is persisted under (row id, prompt, model
fingerprint), so the UI's Retry of a failed run, a new scheduled run over a grown table, and the
``rerun-failed`` flow request only rows that have not succeeded yet. With ``fail_on_item_failure`` (the
default) a run with failed rows writes the complete output file and its artifacts, then ends Failed so the
UI offers Retry; the ids of the failed rows are kept as the ``<key>-failed-rows`` table artifact, which is
what ``rerun-failed`` reads.

Large tables stream (``prefect_batchllm.streaming.enrich_table_file``): the input is read slice by slice
(Parquet row groups; a CSV is first converted once, streaming, into a staging Parquet file next to the
output), each chunk task writes its rows to a part file next to the output, and the output is committed
as ONE Parquet file (CSV for a ``.csv`` output) by an atomic rename at the end; the flow holds the rows of
the chunks in flight, never the table. ``task_runner`` (e.g. ``"dask://scheduler:8786"``) runs the chunk
tasks on a Dask / Ray cluster, each reading its own slice. The failed rows are also written to
``<output_path>.failed.parquet``. ``execution="batch_api"`` runs the table in memory (a Gemini batch job
needs all of its rows).

Run locally: ``python -m flows.enrich_table --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any

import pandas as pd
from prefect import flow, runtime
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from prefect_batchllm import ProcessorConfig, RateLimitConfig, RetryConfig
from prefect_batchllm.core.items import BatchResult
from prefect_batchllm.core.templates import PromptTemplate
from prefect_batchllm.core.templates import load_prompt_template as load_template_file
from prefect_batchllm.dataframe import enrich_frame, output_model, row_ids
from prefect_batchllm.prefect.artifacts import slugify_key
from prefect_batchllm.streaming import DEFAULT_CHUNK_ROWS, TableBatchResult, enrich_table_file
from prefect_batchllm.tables import read_table, write_table

__all__ = [
    "RowsFailed",
    "enrich_table",
    "failed_rows_key",
    "load_prompt_template",
    "publish_failed_ids",
    "table_config",
]

logger = logging.getLogger("prefect_batchllm")


class RowsFailed(Exception):
    """Rows failed; the output file and artifacts are written. Ends the flow run Failed (UI: Retry)."""


def load_prompt_template(
    prompt_template: str | None,
    prompt_template_path: str | None,
    name: str | None = None,
    version: str | None = None,
) -> str | PromptTemplate:
    """The template given inline, or the versioned template at a file / directory path or fsspec URL
    (exactly one of the two); ``name`` / ``version`` pick one in a directory (default: the highest)."""
    if (prompt_template is None) == (prompt_template_path is None):
        raise ValueError("give exactly one of prompt_template or prompt_template_path")
    if prompt_template is not None:
        if name is not None or version is not None:
            raise ValueError("prompt_template_name / prompt_template_version need prompt_template_path")
        return prompt_template
    assert prompt_template_path is not None
    return load_template_file(prompt_template_path, name=name, version=version)


def table_config(
    *,
    max_workers: int,
    requests_per_minute: float | None,
    tokens_per_minute: int | None,
    max_attempts: int,
    fail_on_item_failure: bool,
    artifact_key: str | None,
    chunk_size: int | None = None,
    timeout_per_item: float = 120.0,
    execution: str = "online",
    batch_wait_timeout_s: float | None = None,
    batch_followup: str | None = None,
) -> ProcessorConfig:
    """The batch settings of a table job (results are always persisted: that is what makes reruns cheap)."""
    return ProcessorConfig(
        max_workers=max_workers,
        timeout_per_item=timeout_per_item,
        retry=RetryConfig(max_attempts=max_attempts),
        rate_limit=RateLimitConfig(
            requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute
        ),
        fail_on_item_failure=fail_on_item_failure,
        persist_results=True,
        artifact_key=artifact_key,
        chunk_size=chunk_size,
        execution=execution,
        batch_wait_timeout_s=batch_wait_timeout_s,
        batch_followup=batch_followup,
    )


def job_key(default: str) -> str:
    """Artifact key prefix of this run: ``<flow>-<deployment>`` for deployment runs, else ``default``."""
    deployment = runtime.deployment.name
    flow_name = runtime.flow_run.flow_name or default
    return slugify_key(f"{flow_name}-{deployment}" if deployment else flow_name, default)


def failed_rows_key(prefix: str) -> str:
    """Key of the artifact that lists every failed row id of a run (read by ``rerun-failed``)."""
    return f"{prefix}-failed-rows"


def publish_failed_rows(frame: pd.DataFrame, ids: list[str], prefix: str) -> None:
    """Record the ids of all failed rows of this run (no cap: ``rerun-failed`` needs every one)."""
    failed = ~frame["success"].to_numpy()
    categories = frame["error_category"].tolist()
    publish_failed_ids(
        [item_id for item_id, bad in zip(ids, failed, strict=True) if bad],
        [str(cat) for cat, bad in zip(categories, failed, strict=True) if bad],
        prefix,
    )


def publish_failed_ids(ids: list[str], categories: list[str], prefix: str) -> None:
    """The ``<prefix>-failed-rows`` table artifact: every failed row id and its error category."""
    table = {"item_id": list(ids), "category": list(categories)}
    create_table_artifact(
        table,
        key=failed_rows_key(prefix),
        description=(
            f"{len(table['item_id'])} failed row id(s) of this run; `rerun-failed` re-runs exactly these"
        ),
    )


def summarize(frame: pd.DataFrame, result: BatchResult[Any, Any] | None, output_path: str) -> dict[str, Any]:
    """The flow's small return value: counts and where the table went."""
    summary = dict(frame.attrs.get("batchllm", {}))
    summary["output_path"] = output_path
    if result is not None:
        summary["estimated_cost_usd"] = round(result.estimated_cost_usd, 6)
    return summary


@flow(name="enrich-table", log_prints=False, persist_result=False)
def enrich_table(
    input_path: str,
    output_path: str,
    prompt_template: str | None = None,
    prompt_template_path: str | None = None,
    prompt_template_name: str | None = None,
    prompt_template_version: str | None = None,
    model_block: str = "batchllm-table-model",
    id_column: str | None = None,
    output_schema: dict[str, str] | str | None = None,
    requests_per_minute: float | None = None,
    tokens_per_minute: int | None = None,
    max_workers: int = 8,
    max_attempts: int = 3,
    fail_on_item_failure: bool = True,
    chunk_size: int | None = None,
    timeout_per_item: float = 120.0,
    execution: str = "online",
    batch_wait_timeout_s: float | None = None,
    batch_followup: str | None = None,
    task_runner: str | None = None,
) -> dict[str, Any]:
    """Add LLM output columns to every row of ``input_path`` and write the table to ``output_path``.

    ``output_schema`` is ``{"field": "type", ...}`` (str, int, float, bool, date, datetime, list[str]...)
    or ``"package.module:Model"`` for a pydantic model (one column per field); ``None`` adds a text
    ``output`` column. Rows are identified by ``id_column`` (or the row index), which is what lets a later
    run skip rows that already succeeded. The table is streamed: ``chunk_size`` rows per task run (default
    500), each chunk's rows written to a part file, one output file committed atomically at the end;
    ``task_runner`` (``"dask://HOST:8786"``, ``"dask?n_workers=2"``, ``"ray://HOST:10001"``; default: this
    process) runs the chunk tasks elsewhere. ``timeout_per_item`` bounds one attempt (seconds).
    ``prompt_template_path`` is a template file or directory (``prompt_template_name`` /
    ``prompt_template_version`` pick one; default the highest version).

    ``execution="batch_api"`` sends the rows as Gemini batch jobs (half the price, answers within 24 h).
    With ``batch_wait_timeout_s`` (e.g. 0) the run does not wait for a job: its rows end ``batch_pending``
    and the next run of the deployment (e.g. hourly on schedule) re-attaches to the same job and collects
    it, without submitting or paying again. ``batch_followup`` ("online" / "batch") re-runs rows a job
    failed.
    """
    log = get_run_logger()
    template = load_prompt_template(
        prompt_template, prompt_template_path, prompt_template_name, prompt_template_version
    )
    output_type = output_model(output_schema)
    prefix = job_key("enrich-table")
    config = table_config(
        max_workers=max_workers,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        max_attempts=max_attempts,
        fail_on_item_failure=fail_on_item_failure,
        artifact_key=prefix,
        chunk_size=chunk_size,
        timeout_per_item=timeout_per_item,
        execution=execution,
        batch_wait_timeout_s=batch_wait_timeout_s,
        batch_followup=batch_followup,
    )
    if execution == "online":
        if chunk_size is None:
            config = dataclasses.replace(config, chunk_size=DEFAULT_CHUNK_ROWS)
        streamed: TableBatchResult = enrich_table_file(
            input_path,
            output_path,
            template,
            id_column=id_column,
            config=dataclasses.replace(config, fail_on_item_failure=False),  # this flow decides below
            model_block=model_block,
            output_schema=output_schema,
            task_runner=task_runner,
        )
        publish_failed_ids(streamed.failed_ids, streamed.failed_categories, prefix)
        summary = {**streamed.table_summary, "output_path": output_path}
        summary["estimated_cost_usd"] = round(streamed.estimated_cost_usd, 6)
        summary["failed_rows_path"] = streamed.failed_path
        pending = streamed.error_categories().get("batch_pending", 0)
    else:
        if task_runner is not None:
            raise ValueError(f"task_runner applies to online runs; execution={execution!r} runs in the flow")
        df = read_table(input_path)
        frame, result = enrich_frame(
            df, template, id_column=id_column, config=config, model_block=model_block, output_type=output_type
        )
        write_table(frame, output_path)
        publish_failed_rows(frame, row_ids(frame, id_column), prefix)
        summary = summarize(frame, result, output_path)
        pending = int((frame["error_category"] == "batch_pending").sum())
    log.info("enrich-table: %s", json.dumps(summary))
    if fail_on_item_failure and summary.get("failed"):
        hint = "Retry this run or run rerun-failed to re-request only the failed rows."
        if pending:  # not failures of the rows: their Gemini batch job is still running
            hint = (
                f"{pending} of them are still in a running Gemini batch job: re-run this deployment (e.g. on "
                "its schedule) to re-attach to the job and collect them; nothing is submitted or paid again."
            )
        raise RowsFailed(
            f"{summary['failed']}/{summary['rows']} rows failed; the complete table is at {output_path}. "
            + hint
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.enrich_table IN OUT --template '...' --model-block NAME``: one local run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input_path")
    parser.add_argument("output_path")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--template", dest="prompt_template")
    group.add_argument("--template-path", dest="prompt_template_path", help="template file or directory")
    parser.add_argument("--template-name", dest="prompt_template_name")
    parser.add_argument("--template-version", dest="prompt_template_version")
    parser.add_argument("--model-block", default="batchllm-table-model")
    parser.add_argument("--id-column")
    parser.add_argument("--output-schema", help='JSON object {"field": "type"} or "module:Model"')
    parser.add_argument("--requests-per-minute", type=float)
    parser.add_argument("--tokens-per-minute", type=int)
    parser.add_argument("--max-workers", type=int, default=8)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, help=f"rows per task run (default {DEFAULT_CHUNK_ROWS})")
    parser.add_argument("--task-runner", help="where chunk tasks run, e.g. dask://HOST:8786 (default: here)")
    parser.add_argument("--timeout-per-item", type=float, default=120.0, help="seconds per attempt")
    parser.add_argument("--no-fail", dest="fail_on_item_failure", action="store_false")
    args = vars(parser.parse_args(argv))
    schema = args.pop("output_schema")
    if schema is not None and schema.lstrip().startswith("{"):
        schema = json.loads(schema)
    try:
        summary = enrich_table(**args, output_schema=schema)
    except RowsFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
