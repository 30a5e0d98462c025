"""Reruns end to end on a real ``prefect server start`` (temp home, SQLite) and the bundled Gemini server.

What the issue promises, counted from the emulator's request log:

* a served ``enrich-table`` deployment: run 1 fails scripted rows; the UI's Retry (the API call it makes)
  re-requests exactly those rows; run 3 over the table grown by two rows requests exactly two;
* ``rerun-failed`` re-requests exactly the failed rows of a run (and of its own runs, chained);
* SIGKILL mid-batch: the next run loads every row completed before the kill, the output is never torn;
* ``prefect --no-prompt deploy --all`` with the project's ``prefect.yaml``, then a process worker runs
  the deployed flow.

One server, one emulator and one saved model block are shared by the whole module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from _prefect_server import connected, prefect_env, prefect_server, stop_process_group
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.states import Scheduled
from pydantic import SecretStr

from prefect_batchllm.dataframe import output_model, row_ids, template_fields
from prefect_batchllm.tables import read_table, write_table
from prefect_batchllm.testing import Fault, GeminiEmulator

pytestmark = pytest.mark.prefect

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BLOCK = "reruns-test-model"
SCHEMA = {"genre": "str", "pages": "int"}


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    """A real Prefect server for this module, and this process pointed at it."""
    with prefect_server() as url, connected(url):
        yield url


@pytest.fixture(scope="module")
def emu() -> Iterator[GeminiEmulator]:
    with GeminiEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def model_block(api_url: str, emu: GeminiEmulator) -> str:
    """A saved GeminiCachedModelBlock pointing at the emulator (what a user saves once per workspace)."""
    from prefect_batchllm.prefect.blocks import GeminiCachedModelBlock, GeminiCredentials

    GeminiCachedModelBlock(
        model="gemini-2.5-flash",
        credentials=GeminiCredentials(
            api_key=SecretStr("test-key"), base_url=emu.base_url, api_version="v1beta"
        ),
        system_instruction="You catalogue books. Answer with JSON only.",
    ).save(BLOCK, overwrite=True)
    return BLOCK


@pytest.fixture
def clean_emu(emu: GeminiEmulator) -> Iterator[GeminiEmulator]:
    emu.reset()
    yield emu
    emu.reset()


def books(n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "book_id": [f"book-{i}" for i in range(start, start + n)],
            "title": [f"Title {i}" for i in range(start, start + n)],
            "year": [1800 + i for i in range(start, start + n)],
        }
    )


def template(tag: str) -> str:
    """Row ids are delimited (``[book-3]``) so faults and counts target exact rows; ``tag`` keeps the
    prompts (hence the persisted results) of one test apart from the others'."""
    return f"[{{book_id}}] ({tag}) Catalogue {{title}} ({{year}})."


def counts(emu: GeminiEmulator, ids: list[str]) -> dict[str, int]:
    """generateContent requests per row id, from the emulator's request log."""
    return {i: emu.count("generateContent", contains=f"[{i}]") for i in ids}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def read_run(run_id: Any) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def wait_final(run_id: Any, timeout: float = 180) -> FlowRun:
    def final() -> FlowRun | None:
        run = read_run(run_id)
        return run if run.state is not None and run.state.is_final() else None

    return wait_for(final, timeout, f"flow run {run_id} to finish")


