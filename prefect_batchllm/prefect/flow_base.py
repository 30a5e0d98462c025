"""One ``Flow`` base for the package's flows (``run_batch``, ``enrich_dataframe``): Prefect subclass tricks
live here once, on Prefect's public API only.

* Stored parameters are summaries (:meth:`BatchLLMFlow.summarize_parameters`): the server caps flow
  parameters at 512 KiB, and prompts, frames and clients do not belong in the UI anyway.
* Inputs are checked (:meth:`BatchLLMFlow.check_call`) before a flow run is created, so a bad call fails at
  once with a clear message instead of as a failed run.
* Called with no running event loop (plain code, or inside a sync ``@flow``), an async flow runs to
  completion and returns its result; from async code it returns an awaitable, like any async flow.
* The caller (parent flow, its deployment) is remembered in :data:`CALLER` for artifact keys and the events'
  related resources.
* ``with_options`` keeps the subclass (Prefect's builds a plain ``Flow``, which would lose all of the above).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from dataclasses import dataclass
from typing import Any, Self, cast

from prefect import Flow
from prefect.context import FlowRunContext, get_run_context
from prefect.exceptions import MissingContextError
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.utilities.callables import get_call_parameters

__all__ = ["CALLER", "BatchLLMFlow", "Caller", "in_async_context"]


@dataclass(frozen=True)
class Caller:
    """Who called a batch flow: the parent flow's name and its deployment (``None`` outside a flow run)."""

    flow_name: str | None
    deployment_id: Any


#: The caller of the batch flow being run (set by :meth:`BatchLLMFlow.__call__`).
CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("batchllm_caller", default=None)


def in_async_context() -> bool:
    """Whether the caller can ``await``: inside an async task / flow run, or on a running event loop."""
    try:
        run = get_run_context()
    except MissingContextError:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True
    owner = getattr(run, "task", None) or getattr(run, "flow", None)
    return bool(getattr(owner, "isasync", True))


class BatchLLMFlow(Flow):  # type: ignore[type-arg]
    """A Prefect ``Flow`` with compact stored parameters, early input checks and call-style dispatch."""

    def summarize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """JSON-able stand-ins for the parameters stored with the flow run (override; default: as is)."""
        return parameters

    def check_call(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """Validate (and possibly normalise) the call's parameters before a run exists (override)."""
        return parameters

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return super().serialize_parameters(self.summarize_parameters(dict(parameters)))

    def with_options(self, *args: Any, **kwargs: Any) -> Self:
        new = super().with_options(*args, **kwargs)
        new.__class__ = type(self)
        return cast(Self, new)

    def __call__(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
        params = self.check_call(get_call_parameters(self.fn, args, kwargs))
        parent = FlowRunContext.get()
        CALLER.set(
            Caller(
                flow_name=parent.flow.name if parent and parent.flow else None,
                deployment_id=parent.flow_run.deployment_id if parent and parent.flow_run else None,
            )
        )
        result = super().__call__(return_state=return_state, wait_for=wait_for, **params)
        if inspect.iscoroutine(result) and not in_async_context():
            return run_coro_as_sync(result)
        return result
