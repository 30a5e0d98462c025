"""Batch events reach a real Prefect API with the right payloads and resources, and the shipped automation
(docs/automations/batch-failure-rate.yaml) notifies on a failure rate above 5 %.

The batches run in their own processes against ``prefect server start`` (tests/_prefect_server.py): events
travel over the events websocket, which is not reliable for in-process flows late in a long test session,
while a process that exits drains its events worker first. Events are then read back through the API's
``/events/filter``, polling because the server persists them asynchronously.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from _prefect_server import connected, prefect_env, prefect_server

from prefect_batchllm.prefect.events import batch_resource_id
from prefect_batchllm.testing import GeminiEmulator
from prefect_batchllm.testing.faults import Fault

ROOT = Path(__file__).resolve().parents[1]
JOB = Path(__file__).with_name("_events_job.py")
AUTOMATION = ROOT / "docs" / "automations" / "batch-failure-rate.yaml"


class _Webhook:
    """A loopback HTTP endpoint recording the JSON bodies POSTed to it (the notification target)."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    received.append(json.loads(raw))
                except ValueError:
                    received.append(raw.decode(errors="replace"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _run_job(api_url: str, base_url: str, mode: str, deployment_id: str | None = None) -> dict[str, Any]:
    args = [sys.executable, str(JOB), base_url, mode, *([deployment_id] if deployment_id else [])]
    done = subprocess.run(
        args, env=prefect_env(api_url), cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"job failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


def _events(api_url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.post(f"{api_url}/events/filter", json={**body, "limit": 50}, timeout=30)
    response.raise_for_status()
    return list(response.json()["events"])


def _batch_events(
    api_url: str, flow_run_id: str, until_name: str = "prefect-batchllm.batch.completed"
) -> list:
    """Every event of the batch (oldest first), once its ``until_name`` event has been persisted."""
    body = {"filter": {"resource": {"id": [batch_resource_id(flow_run_id)]}, "order": "ASC"}}
    deadline = time.monotonic() + 120
    while True:
        events = _events(api_url, body)
        if any(e["event"] == until_name for e in events) or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def _related(event: dict[str, Any], role: str) -> list[str]:
    return [r["prefect.resource.id"] for r in event["related"] if r.get("prefect.resource.role") == role]


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, Any]]:
    """Three batches against one real server: per-item with failures and a 429 pause, chunked inside a
    deployment's flow run with one failure, and a clean one; plus the shipped automation, wired to a
    webhook notification block."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore

    webhook = _Webhook()
    try:
        with prefect_server() as api_url, connected(api_url), GeminiEmulator() as emu:
            block = CustomWebhookNotificationBlock(
                name="batch-alerts", url=webhook.url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
            )
            block_id = block.save(f"batch-alerts-{uuid.uuid4().hex[:6]}")
            spec = yaml.safe_load(AUTOMATION.read_text())
            automation = AutomationCore.model_validate(spec)  # the shipped file is a valid automation
            action = automation.actions[0]
            assert isinstance(action, SendNotification)
            automation.actions = [action.model_copy(update={"block_document_id": block_id})]
            with get_client(sync_client=True) as client:
                client.create_automation(automation)
                flow_id = client.create_flow_from_name("events-job")
                deployment_id = str(client.create_deployment(flow_id=flow_id, name="events"))
            time.sleep(2)  # the triggers service loads new automations periodically

            emu.faults.add(Fault.status(400), contains="[per-item-item-5]", times=1)
            emu.faults.add(Fault.status(400), contains="[per-item-item-9]", times=1)
            emu.faults.add(Fault.rate_limit(1.0), contains="[per-item-item-2]", times=1)
            emu.faults.add(Fault.status(400), contains="[chunked-item-7]", times=1)
            out = {
                "api_url": api_url,
                "deployment_id": deployment_id,
                "webhook": webhook,
                "per-item": _run_job(api_url, emu.base_url, "per-item"),
                "chunked": _run_job(api_url, emu.base_url, "chunked", deployment_id),
                "clean": _run_job(api_url, emu.base_url, "clean"),
            }
            yield out
    finally:
        webhook.close()


def test_batch_events_with_failures_and_a_rate_limit_pause(runs: dict[str, Any]) -> None:
    api_url, run = runs["api_url"], runs["per-item"]
    flow_run_id = run["flow_run_id"]
    assert run["failed"] == {"item-5": "fatal", "item-9": "fatal"}
    events = _batch_events(api_url, flow_run_id)
    names = [e["event"] for e in events]
    assert names[0] == "prefect-batchllm.batch.started" and names[-1] == "prefect-batchllm.batch.completed"
    assert (
        names.count("prefect-batchllm.batch.started") == 1 == names.count("prefect-batchllm.batch.completed")
    )
    # One event per failed item, none per success.
    failed = [e for e in events if e["event"] == "prefect-batchllm.item.failed"]
    assert sorted(e["payload"]["item_id"] for e in failed) == ["item-5", "item-9"]
    assert {e["payload"]["category"] for e in failed} == {"fatal"}
    assert all(e["payload"]["attempts"] == 1 and "400" in e["payload"]["error"] for e in failed)
    # The 429 paused the shared limiter once: paused, then resumed after at least the server's delay.
    paused = [e for e in events if e["event"] == "prefect-batchllm.rate-limit.paused"]
    resumed = [e for e in events if e["event"] == "prefect-batchllm.rate-limit.resumed"]
    assert len(paused) == len(resumed) == 1
    assert paused[0]["payload"]["seconds"] >= 0.9 and resumed[0]["payload"]["paused_seconds"] >= 0.9
    assert names.index("prefect-batchllm.rate-limit.paused") < names.index(
        "prefect-batchllm.rate-limit.resumed"
    )

    started = events[0]
    assert started["payload"]["total"] == 12 and started["payload"]["max_workers"] == 3
    completed = events[-1]
    payload = completed["payload"]
    assert (payload["total"], payload["succeeded"], payload["failed"]) == (12, 10, 2)
    assert payload["failure_rate"] == pytest.approx(2 / 12, abs=1e-5)
    assert payload["error_categories"] == {"fatal": 2}
    assert (
        payload["estimated_cost_usd"] == pytest.approx(run["estimated_cost_usd"])
        and payload["estimated_cost_usd"] > 0
    )
    assert payload["cache_hit_rate"] == pytest.approx(run["cache_hit_rate"])
    assert payload["input_tokens"] > 0 and payload["item_failed_events_suppressed"] == 0
    resource = completed["resource"]
    assert resource["prefect-batchllm.outcome"] == "failed-items"
    assert resource["prefect-batchllm.failure-rate-above-5pct"] == "true"
    assert resource["prefect-batchllm.failure-rate-above-25pct"] == "false"
    for event in events:  # every event links the batch's flow run
        assert f"prefect.flow-run.{flow_run_id}" in _related(event, "flow-run")
        assert event["resource"]["prefect.resource.id"] == batch_resource_id(flow_run_id)


def test_chunked_batch_in_a_deployment_run_links_the_deployment(runs: dict[str, Any]) -> None:
    api_url, run = runs["api_url"], runs["chunked"]
    assert run["failed"] == {"item-7": "fatal"}
    events = _batch_events(api_url, run["flow_run_id"])
    names = [e["event"] for e in events]
    assert names[0] == "prefect-batchllm.batch.started" and names[-1] == "prefect-batchllm.batch.completed"
    failed = [e for e in events if e["event"] == "prefect-batchllm.item.failed"]
    assert [e["payload"]["item_id"] for e in failed] == ["item-7"]  # chunked mode: no per-item task run
    assert failed[0]["payload"]["category"] == "fatal"
    # The chunk's task run is linked too (the events worker adds the run context).
    assert _related(failed[0], "task-run")
    for event in events:
        assert f"prefect.deployment.{runs['deployment_id']}" in _related(event, "deployment")
        assert f"prefect.flow-run.{run['flow_run_id']}" in _related(event, "flow-run")
    # An automation can select the deployment's batches through the related resource.
    by_deployment = _events(
        api_url,
        {
            "filter": {
                "event": {"name": ["prefect-batchllm.batch.completed"]},
                "related": {"id": [f"prefect.deployment.{runs['deployment_id']}"]},
            }
        },
    )
    assert [e["resource"]["prefect.resource.id"] for e in by_deployment] == [
        batch_resource_id(run["flow_run_id"])
    ]


def test_clean_batch_emits_no_item_events(runs: dict[str, Any]) -> None:
    api_url, run = runs["api_url"], runs["clean"]
    assert run["failed"] == {}
    events = _batch_events(api_url, run["flow_run_id"])
    assert [e["event"] for e in events] == [
        "prefect-batchllm.batch.started",
        "prefect-batchllm.batch.completed",
    ]
    completed = events[-1]
    assert completed["payload"]["failure_rate"] == 0.0
    assert completed["resource"]["prefect-batchllm.outcome"] == "succeeded"
    assert completed["resource"]["prefect-batchllm.failure-rate-above-0pct"] == "false"


def test_the_shipped_automation_notifies_above_five_percent(runs: dict[str, Any]) -> None:
    """16.7 % and 8.3 % failed: two notifications, naming each batch's counts; the clean batch: none."""
    webhook = runs["webhook"]
    for run in ("per-item", "chunked", "clean"):  # every batch's completion is persisted first
        _batch_events(runs["api_url"], runs[run]["flow_run_id"])
    deadline = time.monotonic() + 120
    while len(webhook.bodies) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # room for a wrong third notification to arrive
    bodies = [b["body"] for b in webhook.bodies]
    assert len(bodies) == 2, webhook.bodies
    assert any("2 of 12 items failed (16.7 %)" in b for b in bodies)
    assert any("1 of 12 items failed (8.3 %)" in b for b in bodies)
    assert all("fatal" in b for b in bodies)
