"""Batch events as Prefect events, for Automations: what a user may alert or act on.

:class:`PrefectEventBridge` observes a batch's :class:`~prefect_batchllm.core.events.ProcessingEvent` stream
and emits these Prefect events (``prefect.events.emit_event``), named ``prefect-batchllm.<name>``:

==========================  ===========================================================================
name                        payload
==========================  ===========================================================================
``batch.started``           ``total``, ``max_workers``
``batch.completed``         ``total``, ``succeeded``, ``failed``, ``pending`` (rows still in a running
                            Gemini batch job: not failures, no item.failed event), ``failure_rate`` (0-1),
                            ``estimated_cost_usd``, ``cache_hit_rate`` (percent), tokens, ``replayed``,
                            ``error_categories``, ``wall_time_s``, ``item_failed_events_suppressed``
``item.failed``             ``item_id``, ``category``, ``error``, ``attempts``
``rate-limit.paused``       ``seconds`` (planned), ``pause`` (1, 2, ... within this batch)
``rate-limit.resumed``      ``paused_seconds``, ``pause``
``budget.exceeded``         what the budget stop reports (spent, budget, ...)
``batch.stopped``           errors that fail every item stopped the batch early (category, reason)
==========================  ===========================================================================

Every event's primary resource is the batch, ``prefect-batchllm.batch.<flow run id>``; its related resources
are the batch's flow run (``prefect.flow-run.<id>``, role ``flow-run``), its flow and, when the run (or the
flow that called ``run_batch``) belongs to a deployment, ``prefect.deployment.<id>`` (role ``deployment``).
Prefect's events worker adds the rest of the run context (tags, work pool, the chunk's task run).

Prefect triggers match labels, not numbers, so ``batch.completed``'s resource carries
``prefect-batchllm.failure-rate-above-<N>pct`` = ``"true"`` / ``"false"`` for N in
:data:`FAILURE_RATE_THRESHOLDS` and ``prefect-batchllm.outcome`` (``succeeded`` / ``failed-items`` /
``all-failed``): "notify when a batch finishes with more than 5 % failed" is a trigger on
``prefect-batchllm.failure-rate-above-5pct: "true"`` (see ``docs/automations/``).

Volume: a constant number of events per batch plus one per *failed* item (never per success), capped at
``max_item_events`` per batch (default 1,000); beyond that ``batch.completed`` reports
``item_failed_events_suppressed``. A million-item run with 1 % failures emits ~1,000 events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prefect.context import FlowRunContext
from prefect.events import emit_event

from prefect_batchllm.core.events import EventDispatcher, ProcessingEvent
from prefect_batchllm.models.gemini_batch import PENDING_CATEGORY

if TYPE_CHECKING:
    from prefect_batchllm.core.items import BatchResult

logger = logging.getLogger("prefect_batchllm")

__all__ = [
    "EVENT_PREFIX",
    "FAILURE_RATE_THRESHOLDS",
    "PauseEvents",
    "PrefectEventBridge",
    "batch_completed_data",
    "batch_resource_id",
]

EVENT_PREFIX = "prefect-batchllm"
#: Failure-rate thresholds (percent) published as ``prefect-batchllm.failure-rate-above-<N>pct`` labels.
FAILURE_RATE_THRESHOLDS: tuple[int, ...] = (0, 1, 5, 10, 25, 50)
#: Default cap on ``item.failed`` events per batch.
MAX_ITEM_EVENTS = 1000
_MAX_ERROR_CHARS = 500

_EVENT_NAMES: dict[ProcessingEvent, str] = {
    ProcessingEvent.BATCH_STARTED: f"{EVENT_PREFIX}.batch.started",
    ProcessingEvent.BATCH_COMPLETED: f"{EVENT_PREFIX}.batch.completed",
    ProcessingEvent.ITEM_FAILED: f"{EVENT_PREFIX}.item.failed",
    ProcessingEvent.COOLDOWN_STARTED: f"{EVENT_PREFIX}.rate-limit.paused",
    ProcessingEvent.COOLDOWN_ENDED: f"{EVENT_PREFIX}.rate-limit.resumed",
    ProcessingEvent.BUDGET_EXCEEDED: f"{EVENT_PREFIX}.budget.exceeded",
    ProcessingEvent.BATCH_STOPPED: f"{EVENT_PREFIX}.batch.stopped",
}


def batch_resource_id(flow_run_id: Any) -> str:
    """The primary resource id of a batch's events."""
    return f"{EVENT_PREFIX}.batch.{flow_run_id}"


