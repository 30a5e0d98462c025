"""Re-run exactly the failed rows of an earlier ``enrich-table`` run and fold them into its output table.

Give it the flow-run id of an ``enrich-table`` run (or of an earlier ``rerun-failed`` run, to continue a
chain). It reads that run's parameters from the Prefect API and the ids of its failed rows from the
``<key>-failed-rows`` artifact the run published (the newest one, so a run that was retried from the UI
reports its last attempt), re-requests those rows with the same template and model, and replaces them in
the output file (atomic write). Rows that succeeded are never requested: they are not in the list, and
their persisted results would be loaded anyway.
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType
from prefect.client.schemas.sorting import ArtifactSort
from prefect.logging import get_run_logger

from flows.enrich_table import (
    RowsFailed,
    enrich_table,
    job_key,
    load_prompt_template,
    publish_failed_rows,
    summarize,
    table_config,
)
from prefect_batchllm.dataframe import (
    RESULT_COLUMNS,
    enrich_frame,
    merge_rows,
    output_columns,
    output_model,
    row_ids,
)
from prefect_batchllm.models.gemini_batch import PENDING_CATEGORY
from prefect_batchllm.tables import read_table, write_table

__all__ = ["failed_rows_of", "origin_parameters", "rerun_failed"]

_MAX_CHAIN = 20


def _read_run(run_id: UUID) -> tuple[str, dict[str, Any]]:
    """(flow name, stored parameters) of a flow run."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        flow_name = client.read_flow(run.flow_id).name
    return flow_name, dict(run.parameters or {})


def origin_parameters(flow_run_id: str | UUID) -> dict[str, Any]:
    """The ``enrich-table`` parameters behind a run (following ``rerun-failed`` runs back to their origin),
    completed with the flow's defaults."""
    run_id = UUID(str(flow_run_id))
    for _ in range(_MAX_CHAIN):
        flow_name, params = _read_run(run_id)
        if flow_name == enrich_table.name:
            defaults = {
                name: p.default
                for name, p in inspect.signature(enrich_table.fn).parameters.items()
                if p.default is not inspect.Parameter.empty
            }
            return {**defaults, **params}
        if flow_name == rerun_failed.name:
            run_id = UUID(str(params["flow_run_id"]))
            continue
        raise ValueError(
            f"flow run {flow_run_id} is a {flow_name!r} run; rerun-failed takes an "
            f"{enrich_table.name!r} or {rerun_failed.name!r} run"
        )
    raise ValueError(f"flow run {flow_run_id}: rerun-failed chain longer than {_MAX_CHAIN}")


def failed_rows_of(flow_run_id: str | UUID) -> list[str]:
    """Ids of the rows that failed in a run, from the newest ``*-failed-rows`` artifact it published.

    Rows still in a running Gemini batch job (``batch_pending``) are not failures: a new run of the
    deployment collects them from that job; re-requesting them here would pay for them twice."""
    run_id = UUID(str(flow_run_id))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), type=ArtifactFilterType(any_=["table"])
            ),
            sort=ArtifactSort.CREATED_DESC,
        )
    for artifact in artifacts:
        if artifact.key and artifact.key.endswith("-failed-rows"):
            data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            categories = data.get("category") or [None] * len(data["item_id"])
            return [
                str(i)
                for i, category in zip(data["item_id"], categories, strict=True)
                if category != PENDING_CATEGORY
            ]
    raise ValueError(
        f"flow run {flow_run_id} published no failed-rows artifact: it did not finish writing its output "
        "(crashed or still running). Start a new run of the same deployment instead: rows that completed "
        "are loaded from their persisted results, not requested again."
    )


@flow(name="rerun-failed", log_prints=False, persist_result=False)
def rerun_failed(flow_run_id: str, fail_on_item_failure: bool = True) -> dict[str, Any]:
    """Re-request exactly the rows that failed in ``flow_run_id`` and update them in its output table."""
    log = get_run_logger()
    params = origin_parameters(flow_run_id)
    failed = failed_rows_of(flow_run_id)
    output_path = str(params["output_path"])
    if not failed:
        log.info("flow run %s has no failed rows; nothing to do", flow_run_id)
        return {"rows": 0, "succeeded": 0, "failed": 0, "output_path": output_path}

    id_column = params.get("id_column")
    # A template directory without a pinned version resolves to its highest version now.
    template = load_prompt_template(
        params.get("prompt_template"),
        params.get("prompt_template_path"),
        params.get("prompt_template_name"),
        params.get("prompt_template_version"),
    )
    output_type = output_model(params.get("output_schema"))
    df = read_table(str(params["input_path"]))
    existing = read_table(output_path)

    # Check everything before a request: the rows must still exist in the input and the output table.
    in_input = set(row_ids(df, id_column))
    gone = [i for i in failed if i not in in_input]
    if gone:
        log.warning("%d failed row(s) are no longer in the input and are skipped: %s", len(gone), gone[:10])
    wanted = [i for i in failed if i in in_input]
    missing_columns = [
        c for c in [*output_columns(output_type), *RESULT_COLUMNS] if c not in existing.columns
    ]
    if missing_columns:
        raise ValueError(f"{output_path} lacks column(s) {missing_columns}: it was not written by this job")
    out_ids = set(row_ids(existing, id_column))
    absent = [i for i in wanted if i not in out_ids]
    if absent:
        raise ValueError(
            f"{output_path} has no row(s) {absent[:10]}: it was replaced since run {flow_run_id}"
        )

    prefix = job_key("rerun-failed")
    config = table_config(
        max_workers=int(params.get("max_workers") or 8),
        requests_per_minute=params.get("requests_per_minute"),
        tokens_per_minute=params.get("tokens_per_minute"),
        max_attempts=int(params.get("max_attempts") or 3),
        fail_on_item_failure=fail_on_item_failure,
        artifact_key=prefix,
        chunk_size=params.get("chunk_size"),
        timeout_per_item=float(params.get("timeout_per_item") or 120.0),
    )
    frame, result = enrich_frame(
        df,
        template,
        id_column=id_column,
        config=config,
        model_block=params["model_block"],
        output_type=output_type,
        only_ids=wanted,
    )
    write_table(merge_rows(existing, frame, id_column), output_path)
    publish_failed_rows(frame, row_ids(frame, id_column), prefix)
    summary = summarize(frame, result, output_path)
    summary["skipped_not_in_input"] = gone
    log.info("rerun-failed: %s", json.dumps(summary))
    if fail_on_item_failure and summary.get("failed"):
        raise RowsFailed(f"{summary['failed']}/{summary['rows']} re-run rows failed again; see {output_path}")
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.rerun_failed FLOW_RUN_ID")
    print(json.dumps(rerun_failed(sys.argv[1]), indent=2))
