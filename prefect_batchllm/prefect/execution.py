"""One batch's execution: the per-item and per-chunk steps, and how the flow dispatches them.

:class:`BatchExecution` is the one object a batch flow builds. Its methods are the steps: ``prepare`` the
strategies, ``dispatch_items`` (one task run per item) or ``dispatch_chunks`` (one task run per chunk),
``cleanup``. A chunk task is self-contained: it gets the execution object and a :class:`ChunkSource` as
arguments (no registry, no closures), so on a Dask or Ray task runner both are pickled to a worker, which
builds its own limiter, clients and result log, runs the chunk and returns the chunk's results. In the
flow's own process (Prefect's default task runner) chunks run on the flow's event loop instead: items
share one ``max_workers`` bound and each result reaches the driver the moment it exists.

What a process needs at run time (limiter, ledgers, events) lives in a :class:`~.tasks.BatchRun` that is
never pickled; the driver's is built by :meth:`BatchExecution.start`, a worker's per chunk task.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from prefect_batchllm.core.admission import Admission, Unlimited
from prefect_batchllm.core.attempt import AttemptFailed
from prefect_batchllm.core.config import ProcessorConfig
from prefect_batchllm.core.errors import ErrorCategory, ErrorClassifier, ErrorInfo, describe_error, redact
from prefect_batchllm.core.events import EventDispatcher, Middleware, ProcessingEvent
from prefect_batchllm.core.items import LLMWorkItem, WorkItemResult
from prefect_batchllm.core.stop import BatchStop
from prefect_batchllm.core.strategy import LLMCallStrategy
from prefect_batchllm.core.tokens import normalize_usage
from prefect_batchllm.prefect.artifacts import slugify_key, task_run_metadata
from prefect_batchllm.prefect.heap import steady_heap
from prefect_batchllm.prefect.result_log import ResultLog
from prefect_batchllm.prefect.tasks import (
    BatchRun,
    attempt_with_retries,
    call_lifecycle_hook,
    cleanup_strategy,
    configured_item_task,
    item_cache_key,
    prepare_strategy,
    process_chunk,
    safe_reason,
    strategy_key,
)

logger = logging.getLogger("prefect_batchllm")

__all__ = ["BatchExecution", "ChunkSource", "ItemsChunk", "Report", "failed_result"]

#: What the driver does with each finished item: ``report(position_in_batch, result)``.
Report = Callable[[int, WorkItemResult[Any, Any]], Awaitable[None]]


@runtime_checkable
class ChunkSource(Protocol):
    """A chunk's items, as a picklable description that travels to the worker in place of the items."""

    #: Position of the chunk's first item in the batch.
    start: int

    def __len__(self) -> int:
        """Items in the chunk (known to the driver without loading them)."""
        ...

    def label(self) -> str:
        """The chunk task run's name."""
        ...

    async def load(self) -> list[LLMWorkItem[Any, Any]]:
        """The chunk's items (runs where the chunk task runs)."""
        ...

    async def finish(
        self, items: list[LLMWorkItem[Any, Any]], results: list[WorkItemResult[Any, Any]]
    ) -> list[WorkItemResult[Any, Any]]:
        """After every item has a result (same order): e.g. write the chunk's rows; returns what travels
        back to the driver."""
        ...


@dataclass
class ItemsChunk:
    """An in-memory chunk: consecutive items of a ``run_batch`` batch."""

    items: list[LLMWorkItem[Any, Any]]
    start: int
    number: int

    def __len__(self) -> int:
        return len(self.items)

    def label(self) -> str:
        return f"chunk-{self.number}: {self.items[0].item_id} .. {self.items[-1].item_id}"

    async def load(self) -> list[LLMWorkItem[Any, Any]]:
        return self.items

    async def finish(
        self, items: list[LLMWorkItem[Any, Any]], results: list[WorkItemResult[Any, Any]]
    ) -> list[WorkItemResult[Any, Any]]:
        return results


def items_chunks(items: Sequence[LLMWorkItem[Any, Any]], size: int) -> Iterable[ItemsChunk]:
    """``items`` as consecutive chunks of ``size``."""
    for number, start in enumerate(range(0, len(items), size), start=1):
        yield ItemsChunk(list(items[start : start + size]), start, number)