@contextlib.contextmanager
def background(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess in its own session (so it and its children can be signalled by group id)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        stop_process_group(proc)


def table_params(tmp_path: Path, tag: str, **extra: Any) -> dict[str, Any]:
    return {
        "input_path": str(tmp_path / "books.parquet"),
        "output_path": str(tmp_path / "out" / "books_enriched.parquet"),
        "prompt_template": template(tag),
        "model_block": BLOCK,
        "id_column": "book_id",
        "output_schema": SCHEMA,
        "max_workers": 4,
        "max_attempts": 2,
        **extra,
    }


# ------------------------------------------------------------------------------------------------------


def test_served_deployment_retry_and_incremental_run(
    api_url: str, model_block: str, clean_emu: GeminiEmulator, tmp_path: Path
) -> None:
    """Run 1 fails two rows; the UI's Retry re-requests exactly those; run 3 requests exactly the new two."""
    from prefect.deployments import run_deployment

    emu = clean_emu
    write_table(books(10), tmp_path / "books.parquet")
    params = table_params(tmp_path, uuid.uuid4().hex[:8])
    ids = [f"book-{i}" for i in range(10)]
    # 400 is not retryable: one request per failing row per run.
    emu.faults.add(Fault.status(400), contains="[book-3]", times=None)
    emu.faults.add(Fault.status(400), contains="[book-7]", times=None)

    env = prefect_env(api_url)
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "1"
    serve = (
        "from prefect import serve\n"
        "from flows.enrich_table import enrich_table\n"
        "from flows.rerun_failed import rerun_failed\n"
        "serve(enrich_table.to_deployment(name='served'), rerun_failed.to_deployment(name='served'))\n"
    )
    with background([PYTHON, "-c", serve], env, tmp_path / "serve.log"):

        def deployed() -> bool:
            with get_client(sync_client=True) as client:
                try:
                    client.read_deployment_by_name("enrich-table/served")
                except Exception:
                    return False
            return True

        wait_for(deployed, 120, "the served deployment")

        run1 = run_deployment("enrich-table/served", parameters=params, timeout=240, poll_interval=1)
        assert run1.state is not None and run1.state.is_failed(), run1.state
        assert counts(emu, ids) == {i: 1 for i in ids}
        out = read_table(params["output_path"])
        assert out["book_id"].tolist() == ids
        assert sorted(out.loc[~out["success"], "book_id"]) == ["book-3", "book-7"]

        # The UI's Retry button: force the finished run back to AwaitingRetry.
        emu.faults.clear()
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run1.id, Scheduled(name="AwaitingRetry"), force=True)
        retried = wait_final(run1.id)
        assert retried.state is not None and retried.state.is_completed(), retried.state
        assert retried.run_count == 2
        expected = {i: 1 for i in ids} | {"book-3": 2, "book-7": 2}
        assert counts(emu, ids) == expected
        out = read_table(params["output_path"])
        assert out["success"].all()
        assert sorted(out.loc[~out["replayed"], "book_id"]) == ["book-3", "book-7"]

        # The table grew by two rows: a fresh run requests exactly those two.
        before = emu.count("generateContent")
        write_table(pd.concat([books(10), books(2, start=10)], ignore_index=True), params["input_path"])
        run3 = run_deployment("enrich-table/served", parameters=params, timeout=240, poll_interval=1)
        assert run3.state is not None and run3.state.is_completed(), run3.state
        assert emu.count("generateContent") - before == 2
        assert counts(emu, ["book-10", "book-11"]) == {"book-10": 1, "book-11": 1}
        out = read_table(params["output_path"])
        assert len(out) == 12 and out["success"].all()
        assert out["replayed"].sum() == 10


