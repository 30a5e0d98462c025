"""Provider quotas (RPM, TPM, in-flight) enforced by Prefect global concurrency limits, efficiently.

The Prefect server owns the limits, so one quota holds across flow runs, processes and machines; this module
is *how* a process talks to them (one reserve loop per limit on the limiter's own thread, blocks of slots
taken with few writes, leased in-flight slots, a shared 429 pause). Why it is built this way, with the
measurements behind it: ``docs/rate-limits.md``. Creating, reading and deleting the limits (the operator
API behind ``prefect-batchllm limits``) is :mod:`prefect_batchllm.prefect.limit_admin`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import Any, TypeVar
from uuid import UUID

import httpx
from prefect.client.schemas.responses import (
    ConcurrencyLimitWithLeaseResponse,
    MinimalConcurrencyLimitResponse,
)
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from pydantic import TypeAdapter

from prefect_batchllm.core.admission import Admission, Permit, Unlimited
from prefect_batchllm.core.config import ProcessorConfig, RateLimitConfig
from prefect_batchllm.prefect.limit_admin import (
    BLOCK_SECONDS,
    HOLD_SECONDS,
    Kind,
    LimitSpec,
    _pause_variable,
    _wanted_variable,
    aensure_rate_limits,
    delete_rate_limits,
    ensure_rate_limits,
    limit_names,
    limit_specs,
    read_rate_limits,
)

# The limit names, sizes and admin API live in limit_admin; they stay importable from here as before.
__all__ = [
    "GlobalRateLimiter",
    "LimitSpec",
    "LimiterStats",
    "RateLimitConfigurationError",
    "admission_for",
    "aensure_rate_limits",
    "delete_rate_limits",
    "ensure_rate_limits",
    "limit_names",
    "limit_specs",
    "read_rate_limits",
]

logger = logging.getLogger("prefect_batchllm.limits")

SEND_GRACE_SECONDS = 0.25  # a permit picked up later than HOLD + this after its slot was reserved is refused
PHASE_MARGIN = 0.15  # aim an increment this fraction of a slot past a decay step
LEASE_SECONDS = 120.0  # in-flight lease duration (Prefect requires >= 60); renewed at half-life
IDLE_LEASE_SECONDS = 0.5  # an in-flight lease unused this long, with nobody waiting, is returned
LEASE_ROTATE_SECONDS = 3.0  # an in-flight lease is handed back (and re-acquired) after about this long
INFLIGHT_POLL_SECONDS = 0.25  # re-check interval while other processes hold every in-flight slot
PAUSE_POLL_SECONDS = 1.0  # how often a busy process reads the shared pause variable
ERROR_BACKOFF_SECONDS = 1.0  # wait after a failed API call before trying again
RATE_WINDOW_SECONDS = 2.0  # admissions over this window size the next block
MAX_OUTSTANDING_WRITES = 2  # increments of one limit in flight at once (hides slow SQLite writes)

#: The Prefect client returns the raw response of the v2 increment endpoints; these are Prefect's own models.
_INCREMENTED = TypeAdapter(list[MinimalConcurrencyLimitResponse])
_T = TypeVar("_T")


class RateLimitConfigurationError(ConcurrencySlotAcquisitionError):
    """A limit the job needs is missing, disabled or of the wrong kind (never run unlimited instead)."""


# --------------------------------------------------------------------------------------------------
# The limiter


@dataclass
class LimiterStats:
    """Counters for tests, benchmarks and logs (read them after the run; updated on the limiter thread)."""

    admitted: int = 0
    pauses: int = 0  # 429 waves that paused this process (one per wave, not per 429)
    remote_pauses: int = 0  # pauses adopted from another process through the shared variable
    rate_limit_reports: int = 0
    paused_seconds: float = 0.0
    gcl_reads: int = 0
    gcl_increments: int = 0
    gcl_denied: int = 0
    bucket_full: int = 0  # times callers waited for the bucket to decay: the quota, not demand, was the bound
    gcl_returns: int = 0  # decrements (token debt paid by credit is not a decrement)
    expired: dict[str, int] = field(default_factory=lambda: {"rpm": 0, "tpm": 0})  # reserved, never used
    stale_permits: int = 0  # permits the caller picked up too late to send within the window budget
    leases_acquired: int = 0
    leases_released: int = 0
    gcl_seconds: float = 0.0  # total time spent waiting for limit updates (increments)
    gcl_read_seconds: float = 0.0  # total time spent reading limits
    gcl_max_seconds: float = 0.0  # slowest single limit call
    reserved: dict[str, int] = field(default_factory=lambda: {"rpm": 0, "tpm": 0, "inflight": 0})


_current_permit: contextvars.ContextVar[_GlobalPermit | None] = contextvars.ContextVar(
    "prefect_batchllm_permit", default=None
)


class _Waiter:
    __slots__ = ("future", "tokens")

    def __init__(self, tokens: int, future: asyncio.Future[_GlobalPermit]) -> None:
        self.tokens = tokens
        self.future = future


class _GlobalPermit:
    """One admitted attempt. ``release`` is idempotent; both methods are safe from any thread."""

    __slots__ = ("_core", "_reconciled", "_released", "generation", "lease", "reserved_at", "tokens")

    def __init__(
        self, core: _Core, tokens: int, lease: _Lease | None, generation: int, reserved_at: float | None
    ) -> None:
        self._core = core
        self.tokens = tokens
        self.lease = lease
        self.generation = generation
        #: ``time.monotonic()`` when the oldest RPM/TPM slot behind this permit was reserved (None: no decay).
        self.reserved_at = reserved_at
        self._released = False
        self._reconciled = False

    def stale(self, now: float) -> bool:
        """Picked up too late: a request sent now could land outside the window budget of its slot."""
        return self.reserved_at is not None and now - self.reserved_at > HOLD_SECONDS + SEND_GRACE_SECONDS

    def reconcile(self, actual_tokens: int | None) -> None:
        if self._reconciled or actual_tokens is None:
            return
        self._reconciled = True
        if self._core.tpm is not None and actual_tokens != self.tokens:
            self._core.call(self._core.tpm.adjust, int(actual_tokens) - self.tokens)

    async def release(self) -> None:
        self.release_nowait()

    def release_nowait(self) -> None:
        if self._released:
            return
        self._released = True
        if self.lease is not None:
            self._core.call(self._core.give_inflight, self.lease)


class _Pool:
    """Base of the per-limit reserve loops; all methods run on the limiter's loop."""

    def __init__(self, core: _Core, kind: Kind, name: str) -> None:
        self.core = core
        self.kind = kind
        self.name = name
        self.limit = 0
        self.decay = 0.0
        self._need = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batchllm-{self.name}")

    def kick(self) -> None:
        self._need.set()

    async def _idle(self, timeout: float | None) -> None:
        """Wait for demand (or ``timeout``)."""
        if timeout is not None and timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._need.wait()
        self._need.clear()

    async def _run(self) -> None:
        while not self.core.closed:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except RateLimitConfigurationError as exc:
                self.core.fail(exc)
                return
            except Exception as exc:  # server hiccup: keep the limit, try again shortly
                logger.warning("limit %s: %s; retrying in %.0fs", self.name, exc, ERROR_BACKOFF_SECONDS)
                await asyncio.sleep(ERROR_BACKOFF_SECONDS)

    async def step(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _missing(self) -> RateLimitConfigurationError:
        return RateLimitConfigurationError(
            f"Prefect global concurrency limit {self.name!r} does not exist (strict): create it with "
            f"`prefect-batchllm limits apply --prefix {self.core.config.limit_prefix} ...` or "
            "ensure_rate_limits(config)"
        )

    async def read(self) -> Any:
        from prefect.exceptions import ObjectNotFound

        self.core.stats.gcl_reads += 1
        try:
            with self.core.timed(read=True):
                lim = await self.core.client.read_global_concurrency_limit_by_name(self.name)
        except ObjectNotFound:
            raise self._missing() from None
        self.core.check_limit(self.kind, lim)
        self.limit, self.decay = int(lim.limit), float(lim.slot_decay_per_second)
        return lim


class _DecayPool(_Pool):
    """RPM or TPM: blocks of slots from a decaying limit, handed out locally, unused ones returned."""

    def __init__(self, core: _Core, kind: Kind, name: str) -> None:
        super().__init__(core, kind, name)
        self.avail = 0
        self.lots: deque[list[float]] = deque()  # [reserved_at, remaining], oldest first
        self.debt = 0  # tokens used beyond their reservation, charged with a later increment
        self.outstanding = 0  # slots requested by increments still in flight
        self._writes: set[asyncio.Task[None]] = set()

    def need_of(self, waiter: _Waiter) -> int:
        if self.kind == "rpm":
            return 1
        return min(waiter.tokens, self.limit)

    def ready(self, waiter: _Waiter) -> bool:
        if self.lots and time.monotonic() - self.lots[0][0] >= HOLD_SECONDS:
            self._expire(time.monotonic())  # never hand out a slot reserved too long ago
            self.kick()
        return self.avail >= self.need_of(waiter)

    def take(self, waiter: _Waiter) -> float:
        """Hand ``waiter`` its slots (oldest first); returns when the oldest of them was reserved."""
        n = self.need_of(waiter)
        self.avail -= n
        reserved_at = self.lots[0][0]
        while n > 0 and self.lots:
            lot = self.lots[0]
            used = min(n, int(lot[1]))
            lot[1] -= used
            n -= used
            if lot[1] <= 0:
                self.lots.popleft()
        if self.kind == "tpm" and waiter.tokens > self.limit:  # larger than one block: charge the rest
            self.debt += waiter.tokens - self.limit
        return reserved_at

    def adjust(self, delta: int) -> None:
        """Reconciliation: an under-estimate (+) is debt charged later; an over-estimate (-) only cancels
        debt. Surplus is never given back: see :meth:`_expire` for why a late return breaks the quota."""
        self.debt = max(0, self.debt + delta)
        self.kick()

    def shortage(self) -> int:
        return max(0, self.core.demand(self) - self.avail - self.outstanding)

    def _expire(self, now: float) -> float | None:
        """Drop reserved slots not handed out within ``HOLD_SECONDS``; the time of the next expiry, if any.

        They are left to decay on the server, never returned and never re-used. The server applies a
        decrement to what is active *now* (``max(0, active_after_decay - n)``): a slot returned after it
        had decayed cancels somebody else's fresh slot, and a slot re-used late counts where the provider
        sees it, not where the bucket did. Either lets a provider window overflow (the 429 seen under CPU
        load in ``test_two_processes_share_one_quota``).
        """
        while self.lots and now - self.lots[0][0] >= HOLD_SECONDS:
            stale = int(self.lots.popleft()[1])
            self.avail -= stale
            self.core.stats.expired[self.kind] += stale
        return self.lots[0][0] + HOLD_SECONDS if self.lots else None

    async def step(self) -> None:
        now = time.monotonic()
        next_expiry = self._expire(now)
        short = self.shortage()
        paused = self.core.paused(now)
        if short <= 0 or paused:
            if self.debt > 0 and not self.core.waiters:
                await self._charge_debt()
            wake = next_expiry - now if next_expiry is not None else None
            if paused:
                resume = self.core.paused_until - now
                wake = resume if wake is None else min(wake, resume)
            await self._idle(wake)
            return
        if await self.core.check_shared_pause():  # another process hit a 429: do not reserve now
            return
        head = self.core.head_need(self) - self.avail
        # Size the block for what callers will need until the *next* increment lands: limit writes
        # queue behind task-run event writes on SQLite (~1 s, up to 3.4 s measured). Growing 1.5x over
        # the recent admission rate lets a supply-limited process climb to the full rate in a few blocks
        # without over-reserving when callers are few.
        horizon = max(BLOCK_SECONDS, 2.0 * self.core.write_rtt)
        supply = math.ceil(self.decay * horizon)
        expected = math.ceil(1.5 * self.core.grant_rate(self) * horizon) - self.avail
        want = min(self.limit, max(head, short, min(supply, expected)))
        if len(self._writes) >= MAX_OUTSTANDING_WRITES:
            await asyncio.wait(self._writes, return_when=asyncio.FIRST_COMPLETED)
            return
        # Debt rides along with the block (settled by one write at a time).
        debt = 0 if self._writes else min(self.debt, self.limit - want)
        lim = await self.read()
        # What decays while our write is queued is left for the next one.
        free = lim.limit - lim.active_slots - self.outstanding
        if free >= want + debt:
            take = want
        else:
            take = min(want, min(free, lim.limit) - debt)
            if take < max(1, head, min(want, self.limit // 2) // 2):
                # Too little free to be worth a server write: sleep until a block (at most half the
                # capacity, so the bucket cannot overflow meanwhile) has decayed, then take it without
                # reading again (a 423 only means another process was first; we read next time).
                take = max(1, head, min(want, self.limit // 2))
                self.core.stats.bucket_full += 1
                early = self.core.write_rtt * 0.5
                needed = take + debt + self.outstanding
                await asyncio.sleep(max(0.0, self._seconds_until_free(lim, needed) - early))
        # Limit writes can wait seconds for SQLite's write lock: keep up to MAX_OUTSTANDING_WRITES in
        # flight (staggered by half a write), so slots that decay meanwhile are taken by the next one.
        self.outstanding += take
        write = asyncio.get_running_loop().create_task(self._write(take, debt, short, want, free))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        await asyncio.wait({write}, timeout=max(0.0, self.core.write_rtt * 0.5))

    async def _write(self, take: int, debt: int, short: int, want: int, free: int) -> None:
        try:
            granted = await self._increment(take + debt)
        except asyncio.CancelledError:
            raise
        except RateLimitConfigurationError as exc:
            self.core.fail(exc)
            return
        except Exception as exc:
            logger.warning("limit %s: %s", self.name, exc)
            return
        finally:
            self.outstanding -= take
        logger.debug(
            "%s: short=%d want=%d free=%d take=%d debt=%d granted=%s write_rtt=%.3f avail=%d",
            self.name,
            short,
            want,
            free,
            take,
            debt,
            granted,
            self.core.write_rtt,
            self.avail,
        )
        if granted:
            self.debt -= debt
            self._reserved(take)
        else:
            self.kick()

    def _reserved(self, n: int) -> None:
        self.avail += n
        self.lots.append([time.monotonic(), float(n)])
        self.core.stats.reserved[self.kind] += n
        self.core.kick()

    async def _charge_debt(self) -> None:
        lim = await self.read()
        amount = min(self.debt, lim.limit - lim.active_slots, lim.limit)
        if amount > 0 and await self._increment(amount):
            self.debt -= amount

    def _seconds_until_free(self, lim: Any, n: int) -> float:
        """When ``n`` slots will be free, aimed just past a decay step (``floor()`` on the server)."""
        decay = max(float(lim.slot_decay_per_second), 1e-9)
        free = lim.limit - lim.active_slots
        fallback = (n - free) / decay
        updated: datetime | None = getattr(lim, "updated", None)
        if updated is None:
            return max(0.005, fallback)
        since = time.time() - updated.timestamp()
        steps_now = math.floor(decay * since)
        steps_needed = lim.active_slots + steps_now - lim.limit + n
        wait = updated.timestamp() + (steps_needed + PHASE_MARGIN) / decay - time.time()
        # Clock skew between here and the server: never trust a target far from the plain estimate.
        return min(max(0.005, wait), fallback + 1.0 / decay)

    async def _increment(self, n: int) -> bool:
        self.core.stats.gcl_increments += 1
        try:
            with self.core.timed():
                response = await self.core.client.increment_concurrency_slots(
                    names=[self.name], slots=n, mode="rate_limit"
                )
        except httpx.HTTPStatusError as exc:  # what Prefect's own acquire helpers catch
            if exc.response.status_code == HTTPStatus.LOCKED:  # no room now: not an error
                self.core.stats.gcl_denied += 1
                return False
            if exc.response.status_code == HTTPStatus.UNPROCESSABLE_ENTITY:
                raise RateLimitConfigurationError(f"limit {self.name!r} refused {n} slots: {exc}") from exc
            raise
        if not _INCREMENTED.validate_json(response.content):  # strict: the server skips missing limits
            raise self._missing()
        return True

    async def close(self) -> None:
        """Stop; unused reserved slots are left to decay (returning them could cancel others' slots)."""
        await super().close()
        for write in list(self._writes):
            write.cancel()
        self.core.stats.expired[self.kind] += self.avail
        self.avail, self.lots = 0, deque()


class _Lease:
    __slots__ = ("id", "idle_since", "renew_at", "rotate_at", "size", "used")

    def __init__(self, lease_id: UUID, size: int) -> None:
        now = time.monotonic()
        self.id = lease_id
        self.size = size
        self.used = 0
        self.idle_since: float | None = now
        self.renew_at = now + LEASE_SECONDS / 2
        self.rotate_at = now + LEASE_ROTATE_SECONDS * random.uniform(0.8, 1.2)

    def draining(self, now: float) -> bool:
        """Old enough to be handed back (so other processes get a turn): no new permits from it."""
        return now >= self.rotate_at


class _LeasePool(_Pool):
    """In flight: leased chunks of a non-decaying limit, handed out locally, returned when idle.

    Leases are kept while this process has callers, so a busy process writes nothing per call. When
    another process finds the limit full it says so in the Prefect Variable ``<prefix>-inflight-wanted``
    (one write per ``LEASE_ROTATE_SECONDS`` while it starves); then leases older than
    ``LEASE_ROTATE_SECONDS`` take no new permits, are released once their calls finish, and are
    re-acquired after a short random hold-off, so processes sharing the limit take turns.
    """

    def __init__(self, core: _Core, name: str) -> None:
        super().__init__(core, "inflight", name)
        self.leases: list[_Lease] = []
        self._hold_off_until = 0.0

    def _open(self, now: float) -> list[_Lease]:
        return [le for le in self.leases if le.used < le.size and not le.draining(now)]

    def free(self) -> int:
        return sum(le.size - le.used for le in self._open(time.monotonic()))

    def ready(self, waiter: _Waiter) -> bool:
        return bool(self._open(time.monotonic()))

    def take(self) -> _Lease:
        # Fill the busiest lease first so the others can go idle and be returned.
        lease = max(self._open(time.monotonic()), key=lambda le: le.used)
        lease.used += 1
        lease.idle_since = None
        return lease

    def give(self, lease: _Lease) -> None:
        lease.used -= 1
        if lease.used <= 0 and lease in self.leases:
            lease.used = 0
            lease.idle_since = time.monotonic()
        self.kick()
        self.core.kick()

    async def step(self) -> None:
        now = time.monotonic()
        await self._renew_due(now)
        if any(le.draining(now) for le in self.leases) and not await self.core.inflight_wanted():
            for lease in self.leases:  # nobody else is waiting for a slot: keep our leases
                lease.rotate_at = max(lease.rotate_at, now + LEASE_ROTATE_SECONDS)
        for lease in [le for le in self.leases if le.used == 0 and le.draining(now)]:
            await self._release(lease)
            self._hold_off_until = now + random.uniform(0.05, INFLIGHT_POLL_SECONDS)
        short = max(0, self.core.demand(self) - self.free())
        held = sum(lease.size for lease in self.leases)
        if short <= 0 or self.core.paused(now) or held >= self.limit:
            # Nothing to reserve (or every slot is ours: a local release wakes us).
            await self._idle(await self._return_idle(now))
            return
        if now < self._hold_off_until:  # just handed a lease back: give other processes a chance
            await self._idle(self._hold_off_until - now)
            return
        lim = await self.read()
        free = min(lim.limit - lim.active_slots, self.limit - held)
        if free <= 0:  # other processes hold the rest: ask for a turn, look again shortly
            await self.core.want_inflight()
            await self._idle(INFLIGHT_POLL_SECONDS)
            return
        lease = await self._acquire(min(short, free, max(1, math.ceil(self.limit / 2))))
        if lease is None:
            await self._idle(INFLIGHT_POLL_SECONDS)
            return
        self.leases.append(lease)
        self.core.stats.reserved["inflight"] += lease.size
        self.core.kick()

    async def _acquire(self, n: int) -> _Lease | None:
        self.core.stats.gcl_increments += 1
        try:
            with self.core.timed():
                response = await self.core.client.increment_concurrency_slots_with_lease(
                    names=[self.name], slots=n, mode="concurrency", lease_duration=LEASE_SECONDS
                )
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == HTTPStatus.LOCKED:
                self.core.stats.gcl_denied += 1
                return None
            if exc.response.status_code == HTTPStatus.UNPROCESSABLE_ENTITY:
                if self.limit == 0:
                    await self.read()
                raise RateLimitConfigurationError(f"limit {self.name!r} refused {n} slots: {exc}") from exc
            raise
        granted = ConcurrencyLimitWithLeaseResponse.model_validate_json(response.content)
        if not granted.limits:
            raise self._missing()
        self.core.stats.leases_acquired += 1
        return _Lease(granted.lease_id, n)

    async def _renew_due(self, now: float) -> None:
        for lease in list(self.leases):
            if now < lease.renew_at:
                continue
            try:
                await self.core.client.renew_concurrency_lease(lease.id, lease_duration=LEASE_SECONDS)
                lease.renew_at = now + LEASE_SECONDS / 2
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code in (HTTPStatus.NOT_FOUND, HTTPStatus.GONE):
                    logger.warning("in-flight lease %s on %s was lost (server restart?)", lease.id, self.name)
                    self.leases.remove(lease)
                else:
                    raise

    async def _return_idle(self, now: float) -> float | None:
        """Release leases idle long enough while nobody waits; seconds until the next check."""
        wake: float | None = None
        for lease in list(self.leases):
            if lease.used > 0 or lease.idle_since is None:
                continue
            due = lease.idle_since + IDLE_LEASE_SECONDS
            if now >= due and not self.core.waiters:
                await self._release(lease)
            else:
                wake = due - now if wake is None else min(wake, due - now)
        for lease in self.leases:
            due = min(lease.renew_at, lease.rotate_at if lease.rotate_at > now else lease.renew_at)
            wake = min(wake, due - now) if wake is not None else due - now
        return max(wake, 0.01) if wake is not None else None

    async def _release(self, lease: _Lease) -> None:
        self.leases.remove(lease)
        await self.core.client.release_concurrency_slots_with_lease(lease.id)
        self.core.stats.leases_released += 1

    async def close(self) -> None:
        await super().close()
        for lease in list(self.leases):
            with contextlib.suppress(Exception):
                await self._release(lease)


class _Core:
    """The limiter state; lives on the limiter's own event loop."""

    def __init__(self, config: RateLimitConfig, stats: LimiterStats, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.stats = stats
        self.loop = loop
        self.client: Any = None
        self.closed = False
        #: Called (on this limiter's thread) with the seconds left whenever a pause starts or is extended.
        self.on_pause: Callable[[float], None] | None = None
        self.error: BaseException | None = None
        self.waiters: deque[_Waiter] = deque()
        names = limit_names(config.limit_prefix)
        self.rpm = _DecayPool(self, "rpm", names["rpm"]) if config.requests_per_minute is not None else None
        self.tpm = _DecayPool(self, "tpm", names["tpm"]) if config.tokens_per_minute is not None else None
        self.inflight = _LeasePool(self, names["inflight"]) if config.max_in_flight is not None else None
        self.pools: list[_Pool] = [p for p in (self.rpm, self.tpm, self.inflight) if p is not None]
        self.generation = 0
        self.consecutive = 0
        self.paused_until = 0.0
        self.ramp_left = 0
        self.last_grant = 0.0
        self.variable = _pause_variable(config.limit_prefix)
        self.write_rtt = 0.02  # moving average of limit-write latency (seconds)
        self.recent: deque[tuple[float, int]] = deque()  # (granted_at, tokens) over RATE_WINDOW_SECONDS
        self.shared_until = 0.0  # wall clock of the last pause we know is published
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self.share_pause = False
        self._pause_checked = -math.inf
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.wanted_variable = _wanted_variable(config.limit_prefix)
        self._wanted_at = -math.inf
        self._client_cm: Any = None

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the limiter loop (from any thread)."""
        if self.closed:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # loop already stopped
                self.loop.call_soon_threadsafe(fn, *args)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, ensure: bool, share_pause: bool) -> None:
        from prefect.client.orchestration import get_client

        self._client_cm = get_client()
        self.client = await self._client_cm.__aenter__()
        if ensure:
            await aensure_rate_limits(self.config, client=self.client)
        for pool in self.pools:
            await pool.read()  # validates existence, kind and enabled; loads the server's values
        for pool in self.pools:
            pool.start()
        self._tasks.append(self.loop.create_task(self._pump(), name="batchllm-admission"))
        self.share_pause = share_pause
        if share_pause:
            self._tasks.append(self.loop.create_task(self._watch_shared_pause(), name="batchllm-pause"))

    async def close(self) -> None:
        self.closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for pool in self.pools:
            await pool.close()
        for waiter in self.waiters:
            if not waiter.future.done():
                waiter.future.set_exception(RuntimeError("the rate limiter was closed"))
        self.waiters.clear()
        if self._client_cm is not None:
            with contextlib.suppress(Exception):
                await self._client_cm.__aexit__(None, None, None)

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        for waiter in self.waiters:
            if not waiter.future.done():
                waiter.future.set_exception(exc)
        self.waiters.clear()

    @contextlib.contextmanager
    def timed(self, read: bool = False) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            if read:
                self.stats.gcl_read_seconds += spent
            else:
                self.stats.gcl_seconds += spent
                self.write_rtt += 0.3 * (spent - self.write_rtt)
            self.stats.gcl_max_seconds = max(self.stats.gcl_max_seconds, spent)

    def check_limit(self, kind: Kind, lim: Any) -> None:
        decay = float(lim.slot_decay_per_second or 0.0)
        fix = f"re-apply it with `prefect-batchllm limits apply --prefix {self.config.limit_prefix} ...`"
        if not lim.active:
            raise RateLimitConfigurationError(
                f"limit {lim.name!r} is disabled, which Prefect treats as unlimited; "
                f"enable it (`prefect gcl enable {lim.name}`) or {fix}"
            )
        if kind in ("rpm", "tpm") and decay <= 0:
            raise RateLimitConfigurationError(f"limit {lim.name!r} needs a slot decay (rate limit); {fix}")
        if kind == "inflight" and decay > 0:
            raise RateLimitConfigurationError(f"limit {lim.name!r} must not decay (in-flight limit); {fix}")

    # -- admission --------------------------------------------------------------------------------

    def kick(self) -> None:
        self._wake.set()

    def paused(self, now: float) -> bool:
        return now < self.paused_until

    def demand(self, pool: _Pool) -> int:
        """What waiting callers need from ``pool`` (only the head during a slow-start ramp).

        RPM slots are reserved only for callers whose tokens are already reserved: reserved slots count
        against the provider's window from the moment they are taken, so they must not sit unused.
        """
        total = 0
        tokens_left = self.tpm.avail if self.tpm is not None and pool is self.rpm else None
        # RPM/TPM slots expire unused after HOLD_SECONDS: reserve only for callers with an in-flight slot.
        seats = self.inflight.free() if self.inflight is not None and pool is not self.inflight else None
        for waiter in self.waiters:
            if waiter.future.done():
                continue
            if seats is not None:
                if seats <= 0:
                    break
                seats -= 1
            if tokens_left is not None and self.tpm is not None:
                tokens = self.tpm.need_of(waiter)
                if tokens > tokens_left:
                    break
                tokens_left -= tokens
            total += pool.need_of(waiter) if isinstance(pool, _DecayPool) else 1
            if self.ramp_left > 0:
                break
        return total

    def grant_rate(self, pool: _DecayPool) -> float:
        """Recent admissions per second (requests for RPM, tokens for TPM)."""
        cutoff = time.monotonic() - RATE_WINDOW_SECONDS
        while self.recent and self.recent[0][0] < cutoff:
            self.recent.popleft()
        if pool.kind == "rpm":
            return len(self.recent) / RATE_WINDOW_SECONDS
        return sum(min(tokens, pool.limit) for _, tokens in self.recent) / RATE_WINDOW_SECONDS

    def head_need(self, pool: _DecayPool) -> int:
        for waiter in self.waiters:
            if not waiter.future.done():
                return pool.need_of(waiter)
        return 0

    async def admit(self, tokens: int) -> _GlobalPermit:
        if self.error is not None:
            raise self.error
        if self.closed:
            raise RuntimeError("the rate limiter was closed")
        waiter = _Waiter(max(0, int(tokens)), self.loop.create_future())
        self.waiters.append(waiter)
        self.kick()
        for pool in self.pools:
            pool.kick()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            # Cancelled after the grant but before this task resumed: the permit exists and holds an
            # in-flight slot nobody else will ever release.
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.result().release_nowait()
            raise

    def _ramp_delay(self) -> float:
        cfg = self.config
        if self.ramp_left <= 0 or cfg.slow_start_items <= 0:
            return 0.0
        done = cfg.slow_start_items - self.ramp_left
        frac = done / max(1, cfg.slow_start_items - 1)
        return (
            cfg.slow_start_initial_delay + (cfg.slow_start_final_delay - cfg.slow_start_initial_delay) * frac
        )

    async def _pump(self) -> None:
        """Grant waiters in FIFO order when every limit has room, outside pauses and ramp spacing."""
        while True:
            timeout: float | None = None
            while self.waiters:
                waiter = self.waiters[0]
                if waiter.future.done():
                    self.waiters.popleft()
                    continue
                now = time.monotonic()
                if self.paused(now):
                    timeout = self.paused_until - now
                    break
                not_before = self.last_grant + self._ramp_delay()
                if now < not_before:
                    timeout = not_before - now
                    break
                if not all(pool.ready(waiter) for pool in self.pools):
                    for pool in self.pools:
                        pool.kick()
                    break
                self.waiters.popleft()
                self._grant(waiter, now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()

    def _grant(self, waiter: _Waiter, now: float) -> None:
        stamps = [pool.take(waiter) for pool in (self.rpm, self.tpm) if pool is not None]
        lease = self.inflight.take() if self.inflight is not None else None
        self.last_grant = now
        self.recent.append((now, waiter.tokens))
        if self.ramp_left > 0:
            self.ramp_left -= 1
        self.stats.admitted += 1
        permit = _GlobalPermit(self, waiter.tokens, lease, self.generation, min(stamps, default=None))
        waiter.future.set_result(permit)

    def count_stale_permit(self) -> None:
        self.stats.stale_permits += 1

    def give_inflight(self, lease: _Lease) -> None:
        if self.inflight is not None:
            self.inflight.give(lease)

    # -- 429 waves --------------------------------------------------------------------------------

    def report_rate_limit(self, retry_after: float | None, generation: int | None) -> None:
        self.stats.rate_limit_reports += 1
        now = time.monotonic()
        floor_until = now + max(0.0, retry_after or 0.0)
        same_wave = (generation is not None and generation < self.generation) or (
            generation is None and self.paused(now)
        )
        if same_wave:  # this wave already paused everybody: honour the server's delay, do not escalate
            if floor_until > self.paused_until:
                self._pause_until(floor_until, publish=True)
            return
        cfg = self.config
        self.consecutive += 1
        cooldown = min(
            cfg.cooldown_seconds * cfg.backoff_multiplier ** (self.consecutive - 1), cfg.max_cooldown_seconds
        )
        self.generation += 1
        self.stats.pauses += 1
        self._pause_until(max(now + cooldown, floor_until), publish=True)
        logger.warning(
            "provider rate limit (429): pausing every worker on %r for %.1fs (wave %d)",
            cfg.limit_prefix,
            self.paused_until - now,
            self.generation,
        )

    def _pause_until(self, until: float, *, publish: bool) -> None:
        now = time.monotonic()
        if until <= self.paused_until:
            return
        self.stats.paused_seconds += until - max(now, self.paused_until)
        self.paused_until = until
        if self.on_pause is not None:
            try:
                self.on_pause(until - now)
            except Exception as exc:  # an observer must never break admission
                logger.warning("on_pause callback failed (ignored): %s", exc)
        self.ramp_left = self.config.slow_start_items
        self.last_grant = until
        self.kick()
        if publish:
            wall_until = time.time() + (until - now)
            task = self.loop.create_task(self._publish_pause(wall_until))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def report_success(self) -> None:
        self.consecutive = 0

    async def _publish_pause(self, wall_until: float) -> None:
        from prefect.client.schemas.actions import VariableCreate, VariableUpdate
        from prefect.exceptions import ObjectAlreadyExists

        if wall_until <= self.shared_until:
            return
        self.shared_until = wall_until
        value = {"until": wall_until, "by": self.identity}
        try:
            current = await self.client.read_variable_by_name(self.variable)
            if current is None:
                try:
                    await self.client.create_variable(VariableCreate(name=self.variable, value=value))
                    return
                except ObjectAlreadyExists:
                    current = await self.client.read_variable_by_name(self.variable)
            if current is not None and _until_of(current.value) >= wall_until:
                return
            await self.client.update_variable(VariableUpdate(name=self.variable, value=value))
        except Exception as exc:  # the local pause still holds; other processes see their own 429s
            logger.warning("could not publish the shared pause %r: %s", self.variable, exc)

    async def want_inflight(self) -> None:
        """Tell other processes we are starved of in-flight slots (at most one write per rotation)."""
        now = time.monotonic()
        if now - self._wanted_at < LEASE_ROTATE_SECONDS:
            return
        self._wanted_at = now
        value = {"at": time.time(), "by": self.identity}
        with contextlib.suppress(Exception):
            await self._write_variable(self.wanted_variable, value)

    async def inflight_wanted(self) -> bool:
        """Did another process ask for in-flight slots recently? (One read.)"""
        try:
            current = await self.client.read_variable_by_name(self.wanted_variable)
        except Exception:
            return False
        value = current.value if current is not None else None
        if not isinstance(value, dict) or value.get("by") == self.identity:
            return False
        at = value.get("at")
        return isinstance(at, int | float) and time.time() - at < 3 * LEASE_ROTATE_SECONDS

    async def _write_variable(self, name: str, value: dict[str, Any]) -> None:
        from prefect.client.schemas.actions import VariableCreate, VariableUpdate
        from prefect.exceptions import ObjectAlreadyExists

        try:
            await self.client.create_variable(VariableCreate(name=name, value=value))
        except ObjectAlreadyExists:
            await self.client.update_variable(VariableUpdate(name=name, value=value))

    async def _watch_shared_pause(self) -> None:
        """While callers wait, adopt a pause another process published (one GET per poll)."""
        while True:
            await asyncio.sleep(PAUSE_POLL_SECONDS)
            if self.waiters:
                await self.check_shared_pause()

    async def check_shared_pause(self) -> bool:
        """Read the shared pause (at most once per ``PAUSE_POLL_SECONDS``); True if we are now paused."""
        if not self.share_pause:
            return False
        now = time.monotonic()
        if now - self._pause_checked < PAUSE_POLL_SECONDS:
            return self.paused(now)
        self._pause_checked = now
        try:
            current = await self.client.read_variable_by_name(self.variable)
        except Exception as exc:
            logger.debug("reading %r failed: %s", self.variable, exc)
            return self.paused(now)
        wall_until = _until_of(current.value) if current is not None else 0.0
        remaining = wall_until - time.time()
        if remaining > 0 and wall_until > self.shared_until:
            self.shared_until = wall_until
            until = time.monotonic() + remaining
            if until > self.paused_until + 0.05:
                self.generation += 1  # 429s of attempts admitted before this belong to that wave
                self.stats.remote_pauses += 1
                self._pause_until(until, publish=False)
        return self.paused(time.monotonic())


def _until_of(value: Any) -> float:
    if isinstance(value, dict):
        value = value.get("until")
    return float(value) if isinstance(value, int | float) else 0.0


class _LimiterThread:
    """A private event loop on a daemon thread; runs with the creator's context (Prefect settings)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        context = contextvars.copy_context()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            try:
                self.loop.run_forever()
            finally:
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.close()

        self.thread = threading.Thread(target=context.run, args=(run,), name=name, daemon=True)
        self.thread.start()
        ready.wait()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=10)


async def _observe(future: concurrent.futures.Future[_T]) -> _T:
    """Await a cross-loop future shared by many callers without letting one caller's cancel cancel it."""
    if future.done():
        return future.result()
    loop = asyncio.get_running_loop()
    mirror: asyncio.Future[_T] = loop.create_future()

    def _copy(done: concurrent.futures.Future[_T]) -> None:
        if mirror.done():
            return
        if done.cancelled():
            mirror.cancel()
        elif (exc := done.exception()) is not None:
            mirror.set_exception(exc)
        else:
            mirror.set_result(done.result())

    def _done(done: concurrent.futures.Future[_T]) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is gone
            loop.call_soon_threadsafe(_copy, done)

    future.add_done_callback(_done)
    return await mirror


async def _await_threadsafe(future: concurrent.futures.Future[_T], on_orphan: Callable[[_T], None]) -> _T:
    """Await a cross-loop future; if our caller is cancelled after it completed, hand the result back."""
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()

        def _orphan(done: concurrent.futures.Future[_T]) -> None:
            if not done.cancelled() and done.exception() is None:
                on_orphan(done.result())

        future.add_done_callback(_orphan)
        raise


class GlobalRateLimiter:
    """:class:`~prefect_batchllm.core.admission.Admission` on Prefect global concurrency limits.

    ``ensure=True`` creates/updates the limits from ``config`` when the limiter starts (first ``admit``);
    with ``ensure=False`` they must already exist (an operator manages them), else the first ``admit``
    raises :class:`RateLimitConfigurationError`. ``share_pause`` propagates 429 pauses across processes.
    Usable from any event loop or thread; ``aclose()`` returns in-flight leases and stops the limiter.
    ``on_pause(seconds)`` is called whenever a pause (a 429 wave, or one adopted from another process)
    starts or is extended; it runs on the limiter's own thread, so it must only hand off (e.g.
    ``loop.call_soon_threadsafe``) and return at once.
    """

    def __init__(
        self,
        config: RateLimitConfig,
        *,
        ensure: bool = True,
        share_pause: bool = True,
        on_pause: Callable[[float], None] | None = None,
    ) -> None:
        if not config.enabled:
            raise ValueError("RateLimitConfig sets no limit; use core.admission.Unlimited instead")
        self.config = config
        self.stats = LimiterStats()
        self._ensure = ensure
        self._share_pause = share_pause
        self._on_pause = on_pause
        self._lock = threading.Lock()
        self._thread: _LimiterThread | None = None
        self._core: _Core | None = None
        self._started: concurrent.futures.Future[None] | None = None
        self._closed = False

    @property
    def names(self) -> list[str]:
        """The global concurrency limits this limiter acquires."""
        return [spec.name for spec in limit_specs(self.config)]

    @property
    def generation(self) -> int:
        """Number of pauses (local waves and adopted remote ones) so far."""
        return self._core.generation if self._core is not None else 0

    def _boot(self) -> tuple[_LimiterThread, _Core, concurrent.futures.Future[None]]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the rate limiter was closed")
            if self._thread is None or self._core is None or self._started is None:
                thread = _LimiterThread(f"batchllm-limiter-{self.config.limit_prefix}")
                core = _Core(self.config, self.stats, thread.loop)
                core.on_pause = self._on_pause
                self._started = thread.submit(core.start(self._ensure, self._share_pause))
                self._thread, self._core = thread, core
                weakref.finalize(self, thread.stop)
            return self._thread, self._core, self._started

    async def start(self) -> None:
        """Create/validate the limits now (otherwise done by the first ``admit``)."""
        _, _, started = self._boot()
        await _observe(started)

    async def admit(self, estimated_tokens: int) -> Permit:
        """Wait for one attempt's slots. A permit this caller picks up too late (its loop was busy or
        descheduled) is dropped and asked for again: sent now, it could overrun the provider's window."""
        thread, core, started = self._boot()
        await _observe(started)
        while True:
            permit = await _await_threadsafe(
                thread.submit(core.admit(estimated_tokens)), lambda p: p.release_nowait()
            )
            if not permit.stale(time.monotonic()):
                break
            permit.release_nowait()
            core.call(core.count_stale_permit)
        _current_permit.set(permit)
        return permit

    async def report_rate_limit(self, retry_after: float | None) -> None:
        if self._core is None:
            return
        permit = _current_permit.get()
        generation = permit.generation if permit is not None and permit._core is self._core else None
        self._core.call(self._core.report_rate_limit, retry_after, generation)

    async def report_success(self) -> None:
        if self._core is not None:
            self._core.call(self._core.report_success)

    async def aclose(self) -> None:
        """Return in-flight leases, stop the limiter thread and log a summary line (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread, core = self._thread, self._core
        if thread is None or core is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(thread.submit(core.close()))
        await asyncio.get_running_loop().run_in_executor(None, thread.stop)
        s = self.stats
        logger.info(
            "rate limiter %r: %d admitted, %d limit increments (%d denied), bucket full %d times, "
            "%d slots expired unused, %d late permits refused, %d pauses (%.1f s)",
            self.config.limit_prefix,
            s.admitted,
            s.gcl_increments,
            s.gcl_denied,
            s.bucket_full,
            sum(s.expired.values()),
            s.stale_permits,
            s.pauses + s.remote_pauses,
            s.paused_seconds,
        )

    async def __aenter__(self) -> GlobalRateLimiter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def admission_for(config: ProcessorConfig, **options: Any) -> Admission:
    """The admission for a batch: :class:`GlobalRateLimiter` when a limit is set, else ``Unlimited``.

    The limiter creates/updates the limits at start unless ``rate_limit.manage_limits`` is False."""
    if config.dry_run or not config.rate_limit.enabled:
        return Unlimited()
    options.setdefault("ensure", config.rate_limit.manage_limits)
    return GlobalRateLimiter(config.rate_limit, **options)
