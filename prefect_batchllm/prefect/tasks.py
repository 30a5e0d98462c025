"""The Prefect tasks of a batch run: prepare, process one item, process one chunk, summarize, cleanup.

``process_item`` is one task run per item, named after the ``item_id``. Each Prefect run of it is one
logical attempt (attempt number = Prefect's ``run_count``); retries are Prefect's, built from
``RetryConfig`` and gated by an async ``retry_condition_fn`` that asks the error classifier. What must
survive those retries (the item's ``RetryState``, billed tokens, counters) lives in the run's
:class:`BatchRun` (passed by reference: per-item mode runs in the flow's process).

Chunked mode (``ProcessorConfig.chunk_size``): ``process_chunk`` is one task run per chunk of items, given
everything it needs as arguments (the :class:`~prefect_batchllm.prefect.execution.BatchExecution` and a
chunk source), so a Dask or Ray task runner can run it in another process. Each item inside it goes
through the same attempt (:func:`attempt_item`) and retry policy as ``process_item``.

Successful item results are persisted by the execution's result log under a key built from (item_id,
sha256 of the prompt, strategy fingerprint) and *not* the flow-run id, so a retried or repeated run loads
completed items instead of paying for them again; failures are never persisted.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import Failed

from prefect_batchllm.core.admission import Admission
from prefect_batchllm.core.attempt import (
    AttemptFailed,
    ItemLedger,
    classify_error,
    pause_after_rate_limit,
    run_attempt,
)
from prefect_batchllm.core.config import ProcessorConfig
from prefect_batchllm.core.errors import ErrorClassifier, ErrorInfo, describe_error, redact
from prefect_batchllm.core.events import EventDispatcher, ProcessingEvent
from prefect_batchllm.core.identity import sha256_of
from prefect_batchllm.core.items import BatchResult, LLMWorkItem, WorkItemResult
from prefect_batchllm.core.stop import BatchStop
from prefect_batchllm.core.strategy import LLMCallStrategy
from prefect_batchllm.prefect.artifacts import publish_batch_artifacts

logger = logging.getLogger("prefect_batchllm")

if TYPE_CHECKING:
    from prefect_batchllm.prefect.execution import BatchExecution, ChunkSource

__all__ = [
    "BatchRun",
    "ChunkResults",
    "attempt_item",
    "attempt_with_retries",
    "cleanup_strategy",
    "configured_item_task",
    "item_cache_key",
    "prepare_error_of",
    "prepare_strategy",
    "process_chunk",
    "process_item",
    "strategy_key",
    "summarize_batch",
]

#: Bumped when the persisted WorkItemResult shape changes, so old cache entries are not loaded.
CACHE_VERSION = "batchllm-item-v1"
#: Prefect accepts at most 50 explicit retry delays; a shorter list repeats its last value.
_MAX_DELAYS = 50
_JITTER_FACTOR = 0.5  # delays vary by +-50 %, like the seed's 50-100 % jitter


# --------------------------------------------------------------------------------------------------
# Per-process state of a batch run


def strategy_key(strategy: LLMCallStrategy[Any]) -> str:
    """What identifies a strategy across processes (its fingerprint), so a worker that unpickled its own
    copy still finds the driver's ``prepare()`` outcome; ``id`` when the strategy cannot fingerprint."""
    try:
        return f"fp:{strategy.fingerprint()}"
    except Exception:
        return f"id:{id(strategy)}"


def prepare_error_of(run: BatchRun, strategy: LLMCallStrategy[Any]) -> AttemptFailed | None:
    """The failure of ``strategy``'s ``prepare()``: by identity in the flow's process, by fingerprint in a
    worker (whose strategies are unpickled copies)."""
    if not run.prepare_errors:
        return None
    return run.prepare_errors.get(f"id:{id(strategy)}") or run.prepare_errors.get(strategy_key(strategy))


@dataclass
class BatchRun:
    """What one process needs to run a batch's items: limiter, classifier, events, per-item ledgers.

    Never pickled: the flow's process builds one for the whole run, a task-runner worker builds one per
    chunk task (:class:`~prefect_batchllm.prefect.execution.BatchExecution` does both).
    """

    config: ProcessorConfig
    admission: Admission
    classifier: ErrorClassifier
    events: EventDispatcher
    ledgers: dict[str, ItemLedger] = field(default_factory=dict)
    #: ``id:<id>`` (flow's process) or strategy_key (worker) -> the final, quiet failure of a strategy's
    #: ``prepare()`` (after retries); its items fail with it (:func:`prepare_error_of`).
    prepare_errors: dict[str, AttemptFailed] = field(default_factory=dict)
    #: The batch-level stop (systematic errors, cost budget), checked before every attempt is admitted.
    stop: BatchStop = field(default_factory=BatchStop)
    prepared: set[int] = field(default_factory=set)
    cleaned: set[int] = field(default_factory=set)

    def ledger(self, item_id: str) -> ItemLedger:
        ledger = self.ledgers.get(item_id)
        if ledger is None:
            ledger = self.ledgers[item_id] = ItemLedger(item_id)
        return ledger


