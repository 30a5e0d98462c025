"""BatchResult artifacts: rendering, key rules, and what the Prefect API holds after a real run."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from prefect_batchllm import BatchResult, LLMWorkItem, ProcessorConfig, RetryConfig, WorkItemResult, run_batch
from prefect_batchllm.core.strategy import LLMCallStrategy, RetryState
from prefect_batchllm.prefect.artifacts import (
    MAX_MESSAGE_CHARS,
    artifact_keys,
    failed_items_table,
    slugify_key,
    summary_markdown,
    task_run_link,
)


class Echo(LLMCallStrategy[str]):
    """Answers with the prompt; items whose prompt contains 'FAIL' fail fatally."""

    model = type("M", (), {"model": "gemini-2.5-flash"})()

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> Any:
        if "FAIL" in prompt:
            raise ValueError("unusable record")
        return prompt, {"input_tokens": 1000, "output_tokens": 100, "cached_input_tokens": 500}


def _batch() -> BatchResult[Any, Any]:
    usage = {"input_tokens": 1_000_000, "output_tokens": 100_000, "cached_input_tokens": 250_000}
    return BatchResult(
        results=[
            WorkItemResult("a", True, "x", token_usage=usage, attempts=1, model="gemini-2.5-flash"),
            WorkItemResult("b", False, error="HTTP 400: bad", error_category="fatal", attempts=1),
            WorkItemResult("c", False, error="blocked: SAFETY", error_category="blocked", attempts=1),
            WorkItemResult("d", False, error="HTTP 400: again", error_category="fatal", attempts=1),
        ],
        wall_time_s=2.0,
    )


def test_summary_markdown_has_the_numbers() -> None:
    text = summary_markdown(_batch(), "Books")
    for line in (
        "# Books",
        "| items | 4 |",
        "| succeeded | 1 |",
        "| failed | 3 |",
        "| input tokens | 1,000,000 |",
        "| cached input tokens | 250,000 |",
        "| cache hit rate | 25.0 % |",
        "| wall time | 2.00 s |",
        "| throughput | 2.00 items/s |",
        "| fatal | 2 |",
        "| blocked | 1 |",
    ):
        assert line in text, line
    # 750k uncached * 0.30 + 250k cached * 0.03 + 100k out * 2.50, per 1M tokens
    assert "| estimated cost | $0.4825 |" in text
    assert text.index("| fatal | 2 |") < text.index("| blocked | 1 |")


def test_failed_items_table_in_input_order_and_capped() -> None:
    table = failed_items_table(_batch())
    assert table == {
        "item_id": ["b", "c", "d"],
        "category": ["fatal", "blocked", "fatal"],
        "attempts": [1, 1, 1],
        "message": ["HTTP 400: bad", "blocked: SAFETY", "HTTP 400: again"],
    }
    assert list(table)[-1] == "message"  # the long column last
    assert failed_items_table(_batch(), max_rows=1)["item_id"] == ["b"]


def test_failed_items_link_to_their_task_run_and_long_reasons_stay_readable() -> None:
    run_id = str(uuid.uuid4())
    reason = "ValidationError: genre *must* be one of [gothic|realist] <got> `space_opera` " + "x" * 300
    batch = BatchResult(
        results=[
            WorkItemResult(
                "b7",
                False,
                error=reason,
                error_category="invalid_output",
                attempts=3,
                metadata={"prefect_task_run_id": run_id, "prefect_task_run_name": "chunk-1: b1 .. b9"},
            ),
            WorkItemResult("b8", False, error="line one\nline two", error_category="fatal", attempts=1),
        ]
    )
    link = task_run_link(run_id)
    assert link.endswith(f"/runs/task-run/{run_id}")
    table = failed_items_table(batch)
    assert table["item_id"] == ["b7", "b8"]
    # the reason links to the task run that ran the item (here a chunk's); no task run, no link
    assert table["message"][0].startswith("[") and table["message"][0].endswith(f"…]({link})")
    cell = table["message"][0][1 : -len(f"]({link})")]
    assert len(cell.replace("\\", "")) == MAX_MESSAGE_CHARS
    # markdown-special characters are escaped: the UI renders cells as markdown
    assert cell.startswith(r"ValidationError: genre \*must\* be one of \[gothic\|realist\] \<got\> \`space")
    assert table["message"][1] == "line one line two"  # one line

    text = summary_markdown(batch)
    listed = [line for line in text.splitlines() if line.startswith("- ")]
    assert listed[0].startswith(f"- [b7]({link}) (in task run chunk-1: b1 .. b9)")
    assert "**invalid_output** · 3 attempts:" in listed[0]
    assert listed[0].endswith("x" * 300)  # the whole reason: list items wrap in the UI, cells do not
    assert listed[1] == "- b8 · **fatal** · 1 attempt: line one line two"


def test_links_are_absolute_when_the_ui_url_is_known(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    with temporary_settings({PREFECT_UI_URL: "http://prefect.example:4200"}):
        assert task_run_link("abc") == "http://prefect.example:4200/runs/task-run/abc"
    # No UI URL (ephemeral API): a UI-relative link, which works when the artifact is viewed in the UI.
    monkeypatch.setattr("prefect_batchllm.prefect.artifacts.url_for", lambda *a, **k: None)
    assert task_run_link("abc") == "/runs/task-run/abc"


def test_keys_are_valid_prefect_artifact_keys() -> None:
    assert slugify_key("Enrich Books / Nightly_v2") == "enrich-books-nightly-v2"
    assert slugify_key("___") == "run-batch"
    assert artifact_keys("books") == {
        "summary": "books-summary",
        "failed": "books-failed-items",
        "progress": "books-progress",
    }
    with pytest.raises(ValueError):
        artifact_keys("Books_2")


async def _latest(key: str) -> Any:
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=50
        )
    assert found, f"no artifact {key!r}"
    return max(found, key=lambda a: a.updated or a.created)


@pytest.mark.usefixtures("prefect_api")
async def test_run_publishes_summary_failed_table_and_progress() -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"art-{tag}"
    items = [
        LLMWorkItem(f"row-{i}", Echo(), f"[row-{i}] {tag}" + (" FAIL" if i in (2, 5) else ""))
        for i in range(7)
    ]
    config = ProcessorConfig(artifact_key=prefix, progress_interval=2, retry=RetryConfig(max_attempts=2))
    result = await run_batch(items, config)
    assert result.failed == 2

    summary = await _latest(f"{prefix}-summary")
    assert summary.type == "markdown"
    assert "| succeeded | 5 |" in summary.data and "| failed | 2 |" in summary.data
    assert "| cache hit rate | 50.0 % |" in summary.data and "| fatal | 2 |" in summary.data

    table = await _latest(f"{prefix}-failed-items")
    assert table.type == "table"
    rows = table.data if isinstance(table.data, str) else str(table.data)
    assert "row-2" in rows and "row-5" in rows and "row-0" not in rows
    assert "unusable record" in rows and "fatal" in rows
    # each failed id links to its own task run (named after it, Failed), in this flow run
    for r in result.failed_items():
        task_run = await _task_run(r.metadata["prefect_task_run_id"])
        assert task_run.name == r.item_id and task_run.state.is_failed()
        assert task_run.flow_run_id == table.flow_run_id
        assert f"]({task_run_link(str(task_run.id))})" in rows
    async with get_client() as client:
        flow_run = await client.read_flow_run(table.flow_run_id)
    assert flow_run.name == f"{prefix}: 7 items"  # not a random name

    progress = await _latest(f"{prefix}-progress")
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.flow_run_id == summary.flow_run_id  # all attached to this batch's flow run


async def _task_run(task_run_id: str) -> Any:
    """The task run once its final state has reached the API: task-run states arrive as events, which
    lag behind the flow's return on a loaded machine (seen: still Running right after the flow ended)."""
    async with get_client() as client:
        for _ in range(120):
            task_run = await client.read_task_run(uuid.UUID(task_run_id))
            if task_run.state is not None and task_run.state.is_final():
                return task_run
            await asyncio.sleep(0.5)
        return task_run


