"""The batch flow (``run_batch``) and its plain-prompts shorthand (the seed's facade: ``processor.py``).

One async flow run per batch. Inside it: one prepare task per unique strategy that has a real
``prepare()`` (at most ``max_workers`` at a time; base no-ops get no task), then one task run per item
fanned out on the flow's own event loop (``max_workers`` async workers; ``.map`` would cost a thread and a
fresh event loop per task and break loop-bound clients) - or, with ``ProcessorConfig.chunk_size``, one task
run per chunk of consecutive items running the same per-item pipeline inside it - then a reduce task that
builds the :class:`BatchResult` from in-process results and publishes artifacts, and one cleanup task per
strategy with a real ``cleanup()`` in a ``finally`` that cancellation cannot skip. A strategy swapped in
by middleware ``before_process`` is prepared lazily (once, under a lock) and cleaned up with the others.

``run_batch`` works from plain sync code (returns the result), from async code (``await`` it) and as a
subflow of sync or async user flows. Its flow-run parameters store a compact description of ``items``
(counts, ids, sizes), never the prompts, so batches far beyond Prefect's 512 KiB parameter cap start.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.utilities.annotations import quote

from prefect_batchllm.core.admission import Admission, Unlimited
from prefect_batchllm.core.attempt import AttemptFailed
from prefect_batchllm.core.config import ProcessorConfig
from prefect_batchllm.core.errors import (
    DefaultErrorClassifier,
    ErrorCategory,
    ErrorClassifier,
    ErrorInfo,
    describe_error,
    redact,
)
from prefect_batchllm.core.events import (
    EventDispatcher,
    Middleware,
    PostProcessorFunc,
    ProcessingEvent,
    ProcessorObserver,
    ProgressCallbackFunc,
    call_user_hook,
)
from prefect_batchllm.core.items import BatchResult, LLMWorkItem, WorkItemResult, check_unique_ids
from prefect_batchllm.core.pricing import price_for
from prefect_batchllm.core.stop import BatchStop
from prefect_batchllm.core.strategy import LLMCallStrategy
from prefect_batchllm.core.tokens import normalize_usage
from prefect_batchllm.prefect.artifacts import ProgressArtifact, slugify_key, task_run_metadata
from prefect_batchllm.prefect.events import PauseEvents, PrefectEventBridge, batch_completed_data
from prefect_batchllm.prefect.flow_base import BatchLLMFlow
from prefect_batchllm.prefect.progress import close_terminal_progress, with_terminal_progress
from prefect_batchllm.prefect.redaction import install_redaction
from prefect_batchllm.prefect.tasks import (
    BatchRun,
    chunk_result_store,
    cleanup_strategy,
    close_run,
    configured_item_task,
    open_run,
    prepare_strategy,
    process_chunk,
    run_item_inline,
    safe_reason,
    summarize_batch,
)

logger = logging.getLogger("prefect_batchllm")

__all__ = ["BatchFlow", "BatchItemsFailed", "run_batch", "run_batch_prompts"]

#: Above this many items in per-item mode the flow suggests ``chunk_size`` (measured at 3,000 RPM on 2 vCPUs
#: and SQLite: ~11-16 items/s per item, 45/s in chunks; see docs/rate-limits.md).
_CHUNK_HINT_ITEMS = 2000
#: Item ids shown in the stored flow-run parameters (the rest is summarised).
_PARAM_IDS_SHOWN = 20


class BatchItemsFailed(Exception):
    """Raised by ``run_batch`` when ``fail_on_item_failure=True`` and items failed (flow run ends Failed).

    The complete :class:`BatchResult` is on ``.result``; results and artifacts were written first.
    """

    def __init__(self, result: BatchResult[Any, Any]) -> None:
        super().__init__(result)
        self.result = result

    def __str__(self) -> str:
        r = self.result
        counts = r.error_categories()
        categories = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        hint = ""
        if counts.get("batch_pending"):  # not failures: their Gemini batch job is still running
            hint = "; batch_pending items are still in running Gemini batch jobs: re-run to collect them"
        return f"{r.failed}/{r.total_items} items failed ({categories}){hint}"


# --------------------------------------------------------------------------------------------------
# Input validation (runs before the flow run is created, and again in the flow body)


def validate_batch_inputs(items: Any, config: Any) -> tuple[list[LLMWorkItem[Any, Any]], ProcessorConfig]:
    """Check items and config; raise a clear TypeError/ValueError before any task runs."""
    if config is None:
        config = ProcessorConfig()
    elif not isinstance(config, ProcessorConfig):
        raise TypeError(f"run_batch: config must be a ProcessorConfig, got {type(config).__name__}")
    else:
        config.validate()
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise TypeError(
            f"run_batch: items must be a sequence of LLMWorkItem, got {type(items).__name__}; "
            "for plain prompts use run_batch_prompts(prompts, strategy)"
        )
    items = list(items)
    if not items:
        raise ValueError("run_batch: the batch is empty; pass at least one LLMWorkItem")
    for index, item in enumerate(items):
        if not isinstance(item, LLMWorkItem):
            raise TypeError(f"run_batch: items[{index}] is a {type(item).__name__}, expected an LLMWorkItem")
        item.validate()  # re-check fields mutated after construction
        if not isinstance(item.prompt, str) and not getattr(item.strategy, "accepts_content_parts", True):
            raise TypeError(
                f"LLMWorkItem {item.item_id!r}: {type(item.strategy).__name__} takes text prompts only, "
                f"got {type(item.prompt).__name__}"
            )
    check_unique_ids(items)
    if config.max_cost_usd is not None and not config.dry_run:
        for strategy in _unique_strategies(items):
            model = _safe_model_name(strategy)
            if price_for(model) is None:
                raise ValueError(
                    f"ProcessorConfig.max_cost_usd is set but {type(strategy).__name__} uses model "
                    f"{model!r}, which has no known price: call prefect_batchllm.core.pricing."
                    "register_price(model, ModelPrice(...)) first, or drop max_cost_usd"
                )
    if config.execution == "batch_api" and not config.dry_run:
        from prefect_batchllm.prefect.batch_api import check_batch_items

        check_batch_items(items)
    return items, config


def describe_items(items: Any) -> dict[str, Any]:
    """Compact, JSON-able description of a batch for the stored flow-run parameters."""
    try:
        seq = list(items)
    except TypeError:
        return {"type": type(items).__name__}
    ids = [getattr(i, "item_id", None) for i in seq]
    strategies = sorted({type(getattr(i, "strategy", None)).__name__ for i in seq})
    prompt_chars = sum(len(p) for p in (getattr(i, "prompt", "") for i in seq) if isinstance(p, str))
    return {
        "count": len(seq),
        "item_ids": ids[:_PARAM_IDS_SHOWN],
        "more_item_ids": max(0, len(ids) - _PARAM_IDS_SHOWN),
        "strategies": strategies,
        "prompt_chars": prompt_chars,
    }


def _callable_name(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return [_callable_name(v) for v in value]
    return getattr(value, "__qualname__", None) or type(value).__qualname__


# --------------------------------------------------------------------------------------------------
# The Flow subclass: compact parameters, sync/async dispatch, caller context


@dataclass(frozen=True)
class _Caller:
    flow_name: str | None
    deployment_id: Any


_CALLER: contextvars.ContextVar[_Caller | None] = contextvars.ContextVar("batchllm_caller", default=None)


class BatchFlow(BatchLLMFlow):
    """The ``run_batch`` flow: stored parameters summarise ``items`` / ``prompts`` (never the prompts), so
    the 512 KiB server cap on flow parameters does not limit batch size; inputs are validated before a
    flow run is created; the caller (parent flow, deployment) is remembered for artifact keys. Call
    dispatch and ``with_options`` come from :class:`BatchLLMFlow`.
    """

    def summarize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        compact = parameters
        for name in ("items", "prompts"):
            if name in compact:
                compact[name] = (
                    describe_items(compact[name]) if name == "items" else _describe_prompts(compact[name])
                )
        for name in ("post_processor", "error_classifier", "middlewares", "observers", "progress_callback"):
            if name in compact:
                compact[name] = _callable_name(compact[name])
        if isinstance(compact.get("strategy"), LLMCallStrategy):
            compact["strategy"] = repr(compact["strategy"])
        return compact

    def check_call(self, parameters: dict[str, Any]) -> dict[str, Any]:
        params = parameters
        if "items" in params:
            # Materialise iterators once (validation must not consume what the flow body needs).
            params["items"], _ = validate_batch_inputs(params["items"], params.get("config"))
        parent = FlowRunContext.get()
        _CALLER.set(
            _Caller(
                flow_name=parent.flow.name if parent and parent.flow else None,
                deployment_id=parent.flow_run.deployment_id if parent and parent.flow_run else None,
            )
        )
        return params


def _describe_prompts(prompts: Any) -> dict[str, Any]:
    try:
        seq = list(prompts.values()) if isinstance(prompts, Mapping) else list(prompts)
    except TypeError:
        return {"type": type(prompts).__name__}
    return {"count": len(seq), "prompt_chars": sum(len(p) for p in seq if isinstance(p, str))}


# --------------------------------------------------------------------------------------------------
# Seams and helpers used by the flow body


async def _admission_for(config: ProcessorConfig, **options: Any) -> Admission:
    """The admission (rate limiter) for a batch: Prefect global concurrency limits when a limit is set.

    The limits are created/updated and validated here, at flow start, so a misconfigured limit fails the
    batch before any item runs (never silent unlimited execution).
    """
    from prefect_batchllm.prefect.limits import admission_for

    admission = admission_for(config, **options)
    start = getattr(admission, "start", None)
    if callable(start):
        await start()
    return admission


async def _artifact_prefix(config: ProcessorConfig) -> str:
    """``config.artifact_key``, else a slug of the calling flow (or this one) plus its deployment name."""
    if config.artifact_key:
        return config.artifact_key
    ctx = FlowRunContext.get()
    caller = _CALLER.get()
    flow_name = (caller.flow_name if caller else None) or (ctx.flow.name if ctx and ctx.flow else "run-batch")
    deployment_id = (caller.deployment_id if caller else None) or (
        ctx.flow_run.deployment_id if ctx and ctx.flow_run else None
    )
    name = flow_name
    if deployment_id is not None:
        try:
            from prefect.client.orchestration import get_client

            async with get_client() as client:
                deployment = await client.read_deployment(deployment_id)
            name = f"{flow_name}-{deployment.name}"
        except Exception as exc:  # naming is cosmetic; never fail the batch over it
            logger.debug("could not read deployment %s: %s", deployment_id, exc)
    return slugify_key(name)


def _run_label() -> str:
    """This flow run's name (set by ``_batch_run_name``), for the terminal progress bar."""
    ctx = FlowRunContext.get()
    name = getattr(getattr(ctx, "flow_run", None), "name", None)
    return name if isinstance(name, str) and name else "run-batch"


