"""Unit tests of one attempt (``core.attempt``): admission, timeout, tokens, on_error, rate limits."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest

from prefect_batchllm.core.attempt import AttemptFailed, ItemLedger, run_attempt
from prefect_batchllm.core.config import ProcessorConfig, RateLimitConfig, RetryConfig
from prefect_batchllm.core.errors import DefaultErrorClassifier, ErrorCategory, InvalidOutputError
from prefect_batchllm.core.strategy import LLMCallStrategy, RetryState


class RecordingPermit:
    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log

    def reconcile(self, actual_tokens: int | None) -> None:
        self.log.append(("reconcile", actual_tokens))

    async def release(self) -> None:
        self.log.append(("release", None))


class RecordingAdmission:
    """Admission that records every call (the executor's side of the seam)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    async def admit(self, estimated_tokens: int) -> RecordingPermit:
        self.log.append(("admit", estimated_tokens))
        return RecordingPermit(self.log)

    async def report_rate_limit(self, retry_after: float | None) -> None:
        self.log.append(("rate_limit", retry_after))

    async def report_success(self) -> None:
        self.log.append(("success", None))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.log]


class Http429(Exception):
    status_code = 429

    def __init__(self, retry_after: float = 0.01) -> None:
        super().__init__("429 RESOURCE_EXHAUSTED")
        self.retry_after = retry_after


