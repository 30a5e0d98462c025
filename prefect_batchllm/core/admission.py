"""The admission seam: what the executor asks before each attempt, and tells after it.

The executor never knows how limits are enforced. Before every attempt it calls ``admit()`` with the
estimated input tokens and gets a :class:`Permit`; after the attempt it reports the actual usage on the
permit (so token budgets are reconciled) and releases it. A provider 429 is reported with
``report_rate_limit()`` so every worker sharing the quota pauses once.

``Unlimited`` is the no-op used when no ``RateLimitConfig`` limit is set (and in dry runs); the Prefect
global-concurrency-limit implementation lives in ``prefect_batchllm.prefect.limits``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Permit(Protocol):
    """Permission for one attempt. ``release`` is idempotent and must be called exactly once in a finally."""

    def reconcile(self, actual_tokens: int | None) -> None:
        """Report the tokens the attempt really used (None = unknown: keep the estimate)."""

    async def release(self) -> None: ...


@runtime_checkable
class Admission(Protocol):
    """Admits attempts within the provider quota, possibly shared across processes."""

    async def admit(self, estimated_tokens: int) -> Permit:
        """Wait (pause, quota, in-flight) until one attempt may start."""

    async def report_rate_limit(self, retry_after: float | None) -> None:
        """A provider 429 happened: pause every worker sharing the quota (once per wave)."""

    async def report_success(self) -> None:
        """An attempt succeeded (resets the consecutive-429 back-off)."""


class _NoopPermit:
    def reconcile(self, actual_tokens: int | None) -> None:
        return None

    async def release(self) -> None:
        return None


class Unlimited:
    """Admits everything immediately (no limits configured, or a dry run)."""

    _permit = _NoopPermit()

    async def admit(self, estimated_tokens: int) -> Permit:
        return self._permit

    async def report_rate_limit(self, retry_after: float | None) -> None:
        return None

    async def report_success(self) -> None:
        return None