class BatchExecution:
    """The steps of one batch run (see the module docstring); picklable for task-runner workers."""

    def __init__(
        self,
        config: ProcessorConfig,
        classifier: ErrorClassifier,
        middlewares: Sequence[Middleware] = (),
        result_log: ResultLog | None = None,
    ) -> None:
        self.config = config
        self.classifier = classifier
        self.middlewares = list(middlewares)
        self.result_log = result_log
        #: strategy_key of every strategy the driver prepared (a worker prepares only strategies swapped
        #: in by middleware, which it then cleans up itself).
        self.prepared_keys: set[str] = set()
        #: strategy_key -> the failure of its ``prepare()``: its items fail with it, in any process.
        self.prepare_errors: dict[str, AttemptFailed] = {}
        #: Items one chunk runs at once in a worker process (in the flow's process all chunks share
        #: ``max_workers``).
        self.chunk_concurrency = config.max_workers
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.run: BatchRun | None = None
        self.batch_step: Any = None  # execution="batch_api": the Gemini batch-job step (driver only)
        self._report: Report | None = None
        self._in_flight: asyncio.Semaphore | None = None
        self._strategies: list[LLMCallStrategy[Any]] = []  # prepared by this process, cleaned up by it
        self._lazy_lock: asyncio.Lock | None = None
        self._item_task: Any = None  # per-item mode: process_item with this config's retry policy
        self._fingerprints: dict[int, str] = {}  # id(strategy) -> fingerprint, taken once per batch
        self._fingerprinted: list[LLMCallStrategy[Any]] = []
        self._known: set[int] = set()  # ids of strategies whose prepare step is over (or not needed)
        self._live: dict[int, list[bool]] = {}  # id(source) -> positions already reported (driver)

    def __getstate__(self) -> dict[str, Any]:
        keep = ("config", "classifier", "middlewares", "result_log", "prepared_keys", "prepare_errors")
        return {name: self.__dict__[name] for name in (*keep, "chunk_concurrency")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    @property
    def reports_live(self) -> bool:
        """Whether this is the flow's process, where each item's result reaches the driver as it finishes."""
        return self._report is not None

    # -- the driver's side ---------------------------------------------------------------------------

    def start(self, admission: Admission, events: EventDispatcher, report: Report) -> BatchRun:
        """Build the flow process's run state; ``report`` gets every finished item."""
        self.run = BatchRun(self.config, admission, self.classifier, events)
        self.run.stop = batch_stop(self.config, events)
        self._report = report
        self._in_flight = asyncio.Semaphore(self.config.max_workers)
        self._lazy_lock = asyncio.Lock()
        return self.run

    async def prepare(self, strategies: Iterable[LLMCallStrategy[Any]]) -> None:
        """One prepare task per unique strategy with a real ``prepare()``, ``max_workers`` at a time.

        Strategies with the base no-op ``prepare`` get no task (per-item strategies would otherwise cost
        one task run each) but still count as prepared, so their ``cleanup()`` runs. Failures fail that
        strategy's items.
        """
        run = self._driver_run()
        semaphore = asyncio.Semaphore(max(1, self.config.max_workers))

        async def prepare(index: int, strategy: LLMCallStrategy[Any]) -> None:
            if self.config.dry_run or not _overrides(strategy, "prepare"):
                run.prepared.add(id(strategy))
                self.prepared_keys.add(strategy_key(strategy))
                return
            async with semaphore:
                state = await prepare_strategy(
                    _strategy_label(index, strategy), quote(strategy), quote(run), return_state=True
                )
            if not state.is_completed():
                exc = await state.aresult(raise_on_failure=False)
                if not isinstance(exc, AttemptFailed):  # the task itself could not run
                    message = str(state.message)
                    reason = describe_error(exc) if isinstance(exc, BaseException) else redact(message)
                    info = ErrorInfo(ErrorCategory.UNKNOWN, False, reason=reason)
                    exc = AttemptFailed(type(strategy).__name__, 1, info, f"prepare() failed: {reason}")
                run.prepare_errors[f"id:{id(strategy)}"] = exc
                self.prepare_errors[strategy_key(strategy)] = exc  # what a worker's copies look up
                logger.warning("prepare() of %s failed; its items fail: %s", type(strategy).__name__, exc)
            # After prepare(): its state (e.g. a context cache name) is part of what workers receive.
            self.prepared_keys.add(strategy_key(strategy))

        new = [s for s in _unique(strategies) if all(s is not p for p in self._strategies)]
        start = len(self._strategies)
        self._strategies.extend(new)
        await asyncio.gather(*(prepare(i, s) for i, s in enumerate(new, start)))
        self._known.update(id(s) for s in new)

    async def cleanup(self) -> None:
        """One cleanup task per strategy this process prepared, ``max_workers`` at a time; shielded from
        cancellation. Falls back to a direct call if the task cannot run."""
        if self.run is None or self.config.dry_run:
            return
        run = self.run
        semaphore = asyncio.Semaphore(max(1, self.config.max_workers))

        async def cleanup(index: int, strategy: LLMCallStrategy[Any]) -> None:
            async with semaphore:
                await self._cleanup_one(run, index, strategy)

        await shielded(asyncio.gather(*(cleanup(i, s) for i, s in enumerate(self._strategies))))

    async def _cleanup_one(self, run: BatchRun, index: int, strategy: LLMCallStrategy[Any]) -> None:
        if id(strategy) not in run.prepared or id(strategy) in run.cleaned:
            return
        if not _overrides(strategy, "cleanup"):
            run.cleaned.add(id(strategy))
            return
        if FlowRunContext.get() is not None:
            try:
                label = _strategy_label(index, strategy)
                state = await cleanup_strategy(label, quote(strategy), quote(run), return_state=True)
                if not state.is_completed():
                    logger.warning("cleanup() of %s failed: %s", type(strategy).__name__, state.message)
            except BaseException as exc:  # the engine could not run the task: clean up directly
                logger.debug("cleanup task could not run (%s); calling cleanup() directly", exc)
        if id(strategy) not in run.cleaned:
            run.cleaned.add(id(strategy))
            try:
                await call_lifecycle_hook(run, type(strategy).__name__, strategy, "cleanup")
            except Exception as exc:
                logger.warning("cleanup() of %s failed: %s", type(strategy).__name__, safe_reason(exc))

    async def dispatch_items(self, items: Sequence[LLMWorkItem[Any, Any]]) -> None:
        """Per-item mode: ``max_workers`` workers take items in order, one task run each (in-process)."""
        pending = iter(enumerate(items))
        report = self._driver_report()

        async def worker() -> None:
            for position, item in pending:  # shared iterator: each item is taken by exactly one worker
                await report(position, await self.run_item(item))

        async with asyncio.TaskGroup() as group:
            for _ in range(min(self.config.max_workers, len(items))):
                group.create_task(worker())

    async def dispatch_chunks(self, sources: Iterable[ChunkSource]) -> None:
        """Chunked mode: one task run per chunk, enough chunks open to keep ``max_workers`` busy.

        ``sources`` is consumed lazily (a table run plans its slices as it goes). On Prefect's default
        task runner chunks run here, on the flow's loop; on any other (Dask, Ray) they are submitted to
        it and run in its workers, each chunk with ``chunk_concurrency`` items at once.
        """
        size = self.config.chunk_size or 1
        remote = self.batch_step is None and _remote_task_runner()
        window = -(-self.config.max_workers // size) + 1
        if remote:
            window = max(3, window)
            self.chunk_concurrency = max(1, math.ceil(self.config.max_workers / window))
        pending = iter(sources)

        async def chunk_worker() -> None:
            for source in pending:  # shared iterator: each chunk is taken by exactly one worker
                await self._run_chunk_task(source, remote)

        async with asyncio.TaskGroup() as group:
            for _ in range(window):
                group.create_task(chunk_worker())

    async def _run_chunk_task(self, source: ChunkSource, remote: bool) -> None:
        """Run one chunk as a task run; report what the chunk did not report live (a worker's results, or
        items a crashed chunk never finished: those fail with the task run's end state)."""
        report = self._driver_report()
        live = self._live[id(source)] = [False] * len(source)
        try:
            if remote:
                future = process_chunk.submit(source.label(), self, source)
                state = await asyncio.to_thread(_final_state, future)
            else:
                state = await process_chunk(source.label(), quote(self), quote(source), return_state=True)
            value = await state.aresult(raise_on_failure=False)
            if all(live):
                return
            results = value if isinstance(value, list) and len(value) == len(source) else None
            items = None if results is not None else await source.load()
            reason = f"chunk task ended {state.name}: {state.message or 'no message'}"
            for offset, done in enumerate(live):
                if done:
                    continue
                if results is not None:
                    result = results[offset]
                else:
                    assert items is not None
                    result = failed_result(items[offset], None, RuntimeError(reason), "unknown", reason)
                await report(source.start + offset, result)
        finally:
            del self._live[id(source)]

    # -- where the items run (the driver, or a worker) -----------------------------------------------

    async def run_chunk(self, source: ChunkSource) -> list[WorkItemResult[Any, Any]]:
        """The body of a chunk task: run the chunk's items concurrently; results in item order."""
        if self.run is not None:
            return await self._run_chunk(source)
        async with self._worker_run():
            return await self._run_chunk(source)

    async def _run_chunk(self, source: ChunkSource) -> list[WorkItemResult[Any, Any]]:
        items = await source.load()
        persisted = await self._lookup(items)
        results: list[WorkItemResult[Any, Any] | None] = [None] * len(items)
        live = self._live.get(id(source))  # only in the flow's process: report as each item finishes
        in_flight = self._in_flight or asyncio.Semaphore(self.chunk_concurrency)

        async def one(offset: int, item: LLMWorkItem[Any, Any]) -> None:
            async with in_flight:
                result = await self.run_item(item, persisted)
            results[offset] = result
            if live is not None and self._report is not None:
                live[offset] = True
                await self._report(source.start + offset, result)

        async with asyncio.TaskGroup() as group:
            for offset, item in enumerate(items):
                group.create_task(one(offset, item))
        done = [r for r in results if r is not None]
        return await source.finish(items, done)

    async def run_item(
        self, item: LLMWorkItem[Any, Any], persisted: dict[str, WorkItemResult[Any, Any]] | None = None
    ) -> WorkItemResult[Any, Any]:
        """Everything about one item: middleware, persisted result, attempts (its own task run per item, or
        inline in a chunk), persisting a success. Never raises: an unexpected error fails only this item."""
        run = self._current_run()
        try:
            result = await self._process(run, item, persisted)
        except Exception as exc:  # e.g. an unloadable persisted result, a raising user property
            logger.warning("item %s failed outside its task: %s", item.item_id, safe_reason(exc))
            reason = safe_reason(exc)
            result = failed_result(item, run.ledgers.get(item.item_id), exc, "unknown", reason)
        if item.template is not None:  # every result records the prompt template it was made from
            result.metadata = {**result.metadata, "prompt_template": item.template.as_dict()}
        run.ledgers.pop(item.item_id, None)  # the result has it all; a table run must not grow with rows
        return result

    async def _process(
        self,
        run: BatchRun,
        item: LLMWorkItem[Any, Any],
        persisted: dict[str, WorkItemResult[Any, Any]] | None,
    ) -> WorkItemResult[Any, Any]:
        current = await _middleware_before(self.middlewares, item)
        if current is None:
            return WorkItemResult(
                item.item_id,
                False,
                error="skipped by middleware",
                context=item.context,
                error_category="skipped",
            )
        await self._ensure_prepared(current.strategy)
        if run.events.observers:
            await run.events.emit(ProcessingEvent.ITEM_STARTED, {"item_id": item.item_id})
        batch_outcome = await self.batch_step.outcome(current) if self.batch_step is not None else None
        error: Exception | None = None
        if batch_outcome is not None:  # answered (or failed) by a Gemini batch job
            result, error = _outcome(batch_outcome.value, current, run, replayed=batch_outcome.replayed)
            result.metadata.update(batch_outcome.metadata)  # billing="batch" for failed answers too
        else:
            key = self._cache_key(current) if self.result_log is not None else None
            replay = await self._replayed(current, key, item, persisted)
            if replay is not None:
                result, error = _outcome(replay, current, run, replayed=True)
            else:
                result, error = await self._attempts(run, current)
                if result.success and key is not None:
                    await self._persist(key, result)
        if result.success and not result.replayed:
            result = await _middleware_after(self.middlewares, result)
        elif not result.success and error is not None:
            # Middleware sees the original provider exception (with its cause), not the quiet AttemptFailed
            # that went to Prefect.
            original = run.ledger(item.item_id).last_exception
            cause = original if isinstance(original, Exception) else error
            recovered = await _middleware_on_error(self.middlewares, current, cause)
            if recovered is not None:
                result = recovered
        return result

    async def _persist(self, key: str, result: WorkItemResult[Any, Any]) -> None:
        """Persist a success for later runs; a result that cannot be stored is still returned (only its
        replay is lost), with a warning naming why."""
        assert self.result_log is not None
        try:
            await self.result_log.add(key, result)  # the log stores a copy without ``context``
        except Exception as exc:
            logger.warning("could not persist the result of %s: %s", result.item_id, safe_reason(exc))

    async def _attempts(
        self, run: BatchRun, item: LLMWorkItem[Any, Any]
    ) -> tuple[WorkItemResult[Any, Any], Exception | None]:
        """Every attempt of one item: its own task run (per-item mode) or inline in the chunk's task run."""
        if self.config.chunk_size is None:
            if self._item_task is None:
                self._item_task = configured_item_task(self.config)
            state = await self._item_task(
                item_id=item.item_id, item=quote(item), run=quote(run), return_state=True
            )
            if state.is_completed():
                return _outcome(await state.aresult(), item, run, replayed=False)
            exc = await state.aresult(raise_on_failure=False)
            if not isinstance(exc, Exception):
                exc = RuntimeError(str(state.message or state.name))
            return _outcome(exc, item, run, replayed=False)
        try:
            value = await attempt_with_retries(item, run)
        except AttemptFailed as failure:
            return _outcome(failure, item, run, replayed=False)
        if self._report is None:  # a task-runner worker's chunk: say where it ran
            value.metadata = {**value.metadata, "worker": _worker_name()}
        return _outcome(value, item, run, replayed=False)

    async def _lookup(self, items: Sequence[LLMWorkItem[Any, Any]]) -> dict[str, WorkItemResult[Any, Any]]:
        """Persisted results of a chunk's items, in one lookup (none with ``refresh_cache``)."""
        if self.result_log is None or self.config.refresh_cache or self.batch_step is not None:
            return {}
        return await self.result_log.lookup([self._cache_key(item) for item in items])

    def _cache_key(self, item: LLMWorkItem[Any, Any]) -> str:
        """``item_cache_key`` with each strategy fingerprinted once per batch (per item it is ~0.1 ms)."""
        fingerprint = self._fingerprints.get(id(item.strategy))
        if fingerprint is None:
            fingerprint = self._fingerprints[id(item.strategy)] = item.strategy.fingerprint()
            self._fingerprinted.append(item.strategy)  # keeps the id stable while it is a key
        return item_cache_key(item, fingerprint)

    async def _replayed(
        self,
        current: LLMWorkItem[Any, Any],
        key: str | None,
        original: LLMWorkItem[Any, Any],
        persisted: dict[str, WorkItemResult[Any, Any]] | None,
    ) -> WorkItemResult[Any, Any] | None:
        if key is None or self.result_log is None or self.config.refresh_cache:
            return None
        if persisted is not None and (current is original or key in persisted):
            return persisted.get(key)
        return (await self.result_log.lookup([key])).get(key)

    async def _ensure_prepared(self, strategy: LLMCallStrategy[Any]) -> None:
        """Prepare a strategy swapped in by middleware ``before_process``: once, under a lock; it is then
        cleaned up by the process that prepared it (the flow's, at the end; a worker's, after its chunk)."""
        if self.config.dry_run or id(strategy) in self._known:
            return
        in_worker = self._report is None
        key = strategy_key(strategy)
        if in_worker and key in self.prepared_keys:  # an unpickled copy of a strategy the flow prepared
            self._known.add(id(strategy))
            return
        if self._lazy_lock is None:
            self._lazy_lock = asyncio.Lock()
        async with self._lazy_lock:
            if id(strategy) in self._known:
                return
            try:
                if not in_worker:  # the flow's process: a prepare task run, like the others
                    await self.prepare([strategy])
                    return
                run = self._current_run()
                self._strategies.append(strategy)
                run.prepared.add(id(strategy))
                try:
                    await call_lifecycle_hook(run, type(strategy).__name__, strategy, "prepare")
                except AttemptFailed as failure:
                    run.prepare_errors[f"id:{id(strategy)}"] = failure
            finally:
                self._known.add(id(strategy))

    @contextlib.asynccontextmanager
    async def _worker_run(self) -> AsyncIterator[BatchRun]:
        """A task-runner worker's run state for one chunk task: its own limiter (the same Prefect global
        concurrency limits as every other process), a result log handle, no observers."""
        from prefect_batchllm.prefect.limits import admission_for
        from prefect_batchllm.prefect.redaction import install_redaction

        install_redaction()
        admission: Admission = Unlimited()
        if not self.config.dry_run and self.config.rate_limit.enabled:
            admission = admission_for(self.config, ensure=False)
            start = getattr(admission, "start", None)
            if callable(start):
                await start()
        run = BatchRun(self.config, admission, self.classifier, EventDispatcher([]))
        run.stop = batch_stop(self.config, None)
        run.prepare_errors.update(self.prepare_errors)
        self.run = run
        try:
            with steady_heap():
                yield run
        finally:
            try:
                await shielded(self._close_worker_run(run))
            finally:
                self.run = None

    async def _close_worker_run(self, run: BatchRun) -> None:
        for index, strategy in enumerate(self._strategies):
            await self._cleanup_one(run, index, strategy)
        self._strategies.clear()
        if self.result_log is not None:
            await self.result_log.flush()
        aclose = getattr(run.admission, "aclose", None)
        if callable(aclose):
            await aclose()

    def _driver_run(self) -> BatchRun:
        if self.run is None:
            raise RuntimeError("BatchExecution.start() must be called in the flow before this step")
        return self.run

    def _current_run(self) -> BatchRun:
        if self.run is None:
            raise RuntimeError("no run state: BatchExecution steps run inside a batch flow or chunk task")
        return self.run

    def _driver_report(self) -> Report:
        if self._report is None:
            raise RuntimeError("BatchExecution.start() must be called in the flow before dispatching")
        return self._report


# --------------------------------------------------------------------------------------------------
# Helpers


def batch_stop(config: ProcessorConfig, events: EventDispatcher | None) -> BatchStop:
    """The batch's stop switch (systematic errors, cost budget), reported as ProcessingEvents when
    ``events`` is given. A worker process has its own (the flow's does not reach it)."""

    async def on_stop(category: ErrorCategory, reason: str, data: dict[str, Any]) -> None:
        if events is None:
            return
        event = (
            ProcessingEvent.BUDGET_EXCEEDED
            if category is ErrorCategory.BUDGET_EXCEEDED
            else ProcessingEvent.BATCH_STOPPED
        )
        await events.emit(event, {"category": category.value, "reason": reason, **data})

    return BatchStop(
        stop_after_errors=None if config.dry_run else config.stop_after_systematic_errors,
        max_cost_usd=None if config.dry_run else config.max_cost_usd,
        on_stop=on_stop,
    )


async def shielded(coro: Any) -> None:
    """Run ``coro`` to completion in its own task even if the caller is cancelled meanwhile."""
    job = asyncio.ensure_future(coro)
    cancelled = False
    while not job.done():
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            cancelled = True
    job.result()
    if cancelled:
        raise asyncio.CancelledError


def _remote_task_runner() -> bool:
    """Whether the flow run's task runner runs tasks outside this process (anything but Prefect's default
    thread pool, e.g. ``DaskTaskRunner`` or ``RayTaskRunner``)."""
    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None)
    return runner is not None and not isinstance(runner, ThreadPoolTaskRunner)


def _final_state(future: Any) -> Any:
    """Wait for a submitted task's future (blocking: called in a thread) and return its final state."""
    future.wait()
    return future.state


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _unique(strategies: Iterable[LLMCallStrategy[Any]]) -> list[LLMCallStrategy[Any]]:
    seen: dict[int, LLMCallStrategy[Any]] = {}
    for strategy in strategies:
        seen.setdefault(id(strategy), strategy)
    return list(seen.values())


def _strategy_label(index: int, strategy: LLMCallStrategy[Any]) -> str:
    return f"{index}-{slugify_key(type(strategy).__name__, 'strategy')}"


def _overrides(strategy: LLMCallStrategy[Any], hook: str) -> bool:
    """Whether ``strategy`` has its own ``prepare`` / ``cleanup`` (the base ones are no-ops)."""
    return getattr(type(strategy), hook, None) is not getattr(LLMCallStrategy, hook)


async def _middleware_before(
    middlewares: list[Middleware], item: LLMWorkItem[Any, Any]
) -> LLMWorkItem[Any, Any] | None:
    current: LLMWorkItem[Any, Any] | None = item
    for mw in middlewares:
        try:
            changed = await mw.before_process(current)  # type: ignore[arg-type]
        except Exception as exc:
            logger.warning("middleware %r before_process failed (ignored): %s", mw, safe_reason(exc))
            continue
        if changed is None:
            return None
        if not isinstance(changed, LLMWorkItem) or changed.item_id != item.item_id:
            logger.warning("middleware %r must return the item (same item_id) or None; ignored", mw)
            continue
        current = changed
    return current


async def _middleware_after(
    middlewares: list[Middleware], result: WorkItemResult[Any, Any]
) -> WorkItemResult[Any, Any]:
    for mw in reversed(middlewares):
        try:
            changed = await mw.after_process(result)
        except Exception as exc:
            logger.warning("middleware %r after_process failed (ignored): %s", mw, safe_reason(exc))
            continue
        if isinstance(changed, WorkItemResult):
            result = changed
    return result


async def _middleware_on_error(
    middlewares: list[Middleware], item: LLMWorkItem[Any, Any], error: Exception
) -> WorkItemResult[Any, Any] | None:
    for mw in middlewares:
        try:
            recovered = await mw.on_error(item, error)
        except Exception as exc:
            logger.warning("middleware %r on_error failed (ignored): %s", mw, safe_reason(exc))
            continue
        if isinstance(recovered, WorkItemResult):
            return recovered
    return None


def _outcome(
    value: Any, item: LLMWorkItem[Any, Any], run: BatchRun, *, replayed: bool
) -> tuple[WorkItemResult[Any, Any], Exception | None]:
    """The item's WorkItemResult from what its execution returned or raised (and the failure, if any)."""
    ledger = run.ledgers.get(item.item_id)
    if isinstance(value, AttemptFailed):
        return failed_result(item, ledger, value, value.category, value.message), value
    if isinstance(value, Exception):
        return failed_result(item, ledger, value, "unknown"), value
    if not isinstance(value, WorkItemResult):
        error = TypeError(f"item task returned {type(value).__name__}, not a WorkItemResult")
        return failed_result(item, ledger, error, "fatal"), error
    result = dataclasses.replace(value, context=item.context)
    if replayed:
        # Loaded from an earlier run's persisted result: nothing was requested or billed now.
        result.replayed = True
        result.metadata = {**result.metadata, "replayed_token_usage": dict(result.token_usage)}
        result.token_usage = normalize_usage(None)
        result.attempts = 0
        result.duration_s = 0.0
    return result, None


def failed_result(
    item: LLMWorkItem[Any, Any], ledger: Any, error: BaseException, category: str, message: str | None = None
) -> WorkItemResult[Any, Any]:
    """A failed :class:`WorkItemResult` for ``item`` with what its ledger (if any) recorded."""
    return WorkItemResult(
        item_id=item.item_id,
        success=False,
        error=message or describe_error(error),
        context=item.context,
        token_usage=ledger.token_usage if ledger is not None else normalize_usage(None),
        gemini_safety_ratings=getattr(ledger, "safety_ratings", None),
        error_category=category,
        attempts=getattr(ledger, "attempts", 0),
        duration_s=getattr(ledger, "duration_s", 0.0),
        model=safe_model_name(item.strategy),
        metadata=task_run_metadata(ledger),
    )


def safe_model_name(strategy: Any) -> str | None:
    """The strategy's model name, or ``None`` when its (user-written) property raises."""
    try:
        name = strategy.model_name
    except Exception:
        return None
    return name if isinstance(name, str) else None