class Scripted(LLMCallStrategy[str]):
    """Plays a script of outcomes, one per execute() call; records calls and on_error."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[Any, int]] = []
        self.errors: list[tuple[str, int]] = []
        self.cancelled = 0

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> Any:
        self.calls.append((prompt, attempt))
        outcome = self.outcomes.pop(0) if self.outcomes else ("ok", {"input_tokens": 1})
        if outcome == "hang":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def on_error(self, exception: Exception, attempt: int, state: RetryState | None = None) -> None:
        self.errors.append((type(exception).__name__, attempt))
        assert state is not None
        state.set("seen", state.get("seen", 0) + 1)


def _config(**kw: Any) -> ProcessorConfig:
    return ProcessorConfig(**kw)


async def _run(strategy: Scripted, ledger: ItemLedger, attempt: int = 1, **kw: Any) -> Any:
    admission = kw.pop("admission", RecordingAdmission())
    config = kw.pop("config", _config())
    return await run_attempt(
        strategy,
        "hello world",
        attempt,
        ledger,
        config=config,
        admission=admission,
        classifier=DefaultErrorClassifier(),
        **kw,
    )


async def test_success_admits_reconciles_and_releases_once() -> None:
    admission = RecordingAdmission()
    strategy = Scripted(
        ("OUT", {"input_tokens": 7, "output_tokens": 3}, {"safety_ratings": {"HARASS": "LOW"}})
    )
    ledger = ItemLedger("a")
    ok = await _run(strategy, ledger, admission=admission)
    assert ok.output == "OUT"
    assert ok.safety_ratings == {"HARASS": "LOW"}
    assert admission.log == [("admit", 3), ("reconcile", 7), ("release", None), ("success", None)]
    assert ledger.token_usage["input_tokens"] == 7 and ledger.token_usage["total_tokens"] == 10
    assert ledger.safety_ratings == {"HARASS": "LOW"}
    assert (ledger.attempts, ledger.executions) == (1, 1)


async def test_failed_attempt_counts_billed_tokens_calls_on_error_and_classifies() -> None:
    admission = RecordingAdmission()
    bad = InvalidOutputError("not json", token_usage={"input_tokens": 5, "output_tokens": 4})
    strategy = Scripted(bad, ("fine", {"input_tokens": 5, "output_tokens": 2}))
    ledger = ItemLedger("b")
    with pytest.raises(AttemptFailed) as info:
        await _run(strategy, ledger, attempt=1, admission=admission)
    failure = info.value
    assert failure.category == ErrorCategory.INVALID_OUTPUT and failure.retryable
    assert str(failure).startswith("[invalid_output] InvalidOutputError: not json")
    assert strategy.errors == [("InvalidOutputError", 1)]
    assert admission.kinds() == ["admit", "reconcile", "release"]
    assert ledger.last_error is failure

    ok = await _run(strategy, ledger, attempt=2, admission=admission)
    assert ok.output == "fine"
    # Both attempts were billed; the RetryState written by on_error survived into attempt 2.
    assert ledger.token_usage["input_tokens"] == 10 and ledger.token_usage["output_tokens"] == 6
    assert ledger.state.get("seen") == 1
    assert [a for _, a in strategy.calls] == [1, 2]
    assert ledger.attempts == 2


async def test_fatal_error_is_not_retryable_and_pickles() -> None:
    strategy = Scripted(ValueError("bad request shape"))
    with pytest.raises(AttemptFailed) as info:
        await _run(strategy, ItemLedger("c"))
    assert info.value.category == "fatal" and not info.value.retryable
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.info == info.value.info and again.item_id == "c"


async def test_timeout_becomes_item_timeout_and_releases_permit() -> None:
    admission = RecordingAdmission()
    strategy = Scripted("hang")
    ledger = ItemLedger("d")
    with pytest.raises(AttemptFailed) as info:
        await _run(strategy, ledger, admission=admission, config=_config(timeout_per_item=0.05))
    assert info.value.category == "timeout" and info.value.retryable
    assert "ItemTimeoutError" in str(info.value) and "timeout_per_item=0.05s" in str(info.value)
    assert strategy.cancelled == 1
    assert admission.kinds() == ["admit", "reconcile", "release"]
    assert strategy.errors == [("ItemTimeoutError", 1)]


async def test_provider_timeout_keeps_its_own_message() -> None:
    strategy = Scripted(TimeoutError("read timed out"))
    with pytest.raises(AttemptFailed) as info:
        await _run(strategy, ItemLedger("e"))
    assert info.value.category == "timeout" and "read timed out" in str(info.value)


async def test_rate_limit_retries_the_same_attempt_without_burning_it() -> None:
    admission = RecordingAdmission()
    strategy = Scripted(Http429(0.01), Http429(0.02), ("done", {"input_tokens": 2}))
    ledger = ItemLedger("f")
    hits: list[float | None] = []

    async def on_rate_limit(info: Any) -> None:
        hits.append(info.retry_after)

    ok = await _run(strategy, ledger, attempt=1, admission=admission, on_rate_limit=on_rate_limit)
    assert ok.output == "done"
    assert [a for _, a in strategy.calls] == [1, 1, 1]  # same attempt number every time
    assert (ledger.attempts, ledger.executions, ledger.rate_limit_retries) == (1, 3, 2)
    assert [v for k, v in admission.log if k == "rate_limit"] == [0.01, 0.02]
    assert hits == [0.01, 0.02]
    # every execution was admitted and released, and re-admission came after the report
    assert admission.kinds().count("admit") == 3 and admission.kinds().count("release") == 3
    assert admission.kinds().index("rate_limit") < admission.kinds().index("admit", 1)


async def test_rate_limit_retry_cap() -> None:
    config = _config(retry=RetryConfig(max_rate_limit_retries=2))
    strategy = Scripted(Http429(0.0), Http429(0.0), Http429(0.0), ("never", {}))
    ledger = ItemLedger("g")
    with pytest.raises(AttemptFailed) as info:
        await _run(strategy, ledger, config=config)
    assert info.value.category == "rate_limited" and not info.value.retryable
    assert "RateLimitRetriesExceeded" in str(info.value)
    assert ledger.executions == 3


async def test_rate_limit_without_retry_after_waits_the_cooldown(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float, *args: Any) -> None:
        slept.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr("prefect_batchllm.core.attempt.asyncio.sleep", fake_sleep)
    error = Http429()
    del error.retry_after
    config = _config(rate_limit=RateLimitConfig(cooldown_seconds=7.0))
    strategy = Scripted(error, ("ok", {}))
    await _run(strategy, ItemLedger("h"), config=config)
    assert len(slept) == 1 and 6.5 < slept[0] <= 7.0


async def test_dry_run_skips_admission_and_network() -> None:
    admission = RecordingAdmission()
    strategy = Scripted(RuntimeError("must not be called"))
    ledger = ItemLedger("i")
    ok = await _run(strategy, ledger, admission=admission, config=_config(dry_run=True))
    assert ok.output == "[DRY-RUN] Mock output"
    assert admission.log == [] and strategy.calls == []
    assert ledger.token_usage["input_tokens"] == 100


async def test_bad_execute_result_shape_is_a_fatal_strategy_bug() -> None:
    strategy = Scripted("just a string")
    with pytest.raises(AttemptFailed) as info:
        await _run(strategy, ItemLedger("j"))
    assert info.value.category == "fatal" and "must return (output, token_usage)" in str(info.value)


async def test_on_error_failure_is_ignored() -> None:
    class Grumpy(Scripted):
        async def on_error(self, exception: Exception, attempt: int, state: RetryState | None = None) -> None:
            raise RuntimeError("hook broke")

    with pytest.raises(AttemptFailed) as info:
        await _run(Grumpy(ConnectionError("reset")), ItemLedger("k"))
    assert info.value.category == "transient"


async def test_cancellation_releases_the_permit_and_skips_on_error() -> None:
    admission = RecordingAdmission()
    strategy = Scripted("hang")
    job = asyncio.ensure_future(_run(strategy, ItemLedger("l"), admission=admission))
    while not strategy.calls:  # noqa: ASYNC110 - polling a plain list the strategy appends to
        await asyncio.sleep(0)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert admission.kinds() == ["admit", "release"]
    assert strategy.errors == []
