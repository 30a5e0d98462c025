"""Run one attempt of one item: admission, ``execute`` under the per-item timeout, token accounting,
``on_error`` and classification.

Prefect-free on purpose: the orchestration layer (per-item Prefect task, chunked mode, tests) calls
:func:`run_attempt` once per attempt and decides about retries from the :class:`AttemptFailed` it raises.
What must survive between attempts of one item (its ``RetryState``, billed tokens, counters) lives in an
:class:`ItemLedger` the caller keeps.

Rate limits are handled *inside* one attempt: a 429 is reported to the admission (so every worker sharing
the quota pauses), waited out (at least the provider's ``retry_after``), and the same attempt number is
tried again. They never consume ``RetryConfig.max_attempts``; ``max_rate_limit_retries`` caps them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prefect_batchllm.core.admission import Admission
from prefect_batchllm.core.config import ProcessorConfig
from prefect_batchllm.core.errors import (
    BlockedResponseError,
    ErrorCategory,
    ErrorClassifier,
    ErrorInfo,
    InvalidInputError,
    ItemTimeoutError,
    RateLimitRetriesExceeded,
    describe_error,
    redact,
    token_usage_of,
)
from prefect_batchllm.core.model_limits import input_token_limit
from prefect_batchllm.core.stop import BatchStop, BatchStopped
from prefect_batchllm.core.strategy import LLMCallStrategy, RetryState
from prefect_batchllm.core.tokens import TokenUsage, add_usage, normalize_usage

logger = logging.getLogger("prefect_batchllm")

#: Called when an attempt hit a provider rate limit (before the pause), e.g. to emit an observer event.
RateLimitHook = Callable[[ErrorInfo], Awaitable[None]]


@dataclass
class ItemLedger:
    """Everything about one item that must survive between its attempts (and its Prefect task retries)."""

    item_id: str
    state: RetryState = field(default_factory=RetryState)
    token_usage: TokenUsage = field(default_factory=lambda: normalize_usage(None))
    attempts: int = 0  # highest logical attempt number started (what the retry budget counts)
    executions: int = 0  # execute() calls, rate-limit repeats included
    rate_limit_retries: int = 0
    started_at: float | None = None  # time.monotonic() of the first attempt
    finished_at: float | None = None
    safety_ratings: dict[str, str] | None = None
    last_error: AttemptFailed | None = None
    #: The original exception of the last failed attempt (provider error, with its traceback and cause), for
    #: in-process hooks such as middleware ``on_error``; never persisted or sent to Prefect.
    last_exception: BaseException | None = None
    #: The orchestrator's run that executed the last attempt (a Prefect task run: the item's own, or its
    #: chunk's), so reports can link a failed item to where its attempts and logs are.
    task_run_id: str | None = None
    task_run_name: str | None = None

    @property
    def duration_s(self) -> float:
        """Seconds from the first attempt's start to the end (or now while running)."""
        if self.started_at is None:
            return 0.0
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return max(0.0, end - self.started_at)


@dataclass
class AttemptSuccess:
    """A successful attempt: output, the tokens of *this* attempt, and the strategy's metadata."""

    output: Any
    token_usage: TokenUsage
    metadata: dict[str, Any]
    safety_ratings: dict[str, str] | None = None


class AttemptFailed(Exception):
    """One attempt of an item failed. Its text is ``[category] reason``, which is what the UI shows.

    Carries only plain data (picklable, safe to persist as a Prefect result); the provider exception is
    the ``__cause__`` for in-process debugging.
    """

    def __init__(self, item_id: str, attempt: int, info: ErrorInfo, message: str) -> None:
        super().__init__(item_id, attempt, info, message)
        self.item_id = item_id
        self.attempt = attempt
        self.info = info
        self.message = message

    @property
    def category(self) -> str:
        return self.info.category.value

    @property
    def retryable(self) -> bool:
        return self.info.is_retryable

    @property
    def retry_after(self) -> float | None:
        return self.info.retry_after

    def __str__(self) -> str:
        return f"[{self.category}] {self.message}"


class _RateLimited(Exception):
    def __init__(self, info: ErrorInfo, error: Exception) -> None:
        super().__init__(info.reason)
        self.info = info
        self.error = error


def normalize_execute_result(raw: Any, strategy: object) -> tuple[Any, TokenUsage, dict[str, Any]]:
    """Accept ``(output, usage)`` or ``(output, usage, metadata)``; anything else is a strategy bug."""
    if isinstance(raw, tuple) and len(raw) in (2, 3):
        output, usage = raw[0], raw[1]
        metadata = raw[2] if len(raw) == 3 else None
        if usage is not None and not isinstance(usage, dict):
            raise TypeError(
                f"{type(strategy).__name__}.execute returned token usage of type {type(usage).__name__}; "
                "expected a dict like {'input_tokens': ..., 'output_tokens': ...}"
            )
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"{type(strategy).__name__}.execute returned non-dict metadata")
        return output, normalize_usage(usage), dict(metadata or {})
    raise TypeError(
        f"{type(strategy).__name__}.execute must return (output, token_usage) or "
        f"(output, token_usage, metadata), got {type(raw).__name__}"
    )


