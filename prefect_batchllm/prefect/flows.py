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
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.utilities.annotations import quote

from prefect_batchllm.core.admission import Admission, Unlimited
from prefect_batchllm.core.config import ProcessorConfig
from prefect_batchllm.core.errors import (
    DefaultErrorClassifier,
    ErrorClassifier,
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
from prefect_batchllm.prefect.artifacts import ProgressArtifact, slugify_key
from prefect_batchllm.prefect.events import PauseEvents, PrefectEventBridge, batch_completed_data
from prefect_batchllm.prefect.execution import BatchExecution, Report, items_chunks, safe_model_name, shielded
from prefect_batchllm.prefect.flow_base import CALLER, BatchLLMFlow
from prefect_batchllm.prefect.heap import steady_heap
from prefect_batchllm.prefect.progress import close_terminal_progress, with_terminal_progress
from prefect_batchllm.prefect.redaction import install_redaction
from prefect_batchllm.prefect.result_log import ResultLog
from prefect_batchllm.prefect.tasks import summarize_batch

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
            model = safe_model_name(strategy)
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


class BatchFlow(BatchLLMFlow):
    """The ``run_batch`` flow: stored parameters summarise ``items`` / ``prompts`` (never the prompts), so
    the 512 KiB server cap on flow parameters does not limit batch size; inputs are validated before a
    flow run is created. Call dispatch, the caller's context and ``with_options`` come from
    :class:`BatchLLMFlow`.
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
    caller = CALLER.get()
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


@dataclass
class DriveOutcome:
    """What a driven batch leaves for its reduce step."""

    artifact_prefix: str
    wall_time_s: float
    batch_jobs: list[dict[str, Any]] | None
    stop: BatchStop
    events: EventDispatcher


async def drive_batch(
    execution: BatchExecution,
    *,
    total: int,
    strategies: Iterable[LLMCallStrategy[Any]],
    dispatch: Callable[[], Awaitable[None]],
    collect: Report,
    post_processor: PostProcessorFunc | None = None,
    observers: list[ProcessorObserver] | None = None,
    progress_callback: ProgressCallbackFunc | None = None,
    batch_api_items: Sequence[LLMWorkItem[Any, Any]] | None = None,
) -> DriveOutcome:
    """The flow-side steps every batch shares: limiter, events and progress, prepare, ``dispatch()``,
    per-item reporting (events, ``progress_callback``, ``post_processor``, then ``collect``), cleanup.

    ``run_batch`` dispatches its in-memory items, a table run its slices; each reduces in its own way.
    """
    config = execution.config
    install_redaction()
    caller = CALLER.get()
    bridge = PrefectEventBridge.for_current_run(caller.deployment_id if caller else None)
    observers = with_terminal_progress(observers, label=_run_label())  # a live bar when a person watches
    events = EventDispatcher(
        [*(observers or []), *([bridge] if bridge else [])], timeout=config.progress_callback_timeout or 5.0
    )
    pauses = PauseEvents(events)  # the limiter's 429 pauses -> COOLDOWN_STARTED / COOLDOWN_ENDED
    admission = Unlimited() if config.dry_run else await _admission_for(config, on_pause=pauses.on_pause)
    prefix = await _artifact_prefix(config)
    progress = ProgressArtifact(prefix, total, config.progress_interval)
    completed = 0

    async def report(position: int, result: WorkItemResult[Any, Any]) -> None:
        nonlocal completed
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
        await collect(position, result)

    run = execution.start(admission, events, report)
    started = time.monotonic()
    with steady_heap():  # full GC passes walk only what the run creates (see heap.py)
        try:
            await progress.start()
            await events.emit(
                ProcessingEvent.BATCH_STARTED, {"total": total, "max_workers": config.max_workers}
            )
            if config.chunk_size is None and total > _CHUNK_HINT_ITEMS:
                get_run_logger().info(
                    "%d items run as %d task runs: at high request rates (above all with rate limits on "
                    "a SQLite-backed API) Prefect's per-task-run work bounds throughput. "
                    "ProcessorConfig(chunk_size=200) runs one task run per 200 items with the same "
                    "guarantees",
                    total,
                    total,
                )
            await execution.prepare(strategies)
            if batch_api_items is not None:
                from prefect_batchllm.prefect.batch_api import BatchApiStep

                execution.batch_step = BatchApiStep(run, batch_api_items, execution.result_log)
                async with asyncio.TaskGroup() as group:
                    group.create_task(execution.batch_step.run_step())
                    group.create_task(dispatch())
            else:
                await dispatch()
        finally:
            try:
                await execution.cleanup()
            finally:
                close_terminal_progress(observers)
                if execution.result_log is not None:
                    await shielded(execution.result_log.aclose())
                aclose = getattr(admission, "aclose", None)
                if callable(aclose):
                    await shielded(aclose())
                await shielded(pauses.aclose())
    wall = time.monotonic() - started
    await progress.update(completed, force=True)
    jobs = execution.batch_step.job_summaries() if execution.batch_step is not None else None
    return DriveOutcome(prefix, wall, jobs, run.stop, events)


async def announce_completed(batch: BatchResult[Any, Any], drive: DriveOutcome) -> None:
    """The BATCH_COMPLETED event (observers and the Prefect event bridge)."""
    await drive.events.emit(
        ProcessingEvent.BATCH_COMPLETED,
        {
            **batch_completed_data(batch),
            "stopped": drive.stop.category.value if drive.stop.category else None,
            "stop_reason": drive.stop.reason,
        },
    )


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
    total = len(items)
    results: list[WorkItemResult[Any, Any] | None] = [None] * total
    execution = BatchExecution(
        config,
        error_classifier or DefaultErrorClassifier(),
        middlewares or [],
        await ResultLog.for_config(config),
    )

    async def collect(position: int, result: WorkItemResult[Any, Any]) -> None:
        results[position] = result

    async def dispatch() -> None:
        if config.chunk_size is None:
            await execution.dispatch_items(items)
        else:
            await execution.dispatch_chunks(items_chunks(items, config.chunk_size))

    drive = await drive_batch(
        execution,
        total=total,
        strategies=_unique_strategies(items),
        dispatch=dispatch,
        collect=collect,
        post_processor=post_processor,
        observers=observers,
        progress_callback=progress_callback,
        batch_api_items=items if config.execution == "batch_api" and not config.dry_run else None,
    )
    final = [r for r in results if r is not None]
    if len(final) != total:  # defensive: every item must be accounted for
        raise RuntimeError(f"internal error: {total - len(final)} items have no result")
    batch = await summarize_batch(
        quote(final), drive.wall_time_s, drive.artifact_prefix, batch_jobs=drive.batch_jobs
    )
    await announce_completed(batch, drive)
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
        caller = CALLER.get()
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