# --------------------------------------------------------------------------------------------------
# Cross-run result cache key


def prompt_sha256(prompt: Any) -> str:
    """sha256 of a prompt; strings hash their UTF-8 bytes, content-part lists their canonical JSON.

    A part that is not data raises :class:`~prefect_batchllm.core.identity.FingerprintError` naming its
    type (never ``repr``, whose memory address would make every run miss the cache).
    """
    if isinstance(prompt, str):
        return hashlib.sha256(prompt.encode()).hexdigest()
    return sha256_of(prompt)


def item_cache_key(item: LLMWorkItem[Any, Any], fingerprint: str | None = None) -> str:
    """Cache key of an item's result: (item_id, prompt sha256, strategy fingerprint, prompt template name and
    version when set), no run id: a new template version re-runs the item even if its prompt is unchanged.
    ``fingerprint``: the strategy's, when the caller already has it (it costs a canonical JSON + sha256)."""
    fingerprint = fingerprint if fingerprint is not None else item.strategy.fingerprint()
    parts = [CACHE_VERSION, item.item_id, prompt_sha256(item.prompt), fingerprint]
    if item.template is not None:
        parts.append(f"template={item.template.name}@{item.template.version}")
    raw = "|".join(parts)
    return hashlib.sha256(raw.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Tasks


async def call_lifecycle_hook(run: BatchRun, label: str, strategy: LLMCallStrategy[Any], hook: str) -> None:
    """``strategy.prepare()`` / ``cleanup()`` with the items' retry policy; raises a quiet AttemptFailed.

    Classifier-driven: retryable errors are retried up to ``RetryConfig.max_attempts`` with its back-off
    (jittered, at least the provider's ``RetryInfo`` delay); a 429 pauses the shared limiter, waits and
    tries again without using an attempt (at most ``max_rate_limit_retries`` times). The final failure is
    an :class:`AttemptFailed` carrying the real category, with a redacted message and no provider
    traceback or cause, so Prefect's logs and task-run state never see the raw exception.
    """
    config = run.config
    attempt = 1
    rate_limits = 0
    delay = 0.0
    while True:
        try:
            await getattr(strategy, hook)()
            return
        except Exception as exc:
            info = classify_error(run.classifier, exc)
            message = describe_error(exc)
            if info.is_rate_limit and info.is_retryable and rate_limits < config.retry.max_rate_limit_retries:
                rate_limits += 1
                get_run_logger().info("%s() of %s rate limited (%s); waiting", hook, label, message)
                failure = None
            elif info.is_retryable and attempt < config.retry.max_attempts:
                delay = retry_delay(config, attempt, info.retry_after)
                get_run_logger().info(
                    "%s() of %s: attempt %d failed (%s); retrying in %.1f s",
                    hook,
                    label,
                    attempt,
                    message,
                    delay,
                )
                failure = None
            else:
                if info.is_rate_limit:
                    message = (
                        f"rate limited {rate_limits + 1} times (max_rate_limit_retries); last: {message}"
                    )
                failure = AttemptFailed(label, attempt, info, f"{hook}() failed: {message}")
        # Outside the except block: the provider exception (and its traceback) is not chained to anything.
        if failure is not None:
            raise failure
        if info.is_rate_limit and info.is_retryable:
            await pause_after_rate_limit(info, config, run.admission, None)
        else:
            await asyncio.sleep(delay)
            attempt += 1


@task(
    name="prepare-strategy",
    task_run_name="prepare-{label}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=0,
)
async def prepare_strategy(label: str, strategy: LLMCallStrategy[Any], run: BatchRun) -> None:
    """Call ``strategy.prepare()`` once for this flow run (e.g. find or create a context cache), retried
    like an item (:func:`call_lifecycle_hook`). Runs in the flow's process (``run`` is its state)."""
    run.prepared.add(id(strategy))
    await call_lifecycle_hook(run, label, strategy, "prepare")


@task(
    name="cleanup-strategy",
    task_run_name="cleanup-{label}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=0,
)
async def cleanup_strategy(label: str, strategy: LLMCallStrategy[Any], run: BatchRun) -> None:
    """Call ``strategy.cleanup()`` once, after every item finished (caches are kept for later runs),
    retried like an item (:func:`call_lifecycle_hook`). Runs in the flow's process."""
    run.cleaned.add(id(strategy))
    await call_lifecycle_hook(run, label, strategy, "cleanup")


async def _retry_if_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only what the classifier called retryable.

    Async on purpose: inside an async task a sync condition gets an un-awaited coroutine from
    ``state.result()`` and never sees the exception. When the provider named a delay longer than the
    planned back-off, wait out the difference here.
    """
    exc = await state.aresult(raise_on_failure=False)
    if not isinstance(exc, AttemptFailed) or not exc.retryable:
        return False
    retry_after = exc.retry_after
    if retry_after:
        delays = task.retry_delay_seconds
        done = max(0, int(getattr(task_run, "run_count", 1)) - 1)
        if isinstance(delays, list | tuple) and delays:
            planned = float(delays[min(done, len(delays) - 1)])
        else:
            planned = float(delays or 0)
        planned *= 1.0 - float(task.retry_jitter_factor or 0.0)
        if retry_after > planned:
            await asyncio.sleep(retry_after - planned)
    return True


def _attempt_number() -> int:
    ctx = TaskRunContext.get()
    run_count = getattr(getattr(ctx, "task_run", None), "run_count", None)
    return int(run_count) if run_count else 1


def _record_task_run(ledger: ItemLedger) -> None:
    """Remember which task run executes this attempt (the item's own, or its chunk's) for artifact links."""
    task_run = getattr(TaskRunContext.get(), "task_run", None)
    if task_run is not None:
        ledger.task_run_id = str(task_run.id)
        ledger.task_run_name = task_run.name


async def attempt_item(item: LLMWorkItem[Any, Any], run: BatchRun, attempt: int) -> WorkItemResult[Any, Any]:
    """Logical attempt ``attempt`` of one item, in either execution mode.

    Returns the successful :class:`WorkItemResult` (without ``context``, which is re-attached in the flow,
    so user context is never persisted); raises a quiet :class:`AttemptFailed` otherwise.
    """
    item_id = item.item_id
    ledger = run.ledger(item_id)
    _record_task_run(ledger)
    prepare_error = prepare_error_of(run, item.strategy)
    if prepare_error is not None:  # not attempted (attempts stay 0): fails with prepare's real category
        ledger.finished_at = time.monotonic()
        info = ErrorInfo(prepare_error.info.category, False, reason=prepare_error.info.reason)
        failure = AttemptFailed(item_id, attempt, info, f"strategy {prepare_error.message}")
        ledger.last_error = failure
        raise failure

    async def on_rate_limit(info: ErrorInfo) -> None:
        await run.events.emit(
            ProcessingEvent.RATE_LIMIT_HIT,
            {"item_id": item_id, "attempt": attempt, "retry_after": info.retry_after, "error": info.reason},
        )

    try:
        success = await run_attempt(
            item.strategy,
            item.prompt,
            attempt,
            ledger,
            config=run.config,
            admission=run.admission,
            classifier=run.classifier,
            on_rate_limit=on_rate_limit,
            stop=run.stop,
        )
    except AttemptFailed as failure:
        if failure.retryable and attempt < run.config.retry.max_attempts:
            await run.events.emit(
                ProcessingEvent.ITEM_RETRYING,
                {"item_id": item_id, "attempt": attempt, "error": str(failure), "category": failure.category},
            )
        else:
            ledger.finished_at = time.monotonic()
        # Quiet failures: the UI and logs get our one-line classified reason, not the provider traceback.
        raise failure.with_traceback(None) from None
    ledger.finished_at = time.monotonic()
    return WorkItemResult(
        item_id=item_id,
        success=True,
        output=success.output,
        token_usage=ledger.token_usage,
        gemini_safety_ratings=ledger.safety_ratings or success.safety_ratings,
        attempts=ledger.attempts,
        duration_s=ledger.duration_s,
        model=item.strategy.model_name,
        metadata=dict(success.metadata),
    )


@task(
    name="process-item",
    task_run_name="{item_id}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=_retry_if_retryable,
)
async def process_item(item_id: str, item: LLMWorkItem[Any, Any], run: BatchRun) -> WorkItemResult[Any, Any]:
    """One attempt of one item (Prefect retries re-enter here with the next attempt number). Per-item mode
    runs in the flow's process; ``run`` is its state."""
    return await attempt_item(item, run, _attempt_number())


# --------------------------------------------------------------------------------------------------
# Chunked execution: one task run per chunk, items inside it retried and persisted here


def chunk_failure_message(results: list[WorkItemResult[Any, Any]]) -> str | None:
    """The Failed message of a chunk's task run (counts by category, first ids); None if all succeeded."""
    failed = [r for r in results if not r.success]
    if not failed:
        return None
    categories = collections.Counter(r.error_category or "unknown" for r in failed)
    counts = ", ".join(f"{k}={v}" for k, v in sorted(categories.items()))
    shown = ", ".join(r.item_id for r in failed[:10]) + (", ..." if len(failed) > 10 else "")
    return f"{len(failed)} of {len(results)} items failed ({counts}): {shown}"


class ChunkResults(list):  # type: ignore[type-arg]
    """A chunk's results. Its repr is a count: Prefect logs a Failed chunk's state, which must never print
    item outputs (or a million of them)."""

    def __repr__(self) -> str:
        return f"<{len(self)} item results>"


@task(name="process-chunk", task_run_name="{label}", cache_policy=NO_CACHE, persist_result=False, retries=0)
async def process_chunk(label: str, execution: BatchExecution, source: ChunkSource) -> Any:
    """Run one chunk's items concurrently, each with its own retries; return their results (input order).

    Self-contained: ``execution`` and ``source`` are all it needs, so it runs in the flow's process or,
    pickled, on a Dask / Ray worker. Never retried as a whole (``retries=0`` whatever the defaults): items
    retry individually inside. Any failed item makes the task run end Failed, still carrying every result.
    """
    results = ChunkResults(await execution.run_chunk(source))
    message = chunk_failure_message(results)
    # In the flow's process every result already reached the driver; returning them would keep them alive
    # (Prefect links a task's return value to its state for the whole flow run): O(rows) for a table run.
    value: Any = len(results) if execution.reports_live else results
    if message is None:
        return value
    return Failed(message=message, data=value)


def retry_delay(config: ProcessorConfig, attempt: int, retry_after: float | None) -> float:
    """Back-off after failed attempt ``attempt``: ``RetryConfig``'s delay (+-50 % jitter), at least the
    provider's ``retry_after``."""
    delays = config.retry.delays() or [0.0]
    delay = delays[min(attempt - 1, len(delays) - 1)]
    if config.retry.jitter:
        delay *= random.uniform(1.0 - _JITTER_FACTOR, 1.0 + _JITTER_FACTOR)
    return max(delay, retry_after or 0.0)


async def attempt_with_retries(item: LLMWorkItem[Any, Any], run: BatchRun) -> WorkItemResult[Any, Any]:
    """Attempts 1..max_attempts of one item in this task run, retrying what the classifier allows."""
    attempt = 1
    while True:
        try:
            return await attempt_item(item, run, attempt)
        except AttemptFailed as failure:
            if not failure.retryable or attempt >= run.config.retry.max_attempts:
                # The chunk's run log gets one line per failed item (per-item mode has a Failed task run).
                get_run_logger().warning("%s failed after %d attempt(s): %s", item.item_id, attempt, failure)
                raise
            delay = retry_delay(run.config, attempt, failure.retry_after)
            get_run_logger().info(
                "%s: attempt %d failed (%s); retrying in %.1f s", item.item_id, attempt, failure, delay
            )
            await asyncio.sleep(delay)
            attempt += 1


def configured_item_task(config: ProcessorConfig) -> Any:
    """``process_item`` with this config's retries, back-off and jitter.

    Results are not persisted per task run: the flow looks them up in, and writes them to, the batch's
    :class:`~prefect_batchllm.prefect.result_log.ResultLog` (the same store chunked mode uses).
    """
    retries = config.retry.max_attempts - 1
    delays = config.retry.delays()[:_MAX_DELAYS]
    return process_item.with_options(
        retries=retries,
        retry_delay_seconds=delays if retries and any(delays) else 0,
        retry_jitter_factor=_JITTER_FACTOR if config.retry.jitter and retries else None,
    )


@task(
    name="summarize-batch",
    task_run_name="summarize-{artifact_prefix}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def summarize_batch(
    results: list[WorkItemResult[Any, Any]],
    wall_time_s: float,
    artifact_prefix: str,
    batch_jobs: list[dict[str, Any]] | None = None,
) -> BatchResult[Any, Any]:
    """Reduce: build the :class:`BatchResult` from in-process results and publish its artifacts."""
    batch: BatchResult[Any, Any] = BatchResult(
        results=list(results), wall_time_s=wall_time_s, batch_jobs=list(batch_jobs or [])
    )
    await publish_batch_artifacts(batch, artifact_prefix)
    return batch


def safe_reason(exc: BaseException) -> str:
    """One-line, secret-free description of an unexpected exception."""
    return redact(f"{type(exc).__name__}: {exc}")[:300]