def _safety_ratings(metadata: dict[str, Any]) -> dict[str, str] | None:
    ratings = metadata.get("safety_ratings")
    return {str(k): str(v) for k, v in ratings.items()} if isinstance(ratings, dict) and ratings else None


def classify_error(classifier: ErrorClassifier, exc: BaseException) -> ErrorInfo:
    """The classifier's verdict; a classifier that raises gives ``unknown`` (retryable), never an escape."""
    try:
        return classifier.classify(exc)
    except Exception as classifier_exc:  # a buggy user classifier must not lose the item's outcome
        logger.warning("error classifier %r failed: %s", classifier, classifier_exc)
        return ErrorInfo(ErrorCategory.UNKNOWN, True, reason=describe_error(exc))


async def call_on_error(
    strategy: LLMCallStrategy[Any], exc: Exception, attempt: int, state: RetryState
) -> None:
    try:
        await strategy.on_error(exc, attempt, state)
    except asyncio.CancelledError:
        raise
    except Exception as hook_exc:  # fail open: on_error is advisory
        logger.warning("%s.on_error failed (ignored): %s", type(strategy).__name__, redact(f"{hook_exc!r}"))


async def _execute_once(
    strategy: LLMCallStrategy[Any],
    prompt: Any,
    attempt: int,
    ledger: ItemLedger,
    config: ProcessorConfig,
    admission: Admission,
    classifier: ErrorClassifier,
    stop: BatchStop | None = None,
) -> AttemptSuccess:
    timeout = config.timeout_per_item
    estimated = strategy.estimate_tokens(prompt)
    reservation = None
    if stop is not None:  # raises BatchStopped (nothing sent) once the batch has stopped
        reservation = await stop.reserve(_model_name(strategy), estimated, _max_output_tokens(strategy))
    try:
        permit = await admission.admit(estimated)
    except BaseException:
        if stop is not None:
            stop.settle(reservation, None)
        raise
    error: Exception | None = None
    billed: TokenUsage | None = None
    try:
        if stop is not None:
            stop.check()  # the batch may have stopped while this attempt waited for admission
        ledger.executions += 1
        try:
            async with asyncio.timeout(timeout) as scope:
                raw = await strategy.execute(prompt, attempt, timeout, ledger.state)
            output, usage, metadata = normalize_execute_result(raw, strategy)
        except TimeoutError as exc:
            error = exc
            if scope.expired():
                error = ItemTimeoutError(f"attempt {attempt} exceeded timeout_per_item={timeout:g}s")
                error.__cause__ = exc
        except Exception as exc:
            error = exc
        if error is None:
            permit.reconcile(usage["input_tokens"])
            ledger.token_usage = add_usage(ledger.token_usage, usage)
            billed = usage
        else:
            billed = token_usage_of(error)
            permit.reconcile(normalize_usage(billed)["input_tokens"] if billed else None)
            if billed:
                ledger.token_usage = add_usage(ledger.token_usage, billed)
    finally:
        if stop is not None:
            stop.settle(reservation, billed)
        await permit.release()

    if error is None:
        ratings = _safety_ratings(metadata)
        if ratings:
            ledger.safety_ratings = ratings
        await admission.report_success()
        if stop is not None:
            await stop.record(None)
        return AttemptSuccess(output, usage, metadata, ratings)

    if isinstance(error, BlockedResponseError) and error.safety_ratings:
        ledger.safety_ratings = dict(error.safety_ratings)
    await call_on_error(strategy, error, attempt, ledger.state)
    info = classify_error(classifier, error)
    if info.is_rate_limit and info.is_retryable:
        raise _RateLimited(info, error)
    failure = AttemptFailed(ledger.item_id, attempt, info, describe_error(error))
    ledger.last_error = failure
    ledger.last_exception = error
    if stop is not None:
        await stop.record(info.category, failure.message)
    raise failure from error