@pytest.mark.parametrize("chunk_size", [None, 5], ids=["per-row", "chunked"])
def test_rerun_failed_requests_exactly_the_failed_rows(
    api_url: str,
    model_block: str,
    clean_emu: GeminiEmulator,
    tmp_path: Path,
    chunk_size: int | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """rerun-failed re-requests only a run's failed rows, merges them in place, and chains (in either
    execution mode: rerun-failed takes chunk_size from the run it repeats)."""
    from flows.enrich_table import RowsFailed, enrich_table
    from flows.rerun_failed import rerun_failed

    emu = clean_emu
    write_table(books(12), tmp_path / "books.parquet")
    params = table_params(tmp_path, uuid.uuid4().hex[:8], chunk_size=chunk_size)
    ids = [f"book-{i}" for i in range(12)]
    emu.faults.add(Fault.status(400), contains="[book-3]", times=2)  # fails in run 1 and rerun 1
    emu.faults.add(Fault.status(400), contains="[book-7]", times=1)  # fails in run 1 only

    state = enrich_table(**params, return_state=True)
    assert state.is_failed()
    with pytest.raises(RowsFailed):
        state.result()
    run1 = state.state_details.flow_run_id
    first = read_table(params["output_path"])
    assert sorted(first.loc[~first["success"], "book_id"]) == ["book-3", "book-7"]

    rerun1 = rerun_failed(str(run1), return_state=True)
    assert rerun1.is_failed()  # book-3 failed again
    assert counts(emu, ids) == {i: 1 for i in ids} | {"book-3": 2, "book-7": 2}
    merged = read_table(params["output_path"])
    assert merged["book_id"].tolist() == ids
    assert merged.loc[~merged["success"], "book_id"].tolist() == ["book-3"]

    summary = rerun_failed(str(rerun1.state_details.flow_run_id))  # a rerun of the rerun
    assert summary["rows"] == 1 and summary["succeeded"] == 1
    assert counts(emu, ids) == {i: 1 for i in ids} | {"book-3": 3, "book-7": 2}
    final = read_table(params["output_path"])
    assert final["book_id"].tolist() == ids and final["success"].all()
    assert final.index.equals(first.index)
    assert (final.dtypes == first.dtypes).all()
    # Rows that did not fail keep their original answers.
    ok = first["success"]
    pd.testing.assert_frame_equal(final.loc[ok], first.loc[ok])
    if chunk_size:  # the rows really ran in chunks (read from the run loggers' records, not the API's
        # task runs: those arrive through the events websocket, which this in-process test cannot rely on)
        names = {getattr(r, "task_run_name", None) for r in caplog.records}
        # enrich-table streams the table (its chunks are row ranges); rerun-failed runs the failed rows.
        expected = {"chunk-1: rows 0..4", "chunk-2: rows 5..9", "chunk-1: book-3 .. book-7"}
        assert expected <= names


def result_records() -> set[str]:
    """Names of the result log's record objects in the session's default location."""
    records = Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"]) / "batchllm-results" / "v1" / "records"
    return {p.name for p in records.glob("*.blr")} if records.exists() else set()


def stored_entries(earlier: set[str]) -> int:
    """Results stored in record objects written since ``earlier`` (read from the objects' headers)."""
    from prefect_batchllm.prefect import result_log

    records = Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"]) / "batchllm-results" / "v1" / "records"
    total = 0
    for name in result_records() - earlier:
        parsed = result_log._parse_prefix((records / name).read_bytes())
        total += parsed[0] if parsed is not None else 0
    return total


def test_sigkill_mid_batch_loses_nothing(
    api_url: str, model_block: str, clean_emu: GeminiEmulator, tmp_path: Path
) -> None:
    """SIGKILL the flow process mid-batch; the next run loads every row finished before the kill."""
    from flows.enrich_table import enrich_table

    emu = clean_emu
    n = 30
    write_table(books(n), tmp_path / "books.parquet")
    params = table_params(tmp_path, uuid.uuid4().hex[:8])
    ids = [f"book-{i}" for i in range(n)]
    previous = pd.DataFrame({"book_id": ["old"], "note": ["output of an earlier run"]})
    write_table(previous, params["output_path"])
    # Four workers; rows 20-23 hang. Once all four hang, every other started row has finished (a worker
    # takes its next row only after the last one completed) and rows 24+ have not started.
    hanging = [f"book-{i}" for i in range(20, 24)]
    for item_id in hanging:
        emu.faults.add(Fault.hang(600), contains=f"[{item_id}]", times=1)

    args = [PYTHON, "-m", "flows.enrich_table", params["input_path"], params["output_path"]]
    args += ["--template", params["prompt_template"], "--model-block", BLOCK, "--id-column", "book_id"]
    args += ["--output-schema", '{"genre": "str", "pages": "int"}', "--max-workers", "4"]
    args += ["--max-attempts", "2"]
    earlier = result_records()
    with background(args, prefect_env(api_url), tmp_path / "run1.log") as proc:
        wait_for(
            lambda: all(rule.hits == 1 for rule in emu.faults.rules) and emu.in_flight == 4,
            120,
            "four hanging requests",
        )
        # Results are persisted one object per flush (at most ~1 s or 200 items after they finish): a
        # SIGKILL loses what is still buffered (tests/test_result_log.py), so kill once they are stored.
        wait_for(lambda: stored_entries(earlier) == 20, 60, "the 20 finished rows persisted")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done_before_kill = [i for i in ids if emu.count("generateContent", contains=f"[{i}]", status=200)]
    assert done_before_kill == [f"book-{i}" for i in range(20)]
    # The kill left the earlier output intact; its finished chunks are part files in a hidden staging
    # directory, never at the output path (the next run's commit removes it).
    pd.testing.assert_frame_equal(read_table(params["output_path"]), previous)
    out_dir = Path(params["output_path"]).parent
    left = sorted(p.name for p in out_dir.iterdir())
    assert left[-1] == "books_enriched.parquet" and all(
        name.startswith(".books_enriched.parquet.staging-") for name in left[:-1]
    ), left

    emu.faults.clear()
    summary = enrich_table(**params)
    assert summary["failed"] == 0 and summary["replayed"] == 20
    # Answered requests: each row exactly once overall. The four hung requests of run 1 were never
    # answered (the log records a request when it is answered); each hang fired once.
    answered = {i: emu.count("generateContent", contains=f"[{i}]", status=200) for i in ids}
    assert answered == {i: 1 for i in ids}
    assert emu.count("generateContent") == n
    out = read_table(params["output_path"])
    assert out["book_id"].tolist() == ids and out["success"].all()
    assert out["replayed"].tolist() == [True] * 20 + [False] * 10
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "books_enriched.parquet",
        "books_enriched.parquet.failed.parquet",
    ]


