"""The event bridge's own rules, without a server: which events, how many, which labels; and how the
limiter's pause callbacks (from its own thread) become one started/ended pair per pause.

The end-to-end proof (events read back from a real Prefect API) is tests/test_prefect_events.py.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest

from prefect_batchllm.core.events import EventDispatcher, ProcessingEvent
from prefect_batchllm.prefect import events as bridge_module
from prefect_batchllm.prefect.events import PauseEvents, PrefectEventBridge


@pytest.fixture
def emitted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    def record(name: str, **kwargs: Any) -> None:
        sent.append({"event": name, **kwargs})

    monkeypatch.setattr(bridge_module, "emit_event", record)
    return sent


async def test_item_events_are_capped_and_successes_never_reach_the_bridge(emitted: list) -> None:
    run_id, deployment_id = uuid.uuid4(), uuid.uuid4()
    bridge = PrefectEventBridge(
        run_id, flow_run_name="brave-otter", deployment_id=deployment_id, max_item_events=3
    )
    seen: list[ProcessingEvent] = []

    class Spy:
        accepts = PrefectEventBridge.accepts

        async def on_event(self, event: ProcessingEvent, data: dict[str, Any]) -> None:
            seen.append(event)

    dispatcher = EventDispatcher([bridge, Spy()])
    await dispatcher.emit(ProcessingEvent.BATCH_STARTED, {"total": 10, "max_workers": 2})
    for i in range(10):
        await dispatcher.emit(ProcessingEvent.ITEM_STARTED, {"item_id": f"i{i}"})
        await dispatcher.emit(ProcessingEvent.ITEM_COMPLETED, {"item_id": f"i{i}"})
    for i in range(5):
        data = {"item_id": f"f{i}", "error": "x" * 2000, "error_category": "fatal", "attempts": 2}
        await dispatcher.emit(ProcessingEvent.ITEM_FAILED, data)
    await dispatcher.emit(
        ProcessingEvent.BUDGET_EXCEEDED, {"spent_usd": 1.5, "budget_usd": 1.0, "odd": {1, 2}}
    )
    await dispatcher.emit(ProcessingEvent.BATCH_COMPLETED, {"total": 15, "succeeded": 10, "failed": 5})

    assert ProcessingEvent.ITEM_COMPLETED not in seen and ProcessingEvent.ITEM_STARTED not in seen
    names = [e["event"] for e in emitted]
    assert names == [
        "prefect-batchllm.batch.started",
        *["prefect-batchllm.item.failed"] * 3,
        "prefect-batchllm.budget.exceeded",
        "prefect-batchllm.batch.completed",
    ]
    failed = emitted[1]
    assert failed["payload"] == {"item_id": "f0", "category": "fatal", "error": "x" * 500, "attempts": 2}
    assert emitted[4]["payload"]["odd"] == [1, 2]  # made JSON-able
    completed = emitted[-1]
    assert completed["payload"]["item_failed_events_suppressed"] == 2
    resource = completed["resource"]
    assert resource["prefect.resource.id"] == f"prefect-batchllm.batch.{run_id}"
    assert resource["prefect.resource.name"] == "brave-otter"
    assert resource["prefect-batchllm.outcome"] == "failed-items"
    assert resource["prefect-batchllm.failure-rate-above-25pct"] == "true"
    assert resource["prefect-batchllm.failure-rate-above-50pct"] == "false"
    assert "prefect-batchllm.outcome" not in emitted[0]["resource"]  # only the completion is labelled
    related = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in completed["related"]}
    assert related == {
        "flow-run": f"prefect.flow-run.{run_id}",
        "deployment": f"prefect.deployment.{deployment_id}",
    }


async def test_emit_failures_never_reach_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("events worker gone")

    monkeypatch.setattr(bridge_module, "emit_event", broken)
    bridge = PrefectEventBridge(uuid.uuid4())
    await bridge.on_event(ProcessingEvent.BATCH_STARTED, {"total": 1})
    assert bridge.emitted == []


async def test_limiter_pauses_become_one_started_and_one_ended_event() -> None:
    got: list[tuple[ProcessingEvent, dict[str, Any]]] = []

    class Recorder:
        async def on_event(self, event: ProcessingEvent, data: dict[str, Any]) -> None:
            got.append((event, data))

    pauses = PauseEvents(EventDispatcher([Recorder()]))

    def from_limiter_thread(*seconds: float) -> None:
        def call() -> None:
            for s in seconds:
                pauses.on_pause(s)

        thread = threading.Thread(target=call)
        thread.start()
        thread.join()

    from_limiter_thread(0.3, 0.5)  # a pause, extended while it lasts: still one pause
    for _ in range(200):
        if len(got) == 2:
            break
        await asyncio.sleep(0.05)
    assert [e for e, _ in got] == [ProcessingEvent.COOLDOWN_STARTED, ProcessingEvent.COOLDOWN_ENDED]
    assert got[0][1] == {"seconds": pytest.approx(0.3, abs=0.1), "pause": 1}
    assert got[1][1]["pause"] == 1 and got[1][1]["paused_seconds"] >= 0.45

    from_limiter_thread(60.0)  # a second pause, still running when the batch ends
    for _ in range(100):
        if len(got) == 3:
            break
        await asyncio.sleep(0.02)
    await pauses.aclose()
    assert [e for e, _ in got[2:]] == [ProcessingEvent.COOLDOWN_STARTED, ProcessingEvent.COOLDOWN_ENDED]
    assert got[3][1]["pause"] == 2 and got[3][1]["paused_seconds"] < 60
    from_limiter_thread(5.0)  # after close: ignored
    await asyncio.sleep(0.1)
    assert len(got) == 4


async def test_rows_still_in_a_batch_job_are_not_failures(emitted: list) -> None:
    """``batch_pending`` rows (their Gemini job still runs) raise no item.failed event and no failure rate."""
    from prefect_batchllm import BatchResult, WorkItemResult
    from prefect_batchllm.prefect.events import batch_completed_data

    bridge = PrefectEventBridge(uuid.uuid4(), flow_run_name="patient-heron")
    results = [WorkItemResult("a", True, output="x")] + [
        WorkItemResult(f"p{i}", False, error="still running", error_category="batch_pending")
        for i in range(3)
    ]
    data = batch_completed_data(BatchResult(results=results))
    assert (data["failed"], data["pending"], data["failure_rate"]) == (0, 3, 0.0)
    await bridge.on_event(
        ProcessingEvent.ITEM_FAILED, {"item_id": "p0", "error_category": "batch_pending", "error": "x"}
    )
    await bridge.on_event(ProcessingEvent.BATCH_COMPLETED, data)
    assert [e["event"] for e in emitted] == ["prefect-batchllm.batch.completed"]
    labels = emitted[0]["resource"]
    assert labels["prefect-batchllm.failure-rate-above-5pct"] == "false"
    assert labels["prefect-batchllm.outcome"] == "succeeded"
