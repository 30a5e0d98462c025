"""One batch-level stop: once set, no new attempt is admitted and every unfinished item fails with its reason.

Two reasons set it today:

* **systematic errors**: ``ProcessorConfig.stop_after_systematic_errors`` consecutive failed attempts of
  the same systematic category (``auth``, ``not_found``, ``quota_exhausted``: the key, the model or the
  day's quota is wrong, so every later item would fail the same way and cost one request each);
* **budget**: ``ProcessorConfig.max_cost_usd`` - an attempt is admitted only while the cost already spent plus
  the estimated cost of the attempts in flight plus its own estimate stays within the budget.

Items not attempted because of a stop fail with the stop's category (``auth``..., ``budget_exceeded``) and
keep ``attempts=0``; they are never persisted as successes, so a rerun (fixed key, raised budget) runs them.
Prefect-free: the executor (:func:`~prefect_batchllm.core.attempt.run_attempt`) checks it before admission.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prefect_batchllm.core.errors import SYSTEMATIC_CATEGORIES, ErrorCategory, ErrorInfo
from prefect_batchllm.core.pricing import price_for
from prefect_batchllm.core.tokens import TokenUsage, normalize_usage

logger = logging.getLogger("prefect_batchllm")

__all__ = ["BatchStop", "BatchStopped", "CostReservation"]

#: Output tokens assumed for an attempt before any attempt finished and without ``max_output_tokens``.
DEFAULT_OUTPUT_ESTIMATE = 256


class BatchStopped(Exception):
    """Raised instead of admitting an attempt once the batch has stopped."""

    def __init__(self, category: ErrorCategory, reason: str) -> None:
        super().__init__(category, reason)
        self.category = category
        self.reason = reason

    def __str__(self) -> str:
        return self.reason

    def info(self) -> ErrorInfo:
        return ErrorInfo(self.category, False, reason=self.reason)


@dataclass
class CostReservation:
    """The estimated cost of one admitted attempt, held until it is settled with the real usage."""

    model: str | None
    estimate_usd: float
    settled: bool = False


#: Called once when the batch stops: ``(category, reason, data)``; e.g. emits a ProcessingEvent.
StopHook = Callable[[ErrorCategory, str, dict[str, Any]], Awaitable[None]]


class BatchStop:
    """The batch's stop switch, error streak and cost budget (one per batch run, shared by every item)."""

    def __init__(
        self,
        *,
        stop_after_errors: int | None = None,
        max_cost_usd: float | None = None,
        on_stop: StopHook | None = None,
    ) -> None:
        self.stop_after_errors = stop_after_errors or None
        self.max_cost_usd = max_cost_usd
        self.on_stop = on_stop
        self.category: ErrorCategory | None = None
        self.reason: str | None = None
        self.spent_usd = 0.0
        self.reserved_usd = 0.0
        self._streak_category: ErrorCategory | None = None
        self._streak = 0
        self._output_tokens = 0
        self._outputs = 0

    @property
    def stopped(self) -> bool:
        return self.category is not None

    async def stop(self, category: ErrorCategory, reason: str, data: dict[str, Any] | None = None) -> bool:
        """Stop the batch (the first reason wins); True if this call stopped it."""
        if self.category is not None:
            return False
        self.category, self.reason = category, reason
        logger.warning("%s", reason)
        if self.on_stop is not None:
            try:
                await self.on_stop(category, reason, dict(data or {}))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # fail open: the stop itself has happened
                logger.warning("batch-stop hook failed (ignored): %s", exc)
        return True

    def check(self) -> None:
        """Raise :class:`BatchStopped` once the batch has stopped."""
        if self.category is not None:
            raise BatchStopped(self.category, f"not attempted: {self.reason}")

    # -- systematic errors --------------------------------------------------------------------------

    async def record(self, category: ErrorCategory | None, reason: str = "") -> None:
        """Count one finished attempt (``None`` = success); stop after enough consecutive systematic errors.

        A success or a systematic error of another category restarts the streak; other failures (timeouts,
        5xx, invalid output) neither confirm nor refute that the key/model is wrong, so they leave it alone.
        """
        if category is None:
            self._streak_category, self._streak = None, 0
            return
        if category not in SYSTEMATIC_CATEGORIES or self.stop_after_errors is None:
            return
        if category is self._streak_category:
            self._streak += 1
        else:
            self._streak_category, self._streak = category, 1
        if self._streak >= self.stop_after_errors:
            await self.stop(
                category,
                f"batch stopped after {self._streak} consecutive {category.value} errors: {reason}",
                {"category": category.value, "consecutive_errors": self._streak, "last_error": reason},
            )

    # -- cost budget --------------------------------------------------------------------------------

    def _output_estimate(self, max_output_tokens: int | None) -> int:
        if self._outputs:
            average = -(-self._output_tokens // self._outputs)
            return min(average, max_output_tokens) if max_output_tokens else average
        return max_output_tokens or DEFAULT_OUTPUT_ESTIMATE

    async def reserve(
        self, model: str | None, input_tokens: int, max_output_tokens: int | None = None
    ) -> CostReservation | None:
        """Admit one attempt's estimated cost against ``max_cost_usd``, or stop the batch and raise.

        Output tokens are estimated from the running average of finished attempts (capped by
        ``max_output_tokens``), else ``max_output_tokens``, else :data:`DEFAULT_OUTPUT_ESTIMATE`.
        """
        self.check()
        if self.max_cost_usd is None:
            return None
        price = price_for(model)
        if price is None:  # validated at batch start; a middleware-swapped strategy may still get here
            raise ValueError(
                f"max_cost_usd is set but model {model!r} has no known price; "
                "call prefect_batchllm.core.pricing.register_price(...) for it"
            )
        estimate = price.cost(input_tokens, self._output_estimate(max_output_tokens))
        if self.spent_usd + self.reserved_usd + estimate > self.max_cost_usd:
            await self.stop(
                ErrorCategory.BUDGET_EXCEEDED,
                f"budget max_cost_usd={self.max_cost_usd:g} reached (spent ${self.spent_usd:.6f}, "
                f"${self.reserved_usd:.6f} in flight, next attempt ~${estimate:.6f})",
                {
                    "max_cost_usd": self.max_cost_usd,
                    "spent_usd": self.spent_usd,
                    "in_flight_usd": self.reserved_usd,
                    "next_estimate_usd": estimate,
                },
            )
            self.check()
        self.reserved_usd += estimate
        return CostReservation(model, estimate)

    def settle(self, reservation: CostReservation | None, usage: TokenUsage | None) -> None:
        """Replace an attempt's estimate with the cost of the tokens it was really billed."""
        if reservation is None or reservation.settled:
            return
        reservation.settled = True
        self.reserved_usd = max(0.0, self.reserved_usd - reservation.estimate_usd)
        if usage is None:
            return
        used = normalize_usage(usage)
        price = price_for(reservation.model)
        if price is not None:
            self.spent_usd += price.cost(
                used["input_tokens"], used["output_tokens"], used["cached_input_tokens"]
            )
        if used["output_tokens"]:
            self._output_tokens += used["output_tokens"]
            self._outputs += 1
