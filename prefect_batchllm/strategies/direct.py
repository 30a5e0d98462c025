"""``DirectCallStrategy``: wrap your own async call (the original README's ``direct_call``).

``call(prompt, attempt, timeout)`` returns ``(output, token_usage)`` or ``(output, token_usage, metadata)``;
a callable that also takes ``state`` receives the item's :class:`RetryState`. Use it for any client this
package does not wrap, or for full control of temperature and prompts per attempt.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from prefect_batchllm.core.identity import callable_identity
from prefect_batchllm.core.strategy import ExecuteResult, LLMCallStrategy, RetryState, TOutput
from prefect_batchllm.core.tokens import TokenUsage, normalize_usage

__all__ = ["DirectCallStrategy"]


class DirectCallStrategy(LLMCallStrategy[TOutput]):
    """Calls ``call(prompt, attempt, timeout[, state])`` once per attempt.

    ``model_name`` (for pricing) and ``identity`` (for the rerun fingerprint; defaults to
    :func:`callable_identity` of the callable: its name, code, defaults and closure values) are optional.
    """

    def __init__(
        self,
        call: Callable[..., Any],
        *,
        model_name: str | None = None,
        identity: str | None = None,
    ) -> None:
        if call is None or not callable(call):
            raise TypeError(
                "call must be a callable: async def call(prompt, attempt, timeout) -> (output, token_usage); "
                f"got {type(call).__name__}"
            )
        self.call = call
        self._model_name = model_name
        self.identity = identity
        self._pass_state = _takes_state(call)
        self._is_async = is_coroutine_callable(call)
        _check_arity(call)

    def __repr__(self) -> str:
        return f"DirectCallStrategy({_qualname(self.call)})"

    @property
    def model_name(self) -> str | None:
        """The model name given at construction (for pricing), if any."""
        return self._model_name

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> ExecuteResult[TOutput]:
        """Run the callable and normalise its ``(output, usage[, metadata])`` result.

        Coroutine functions are awaited on the loop; sync callables run in a worker thread
        (``asyncio.to_thread``) so they neither block the loop nor escape the framework's timeout.
        """
        kwargs: dict[str, Any] = {"state": state} if self._pass_state else {}
        if self._is_async:
            result = self.call(prompt, attempt, timeout, **kwargs)
        else:
            result = await asyncio.to_thread(self.call, prompt, attempt, timeout, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, tuple) or len(result) not in (2, 3):
            raise TypeError(
                f"{_qualname(self.call)} must return (output, token_usage) or "
                f"(output, token_usage, metadata), got {type(result).__name__}"
            )
        output, usage = result[0], result[1]
        if usage is not None and not isinstance(usage, Mapping):
            raise TypeError(
                f"{_qualname(self.call)} returned token_usage of type {type(usage).__name__}, not a dict"
            )
        normalized: TokenUsage = normalize_usage(dict(usage or {}))
        if len(result) == 3:
            metadata = result[2]
            if metadata is not None and not isinstance(metadata, Mapping):
                raise TypeError(f"{_qualname(self.call)} returned metadata of type {type(metadata).__name__}")
            return output, normalized, dict(metadata or {})
        return output, normalized

    def fingerprint(self) -> str:
        """``identity`` or the callable's :func:`callable_identity`, plus the model name."""
        identity = self.identity or callable_identity(self.call)
        text = "|".join([type(self).__qualname__, identity, self._model_name or ""])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _qualname(call: Callable[..., Any]) -> str:
    return f"{getattr(call, '__module__', '')}.{getattr(call, '__qualname__', type(call).__name__)}"


def is_coroutine_callable(call: Callable[..., Any]) -> bool:
    while isinstance(call, functools.partial):
        call = call.func
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(
        getattr(call, "__call__", None)  # noqa: B004 - an instance with an async __call__
    )


def _signature(call: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(call)
    except (TypeError, ValueError):
        return None


def _takes_state(call: Callable[..., Any]) -> bool:
    sig = _signature(call)
    if sig is None:
        return False
    params = sig.parameters
    return "state" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _check_arity(call: Callable[..., Any]) -> None:
    """Reject callables that cannot take ``(prompt, attempt, timeout)`` positionally, at construction."""
    sig = _signature(call)
    if sig is None:
        return
    try:
        if "state" in sig.parameters:
            sig.bind(None, 1, 1.0, state=None)
        else:
            sig.bind(None, 1, 1.0)
    except TypeError as exc:
        raise TypeError(
            f"call {_qualname(call)}{sig} must accept (prompt, attempt, timeout) positionally: {exc}"
        ) from None