def batch_completed_data(batch: BatchResult[Any, Any]) -> dict[str, Any]:
    """The ``BATCH_COMPLETED`` data: counts, failure rate (0-1), cost, cache hit rate, tokens."""
    total = batch.total_items
    pending = batch.error_categories().get(PENDING_CATEGORY, 0)  # still in a running Gemini batch job
    failed = batch.failed - pending
    return {
        "total": total,
        "succeeded": batch.succeeded,
        "failed": failed,
        "pending": pending,
        "failure_rate": round(failed / total, 6) if total else 0.0,
        "replayed": batch.replayed_count,
        "estimated_cost_usd": round(batch.estimated_cost_usd, 8),
        "cache_hit_rate": round(batch.cache_hit_rate(), 4),
        "input_tokens": batch.total_input_tokens,
        "output_tokens": batch.total_output_tokens,
        "cached_tokens": batch.total_cached_tokens,
        "error_categories": batch.error_categories(),
        "wall_time_s": round(batch.wall_time_s, 3),
    }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


class PrefectEventBridge:
    """Observer that turns the batch-level :class:`ProcessingEvent`s into Prefect events (see module doc).

    Receives only the events in :attr:`accepts` (the dispatcher skips it for every per-item success).
    Emitting only queues the event for Prefect's events worker, so it never blocks the batch; a failure
    to emit is logged, never raised.
    """

    accepts = frozenset(_EVENT_NAMES)

    def __init__(
        self,
        flow_run_id: Any,
        *,
        flow_run_name: str | None = None,
        flow_id: Any = None,
        flow_name: str | None = None,
        deployment_id: Any = None,
        max_item_events: int = MAX_ITEM_EVENTS,
    ) -> None:
        self.flow_run_id = str(flow_run_id)
        self.resource: dict[str, str] = {
            "prefect.resource.id": batch_resource_id(flow_run_id),
            "prefect.resource.name": flow_run_name or self.flow_run_id,
        }
        related: list[dict[str, str]] = [
            {
                "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
                "prefect.resource.role": "flow-run",
                **({"prefect.resource.name": flow_run_name} if flow_run_name else {}),
            }
        ]
        if flow_id is not None:
            related.append(
                {
                    "prefect.resource.id": f"prefect.flow.{flow_id}",
                    "prefect.resource.role": "flow",
                    **({"prefect.resource.name": flow_name} if flow_name else {}),
                }
            )
        if deployment_id is not None:
            related.append(
                {
                    "prefect.resource.id": f"prefect.deployment.{deployment_id}",
                    "prefect.resource.role": "deployment",
                }
            )
        self.related = related
        self.max_item_events = max(0, int(max_item_events))
        self.item_events = 0
        self.suppressed = 0
        self.emitted: list[str] = []  # names of the events emitted, in order (cheap: bounded as above)

    @classmethod
    def for_current_run(cls, deployment_id: Any = None, **options: Any) -> PrefectEventBridge | None:
        """A bridge for the flow run in context (``None`` outside one). ``deployment_id`` (e.g. that of the
        flow that called ``run_batch``) wins over the run's own."""
        ctx = FlowRunContext.get()
        flow_run = getattr(ctx, "flow_run", None)
        if flow_run is None:
            return None
        flow = getattr(ctx, "flow", None)
        return cls(
            flow_run.id,
            flow_run_name=flow_run.name,
            flow_id=flow_run.flow_id,
            flow_name=getattr(flow, "name", None),
            deployment_id=deployment_id or flow_run.deployment_id,
            **options,
        )

    async def on_event(self, event: ProcessingEvent, data: dict[str, Any]) -> None:
        name = _EVENT_NAMES.get(event)
        if name is None:
            return
        resource = self.resource
        if event is ProcessingEvent.ITEM_FAILED:
            if data.get("error_category") == PENDING_CATEGORY:  # not a failure: its batch job still runs
                return
            if self.item_events >= self.max_item_events:
                self.suppressed += 1
                return
            self.item_events += 1
            error = data.get("error")
            payload: dict[str, Any] = {
                "item_id": data.get("item_id"),
                "category": data.get("error_category") or "unknown",
                "error": error[:_MAX_ERROR_CHARS] if isinstance(error, str) else error,
                "attempts": data.get("attempts"),
            }
        elif event is ProcessingEvent.BATCH_COMPLETED:
            payload = dict(data)
            payload["item_failed_events_suppressed"] = self.suppressed
            resource = {**resource, **self._outcome_labels(data)}
        else:
            payload = dict(data)
        self._emit(name, resource, payload)

    @staticmethod
    def _outcome_labels(data: dict[str, Any]) -> dict[str, str]:
        total = int(data.get("total") or 0)
        failed = int(data.get("failed") or 0)
        percent = 100.0 * failed / total if total else 0.0
        outcome = "succeeded" if failed == 0 else ("all-failed" if failed == total else "failed-items")
        labels = {f"{EVENT_PREFIX}.outcome": outcome}
        for threshold in FAILURE_RATE_THRESHOLDS:
            labels[f"{EVENT_PREFIX}.failure-rate-above-{threshold}pct"] = str(percent > threshold).lower()
        return labels

    def _emit(self, name: str, resource: dict[str, str], payload: dict[str, Any]) -> None:
        try:
            emit_event(
                name, resource=resource, related=[dict(r) for r in self.related], payload=_jsonable(payload)
            )
            self.emitted.append(name)
        except Exception as exc:  # events are a view for automations; never fail the batch over one
            logger.warning("could not emit Prefect event %s: %s", name, exc)


