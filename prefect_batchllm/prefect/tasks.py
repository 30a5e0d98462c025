"""The Prefect tasks of a batch run: prepare, process one item, summarize (reduce), cleanup.

``process_item`` is one task run per item, named after the ``item_id``. Each Prefect run of it is one
logical attempt (attempt number = Prefect's ``run_count``); retries are Prefect's, built from
``RetryConfig`` and gated by an async ``retry_condition_fn`` that asks the error classifier. What must
survive those retries (the item's ``RetryState``, billed tokens, counters) lives in an in-memory
:class:`BatchRun` registry keyed by a per-flow-invocation id, never in task parameters.

Chunked mode (``ProcessorConfig.chunk_size``): ``process_chunk`` is one task run per chunk of items; each
item inside it goes through :func:`run_item_inline`, the same attempt (:func:`attempt_item`), retry policy
and persisted-result key and store as ``process_item``, so the two modes replay each other's results.

Successful item results are persisted under a key built from (item_id, sha256 of the prompt, strategy
fingerprint) and *not* the flow-run id, so a retried or repeated run loads completed items instead of
paying for them again; failed runs write no cache entry.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.results import ResultStore, get_result_store

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

__all__ = [
    "BatchRun",
    "ItemCachePolicy",
    "ChunkItemsFailed",
    "attempt_item",
    "chunk_result_store",
    "cleanup_strategy",
    "configured_item_task",
    "get_run",
    "item_cache_key",
    "prepare_strategy",
    "process_chunk",
    "process_item",
    "run_item_inline",
    "summarize_batch",
]

#: Bumped when the persisted WorkItemResult shape changes, so old cache entries are not loaded.
CACHE_VERSION = "batchllm-item-v1"
#: Prefect accepts at most 50 explicit retry delays; a shorter list repeats its last value.
_MAX_DELAYS = 50
_JITTER_FACTOR = 0.5  # delays vary by +-50 %, like the seed's 50-100 % jitter


# --------------------------------------------------------------------------------------------------
# Per-flow-run registry


@dataclass
class BatchRun:
    """In-memory state of one batch flow invocation, shared by its tasks and its retries."""

    config: ProcessorConfig
    admission: Admission
    classifier: ErrorClassifier
    events: EventDispatcher
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    ledgers: dict[str, ItemLedger] = field(default_factory=dict)
    #: id(strategy) -> the final, quiet failure of its ``prepare()`` (after retries); its items fail with it.
    prepare_errors: dict[int, AttemptFailed] = field(default_factory=dict)
    #: The batch-level stop (systematic errors, cost budget), checked before every attempt is admitted.
    stop: BatchStop = field(default_factory=BatchStop)
    prepared: set[int] = field(default_factory=set)
    cleaned: set[int] = field(default_factory=set)
    #: Chunked mode: where item results are persisted (the store ``process_item`` would use), if at all.
    result_store: ResultStore | None = None
    #: Chunked mode: runs the flow's per-item pipeline for items ``[start, stop)``; returns the failures.
    run_items: Callable[[int, int], Awaitable[list[WorkItemResult[Any, Any]]]] | None = None

    def ledger(self, item_id: str) -> ItemLedger:
        ledger = self.ledgers.get(item_id)
        if ledger is None:
            ledger = self.ledgers[item_id] = ItemLedger(item_id)
        return ledger


_RUNS: dict[str, BatchRun] = {}


def open_run(run: BatchRun) -> BatchRun:
    """Register ``run`` so tasks given its key can find it."""
    _RUNS[run.key] = run
    return run


def close_run(key: str) -> None:
    _RUNS.pop(key, None)


def get_run(key: str) -> BatchRun:
    """The live :class:`BatchRun` for ``key`` (tasks of this module only run inside ``run_batch``)."""
    try:
        return _RUNS[key]
    except KeyError:
        raise RuntimeError(
            f"no active batch run {key!r}: prefect_batchllm item tasks run only inside run_batch / "
            "ParallelBatchProcessor, in the process that started the flow"
        ) from None


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


def item_cache_key(item: LLMWorkItem[Any, Any]) -> str:
    """Cache key of an item's result: (item_id, prompt sha256, strategy fingerprint, prompt template name and
    version when set), no run id: a new template version re-runs the item even if its prompt is unchanged."""
    parts = [CACHE_VERSION, item.item_id, prompt_sha256(item.prompt), item.strategy.fingerprint()]
    if item.template is not None:
        parts.append(f"template={item.template.name}@{item.template.version}")
    raw = "|".join(parts)
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass
class ItemCachePolicy(CachePolicy):
    """Prefect cache policy keyed by :func:`item_cache_key` (shared across flow runs)."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        item = inputs.get("item")
        return item_cache_key(item) if isinstance(item, LLMWorkItem) else None


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
async def prepare_strategy(label: str, strategy: LLMCallStrategy[Any], run_key: str) -> None:
    """Call ``strategy.prepare()`` once for this flow run (e.g. find or create a context cache), retried
    like an item (:func:`call_lifecycle_hook`)."""
    run = get_run(run_key)
    run.prepared.add(id(strategy))
    await call_lifecycle_hook(run, label, strategy, "prepare")