def _unique_strategies(items: Sequence[LLMWorkItem[Any, Any]]) -> list[LLMCallStrategy[Any]]:
    seen: dict[int, LLMCallStrategy[Any]] = {}
    for item in items:
        seen.setdefault(id(item.strategy), item.strategy)
    return list(seen.values())


def _strategy_label(index: int, strategy: LLMCallStrategy[Any]) -> str:
    return f"{index}-{slugify_key(type(strategy).__name__, 'strategy')}"


def _overrides(strategy: LLMCallStrategy[Any], hook: str) -> bool:
    """Whether ``strategy`` has its own ``prepare`` / ``cleanup`` (the base ones are no-ops)."""
    return getattr(type(strategy), hook, None) is not getattr(LLMCallStrategy, hook)


def _batch_stop(config: ProcessorConfig, events: EventDispatcher) -> BatchStop:
    """The batch's stop switch: systematic errors and the cost budget, reported as ProcessingEvents."""

    async def on_stop(category: ErrorCategory, reason: str, data: dict[str, Any]) -> None:
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


async def _prepare_all(
    run: BatchRun, strategies: list[LLMCallStrategy[Any]], start: int = 0, limit: int | None = None
) -> None:
    """One prepare task per unique strategy with a real ``prepare()``, at most ``limit`` at a time.

    Strategies with the base no-op ``prepare`` get no task (per-item strategies would otherwise cost one
    task run each) but still count as prepared, so their ``cleanup()`` runs. Failures fail that
    strategy's items.
    """
    semaphore = asyncio.Semaphore(max(1, limit or run.config.max_workers))

    async def prepare(index: int, strategy: LLMCallStrategy[Any]) -> None:
        if not _overrides(strategy, "prepare"):
            run.prepared.add(id(strategy))
            return
        async with semaphore:
            state = await prepare_strategy(
                _strategy_label(index, strategy), quote(strategy), run.key, return_state=True
            )
        if not state.is_completed():
            exc = await state.aresult(raise_on_failure=False)
            if not isinstance(exc, AttemptFailed):  # the task itself could not run
                reason = describe_error(exc) if isinstance(exc, BaseException) else redact(str(state.message))
                info = ErrorInfo(ErrorCategory.UNKNOWN, False, reason=reason)
                exc = AttemptFailed(type(strategy).__name__, 1, info, f"prepare() failed: {reason}")
            run.prepare_errors[id(strategy)] = exc
            logger.warning("prepare() of %s failed; its items fail: %s", type(strategy).__name__, exc)

    await asyncio.gather(*(prepare(i, s) for i, s in enumerate(strategies, start)))