async def run_attempt(
    strategy: LLMCallStrategy[Any],
    prompt: Any,
    attempt: int,
    ledger: ItemLedger,
    *,
    config: ProcessorConfig,
    admission: Admission,
    classifier: ErrorClassifier,
    on_rate_limit: RateLimitHook | None = None,
    stop: BatchStop | None = None,
) -> AttemptSuccess:
    """Run logical attempt ``attempt`` (1-based) of one item; raise :class:`AttemptFailed` if it failed.

    Admission is asked before every provider call; the permit is reconciled with the real input tokens and
    always released. Tokens billed for failed calls are added to ``ledger.token_usage``. In a dry run the
    strategy's ``dry_run()`` answers and nothing is admitted.
    """
    if not config.dry_run:
        try:
            check_prompt(strategy, prompt)
        except InvalidInputError as exc:  # never sent: the item keeps attempts=0
            failure = AttemptFailed(
                ledger.item_id, attempt, classify_error(classifier, exc), describe_error(exc)
            )
            ledger.last_error, ledger.last_exception = failure, exc
            raise failure from None
    if stop is not None:
        try:
            stop.check()
        except BatchStopped as stopped:
            raise _not_attempted(ledger, attempt, stopped) from None
    previous_attempts = ledger.attempts
    ledger.attempts = max(ledger.attempts, attempt)
    if ledger.started_at is None:
        ledger.started_at = time.monotonic()
    ledger.finished_at = None

    if config.dry_run:
        ledger.executions += 1
        output, usage, metadata = normalize_execute_result(await strategy.dry_run(prompt), strategy)
        ledger.token_usage = add_usage(ledger.token_usage, usage)
        return AttemptSuccess(output, usage, metadata, _safety_ratings(metadata))

    sent_before = ledger.executions
    while True:
        try:
            return await _execute_once(strategy, prompt, attempt, ledger, config, admission, classifier, stop)
        except BatchStopped as stopped:
            if ledger.executions == sent_before:  # this attempt never reached the provider
                ledger.attempts = previous_attempts
            raise _not_attempted(ledger, attempt, stopped) from None
        except _RateLimited as limited:
            ledger.rate_limit_retries += 1
            if ledger.rate_limit_retries > config.retry.max_rate_limit_retries:
                exceeded = RateLimitRetriesExceeded(
                    f"rate limited {ledger.rate_limit_retries} times "
                    f"(max_rate_limit_retries={config.retry.max_rate_limit_retries}); "
                    f"last: {describe_error(limited.error)}"
                )
                info = classify_error(classifier, exceeded)
                failure = AttemptFailed(ledger.item_id, attempt, info, describe_error(exceeded))
                ledger.last_error = failure
                ledger.last_exception = exceeded
                exceeded.__cause__ = limited.error
                raise failure from limited.error
            await pause_after_rate_limit(limited.info, config, admission, on_rate_limit)


def _not_attempted(ledger: ItemLedger, attempt: int, stopped: BatchStopped) -> AttemptFailed:
    """The quiet failure of an attempt the batch stop did not admit (category of the stop, not retryable)."""
    failure = AttemptFailed(ledger.item_id, attempt, stopped.info(), stopped.reason)
    ledger.last_error, ledger.last_exception = failure, None
    return failure


def _model_name(strategy: LLMCallStrategy[Any]) -> str | None:
    try:
        name = strategy.model_name
    except Exception:  # a user property that raises: treat the model as unknown
        return None
    return name if isinstance(name, str) else None


def _max_output_tokens(strategy: LLMCallStrategy[Any]) -> int | None:
    config = getattr(strategy, "generation_config", None)
    value = config.get("max_output_tokens") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


#: Python values that are never a content part (a list of parts holds text, bytes, dicts or SDK objects).
_NOT_PARTS = (bool, int, float, complex)


def check_prompt(strategy: LLMCallStrategy[Any], prompt: Any) -> None:
    """Reject a prompt that cannot be sent, before any request: malformed content parts (``None``, numbers)
    or more estimated input tokens than the model accepts (:mod:`~prefect_batchllm.core.model_limits`).

    Raises :class:`InvalidInputError` (category ``invalid_input``, never retried).
    """
    if isinstance(prompt, list | tuple):
        for index, part in enumerate(prompt):
            if part is None or isinstance(part, _NOT_PARTS):
                raise InvalidInputError(
                    f"prompt content part {index} is {type(part).__name__} {part!r}: a content part must be "
                    "text, bytes, a dict or a google.genai Part/Content (fix or drop that part)"
                )
    limit = input_token_limit(_model_name(strategy))
    if limit is not None:
        estimated = strategy.estimate_tokens(prompt)
        if estimated > limit:
            raise InvalidInputError(
                f"prompt has ~{estimated:,} estimated input tokens, more than "
                f"{_model_name(strategy)} accepts ({limit:,}); shorten it "
                "(or raise the limit with core.model_limits.register_input_limit)"
            )


async def pause_after_rate_limit(
    info: ErrorInfo, config: ProcessorConfig, admission: Admission, on_rate_limit: RateLimitHook | None
) -> None:
    """Tell the admission (shared pause) and wait at least the provider's delay before re-admission.

    The admission's own pause and this wait overlap in wall time, so a pausing admission adds no extra
    delay; with no limiter configured this wait alone keeps us from hammering the provider.
    """
    wait = info.retry_after if info.retry_after is not None else config.rate_limit.cooldown_seconds
    started = time.monotonic()
    if on_rate_limit is not None:
        try:
            await on_rate_limit(info)
        except asyncio.CancelledError:
            raise
        except Exception as hook_exc:
            logger.warning("rate-limit hook failed (ignored): %s", hook_exc)
    await admission.report_rate_limit(info.retry_after)
    remaining = wait - (time.monotonic() - started)
    if remaining > 0:
        await asyncio.sleep(remaining)
