"""Core contract: configuration validation, work items, results and cost, classification helpers."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel, ValidationError

from prefect_batchllm import (
    BatchResult,
    BlockedResponseError,
    DefaultErrorClassifier,
    ErrorCategory,
    InvalidOutputError,
    LLMCallStrategy,
    LLMWorkItem,
    ModelPrice,
    ProcessorConfig,
    RateLimitConfig,
    RetryConfig,
    RetryState,
    WorkItemResult,
)
from prefect_batchllm.core.errors import (
    ItemTimeoutError,
    attach_token_usage,
    redact,
    register_secret,
    retry_after_of,
    token_usage_of,
)
from prefect_batchllm.core.events import call_user_hook
from prefect_batchllm.core.items import check_unique_ids
from prefect_batchllm.core.tokens import add_usage, normalize_usage


class Echo(LLMCallStrategy[str]):
    async def execute(self, prompt, attempt, timeout, state=None):
        return f"echo {prompt}", {"input_tokens": 1, "output_tokens": 1}


# -- configuration -----------------------------------------------------------------------------------


def test_config_defaults_match_seed() -> None:
    cfg = ProcessorConfig()
    assert (cfg.max_workers, cfg.timeout_per_item, cfg.post_processor_timeout) == (5, 120.0, 90.0)
    assert cfg.progress_interval == 10 and cfg.dry_run is False
    assert cfg.retry.max_attempts == 3 and not cfg.rate_limit.enabled


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_workers": 0}, "max_workers"),
        ({"timeout_per_item": -1}, "timeout_per_item"),
        ({"timeout_per_item": 0}, "timeout_per_item"),
        ({"post_processor_timeout": -5}, "post_processor_timeout"),
        ({"progress_interval": 0}, "progress_interval"),
        ({"max_requests_per_minute": 0}, "max_requests_per_minute"),
        ({"artifact_key": "Bad_Key"}, "artifact_key"),
        ({"cache_expiration_s": 0}, "cache_expiration_s"),
        ({"result_storage": "no-slash"}, "result_storage"),
    ],
)
def test_processor_config_rejects_bad_values_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ProcessorConfig(**kwargs)


@pytest.mark.parametrize("field", ["requests_per_minute", "tokens_per_minute", "max_in_flight"])
def test_rate_limit_of_zero_is_rejected(field: str) -> None:
    with pytest.raises(ValueError, match=rf"{field}.*never admit"):
        RateLimitConfig(**{field: 0})


def test_unknown_config_field_names_it_and_suggests() -> None:
    with pytest.raises(TypeError, match=r"unknown config field 'max_worker'.*'max_workers'"):
        ProcessorConfig(max_worker=3)
    with pytest.raises(TypeError, match="max_attempt"):
        RetryConfig(max_attempt=2)


def test_chunk_size_selects_chunked_execution_and_execution_selects_online_or_batch_api() -> None:
    assert ProcessorConfig().chunk_size is None  # one task run per item by default
    assert ProcessorConfig(chunk_size=200).chunk_size == 200
    assert ProcessorConfig().execution == "online"
    assert ProcessorConfig(execution="batch_api").execution == "batch_api"
    with pytest.raises(ValueError, match=r"execution: must be one of 'online', 'batch_api'.*chunk_size=N"):
        ProcessorConfig(execution="chunked")


def test_conflicting_rpm_settings_are_an_error() -> None:
    with pytest.raises(ValueError, match="conflicts"):
        ProcessorConfig(max_requests_per_minute=10, rate_limit=RateLimitConfig(requests_per_minute=20))
    cfg = ProcessorConfig(max_requests_per_minute=120, rate_limit=RateLimitConfig(limit_prefix="jobs-a"))
    assert cfg.rate_limit.requests_per_minute == 120 and cfg.rate_limit.limit_prefix == "jobs-a"


def test_validate_catches_later_mutation() -> None:
    cfg = ProcessorConfig()
    cfg.max_workers = -1
    with pytest.raises(ValueError, match="max_workers"):
        cfg.validate()


def test_retry_delays_are_exponential_and_capped() -> None:
    assert RetryConfig(max_attempts=5, initial_wait=1, max_wait=5).delays() == [1, 2, 4, 5]
    assert RetryConfig(max_attempts=1).delays() == []


# -- work items and results --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"item_id": "", "strategy": Echo(), "prompt": "x"}, ValueError, "item_id"),
        ({"item_id": "  ", "strategy": Echo(), "prompt": "x"}, ValueError, "item_id"),
        ({"item_id": "a", "strategy": None, "prompt": "x"}, TypeError, "strategy is None"),
        ({"item_id": "a", "strategy": object(), "prompt": "x"}, TypeError, "LLMCallStrategy"),
        ({"item_id": "a", "strategy": Echo(), "prompt": ""}, ValueError, "prompt is empty"),
        ({"item_id": "a", "strategy": Echo(), "prompt": []}, ValueError, "empty list"),
        ({"item_id": "a", "strategy": Echo(), "prompt": 42}, TypeError, "prompt must be"),
    ],
)
def test_work_item_validation(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        LLMWorkItem(**kwargs)


def test_duplicate_ids_are_named() -> None:
    s = Echo()
    items = [LLMWorkItem(i, s, "p") for i in ("a", "b", "a", "c", "b")]
    with pytest.raises(ValueError, match=r"duplicate item_id values: 'a', 'b'"):
        check_unique_ids(items)


def _result(item_id: str, ok: bool, inp: int, out: int, cached: int = 0, model: str | None = None):
    return WorkItemResult(
        item_id,
        ok,
        output="x" if ok else None,
        error=None if ok else "HTTP 400",
        error_category=None if ok else "fatal",
        token_usage={"input_tokens": inp, "output_tokens": out, "cached_input_tokens": cached},
        model=model,
    )


def test_batch_result_statistics_and_cost() -> None:
    results = [
        _result("a", True, 1000, 100, 800, "gemini-2.5-flash"),
        _result("b", False, 200, 0, 0, "gemini-2.5-flash"),
        _result("c", True, 1000, 100, 0, "unpriced-model"),
    ]
    batch = BatchResult(results)
    assert (batch.total_items, batch.succeeded, batch.failed) == (3, 2, 1)
    assert batch.total_input_tokens == 2200 and batch.total_cached_tokens == 800
    assert batch.cache_hit_rate() == pytest.approx(100 * 800 / 2200)
    assert batch.effective_input_tokens() == 1400 + 80
    assert [r.item_id for r in batch.failed_items()] == ["b"]
    assert batch.error_categories() == {"fatal": 1}
    expected = (200 * 0.30 + 800 * 0.03 + 100 * 2.50 + 200 * 0.30) / 1e6
    assert batch.estimated_cost_usd == pytest.approx(expected)
    assert batch.unpriced_models == ["unpriced-model"]
    overridden = BatchResult(results, prices={"unpriced-model": ModelPrice(1.0, 1.0)})
    assert overridden.estimated_cost_usd == pytest.approx(expected + 1100 / 1e6)
    frame = batch.to_dataframe()
    assert list(frame["item_id"]) == ["a", "b", "c"]
    assert list(frame["cached_tokens"]) == [800, 0, 0]


def test_token_usage_normalisation() -> None:
    assert normalize_usage({"prompt_tokens": 3, "completion_tokens": 4}) == {
        "input_tokens": 3,
        "output_tokens": 4,
        "total_tokens": 7,
        "cached_input_tokens": 0,
    }
    assert add_usage({"input_tokens": 1}, {"input_tokens": 2, "output_tokens": 5})["total_tokens"] == 8


def test_retry_state_is_a_small_dict() -> None:
    state = RetryState()
    state.set("k", 1)
    assert state.get("k") == 1 and "k" in state
    state.delete("k")
    assert state.get("k", "default") == "default"


# -- classification helpers that need no HTTP (the HTTP paths are tested in test_errors.py) -----------


class _Pet(BaseModel):
    name: str


@pytest.mark.parametrize(
    ("exc", "category", "retryable"),
    [
        (ItemTimeoutError("attempt exceeded 1 s"), ErrorCategory.TIMEOUT, True),
        (InvalidOutputError("bad json"), ErrorCategory.INVALID_OUTPUT, True),
        (BlockedResponseError("blocked"), ErrorCategory.BLOCKED, False),
        (json.JSONDecodeError("x", "doc", 0), ErrorCategory.TRANSIENT, True),
        (KeyError("field"), ErrorCategory.FATAL, False),
        (ValueError("bad argument"), ErrorCategory.FATAL, False),
        (ConnectionResetError("reset by peer"), ErrorCategory.TRANSIENT, True),
        (RuntimeError("upstream said: 503 overloaded"), ErrorCategory.TRANSIENT, True),
        (RuntimeError("something odd"), ErrorCategory.UNKNOWN, True),
    ],
)
def test_classifier_without_http(exc: Exception, category: ErrorCategory, retryable: bool) -> None:
    info = DefaultErrorClassifier().classify(exc)
    assert info.category is category and info.is_retryable is retryable


def test_pydantic_validation_error_is_invalid_output_not_fatal() -> None:
    try:
        _Pet.model_validate({})
    except ValidationError as exc:
        info = DefaultErrorClassifier().classify(exc)
    assert info.category is ErrorCategory.INVALID_OUTPUT and info.is_retryable


def test_retry_after_from_header_and_attribute() -> None:
    class Resp:
        headers = {"retry-after": "12"}
        status_code = 429

    class HTTPErr(Exception):
        response = Resp()

    assert retry_after_of(HTTPErr()) == 12.0
    info = DefaultErrorClassifier().classify(HTTPErr("too many"))
    assert info.is_rate_limit and info.retry_after == 12.0


def test_failed_attempt_tokens_travel_on_the_exception() -> None:
    exc = attach_token_usage(RuntimeError("x"), {"input_tokens": 9})
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = exc
    assert token_usage_of(wrapped) == {"input_tokens": 9}


def test_secrets_are_redacted() -> None:
    register_secret("super-secret-key-123")
    assert "super-secret" not in redact("key=super-secret-key-123 and AIzaSyA1234567890abcdefghijklmnop")
    assert "AIza" not in redact("AIzaSyA1234567890abcdefghijklmnop")
    info = DefaultErrorClassifier().classify(RuntimeError("bad key super-secret-key-123"))
    assert "super-secret" not in info.reason


async def test_user_hooks_fail_open_with_timeout() -> None:
    async def slow(x):
        await asyncio.sleep(5)

    def boom(x):
        raise RuntimeError("hook broke")

    seen = []
    assert await call_user_hook(seen.append, 1, timeout=1, what="sync") == (True, None)
    ok, msg = await call_user_hook(slow, 1, timeout=0.05, what="slow hook")
    assert not ok and "timed out" in msg
    ok, msg = await call_user_hook(boom, 1, timeout=1, what="boom hook")
    assert not ok and "hook broke" in msg
    assert seen == [1]


# -- review fixes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "kwargs", "field"),
    [
        (ProcessorConfig, {"timeout_per_item": "10"}, "ProcessorConfig.timeout_per_item"),
        (ProcessorConfig, {"max_workers": True}, "ProcessorConfig.max_workers"),
        (ProcessorConfig, {"max_workers": 2.0}, "ProcessorConfig.max_workers"),
        (ProcessorConfig, {"progress_interval": 2.5}, "ProcessorConfig.progress_interval"),
        (ProcessorConfig, {"max_queue_size": 1.5}, "ProcessorConfig.max_queue_size"),
        (ProcessorConfig, {"cache_expiration_s": "50"}, "ProcessorConfig.cache_expiration_s"),
        (ProcessorConfig, {"max_requests_per_minute": "60"}, "ProcessorConfig.max_requests_per_minute"),
        (ProcessorConfig, {"progress_callback_timeout": "5"}, "ProcessorConfig.progress_callback_timeout"),
        (RetryConfig, {"initial_wait": "1"}, "RetryConfig.initial_wait"),
        (RetryConfig, {"max_attempts": 2.5}, "RetryConfig.max_attempts"),
        (RetryConfig, {"max_rate_limit_retries": True}, "RetryConfig.max_rate_limit_retries"),
        (RateLimitConfig, {"max_in_flight": 2.5}, "RateLimitConfig.max_in_flight"),
        (RateLimitConfig, {"slow_start_items": 1.5}, "RateLimitConfig.slow_start_items"),
        (RateLimitConfig, {"cooldown_seconds": "5"}, "RateLimitConfig.cooldown_seconds"),
        (RateLimitConfig, {"requests_per_minute": True}, "RateLimitConfig.requests_per_minute"),
    ],
)
def test_config_wrong_types_name_the_field(factory, kwargs: dict, field: str) -> None:
    with pytest.raises(TypeError, match=rf"^{field}: must be"):
        factory(**kwargs)


def test_config_numeric_types_still_accepted() -> None:
    cfg = ProcessorConfig(timeout_per_item=10, max_requests_per_minute=30, progress_callback_timeout=None)
    assert cfg.rate_limit.requests_per_minute == 30
    RetryConfig(initial_wait=0, max_wait=1.5, exponential_base=3)
    RateLimitConfig(requests_per_minute=12.5, tokens_per_minute=10_000, max_in_flight=4)


async def test_user_hook_failure_message_is_redacted() -> None:
    register_secret("hook-secret-value-42")

    def leaky(x):
        raise RuntimeError("boom with hook-secret-value-42 and AIzaSyA1234567890abcdefghijklmnop")

    ok, msg = await call_user_hook(leaky, 1, timeout=1, what="leaky hook")
    assert not ok and msg.startswith("leaky hook failed: RuntimeError: boom")
    assert "hook-secret" not in msg and "AIza" not in msg


def test_parse_duration_is_public_and_rejects_bool() -> None:
    from prefect_batchllm.core.errors import parse_duration
    from prefect_batchllm.testing import emulator

    assert emulator.parse_duration is parse_duration  # one parser for client and emulator
    assert parse_duration("2s") == 2.0 and parse_duration("1.5s") == 1.5 and parse_duration(3) == 3.0
    assert parse_duration(True) is None and parse_duration(False) is None
    assert parse_duration("-5s") is None and parse_duration("soon") is None


def test_retry_after_http_date_without_zone_is_utc(monkeypatch) -> None:
    import time
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    # "-0000" dates parse to naive datetimes; they are UTC, not local time.
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        when = (datetime.now(UTC) + timedelta(seconds=120)).replace(tzinfo=None)
        raw = format_datetime(when)
        assert raw.endswith("-0000")

        class Resp:
            headers = {"retry-after": raw}
            status_code = 429

        class HTTPErr(Exception):
            response = Resp()

        assert 100 <= (retry_after_of(HTTPErr()) or 0) <= 121
    finally:
        monkeypatch.undo()
        time.tzset()


def test_bare_model_name_is_the_one_cleanup() -> None:
    from prefect_batchllm.core.pricing import bare_model_name, price_for

    for raw in ("gemini-2.5-flash", "models/gemini-2.5-flash", "google-gla:gemini-2.5-flash"):
        assert bare_model_name(raw) == "gemini-2.5-flash"
    assert price_for("models/gemini-2.5-flash") is price_for("gemini-2.5-flash")


def test_missing_cache_404_is_transient() -> None:
    from google.genai import errors as genai_errors

    body = {"error": {"code": 404, "message": "CachedContent not found", "status": "NOT_FOUND"}}
    info = DefaultErrorClassifier().classify(genai_errors.ClientError(404, body))
    assert info.category is ErrorCategory.TRANSIENT and info.is_retryable
    other = {"error": {"code": 404, "message": "models/nope is not found", "status": "NOT_FOUND"}}
    verdict = DefaultErrorClassifier().classify(genai_errors.ClientError(404, other))
    assert verdict.category is ErrorCategory.NOT_FOUND


def test_seed_keywords_are_exclusive_with_strategy() -> None:
    async def direct(attempt, timeout):
        return "x", {}

    with pytest.raises(TypeError, match="exactly one of strategy, direct_call"):
        LLMWorkItem("a", Echo(), "p", direct_call=direct)
    item = LLMWorkItem("a", direct_call=direct, input_data={"row": 1})
    assert item.prompt == "a" and item.strategy.fingerprint()  # prompt defaults to the id for direct calls


async def test_seed_direct_call_runs_sync_callables_off_the_loop_and_awaits_async_ones() -> None:
    import threading

    loop_thread = threading.get_ident()
    seen: dict[str, int] = {}

    def sync_call(input_data, attempt, timeout):
        seen["sync"] = threading.get_ident()
        return f"sync {input_data['row']} #{attempt}", {"input_tokens": 1}

    async def async_call(attempt, timeout):
        seen["async"] = threading.get_ident()
        return f"async #{attempt}", {"input_tokens": 2}

    sync_item = LLMWorkItem("s", direct_call=sync_call, input_data={"row": 7})
    async_item = LLMWorkItem("a", direct_call=async_call)
    assert (await sync_item.strategy.execute(sync_item.prompt, 1, 5.0))[0] == "sync 7 #1"
    assert (await async_item.strategy.execute(async_item.prompt, 2, 5.0))[0] == "async #2"
    assert seen["sync"] != loop_thread  # a blocking user call never stalls the event loop
    assert seen["async"] == loop_thread


# -- legacy keywords: input_data identity, no strategy leak --------------------------------------------


def test_direct_call_input_data_is_part_of_the_fingerprint() -> None:
    async def call(data, attempt, timeout):
        return data, {}

    one = LLMWorkItem("same-id", direct_call=call, input_data={"n": 1})
    two = LLMWorkItem("same-id", direct_call=call, input_data={"n": 2})
    again = LLMWorkItem("same-id", direct_call=call, input_data={"n": 1})
    assert one.prompt == two.prompt == "same-id"  # the prompt alone cannot tell them apart
    assert one.strategy.fingerprint() != two.strategy.fingerprint()
    assert one.strategy.fingerprint() == again.strategy.fingerprint()


def test_agent_strategies_are_shared_per_agent_and_not_leaked() -> None:
    import gc

    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    from prefect_batchllm.strategies import seed_keywords as items_module

    agent = Agent(TestModel())
    a = LLMWorkItem("a", agent=agent, prompt="hi")
    b = LLMWorkItem("b", agent=agent, prompt="ho")
    assert a.strategy is b.strategy  # one strategy per agent: prepared once
    other = LLMWorkItem("c", agent=Agent(TestModel()), prompt="hey")
    assert other.strategy is not a.strategy
    before = len(items_module._AGENT_STRATEGIES)
    del a, b, other, agent
    gc.collect()
    assert len(items_module._AGENT_STRATEGIES) <= before - 2  # nothing kept once the items are gone


def test_item_task_gets_retry_policy_and_persists_nothing_itself() -> None:
    """Per-item task runs retry by RetryConfig; the batch's ResultLog persists results, not each run."""
    from prefect_batchllm.core.config import RetryConfig
    from prefect_batchllm.prefect.tasks import configured_item_task

    task = configured_item_task(ProcessorConfig(retry=RetryConfig(max_attempts=4, jitter=False)))
    assert task.retries == 3
    assert task.persist_result is False


