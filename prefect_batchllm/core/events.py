"""Extension points with the seed's semantics: observers, middleware and progress callbacks.

All of them are fail-open: an exception (or a timeout) in user code is logged and never fails an item.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from abc import ABC
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, Protocol, runtime_checkable

from prefect_batchllm.core.errors import describe_error
from prefect_batchllm.core.items import TContext, TInput, TOutput

if TYPE_CHECKING:
    from prefect_batchllm.core.items import LLMWorkItem, WorkItemResult

logger = logging.getLogger("prefect_batchllm")


class ProcessingEvent(StrEnum):
    """Events emitted to observers, in the order they happen for an item."""

    BATCH_STARTED = "batch_started"
    ITEM_STARTED = "item_started"
    RATE_LIMIT_HIT = "rate_limit_hit"
    COOLDOWN_STARTED = "cooldown_started"
    COOLDOWN_ENDED = "cooldown_ended"
    ITEM_RETRYING = "item_retrying"
    ITEM_COMPLETED = "item_completed"
    ITEM_FAILED = "item_failed"
    BATCH_STOPPED = "batch_stopped"  # systematic errors: no new attempt is admitted (data: category, reason)
    BUDGET_EXCEEDED = "budget_exceeded"  # max_cost_usd reached: no new attempt is admitted
    BATCH_COMPLETED = "batch_completed"


@runtime_checkable
class ProcessorObserver(Protocol):
    """Receives :class:`ProcessingEvent`s with a data dict (``item_id``, ``attempt``, ``error``...).

    An observer may set ``accepts`` (a set of :class:`ProcessingEvent`) to receive only those events:
    one that cares about batch-level events then costs nothing per successful item.
    """

    async def on_event(self, event: ProcessingEvent, data: dict[str, Any]) -> None: ...


class Middleware(ABC, Generic[TInput, TOutput, TContext]):
    """Onion around each item: ``before_process`` in order, ``after_process`` in reverse order.

    ``Middleware[TInput, TOutput, TContext]`` as in the seed (the item's generics; all default to ``Any``).

    ``before_process`` may return a modified item (same ``item_id``) or ``None`` to skip the item (it is
    then recorded as failed with category ``skipped``). ``after_process`` runs on successes;
    ``on_error`` runs on terminal failures and may return a recovered result.
    """

    async def before_process(
        self, item: LLMWorkItem[TInput, TOutput, TContext]
    ) -> LLMWorkItem[TInput, TOutput, TContext] | None:
        return item

    async def after_process(
        self, result: WorkItemResult[TOutput, TContext]
    ) -> WorkItemResult[TOutput, TContext]:
        return result

    async def on_error(
        self, item: LLMWorkItem[TInput, TOutput, TContext], error: Exception
    ) -> WorkItemResult[TOutput, TContext] | None:
        return None


ProgressCallbackFunc = Callable[[int, int, str], Awaitable[None] | None]
PostProcessorFunc = Callable[["WorkItemResult[Any, Any]"], Awaitable[None] | None]


async def call_user_hook(
    fn: Callable[..., Any], *args: Any, timeout: float | None, what: str
) -> tuple[bool, str | None]:
    """Run a user callback (sync in a thread, async awaited) under a timeout; never raise.

    Returns ``(ok, error_message)``.
    """
    try:
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):  # noqa: B004
            coro = fn(*args)
        else:
            coro = asyncio.to_thread(fn, *args)
        if timeout is None:
            result = await coro
        else:
            result = await asyncio.wait_for(coro, timeout)
        if inspect.isawaitable(result):  # a sync function that returned an awaitable
            await (asyncio.wait_for(result, timeout) if timeout else result)
        return True, None
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        message = f"{what} timed out after {timeout} s"
    except Exception as exc:  # user code: fail open
        message = f"{what} failed: {describe_error(exc)}"  # redacted, bounded, one line
    logger.warning(message)
    return False, message


class EventDispatcher:
    """Fans events out to observers (each with a timeout), swallowing and logging their failures."""

    def __init__(self, observers: list[ProcessorObserver] | None = None, timeout: float = 5.0) -> None:
        self.observers = list(observers or [])
        self.timeout = timeout

    async def emit(self, event: ProcessingEvent, data: dict[str, Any]) -> None:
        for observer in self.observers:
            accepts = getattr(observer, "accepts", None)
            if accepts is not None and event not in accepts:
                continue
            await call_user_hook(
                observer.on_event, event, data, timeout=self.timeout, what=f"observer {observer!r}"
            )