@task(
    name="cleanup-strategy",
    task_run_name="cleanup-{label}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=0,
)
async def cleanup_strategy(label: str, strategy: LLMCallStrategy[Any], run_key: str) -> None:
    """Call ``strategy.cleanup()`` once, after every item finished (caches are kept for later runs),
    retried like an item (:func:`call_lifecycle_hook`)."""
    run = get_run(run_key)
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
    prepare_error = run.prepare_errors.get(id(item.strategy))
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
async def process_item(item_id: str, item: LLMWorkItem[Any, Any], run_key: str) -> WorkItemResult[Any, Any]:
    """One attempt of one item (Prefect retries re-enter here with the next attempt number)."""
    return await attempt_item(item, get_run(run_key), _attempt_number())


# --------------------------------------------------------------------------------------------------
# Chunked execution: one task run per chunk, items inside it retried and persisted here


class ChunkItemsFailed(Exception):
    """A chunk's task run ends Failed when any of its items failed; the batch still returns every result."""


@task(name="process-chunk", task_run_name="{label}", cache_policy=NO_CACHE, persist_result=False, retries=0)
async def process_chunk(label: str, start: int, stop: int, run_key: str) -> int:
    """Run items ``[start, stop)`` of the batch concurrently (each still bounded by ``max_workers``).

    Never retried as a whole (``retries=0`` whatever the defaults): items retry individually inside.
    """
    run = get_run(run_key)
    if run.run_items is None:
        raise RuntimeError("process_chunk: this batch run is not in chunked mode")
    failed = await run.run_items(start, stop)
    if failed:
        categories = collections.Counter(r.error_category or "unknown" for r in failed)
        counts = ", ".join(f"{k}={v}" for k, v in sorted(categories.items()))
        shown = ", ".join(r.item_id for r in failed[:10]) + (", ..." if len(failed) > 10 else "")
        raise ChunkItemsFailed(f"{len(failed)} of {stop - start} items failed ({counts}): {shown}")
    return stop - start


async def chunk_result_store(item_task: Any) -> ResultStore | None:
    """The result store ``item_task`` (from :func:`configured_item_task`) persists to, if it persists at all:
    chunked mode writes there too, so both modes replay each other's results."""
    if not item_task.persist_result:
        return None
    return await get_result_store().aupdate_for_task(item_task)


async def _load_persisted(store: ResultStore, key: str) -> WorkItemResult[Any, Any] | None:
    """The persisted result under ``key`` if present, readable and unexpired (else ``None``, like Prefect)."""
    try:
        record = await store.aread(key)
    except Exception:  # missing or unreadable: execute the item again, as Prefect's cache lookup does
        return None
    expiration = record.metadata.expiration
    if expiration is not None and expiration <= datetime.now(UTC):
        return None
    value = record.result
    return value if isinstance(value, WorkItemResult) else None


def retry_delay(config: ProcessorConfig, attempt: int, retry_after: float | None) -> float:
    """Back-off after failed attempt ``attempt``: ``RetryConfig``'s delay (+-50 % jitter), at least the
    provider's ``retry_after``."""
    delays = config.retry.delays() or [0.0]
    delay = delays[min(attempt - 1, len(delays) - 1)]
    if config.retry.jitter:
        delay *= random.uniform(1.0 - _JITTER_FACTOR, 1.0 + _JITTER_FACTOR)
    return max(delay, retry_after or 0.0)


async def run_item_inline(
    item: LLMWorkItem[Any, Any], run: BatchRun
) -> tuple[WorkItemResult[Any, Any], bool]:
    """Chunked mode: every attempt of one item inside the chunk's task run; ``(result, replayed)``.

    Same retry policy as the per-item task (classifier-gated, ``RetryConfig`` back-off, at least the
    provider's delay) and the same persisted-result key, store and expiration. Raises the final
    :class:`AttemptFailed`.
    """
    store, config = run.result_store, run.config
    if store is not None:
        key = item_cache_key(item)
        if not config.refresh_cache and (persisted := await _load_persisted(store, key)) is not None:
            return persisted, True
    result = await _attempt_with_retries(item, run)
    if store is not None:
        expiration = None
        if config.cache_expiration_s is not None:
            expiration = datetime.now(UTC) + timedelta(seconds=config.cache_expiration_s)
        await store.awrite(obj=result, key=key, expiration=expiration)
    return result, False


async def _attempt_with_retries(item: LLMWorkItem[Any, Any], run: BatchRun) -> WorkItemResult[Any, Any]:
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
    """``process_item`` with this config's retries, back-off, jitter and result persistence.

    ``refresh_cache`` re-executes items that have a persisted result (and overwrites it);
    ``cache_expiration_s`` bounds how long a persisted result is replayed; ``result_storage`` (a saved
    storage block slug) replaces the default local storage, which only serves reruns on the same machine.
    """
    retries = config.retry.max_attempts - 1
    delays = config.retry.delays()[:_MAX_DELAYS]
    cache = config.persist_results and not config.dry_run
    options: dict[str, Any] = {}
    if cache:
        options["refresh_cache"] = config.refresh_cache
        if config.cache_expiration_s is not None:
            options["cache_expiration"] = timedelta(seconds=config.cache_expiration_s)
        if config.result_storage is not None:
            options["result_storage"] = config.result_storage
    return process_item.with_options(
        retries=retries,
        retry_delay_seconds=delays if retries and any(delays) else 0,
        retry_jitter_factor=_JITTER_FACTOR if config.retry.jitter and retries else None,
        cache_policy=ItemCachePolicy() if cache else NO_CACHE,
        persist_result=cache,
        **options,
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