async def _cleanup_all(run: BatchRun, strategies: list[LLMCallStrategy[Any]]) -> None:
    """One cleanup task per prepared strategy with a real ``cleanup()``, ``max_workers`` at a time;
    falls back to a direct call if the task cannot run."""
    semaphore = asyncio.Semaphore(max(1, run.config.max_workers))

    async def cleanup(index: int, strategy: LLMCallStrategy[Any]) -> None:
        async with semaphore:
            await _cleanup_one(run, index, strategy)

    await asyncio.gather(*(cleanup(i, s) for i, s in enumerate(strategies)))


async def _cleanup_one(run: BatchRun, index: int, strategy: LLMCallStrategy[Any]) -> None:
    if id(strategy) not in run.prepared or id(strategy) in run.cleaned:
        return
    if not _overrides(strategy, "cleanup"):
        run.cleaned.add(id(strategy))
        return
    try:
        state = await cleanup_strategy(
            _strategy_label(index, strategy), quote(strategy), run.key, return_state=True
        )
        if not state.is_completed():
            logger.warning("cleanup() of %s failed: %s", type(strategy).__name__, state.message)
    except BaseException as exc:  # the engine could not run the task: clean up directly
        logger.debug("cleanup task could not run (%s); calling cleanup() directly", exc)
    if id(strategy) not in run.cleaned:
        run.cleaned.add(id(strategy))
        try:
            await strategy.cleanup()
        except Exception as exc:
            logger.warning("cleanup() of %s failed: %s", type(strategy).__name__, safe_reason(exc))


