"""Gemini Batch API execution (``ProcessorConfig(execution="batch_api")``): the flow step and its tasks.

One :class:`BatchApiStep` per ``run_batch`` invocation, started after the strategies are prepared. It

1. replays items that have a persisted result (same key and store as online mode, so both modes replay
   each other's results);
2. builds every other item's request with the strategy's own online request builder, splits them into
   jobs (inline or an uploaded JSONL file; several jobs above the limits), and submits each job through the
   ``submit-batch-job`` task, whose result - the job name - is persisted under a key derived from the jobs'
   content (model, and each item's id, prompt and strategy fingerprint). A crashed, cancelled or retried
   flow run, or a fresh run over the same input, therefore re-attaches to the running or finished job
   instead of submitting (and paying for) a new one. A job found FAILED / CANCELLED / EXPIRED, or gone,
   is never re-attached: its items are submitted again;
3. polls the jobs on the event loop with capped exponential back-off (no thread held) until they end or
   ``batch_wait_timeout_s`` passes (then the items still in a job fail with ``batch_pending``: re-run to
   collect);
4. maps each answer back by request key, parses it with the strategy's online parser (blocked / invalid
   answers fail like online), persists successes, and fails unanswered items of a job that ended
   FAILED / CANCELLED / EXPIRED with ``batch_failed`` / ``batch_cancelled`` / ``batch_expired``;
5. follows up (``batch_followup``): items that failed for a retryable reason or because their job ended
   badly are re-run online (the normal per-item path) or as one new, smaller job.

The flow's per-item workers await :meth:`BatchApiStep.outcome`, so results, events, progress,
post-processors, middleware and the summary are those of online mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.utilities.annotations import quote

from prefect_batchllm.core.attempt import AttemptFailed, call_on_error, check_prompt
from prefect_batchllm.core.config import ProcessorConfig
from prefect_batchllm.core.errors import (
    DefaultErrorClassifier,
    ErrorCategory,
    ErrorClassifier,
    ErrorInfo,
    InvalidInputError,
    describe_error,
    token_usage_of,
)
from prefect_batchllm.core.items import LLMWorkItem, WorkItemResult
from prefect_batchllm.core.pricing import BATCH_BILLING
from prefect_batchllm.core.tokens import normalize_usage
from prefect_batchllm.models.gemini_batch import (
    DISPLAY_PREFIX,
    FAILED_STATES,
    JOB_STATE_CATEGORIES,
    PENDING_CATEGORY,
    BatchAnswer,
    BatchRequest,
    JobPlan,
    answer_error,
    find_job,
    get_job,
    plan_jobs,
    read_answers,
    state_name,
    submit_job,
    wait_for_job,
)
from prefect_batchllm.prefect.result_log import ResultLog, prefect_result_storage
from prefect_batchllm.prefect.tasks import BatchRun, item_cache_key, strategy_key

logger = logging.getLogger("prefect_batchllm")

__all__ = [
    "BatchApiStep",
    "BatchItemFailed",
    "BatchOutcome",
    "JobRecord",
    "check_batch_items",
    "submit_batch_job",
]

#: Bumped when job keys change meaning (old persisted job names are then not re-attached).
JOB_KEY_VERSION = "batchllm-job-v1"
#: Persisted-result reads / writes in flight at once (local files or object storage).
_IO_CONCURRENCY = 32
_T = TypeVar("_T")
#: Persisted job names are re-attached for this long (Gemini keeps jobs and results at least 48 h).
JOB_NAME_TTL = timedelta(days=7)


def check_batch_items(items: Sequence[LLMWorkItem[Any, Any]]) -> None:
    """Fail early (before any flow or job) when an item's strategy cannot run as a Gemini batch request.

    A strategy that can has ``check_batch()``, ``batch_client()``, ``batch_model``, ``batch_request(prompt)``
    and ``parse_batch_response(response)`` (``GeminiStrategy``; ``PydanticAIStrategy`` for agents on a
    Gemini ``GoogleModel`` without tools); ``check_batch()`` raises a ``TypeError`` naming the fix.
    """
    seen: set[int] = set()
    for item in items:
        strategy = item.strategy
        if id(strategy) in seen:
            continue
        seen.add(id(strategy))
        name = type(strategy).__name__
        check = getattr(strategy, "check_batch", None)
        if not callable(check) or not all(
            callable(getattr(strategy, attr, None))
            for attr in ("batch_client", "batch_request", "parse_batch_response")
        ):
            raise TypeError(
                f"LLMWorkItem {item.item_id!r}: {name} cannot run with execution='batch_api' (Gemini batch "
                "jobs need a strategy that builds Gemini requests and parses Gemini answers). Use "
                "GeminiStrategy(GeminiModel(...) or GeminiCachedModel(...)) or PydanticAIStrategy(agent "
                "on a GoogleModel) for batch mode, or execution='online' for this strategy"
            )
        try:
            check()
        except TypeError as exc:
            raise TypeError(f"LLMWorkItem {item.item_id!r}: {exc}") from None


class BatchItemFailed(AttemptFailed):
    """An item a batch job did not answer successfully; ``category`` may be a batch-only category
    (``batch_expired``, ``batch_cancelled``, ``batch_failed``, ``batch_no_answer``, ``batch_pending``)."""

    def __init__(self, item_id: str, info: ErrorInfo, message: str, category: str | None = None) -> None:
        super().__init__(item_id, 1, info, message)
        self._category = category

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.item_id, self.info, self.message, self._category))

    @property
    def category(self) -> str:
        return self._category or self.info.category.value


@dataclass
class BatchOutcome:
    """What the batch step decided for one item: its result (or failure) and whether it was replayed."""

    value: WorkItemResult[Any, Any] | AttemptFailed
    replayed: bool = False
    #: Added to a failed item's result metadata: ``billing="batch"`` and the job, when a job answered it.
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobRecord:
    """One batch job of this run, for logs, the summary artifact and ``BatchResult.batch_jobs``."""

    key: str
    model: str
    mode: str
    requests: int
    generation: int = 1
    name: str | None = None
    state: str = "NOT_SUBMITTED"
    reattached: bool = False
    succeeded: int = 0
    failed: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "mode": self.mode,
            "model": self.model,
            "requests": self.requests,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "reattached": self.reattached,
            "generation": self.generation,
            "error": self.error,
        }


@dataclass
class _Job:
    record: JobRecord
    plan: JobPlan
    strategy: Any
    items: list[LLMWorkItem[Any, Any]]
    client: Any = None
    config: ProcessorConfig = field(default_factory=ProcessorConfig)
    classifier: ErrorClassifier = field(default_factory=DefaultErrorClassifier)
    submitted_at: float = field(default_factory=time.monotonic)


def _job_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return str(parameters["job_key"])


@task(
    name="submit-batch-job",
    task_run_name="submit-{label}",
    cache_key_fn=_job_cache_key,
    persist_result=True,
    cache_expiration=JOB_NAME_TTL,
    retries=0,
)
async def submit_batch_job(label: str, job_key: str, job: _Job, adopt: bool = True) -> str:
    """Submit one Gemini batch job (or, with ``adopt``, adopt the one a crashed earlier submission created);
    returns its name. Persisted under ``job_key`` (derived from the requests' content), so later runs
    re-attach. ``job`` is passed quoted (by reference: the flow's process submits every job)."""
    display = f"{DISPLAY_PREFIX}{job_key[:40]}"
    found = None
    try:
        if adopt:
            found = await find_job(job.client, display)
    except Exception as exc:  # listing is a safety net for a crash between create and persist
        logger.debug("could not list batch jobs (%s); submitting", describe_error(exc))
    if found is not None and found.name:
        get_run_logger().info("adopting batch job %s (%s) submitted earlier", found.name, state_name(found))
        job.record.reattached = True
        return found.name
    created = await _create_with_retries(job, display)
    if not created.name:
        raise RuntimeError("Gemini returned a batch job without a name")
    get_run_logger().info(
        "submitted batch job %s: %d %s request(s) for %s",
        created.name,
        job.record.requests,
        job.plan.mode,
        job.record.model,
    )
    return created.name


async def _create_with_retries(job: _Job, display: str) -> Any:
    """``submit_job``, retried while the classifier says so: a 429 (batch quota: too many active jobs or
    enqueued tokens) up to ``max_rate_limit_retries`` times, transient errors up to ``max_attempts``; the
    wait grows like the poll back-off (at least the server's delay). A retry first looks for a job the
    failed attempt may still have created, so a lost answer never becomes a second job."""
    config = job.config
    delay = config.batch_poll_interval_s
    rate_limited = attempts = 0
    while True:
        attempts += 1
        try:
            return await submit_job(job.client, job.record.model, job.plan, display)
        except Exception as exc:
            info = job.classifier.classify(exc)
            if info.is_rate_limit:
                rate_limited += 1
                attempts -= 1
            budget_left = (
                rate_limited <= config.retry.max_rate_limit_retries
                if info.is_rate_limit
                else attempts < config.retry.max_attempts
            )
            if not info.is_retryable or not budget_left:
                raise
            wait = max(delay, info.retry_after or 0.0)
            get_run_logger().info("creating batch job failed (%s); retrying in %.1f s", info.reason, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 1.5, config.batch_poll_max_interval_s)
            if not info.is_rate_limit:
                try:
                    found = await find_job(job.client, display)
                except Exception:  # listing is only a safety net
                    found = None
                if found is not None:
                    return found


class BatchApiStep:
    """Runs a batch's items as Gemini batch jobs; the flow's workers await :meth:`outcome` per item."""

    def __init__(
        self, run: BatchRun, items: Sequence[LLMWorkItem[Any, Any]], store: ResultLog | None
    ) -> None:
        self.run = run
        self.config = run.config
        self.items = list(items)
        self.store = store
        self.jobs: list[JobRecord] = []
        self._futures: dict[str, asyncio.Future[BatchOutcome | None]] = {
            item.item_id: asyncio.get_running_loop().create_future() for item in self.items
        }
        self._by_id = {item.item_id: item for item in self.items}

    # -- what the flow's workers call ---------------------------------------------------------------

    async def outcome(self, item: LLMWorkItem[Any, Any]) -> BatchOutcome | None:
        """This item's outcome; ``None``: run it online (a follow-up, or an item changed by middleware)."""
        future = self._futures.get(item.item_id)
        if future is None:
            return None
        outcome = await asyncio.shield(future)
        original = self._by_id.get(item.item_id)
        if original is not None and item is not original and item_cache_key(item) != item_cache_key(original):
            return None  # middleware changed the request after the job was built: run the new one online
        return outcome

    def job_summaries(self) -> list[dict[str, Any]]:
        return [record.as_dict() for record in self.jobs]

    # -- the step -----------------------------------------------------------------------------------

    async def run_step(self) -> None:
        """Submit / re-attach, wait, collect, follow up. Never raises: unexpected errors fail the items
        still open (classified), so the batch still returns one result per item."""
        try:
            await self._run()
        except BaseException as exc:
            reason = describe_error(exc) if isinstance(exc, Exception) else type(exc).__name__
            logger.warning("batch step failed: %s", reason)
            info = self.run.classifier.classify(exc) if isinstance(exc, Exception) else None
            for item in self.items:
                await self._resolve_failure(
                    item,
                    info or ErrorInfo(ErrorCategory.CANCELLED, False, reason="cancelled"),
                    f"batch step failed: {reason}",
                )
            if not isinstance(exc, Exception):
                raise

    async def _run(self) -> None:
        pending = await self._replay()
        if not pending:
            return
        failed = await self._submit_and_collect(pending, generation=1)
        followup = self.config.batch_followup
        retry = [(i, o) for i, o in failed if followup and self._follow_up_worthy(o)]
        final = [(i, o) for i, o in failed if not (followup and self._follow_up_worthy(o))]
        if retry and followup == "batch":
            get_run_logger().info("follow-up: %d failed item(s) go into a new batch job", len(retry))
            final += await self._submit_and_collect([i for i, _ in retry], generation=2)
        elif retry:
            get_run_logger().info("follow-up: %d failed item(s) run online", len(retry))
            for item, _ in retry:
                await self._resolve(item, None)
        for item, outcome in final:
            await self._resolve(item, outcome)

    def _follow_up_worthy(self, outcome: BatchOutcome) -> bool:
        """Re-run items whose job ended badly or whose failure the classifier calls retryable; never items
        still in a running job (that would pay twice) nor blocked / fatal ones."""
        failure = outcome.value
        if not isinstance(failure, AttemptFailed) or failure.category == PENDING_CATEGORY:
            return False
        if isinstance(failure, BatchItemFailed) and failure.category in JOB_STATE_CATEGORIES.values():
            return True
        return failure.retryable

    async def _replay(self) -> list[LLMWorkItem[Any, Any]]:
        """Resolve items with a persisted result or a failed ``prepare()``; return the rest (in order)."""

        async def replayed(item: LLMWorkItem[Any, Any]) -> bool:
            if strategy_key(item.strategy) in self.run.prepare_errors:
                await self._resolve(item, None)  # the online path reports the prepare failure
                return True
            if self.store is not None and not self.config.refresh_cache:
                key = item_cache_key(item)
                persisted = (await self.store.lookup([key])).get(key)
                if persisted is not None:
                    await self._resolve(item, BatchOutcome(persisted, replayed=True))
                    return True
            return False

        done = await _bounded(replayed(item) for item in self.items)
        return [item for item, was_replayed in zip(self.items, done, strict=True) if not was_replayed]

    async def _submit_and_collect(
        self, items: list[LLMWorkItem[Any, Any]], generation: int
    ) -> list[tuple[LLMWorkItem[Any, Any], BatchOutcome]]:
        """Run ``items`` as jobs of this generation; resolve successes; return the failures (unresolved)."""
        jobs, failures = await self._plan(items, generation)
        deadline = None
        if self.config.batch_wait_timeout_s is not None:
            deadline = time.monotonic() + self.config.batch_wait_timeout_s

        async def submit_and_wait(job: _Job) -> dict[str, BatchOutcome]:
            try:
                await self._submit(job)
                return await self._collect(job, deadline)
            except Exception as exc:  # e.g. the answers could not be downloaded: this job's items only
                reason = f"batch job {job.record.name or '(not submitted)'}: {describe_error(exc)}"
                logger.warning("%s", reason)
                job.record.error = reason
                return {item.item_id: self._failure(item, exc, message=reason) for item in job.items}

        # Each job is submitted and polled on its own, so a job waiting for quota (429 at create while
        # earlier jobs hold the enqueued-token budget) does not hold up collecting the others.
        outcomes = await asyncio.gather(*(submit_and_wait(job) for job in jobs))
        successes = []
        for job, by_id in zip(jobs, outcomes, strict=True):
            for item in job.items:
                outcome = by_id[item.item_id]
                if isinstance(outcome.value, WorkItemResult):
                    successes.append((item, outcome))
                else:
                    failures.append((item, outcome))
        await _bounded(self._resolve(item, outcome) for item, outcome in successes)  # persists each
        return failures

    async def _plan(
        self, items: list[LLMWorkItem[Any, Any]], generation: int
    ) -> tuple[list[_Job], list[tuple[LLMWorkItem[Any, Any], BatchOutcome]]]:
        """Group items by strategy, build each request with the strategy, split into jobs; also returns
        the items whose request could not be built (failed, classified)."""
        unplanned: list[tuple[LLMWorkItem[Any, Any], BatchOutcome]] = []
        groups: dict[int, list[LLMWorkItem[Any, Any]]] = {}
        for item in items:
            groups.setdefault(id(item.strategy), []).append(item)
        jobs: list[_Job] = []
        for group in groups.values():
            strategy = group[0].strategy
            model_name = strategy.batch_model  # type: ignore[attr-defined]
            client = strategy.batch_client()  # type: ignore[attr-defined]
            requests: list[BatchRequest] = []
            planned: list[LLMWorkItem[Any, Any]] = []
            for item in group:
                try:  # malformed or over-long prompts fail invalid_input, never sent (as online)
                    check_prompt(strategy, item.prompt)
                except InvalidInputError as exc:
                    unplanned.append((item, self._failure(item, exc, attempted=False)))
                    continue
                try:
                    contents, request_config = await strategy.batch_request(item.prompt)  # type: ignore[attr-defined]
                except Exception as exc:
                    unplanned.append((item, self._failure(item, exc)))
                    continue
                requests.append(BatchRequest(item.item_id, contents, request_config))
                planned.append(item)
            by_id = {item.item_id: item for item in planned}
            plans = plan_jobs(
                client,
                requests,
                inline_max_bytes=self.config.batch_inline_max_bytes,
                max_requests_per_job=self.config.batch_max_requests_per_job,
            )
            for plan in plans:
                plan_items = [by_id[key] for key in plan.keys]
                key = _job_key(model_name, generation, plan, plan_items)
                record = JobRecord(key, model_name, plan.mode, len(plan.requests), generation)
                jobs.append(
                    _Job(record, plan, strategy, plan_items, client, self.config, self.run.classifier)
                )
                self.jobs.append(record)
        return jobs, unplanned

    async def _submit(self, job: _Job, *, refresh: bool = False) -> None:
        """Submit (or re-attach to) ``job``; on a re-attached job that ended badly or is gone, submit anew."""
        options: dict[str, Any] = {"refresh_cache": refresh or self.config.refresh_cache}
        persist = self.config.persist_results
        if not persist:
            options.update(cache_policy=NO_CACHE, persist_result=False)
        elif self.config.result_storage is not None:
            options["result_storage"] = await prefect_result_storage(self.config.result_storage)
        label = f"g{job.record.generation}-{job.record.key[:12]}-{len(job.items)}-items"
        state = await submit_batch_job.with_options(**options)(
            label=label,
            job_key=job.record.key,
            job=quote(job),
            adopt=not self.config.refresh_cache,  # refresh_cache: every item is requested anew
            return_state=True,
        )
        if not state.is_completed():
            exc = await state.aresult(raise_on_failure=False)
            job.record.state = "SUBMIT_FAILED"
            job.record.error = describe_error(exc) if isinstance(exc, BaseException) else str(state.message)
            job.record.name = None
            return
        job.record.name = await state.aresult()
        job.submitted_at = time.monotonic()
        if state.name == "Cached":
            job.record.reattached = True
            if not refresh and await self._unusable(job):
                get_run_logger().info(
                    "batch job %s ended %s; submitting its %d item(s) again",
                    job.record.name,
                    job.record.state,
                    len(job.items),
                )
                job.record.reattached = False
                await self._submit(job, refresh=True)
                return
            get_run_logger().info("re-attached to batch job %s (%s)", job.record.name, job.record.state)

    async def _unusable(self, job: _Job) -> bool:
        """A persisted job that ended FAILED / CANCELLED / EXPIRED, or that the API no longer knows."""
        try:
            current = await get_job(job.client, job.record.name or "")
        except Exception as exc:
            info = self.run.classifier.classify(exc)
            if info.category is ErrorCategory.FATAL:  # 404 / 403: gone
                job.record.state = "GONE"
                return True
            raise
        job.record.state = state_name(current)
        return job.record.state in FAILED_STATES

    async def _collect(self, job: _Job, deadline: float | None) -> dict[str, BatchOutcome]:
        record = job.record
        if record.name is None:  # submission failed: every item fails with the classified reason
            reason = record.error or "batch job was not submitted"
            exc = RuntimeError(reason)
            return {
                item.item_id: self._failure(item, exc, message=f"batch job not submitted: {reason}")
                for item in job.items
            }
        log = get_run_logger()

        async def on_poll(current: Any) -> None:
            state = state_name(current)
            if state != record.state:
                log.info("batch job %s: %s", record.name, state)
                record.state = state

        cfg = self.config
        errors = 0

        async def on_error(exc: Exception) -> bool:
            """Keep polling through retryable errors (at most ``max_rate_limit_retries`` in a row)."""
            nonlocal errors
            info = self.run.classifier.classify(exc)
            errors += 1
            if not info.is_retryable or errors > cfg.retry.max_rate_limit_retries:
                return False
            log.info("polling batch job %s failed (%s); polling again", record.name, info.reason)
            return True

        async def on_poll_ok(current: Any) -> None:
            nonlocal errors
            errors = 0
            await on_poll(current)

        final = await wait_for_job(
            job.client,
            record.name,
            interval_s=cfg.batch_poll_interval_s,
            max_interval_s=cfg.batch_poll_max_interval_s,
            deadline=deadline,
            on_poll=on_poll_ok,
            on_error=on_error,
        )
        record.state = state_name(final)
        answers: dict[str, BatchAnswer] = {}
        if record.state in JOB_STATE_CATEGORIES:
            try:
                answers = await read_answers(job.client, final, job.plan.keys)
            except Exception as exc:
                if record.state not in FAILED_STATES:
                    raise
                log.warning("batch job %s (%s): no answers readable: %s", record.name, record.state, exc)
        error = getattr(final, "error", None)
        job_error = getattr(error, "message", None)
        outcomes: dict[str, BatchOutcome] = {}
        duration = time.monotonic() - job.submitted_at
        for item in job.items:
            answer = answers.get(item.item_id)
            if answer is not None:
                outcomes[item.item_id] = await self._from_answer(job, item, answer, duration)
            elif record.state == "JOB_STATE_UNSPECIFIED" or record.state not in JOB_STATE_CATEGORIES:
                message = (
                    f"batch job {record.name} is still {record.state} (stopped waiting after "
                    f"batch_wait_timeout_s={cfg.batch_wait_timeout_s}s); re-run the same input to collect it"
                )
                info = ErrorInfo(ErrorCategory.UNKNOWN, False, reason=message)
                outcomes[item.item_id] = BatchOutcome(
                    BatchItemFailed(item.item_id, info, message, PENDING_CATEGORY),
                    metadata={"batch_job": record.name},
                )
            else:
                category = JOB_STATE_CATEGORIES[record.state]
                message = f"batch job {record.name} ended {record.state} without answering this item"
                if job_error:
                    message += f": {job_error}"
                info = ErrorInfo(ErrorCategory.UNKNOWN, False, reason=message)
                outcomes[item.item_id] = BatchOutcome(
                    BatchItemFailed(item.item_id, info, message, category),
                    metadata={"batch_job": record.name},
                )
        record.succeeded = sum(1 for o in outcomes.values() if isinstance(o.value, WorkItemResult))
        record.failed = len(outcomes) - record.succeeded
        if record.state not in JOB_STATE_CATEGORIES:
            log.warning(
                "batch job %s is still %s: %d item(s) fail with %s; re-run the same input (or let the "
                "deployment's schedule re-run it) to re-attach and collect it",
                record.name,
                record.state,
                len(job.items),
                PENDING_CATEGORY,
            )
        return outcomes

    async def _from_answer(
        self, job: _Job, item: LLMWorkItem[Any, Any], answer: BatchAnswer, duration: float
    ) -> BatchOutcome:
        ledger = self.run.ledger(item.item_id)
        ledger.attempts = max(ledger.attempts, 1)
        billed = {"billing": BATCH_BILLING, "batch_job": job.record.name}
        if answer.error is not None or answer.response is None:
            exc: Exception = answer_error(answer.error or {"code": 13, "message": "no response"})
            return self._failure(item, exc, metadata=billed)
        try:
            output, usage, metadata = job.strategy.parse_batch_response(answer.response)
        except Exception as exc:  # blocked, empty or invalid answers: billed at batch prices
            # As after an online attempt: the strategy may note a correction for the follow-up attempt.
            await call_on_error(job.strategy, exc, 1, ledger.state)
            return self._failure(item, exc, metadata=billed)
        ledger.token_usage = normalize_usage(usage)
        ratings = metadata.get("safety_ratings") if isinstance(metadata.get("safety_ratings"), dict) else None
        result: WorkItemResult[Any, Any] = WorkItemResult(
            item_id=item.item_id,
            success=True,
            output=output,
            token_usage=normalize_usage(usage),
            gemini_safety_ratings=ratings or None,
            attempts=1,
            duration_s=duration,
            model=item.strategy.model_name,
            metadata={**metadata, **billed},
        )
        return BatchOutcome(result)

    def _failure(
        self,
        item: LLMWorkItem[Any, Any],
        exc: BaseException,
        message: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        attempted: bool = True,
    ) -> BatchOutcome:
        """A classified failure, with the tokens the failed answer was billed (e.g. a blocked answer);
        ``attempted=False``: the item was never sent (attempts stay 0)."""
        ledger = self.run.ledger(item.item_id)
        if attempted:
            ledger.attempts = max(ledger.attempts, 1)
        billed = token_usage_of(exc)
        if billed:
            ledger.token_usage = normalize_usage(billed)
        safety = getattr(exc, "safety_ratings", None)
        if isinstance(safety, dict) and safety:
            ledger.safety_ratings = dict(safety)
        info = self.run.classifier.classify(exc)
        ledger.last_exception = exc
        failure = AttemptFailed(item.item_id, 1, info, message or describe_error(exc))
        ledger.last_error = failure
        return BatchOutcome(failure, metadata=dict(metadata or {}))

    # -- resolving items -----------------------------------------------------------------------------

    async def _resolve_failure(self, item: LLMWorkItem[Any, Any], info: ErrorInfo, message: str) -> None:
        await self._resolve(item, BatchOutcome(AttemptFailed(item.item_id, 1, info, message)))

    async def _resolve(self, item: LLMWorkItem[Any, Any], outcome: BatchOutcome | None) -> None:
        """Hand the item its outcome (``None``: run online); a fresh success is persisted first."""
        future = self._futures[item.item_id]
        if future.done():
            return
        if outcome is not None and isinstance(outcome.value, WorkItemResult) and not outcome.replayed:
            await self._persist(item, outcome)
        if not future.done():
            future.set_result(outcome)

    async def _persist(self, item: LLMWorkItem[Any, Any], outcome: BatchOutcome) -> None:
        """Write a collected success under the item's key (the store online mode uses), before it is final."""
        if self.store is None:
            return
        try:
            await self.store.add(item_cache_key(item), outcome.value)
        except Exception as exc:  # the answer is still returned; only its replay is lost
            logger.warning("could not persist the batch result of %s: %s", item.item_id, describe_error(exc))


async def _bounded(coros: Iterable[Awaitable[_T]], limit: int = _IO_CONCURRENCY) -> list[_T]:
    """Await ``coros`` with at most ``limit`` running at once (result-store reads and writes); in order."""
    semaphore = asyncio.Semaphore(limit)

    async def gated(coro: Awaitable[_T]) -> _T:
        async with semaphore:
            return await coro

    return list(await asyncio.gather(*(gated(c) for c in coros)))


def _job_key(model: str, generation: int, plan: JobPlan, items: list[LLMWorkItem[Any, Any]]) -> str:
    """Content key of one job: model, generation, mode and each item's result key (id, prompt, strategy)."""
    digest = hashlib.sha256()
    for part in (JOB_KEY_VERSION, model, str(generation), plan.mode):
        digest.update(part.encode() + b"\0")
    for item in items:
        digest.update(item_cache_key(item).encode() + b"\0")
    return digest.hexdigest()
