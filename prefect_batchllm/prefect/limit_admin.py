"""The operator side of rate limits: which Prefect global concurrency limits a config needs, and their
creation, inspection and deletion (``prefect-batchllm limits apply / show / delete``, flow start).

Limit names derive from ``RateLimitConfig.limit_prefix``; sizes from the provider's quota window, so that
no window of the provider can exceed its allowance (see ``docs/rate-limits.md``, "Token bucket vs the
provider's window"). The limiter itself (:mod:`prefect_batchllm.prefect.limits`) only reads and takes slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from typing import Any, Literal

from prefect_batchllm.core.config import RateLimitConfig

__all__ = [
    "BLOCK_SECONDS",
    "BURST_FRACTION",
    "HOLD_SECONDS",
    "Kind",
    "LimitSpec",
    "aensure_rate_limits",
    "delete_rate_limits",
    "ensure_rate_limits",
    "limit_names",
    "limit_specs",
    "read_rate_limits",
]

BURST_FRACTION = 0.06  # capacity of a decaying limit, as a share of one quota window's allowance
HOLD_SECONDS = 1.0  # reserved RPM/TPM slots not handed out within this long expire unused (never returned)
BLOCK_SECONDS = 1.0  # largest block reserved at once, in seconds of the limit's rate

Kind = Literal["rpm", "tpm", "inflight"]


@dataclass(frozen=True)
class LimitSpec:
    """One Prefect global concurrency limit derived from a :class:`RateLimitConfig`."""

    kind: Kind
    name: str
    limit: int
    slot_decay_per_second: float


def limit_names(prefix: str) -> dict[Kind, str]:
    """``{"rpm": "<prefix>-rpm", "tpm": "<prefix>-tpm", "inflight": "<prefix>-inflight"}``."""
    return {"rpm": f"{prefix}-rpm", "tpm": f"{prefix}-tpm", "inflight": f"{prefix}-inflight"}


def _decaying(per_minute: float, window_s: float, hold_s: float) -> tuple[int, float]:
    """(capacity, decay/s) such that no provider window of ``window_s`` exceeds its allowance."""
    allowance = per_minute * window_s / 60.0
    if allowance >= 1:
        allowance = math.floor(allowance)
    burst = max(1, math.floor(allowance * BURST_FRACTION))
    # A token bucket admits burst + decay * window per window; slots may be used up to hold_s late, and a
    # process may sit on one more reserved block (BLOCK_SECONDS of the rate) that a stalled admission
    # then releases at once: measured, a 2 s stall followed by such a burst filled a 5 s window to 99.96 %
    # of its allowance, so that block is budgeted too (about 1.6 % of the rate on a 60 s window).
    decay = max(allowance - burst, allowance * 0.5) / (window_s + hold_s + BLOCK_SECONDS)
    return burst, decay


def limit_specs(config: RateLimitConfig) -> list[LimitSpec]:
    """The limits a config needs (only the dimensions that are set)."""
    names = limit_names(config.limit_prefix)
    window = config.quota_window_seconds
    specs: list[LimitSpec] = []
    if config.requests_per_minute is not None:
        burst, decay = _decaying(config.requests_per_minute, window, HOLD_SECONDS)
        specs.append(LimitSpec("rpm", names["rpm"], burst, decay))
    if config.tokens_per_minute is not None:
        burst, decay = _decaying(config.tokens_per_minute, window, HOLD_SECONDS)
        specs.append(LimitSpec("tpm", names["tpm"], burst, decay))
    if config.max_in_flight is not None:
        specs.append(LimitSpec("inflight", names["inflight"], int(config.max_in_flight), 0.0))
    return specs


def _pause_variable(prefix: str) -> str:
    return f"{prefix.replace('.', '_')}-paused-until"


def _wanted_variable(prefix: str) -> str:
    return f"{prefix.replace('.', '_')}-inflight-wanted"


@contextlib.asynccontextmanager
async def _client_ctx(client: Any | None) -> Any:
    if client is not None:
        yield client
        return
    from prefect.client.orchestration import get_client

    async with get_client() as own:
        yield own


async def aensure_rate_limits(config: RateLimitConfig, *, client: Any | None = None) -> list[str]:
    """Create or update (idempotently) the limits ``config`` needs; return their names.

    Safe to run from many processes at once (a lost create race is retried as an update). A limit an
    operator disabled stays disabled: the limiter then refuses to run rather than run unlimited.
    """
    from prefect.exceptions import ObjectAlreadyExists

    async with _client_ctx(client) as api:
        for spec in limit_specs(config):
            for attempt in (1, 2):
                try:
                    await api.upsert_global_concurrency_limit_by_name(
                        spec.name, spec.limit, slot_decay_per_second=spec.slot_decay_per_second
                    )
                    break
                except ObjectAlreadyExists:
                    if attempt == 2:
                        raise
    return [spec.name for spec in limit_specs(config)]


def ensure_rate_limits(config: RateLimitConfig, *, client: Any | None = None) -> list[str]:
    """Synchronous :func:`aensure_rate_limits` (CLI, scripts); in async code await the ``a`` variant."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(aensure_rate_limits(config, client=client))
    raise RuntimeError(
        "ensure_rate_limits() was called inside a running event loop; use `await aensure_rate_limits(...)`"
    )


async def read_rate_limits(prefix: str | None = None, *, client: Any | None = None) -> list[Any]:
    """All global concurrency limits (``GlobalConcurrencyLimitResponse``), or those of one prefix."""
    wanted = set(limit_names(prefix).values()) if prefix else None
    found: list[Any] = []
    async with _client_ctx(client) as api:
        offset = 0
        while True:
            page = await api.read_global_concurrency_limits(limit=200, offset=offset)
            found.extend(lim for lim in page if wanted is None or lim.name in wanted)
            if len(page) < 200:
                return found
            offset += len(page)


async def delete_rate_limits(prefix: str, *, client: Any | None = None) -> list[str]:
    """Delete the limits (and the shared variables) of ``prefix``; return the names of the limits deleted."""
    from prefect.exceptions import ObjectNotFound

    deleted: list[str] = []
    async with _client_ctx(client) as api:
        for name in limit_names(prefix).values():
            try:
                await api.delete_global_concurrency_limit_by_name(name)
                deleted.append(name)
            except ObjectNotFound:
                continue
        for variable in (_pause_variable(prefix), _wanted_variable(prefix)):
            with contextlib.suppress(ObjectNotFound):
                await api.delete_variable_by_name(variable)
    return deleted