async def _shielded(coro: Any) -> None:
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
    ledger = run.ledger(item.item_id)
    if isinstance(value, AttemptFailed):
        return _failed(item, ledger, value, value.category, value.message), value
    if isinstance(value, Exception):
        return _failed(item, ledger, value, "unknown"), value
    if not isinstance(value, WorkItemResult):
        error = TypeError(f"item task returned {type(value).__name__}, not a WorkItemResult")
        return _failed(item, ledger, error, "fatal"), error
    result = WorkItemResult(**{f.name: getattr(value, f.name) for f in fields(WorkItemResult)})
    result.context = item.context
    if replayed:
        # Loaded from an earlier run's persisted result: nothing was requested or billed now.
        result.replayed = True
        result.metadata = {**result.metadata, "replayed_token_usage": dict(result.token_usage)}
        result.token_usage = normalize_usage(None)
        result.attempts = 0
        result.duration_s = 0.0
    return result, None


async def _execute_as_task(
    item_task: Any, item: LLMWorkItem[Any, Any], run: BatchRun
) -> tuple[WorkItemResult[Any, Any], Exception | None]:
    """Per-item mode: one task run (Prefect retries, Prefect's result cache)."""
    state = await item_task(item_id=item.item_id, item=quote(item), run_key=run.key, return_state=True)
    if state.is_completed():
        replayed = state.name == "Cached" and run.ledger(item.item_id).attempts == 0
        return _outcome(await state.aresult(), item, run, replayed=replayed)
    exc = await state.aresult(raise_on_failure=False)
    if not isinstance(exc, Exception):
        exc = RuntimeError(str(state.message or state.name))
    return _outcome(exc, item, run, replayed=False)