def test_provider_layer_imports_nothing_from_prefect() -> None:
    """The layer rule (README, Layout): core, models, strategies and testing are usable without Prefect."""
    import subprocess
    import sys

    code = (
        "import sys; import prefect_batchllm as p; "
        "from prefect_batchllm import GeminiModel, GeminiCachedModel, GeminiStrategy, PydanticAIStrategy, "
        "DirectCallStrategy, LLMWorkItem, BatchResult, ProcessorConfig, DefaultErrorClassifier; "
        "import prefect_batchllm.testing, prefect_batchllm.core.attempt; "
        "from prefect_batchllm import estimate_batch, load_prompt_template, PromptTemplate, register_price; "
        "print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_batch_tally_gives_the_same_statistics_as_the_full_result() -> None:
    """A streamed run's BatchResult (summary mode) reports what the full one would, keeping only failures."""
    from prefect_batchllm.core.items import BatchResult, BatchTally, WorkItemResult

    results = [
        WorkItemResult(
            f"i{n}",
            n % 3 != 0,
            output="x" if n % 3 else None,
            error=None if n % 3 else "boom",
            error_category=None if n % 3 else ("transient" if n % 2 else "fatal"),
            token_usage={"input_tokens": 10 * n, "output_tokens": n, "cached_input_tokens": n // 2},
            attempts=n % 4,
            replayed=n % 5 == 0,
            model="gemini-2.5-flash" if n % 2 else "no-such-model",
            metadata={"billing": "batch"} if n % 7 == 0 else {},
        )
        for n in range(40)
    ]
    full = BatchResult(results=results)
    tally = BatchTally()
    for r in results:
        tally.add(r)
    streamed = BatchResult(results=[], summary=tally)
    for name in ("total_items", "succeeded", "failed", "total_input_tokens", "total_output_tokens"):
        assert getattr(streamed, name) == getattr(full, name), name
    assert streamed.total_cached_tokens == full.total_cached_tokens
    assert streamed.estimated_cost_usd == pytest.approx(full.estimated_cost_usd)
    assert streamed.error_categories() == full.error_categories()
    assert streamed.unpriced_models == full.unpriced_models == ["no-such-model"]
    assert (streamed.replayed_count, streamed.total_attempts, streamed.billed_batch_count) == (
        full.replayed_count,
        full.total_attempts,
        full.billed_batch_count,
    )
    assert [r.item_id for r in streamed.results] == [r.item_id for r in full.failed_items()]
