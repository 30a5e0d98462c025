"""The strategy contract: how one LLM call is prepared, made, corrected and cleaned up.

The framework calls ``prepare()`` once per strategy instance per run (before any attempt),
``execute()`` once per attempt, ``on_error()`` after each failed attempt (before the retry decision) and
``cleanup()`` once after every item has finished, success or failure.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

from prefect_batchllm.core.identity import public_state
from prefect_batchllm.core.tokens import TokenUsage, estimate_tokens

__all__ = ["DRY_RUN_TEXT", "MOCK_USAGE", "ExecuteResult", "LLMCallStrategy", "RetryState", "TOutput"]

TOutput = TypeVar("TOutput")

#: The text every dry run returns when no output schema is known.
DRY_RUN_TEXT = "[DRY-RUN] Mock output"
#: Token usage reported by every dry run (no call is made; fixed so dry runs are comparable).
MOCK_USAGE: TokenUsage = {
    "input_tokens": 100,
    "output_tokens": 50,
    "total_tokens": 150,
    "cached_input_tokens": 0,
}


#: ``execute`` returns ``(output, token_usage)``; it may add a third element, a metadata dict
#: (e.g. ``{"safety_ratings": {...}, "finish_reason": "STOP"}``), which lands in ``WorkItemResult``.
ExecuteResult = tuple[TOutput, TokenUsage] | tuple[TOutput, TokenUsage, dict[str, Any]]


class RetryState:
    """Per-item scratch space that persists across the attempts of one item and never leaks to others."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = dict(data or {})

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def clear(self) -> None:
        self.data.clear()

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __repr__(self) -> str:
        return f"RetryState({sorted(self.data)})"


class LLMCallStrategy(ABC, Generic[TOutput]):
    """How to call an LLM for one item. Subclass and implement :meth:`execute`."""

    async def prepare(self) -> None:
        """Set up shared resources (caches, clients) once, before any attempt. Default: no-op."""

    @abstractmethod
    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> ExecuteResult[TOutput]:
        """Make one attempt. ``attempt`` starts at 1; ``timeout`` is enforced by the framework."""

    async def on_error(self, exception: Exception, attempt: int, state: RetryState | None = None) -> None:
        """Inspect a failed attempt before the retry decision (e.g. store a correction). Default: no-op."""

    async def cleanup(self) -> None:
        """Release resources once after all items finished. Must not destroy reusable caches."""

    async def dry_run(self, prompt: Any) -> tuple[TOutput, TokenUsage]:
        """Mock output for ``dry_run=True`` runs: no network call is made."""
        return DRY_RUN_TEXT, dict(MOCK_USAGE)  # type: ignore[return-value]

    # -- hooks used by the orchestration layer (sensible defaults; override when you know better) ------

    @property
    def model_name(self) -> str | None:
        """Model name for pricing and the UI; ``None`` when unknown."""
        model = getattr(self, "model", None)
        name = getattr(model, "model", None) or getattr(model, "model_name", None)
        return name if isinstance(name, str) else None

    def fingerprint(self) -> str:
        """Stable identity of *what* this strategy computes, used in result cache keys for reruns.

        Two processes constructing the same strategy must produce the same fingerprint; a change of
        model, system instruction or parser should change it. The default covers the class, the model
        (its ``fingerprint()`` or name) and every *public* instance attribute: primitives and containers
        by value, pydantic models by their JSON, callables by ``callable_identity`` (so a changed
        ``lambda`` counts), objects with a ``fingerprint()`` or ``__batchllm_fingerprint__()`` by it; anything
        else (clients, locks) by its type name only (see :mod:`prefect_batchllm.core.identity`). Keep
        run-time state (counters, caches) in ``_private`` attributes, or override
        this method (e.g. to add your own version tag).
        """
        parts = [type(self).__module__, type(self).__qualname__]
        model = getattr(self, "model", None)
        model_fp = getattr(model, "fingerprint", None)
        if callable(model_fp):
            parts.append(str(model_fp()))
        elif self.model_name:
            parts.append(self.model_name)
        parts.append(public_state(self))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def estimate_tokens(self, prompt: Any) -> int:
        """Input tokens this prompt will cost, estimated before the call (for tokens-per-minute limits)."""
        if isinstance(prompt, str):
            return estimate_tokens(prompt)
        if isinstance(prompt, list):
            return sum(estimate_tokens(p) if isinstance(p, str) else 258 for p in prompt) or 1
        return estimate_tokens(str(prompt))