def test_prefect_yaml_deploys_and_a_worker_runs_it(
    api_url: str, model_block: str, clean_emu: GeminiEmulator, tmp_path: Path
) -> None:
    """`prefect --no-prompt deploy --all` from the project root; a process worker runs enrich-table."""
    from prefect.deployments import run_deployment

    env = prefect_env(api_url)
    prefect = str(Path(PYTHON).with_name("prefect"))
    for command in (
        [prefect, "work-pool", "create", "batchllm-process", "--type", "process"],
        [prefect, "--no-prompt", "deploy", "--all"],
    ):
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

    with get_client(sync_client=True) as client:
        deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
    for name in ("batchllm-demo/demo", "enrich-table/nightly-books", "rerun-failed/rerun-failed"):
        deployment = deployments[name]
        assert deployment.work_pool_name == "batchllm-process"
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
        ]
    nightly = deployments["enrich-table/nightly-books"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]  # type: ignore[union-attr]
    # The scheduled defaults fit the bundled table: template columns, ids and output schema.
    defaults = nightly.parameters
    table = read_table(ROOT / defaults["input_path"])
    assert set(template_fields(defaults["prompt_template"])) <= set(table.columns)
    assert len(row_ids(table, defaults["id_column"])) == len(table)
    assert output_model(defaults["output_schema"]) is not None

    # Run the deployed flow through a real process worker, on this test's files.
    write_table(books(5), tmp_path / "books.parquet")
    params = table_params(tmp_path, uuid.uuid4().hex[:8])
    run = run_deployment("enrich-table/nightly-books", parameters=params, timeout=0)
    worker = [prefect, "worker", "start", "--pool", "batchllm-process", "--run-once"]
    with background(worker, env, tmp_path / "worker.log") as proc:
        final = wait_final(run.id, timeout=240)
        proc.wait(timeout=60)
    assert final.state is not None and final.state.is_completed(), (tmp_path / "worker.log").read_text()
    out = read_table(params["output_path"])
    assert out["success"].all() and len(out) == 5
    assert counts(clean_emu, [f"book-{i}" for i in range(5)]) == {f"book-{i}": 1 for i in range(5)}