@pytest.mark.usefixtures("prefect_api")
async def test_chunked_failed_items_link_to_their_chunks_task_run() -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"chunk-art-{tag}"
    items = [
        LLMWorkItem(f"row-{i}", Echo(), f"[row-{i}] {tag}" + (" FAIL" if i in (1, 6) else ""))
        for i in range(8)
    ]
    config = ProcessorConfig(artifact_key=prefix, chunk_size=4, retry=RetryConfig(max_attempts=1))
    result = await run_batch(items, config)
    assert [r.item_id for r in result.failed_items()] == ["row-1", "row-6"]
    names = {}
    for r in result.failed_items():
        task_run = await _task_run(r.metadata["prefect_task_run_id"])
        names[r.item_id] = task_run.name
        assert r.metadata["prefect_task_run_name"] == task_run.name and task_run.state.is_failed()
    assert names == {"row-1": "chunk-1: row-0 .. row-3", "row-6": "chunk-2: row-4 .. row-7"}
    summary = await _latest(f"{prefix}-summary")
    assert "(in task run chunk-2: row-4 .. row-7)" in summary.data
    async with get_client() as client:
        flow_run = await client.read_flow_run(summary.flow_run_id)
    assert flow_run.name == f"{prefix}: 8 items in chunks of 4"