async def _execute_inline(
    item: LLMWorkItem[Any, Any], run: BatchRun
) -> tuple[WorkItemResult[Any, Any], Exception | None]:
    """Chunked mode: inside the chunk's task run (same retries and persisted results)."""
    try:
        value, replayed = await run_item_inline(item, run)
    except AttemptFailed as failure:
        return _outcome(failure, item, run, replayed=False)
    return _outcome(value, item, run, replayed=replayed)


def _failed(
    item: LLMWorkItem[Any, Any], ledger: Any, error: BaseException, category: str, message: str | None = None
) -> WorkItemResult[Any, Any]:
    return WorkItemResult(
        item_id=item.item_id,
        success=False,
        error=message or describe_error(error),
        context=item.context,
        token_usage=ledger.token_usage,
        gemini_safety_ratings=ledger.safety_ratings,
        error_category=category,
        attempts=ledger.attempts,
        duration_s=ledger.duration_s,
        model=_safe_model_name(item.strategy),
        metadata=task_run_metadata(ledger),
    )


def _safe_model_name(strategy: Any) -> str | None:
    """The strategy's model name, or ``None`` when its (user-written) property raises."""
    try:
        name = strategy.model_name
    except Exception:
        return None
    return name if isinstance(name, str) else None


# --------------------------------------------------------------------------------------------------
# The flow


class BatchFlowError(RuntimeError):
    """An unexpected error of the batch flow itself, re-raised with registered secrets masked."""