class PauseEvents:
    """Turns the rate limiter's pauses into ``COOLDOWN_STARTED`` / ``COOLDOWN_ENDED`` processing events.

    Give :meth:`on_pause` to the limiter (``GlobalRateLimiter(on_pause=...)``): it is called on the
    limiter's thread whenever a pause starts or is extended, and only hands the news to the flow's event
    loop. A pause that is extended while it lasts stays one pause (one started, one ended event).
    :meth:`aclose` ends a pause still running when the batch finishes and waits for pending emits.
    """

    def __init__(self, events: EventDispatcher) -> None:
        self._events = events
        self._loop = asyncio.get_running_loop()
        self._until = 0.0  # time.monotonic() the current pause ends
        self._started_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.pauses = 0

    @property
    def on_pause(self) -> Callable[[float], None]:
        return self._on_pause_threadsafe

    def _on_pause_threadsafe(self, seconds: float) -> None:
        until = time.monotonic() + max(0.0, float(seconds))
        with contextlib.suppress(RuntimeError):  # the flow's loop is gone: nobody to tell
            self._loop.call_soon_threadsafe(self._paused, until)

    def _paused(self, until: float) -> None:
        if self._closed or until <= self._until:
            return
        now = time.monotonic()
        self._until = until
        if self._started_at is None:
            self._started_at = now
            self.pauses += 1
            self._spawn(
                ProcessingEvent.COOLDOWN_STARTED, {"seconds": round(until - now, 3), "pause": self.pauses}
            )
        self._arm(until - now)

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(max(0.0, delay), self._check)

    def _check(self) -> None:
        remaining = self._until - time.monotonic()
        if remaining > 0:
            self._arm(remaining)
        else:
            self._end()

    def _end(self) -> None:
        if self._started_at is None:
            return
        paused = time.monotonic() - self._started_at
        self._started_at = None
        self._spawn(
            ProcessingEvent.COOLDOWN_ENDED, {"paused_seconds": round(paused, 3), "pause": self.pauses}
        )

    def _spawn(self, event: ProcessingEvent, data: dict[str, Any]) -> None:
        task = self._loop.create_task(self._events.emit(event, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """End a running pause (its ``COOLDOWN_ENDED`` is still emitted) and wait for pending emits."""
        if self._timer is not None:
            self._timer.cancel()
        self._end()
        self._closed = True
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