@pytest.mark.usefixtures("prefect_api")
async def test_default_prefix_is_the_calling_flows_name() -> None:
    tag = uuid.uuid4().hex[:8]

    @flow(name=f"Enrich Books {tag}")
    async def enrich() -> BatchResult[Any, Any]:
        return await run_batch([LLMWorkItem("one", Echo(), f"[one] {tag}")], ProcessorConfig())

    await enrich()
    summary = await _latest(f"enrich-books-{tag}-summary")
    assert "| succeeded | 1 |" in summary.data
    await _latest(f"enrich-books-{tag}-failed-items")
    await _latest(f"enrich-books-{tag}-progress")


@pytest.mark.usefixtures("prefect_api")
async def test_progress_updates_are_bounded_by_time_not_item_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 items finishing over 10 (simulated) seconds send about one update a second, not one per
    ``interval`` items; concurrent finishers never queue updates; the final count always arrives."""
    import prefect_batchllm.prefect.artifacts as artifacts

    sent: list[float] = []
    real_update = artifacts.aupdate_progress_artifact

    async def counting_update(artifact_id: Any, progress: float, **kwargs: Any) -> Any:
        sent.append(progress)
        return await real_update(artifact_id, progress, **kwargs)

    monkeypatch.setattr(artifacts, "aupdate_progress_artifact", counting_update)
    now = [0.0]
    prefix = f"prog-{uuid.uuid4().hex[:8]}"

    @flow(name="progress-bound")
    async def drive() -> artifacts.ProgressArtifact:
        progress = artifacts.ProgressArtifact(prefix, 1000, interval=2, clock=lambda: now[0])
        await progress.start()
        done = 0
        for _ in range(100):  # 100 waves of 10 concurrent finishers, 0.1 s apart
            now[0] += 0.1
            updates = []
            for _ in range(10):
                done += 1
                updates.append(progress.update(done))
            await asyncio.gather(*updates)
        await progress.update(done, force=True)
        return progress

    progress = await drive()
    # 10 s of simulated time at <= 1 update/s, plus the final one (item count alone would allow 500).
    assert 5 <= len(sent) <= 11, sent
    assert progress.updates == len(sent)
    assert sent[-1] == 100.0 and sent == sorted(sent)
    stored = await _latest(f"{prefix}-progress")
    assert float(stored.data) == 100.0


@pytest.mark.usefixtures("prefect_api")
async def test_progress_interval_still_gates_slow_batches() -> None:
    """A slow batch (one item a minute) still updates only every ``interval`` items, and the last item
    is always published even when the previous update was a moment ago."""
    import prefect_batchllm.prefect.artifacts as artifacts

    now = [0.0]
    prefix = f"prog-{uuid.uuid4().hex[:8]}"

    @flow(name="progress-slow")
    async def drive() -> int:
        progress = artifacts.ProgressArtifact(prefix, 9, interval=3, clock=lambda: now[0])
        await progress.start()
        for done in range(1, 9):
            now[0] += 60.0
            await progress.update(done)
        now[0] += 0.01
        await progress.update(9)  # the last item: sent although the previous update was 10 ms ago
        return progress.updates

    assert await drive() == 3  # at 3, 6 and 9 items
    stored = await _latest(f"{prefix}-progress")
    assert float(stored.data) == 100.0