def _masking_errors(fn: Any) -> Any:
    """Flow-level errors reach Prefect (state message, logged traceback) with secrets masked and no cause."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            text = str(exc)
            if redact(text) == text:
                raise
            masked = BatchFlowError(f"{type(exc).__name__}: {redact(text)}")
        raise masked  # outside the except block: the original (with the secret) is not chained

    return wrapper


@_masking_errors
async def _run_batch(
    items: Sequence[LLMWorkItem[Any, Any]],
    config: ProcessorConfig | None = None,
    post_processor: PostProcessorFunc | None = None,
    error_classifier: ErrorClassifier | None = None,
    middlewares: list[Middleware] | None = None,
    observers: list[ProcessorObserver] | None = None,
    progress_callback: ProgressCallbackFunc | None = None,
) -> BatchResult[Any, Any]:
    """Run every item as a Prefect task and return the :class:`BatchResult` (one result per item,
    in input order). Failed items are Failed task runs; the flow still returns the whole result unless
    ``config.fail_on_item_failure`` is set, in which case it raises :class:`BatchItemsFailed` after
    writing results and artifacts.

    ``post_processor`` runs for every successful item, *including* results replayed from an earlier run
    (``result.replayed is True``), so a write that failed or never happened then is retried now. It must
    therefore be idempotent (an upsert), or skip replayed results itself.
    """
    items, config = validate_batch_inputs(items, config)
    install_redaction()
    mws = list(middlewares or [])
    caller = _CALLER.get()
    bridge = PrefectEventBridge.for_current_run(caller.deployment_id if caller else None)
    observers = with_terminal_progress(observers, label=_run_label())  # a live bar when a person watches
    events = EventDispatcher(
        [*(observers or []), *([bridge] if bridge else [])], timeout=config.progress_callback_timeout or 5.0
    )
    pauses = PauseEvents(events)  # the limiter's 429 pauses -> COOLDOWN_STARTED / COOLDOWN_ENDED
    admission = Unlimited() if config.dry_run else await _admission_for(config, on_pause=pauses.on_pause)
    run = BatchRun(config, admission, error_classifier or DefaultErrorClassifier(), events)
    run.stop = _batch_stop(config, events)
    total = len(items)
    results: list[WorkItemResult[Any, Any] | None] = [None] * total
    strategies = _unique_strategies(items)
    ready: set[int] = set()  # strategies whose prepare step has finished (or failed)
    lazy_lock = asyncio.Lock()
    batch_step: Any = None  # execution="batch_api": the Gemini batch-job step (prefect/batch_api.py)
    completed = 0
    started = time.monotonic()

    async def ensure_prepared(strategy: LLMCallStrategy[Any]) -> None:
        """Prepare a strategy swapped in by middleware ``before_process``: once, under a lock; it is
        then cleaned up with the others."""
        if id(strategy) in ready:
            return
        async with lazy_lock:
            if id(strategy) in ready:
                return
            strategies.append(strategy)  # keeps it alive (stable id) and in the cleanup list
            try:
                if not config.dry_run:
                    await _prepare_all(run, [strategy], start=len(strategies) - 1)
            finally:
                ready.add(id(strategy))

    async def process(index: int, item: LLMWorkItem[Any, Any]) -> WorkItemResult[Any, Any]:
        current = await _middleware_before(mws, item)
        if current is None:
            return WorkItemResult(
                item.item_id,
                False,
                error="skipped by middleware",
                context=item.context,
                error_category="skipped",
            )
        await ensure_prepared(current.strategy)
        await events.emit(ProcessingEvent.ITEM_STARTED, {"item_id": item.item_id, "index": index})
        batch_outcome = await batch_step.outcome(current) if batch_step is not None else None
        if batch_outcome is not None:  # answered (or failed) by a Gemini batch job
            result, error = _outcome(batch_outcome.value, current, run, replayed=batch_outcome.replayed)
            result.metadata.update(batch_outcome.metadata)  # billing="batch" for failed answers too
        elif config.chunk_size is None:
            result, error = await _execute_as_task(item_task, current, run)
        else:
            result, error = await _execute_inline(current, run)
        if result.success and not result.replayed:
            result = await _middleware_after(mws, result)
        elif not result.success and error is not None:
            # Middleware sees the original provider exception (with its cause), not the quiet AttemptFailed
            # that went to Prefect.
            original = run.ledger(item.item_id).last_exception
            cause = original if isinstance(original, Exception) else error
            recovered = await _middleware_on_error(mws, current, cause)
            if recovered is not None:
                result = recovered
        return result

    async def run_one(index: int, item: LLMWorkItem[Any, Any]) -> None:
        nonlocal completed
        try:
            result = await process(index, item)
        except Exception as exc:  # e.g. an unloadable persisted result, a raising user property
            # One item's unexpected error must not cancel the TaskGroup and lose every other result.
            logger.warning("item %s failed outside its task: %s", item.item_id, safe_reason(exc))
            result = _failed(item, run.ledger(item.item_id), exc, "unknown", safe_reason(exc))
        if item.template is not None:  # every result records the prompt template it was made from
            result.metadata = {**result.metadata, "prompt_template": item.template.as_dict()}
        results[index] = result
        if result.success:
            await events.emit(
                ProcessingEvent.ITEM_COMPLETED,
                {
                    "item_id": result.item_id,
                    "attempts": result.attempts,
                    "replayed": result.replayed,
                    "token_usage": dict(result.token_usage),
                },
            )
        else:
            await events.emit(
                ProcessingEvent.ITEM_FAILED,
                {
                    "item_id": result.item_id,
                    "error": result.error,
                    "error_category": result.error_category,
                    "attempts": result.attempts,
                    "token_usage": dict(result.token_usage),
                },
            )
        completed += 1
        if progress_callback is not None:
            await call_user_hook(
                progress_callback,
                completed,
                total,
                result.item_id,
                timeout=config.progress_callback_timeout,
                what="progress_callback",
            )
        await progress.update(completed)
        # Replayed successes too: a post-processor that failed (or never ran, after a crash) in the earlier
        # run gets another chance. Post-processors must therefore be idempotent (``result.replayed`` tells).
        if post_processor is not None and result.success:
            ok, message = await call_user_hook(
                post_processor, result, timeout=config.post_processor_timeout, what="post_processor"
            )
            if not ok:
                result.post_processor_error = message

    pending = iter(enumerate(items))

    async def worker() -> None:
        for index, item in pending:  # shared iterator: each item is taken by exactly one worker
            await run_one(index, item)

    in_flight = asyncio.Semaphore(config.max_workers)  # chunked mode: items in flight across all chunks

    async def run_items(start: int, stop: int) -> list[WorkItemResult[Any, Any]]:
        """Chunked mode, called by the chunk's task: items ``[start, stop)``; returns the failures."""

        async def gated(index: int) -> None:
            async with in_flight:
                await run_one(index, items[index])

        async with asyncio.TaskGroup() as group:
            for index in range(start, stop):
                group.create_task(gated(index))
        return [r for r in results[start:stop] if r is not None and not r.success]

    async def chunk_worker(starts: Iterator[int], size: int) -> None:
        for start in starts:  # shared iterator: each chunk is taken by exactly one worker
            stop = min(start + size, total)
            label = f"chunk-{start // size + 1}: {items[start].item_id} .. {items[stop - 1].item_id}"
            state = await process_chunk(
                label=label, start=start, stop=stop, run_key=run.key, return_state=True
            )
            for index in range(start, stop):  # a chunk that crashed before its items ran loses none of them
                if results[index] is None:
                    item = items[index]
                    reason = f"chunk task ended {state.name}: {state.message or 'no message'}"
                    error = RuntimeError(reason)
                    results[index] = _failed(item, run.ledger(item.item_id), error, "unknown", reason)

    try:
        open_run(run)
        prefix = await _artifact_prefix(config)
        progress = ProgressArtifact(prefix, total, config.progress_interval)
        item_task = configured_item_task(config)
        await progress.start()
        await events.emit(ProcessingEvent.BATCH_STARTED, {"total": total, "max_workers": config.max_workers})
        if config.chunk_size is None and total > _CHUNK_HINT_ITEMS:
            get_run_logger().info(
                "%d items run as %d task runs: at high request rates (above all with rate limits on a "
                "SQLite-backed API) Prefect's per-task-run work bounds throughput. "
                "ProcessorConfig(chunk_size=200) runs one task run per 200 items with the same guarantees",
                total,
                total,
            )
        if not config.dry_run:
            await _prepare_all(run, strategies)
        ready.update(id(s) for s in strategies)
        if config.execution == "batch_api" and not config.dry_run:
            from prefect_batchllm.prefect.batch_api import BatchApiStep

            batch_step = BatchApiStep(run, items, await chunk_result_store(item_task))
        async with asyncio.TaskGroup() as group:
            if batch_step is not None:
                group.create_task(batch_step.run_step())
            if config.chunk_size is None:
                for _ in range(min(config.max_workers, total)):
                    group.create_task(worker())
            else:
                # Enough chunks open to keep max_workers busy, plus one to overlap a chunk's slow tail.
                size = config.chunk_size
                run.result_store = await chunk_result_store(item_task)
                run.run_items = run_items
                starts = iter(range(0, total, size))
                for _ in range(min(-(-config.max_workers // size) + 1, -(-total // size))):
                    group.create_task(chunk_worker(starts, size))
    finally:
        try:
            if not config.dry_run:
                await _shielded(_cleanup_all(run, strategies))
        finally:
            close_terminal_progress(observers)
            close_run(run.key)
            aclose = getattr(admission, "aclose", None)
            if callable(aclose):
                await _shielded(aclose())
            await _shielded(pauses.aclose())

    wall = time.monotonic() - started
    final = [r for r in results if r is not None]
    if len(final) != total:  # defensive: every item must be accounted for
        raise RuntimeError(f"internal error: {total - len(final)} items have no result")
    await progress.update(completed, force=True)
    jobs = batch_step.job_summaries() if batch_step is not None else None
    batch = await summarize_batch(quote(final), wall, prefix, batch_jobs=jobs)
    await events.emit(
        ProcessingEvent.BATCH_COMPLETED,
        {
            **batch_completed_data(batch),
            "stopped": run.stop.category.value if run.stop.category else None,
            "stop_reason": run.stop.reason,
        },
    )
    if config.fail_on_item_failure and batch.failed:
        raise BatchItemsFailed(batch)
    return batch


def _batch_run_name() -> str:
    """The UI name of a batch flow run, ``<batch>: <n> items`` (``in chunks of <k>``), not a random one.

    ``<batch>`` is ``ProcessorConfig.artifact_key``, else the calling flow's name, else ``run-batch``.
    """
    try:
        ctx = FlowRunContext.get()
        params = ctx.parameters if ctx is not None and ctx.parameters else {}
        config = params.get("config")
        caller = _CALLER.get()
        label = (
            (config.artifact_key if isinstance(config, ProcessorConfig) else None)
            or (caller.flow_name if caller else None)
            or "run-batch"
        )
        name = f"{label}: {len(params['items']):,} items"
        if isinstance(config, ProcessorConfig) and config.chunk_size:
            name += f" in chunks of {config.chunk_size:,}"
        return name
    except Exception:  # a name is cosmetic; never fail the flow run over it
        return "run-batch"


run_batch: BatchFlow = BatchFlow(
    _run_batch,
    name="run-batch",
    flow_run_name=_batch_run_name,
    description="Run a batch of LLM work items, one Prefect task run per item (or per chunk of items).",
    validate_parameters=False,
    log_prints=False,
)
"""``run_batch(items, config=None, post_processor=None, *, error_classifier=None, middlewares=None,
observers=None, progress_callback=None) -> BatchResult`` - a Prefect flow (see ``_run_batch``)."""


def run_batch_prompts(
    prompts: Sequence[str] | Mapping[str, str],
    strategy: LLMCallStrategy[Any],
    config: ProcessorConfig | None = None,
) -> Any:
    """Run plain prompts through one strategy. Ids are ``item-00000``... (or the mapping's keys).

    Returns the :class:`BatchResult` from sync code, an awaitable from async code (like ``run_batch``).
    """
    if isinstance(prompts, str) or not isinstance(prompts, Iterable):
        raise TypeError(f"run_batch_prompts: prompts must be a list of strings, got {type(prompts).__name__}")
    if isinstance(prompts, Mapping):
        pairs = [(str(k), v) for k, v in prompts.items()]
    else:
        listed = list(prompts)
        width = max(5, len(str(len(listed))))
        pairs = [(f"item-{i:0{width}d}", p) for i, p in enumerate(listed)]
    items = [LLMWorkItem(item_id=item_id, strategy=strategy, prompt=p) for item_id, p in pairs]
    return run_batch(items, config)
