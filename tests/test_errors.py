"""DefaultErrorClassifier on exceptions produced by REAL HTTP responses of the emulator.

Every category is reached twice where it applies: through the google-genai SDK (our ``GeminiModel`` /
``GeminiStrategy``) and through pydantic-ai's ``GoogleModel`` on the same wire.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import httpx2
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai import exceptions as pai_exc
from pydantic_ai.models.google import GoogleModel
from pydantic_ai.providers.google import GoogleProvider

from prefect_batchllm.core.errors import (
    BlockedResponseError,
    DefaultErrorClassifier,
    ErrorCategory,
    ErrorInfo,
    InvalidOutputError,
    is_missing_cache_error,
    retry_after_of,
    token_usage_of,
)
from prefect_batchllm.models import GeminiCachedModel, GeminiModel
from prefect_batchllm.strategies import GeminiStrategy, PydanticAIStrategy
from prefect_batchllm.testing import Fault

MODEL = "gemini-2.5-flash"
# google-genai 2.34 (installed here) uses httpx; the 3.x line uses httpx2, whose classes do not subclass
# httpx's. The classifier must handle both families.
TIMEOUTS = (httpx.TimeoutException, httpx2.TimeoutException)
TRANSPORT_ERRORS = (httpx.TransportError, httpx2.TransportError)
classifier = DefaultErrorClassifier()


class Person(BaseModel):
    name: str
    age: int


async def failure(call: Callable[[], Awaitable[Any]]) -> BaseException:
    """Run ``call`` and return the exception it raised (failing the test if it succeeded)."""
    try:
        await call()
    except Exception as exc:
        return exc
    pytest.fail("expected the call to fail")


def sdk_call(client: genai.Client, model: str = MODEL) -> Callable[[], Awaitable[Any]]:
    return lambda: GeminiModel(model, client).generate("hello")


def pai_call(client: genai.Client, model: str = MODEL, **agent_kwargs: Any) -> Callable[[], Awaitable[Any]]:
    agent = Agent(GoogleModel(model, provider=GoogleProvider(client=client)), **agent_kwargs)
    return lambda: agent.run("hello")


def both(emulator) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    return [("sdk", sdk_call(emulator.client())), ("pydantic-ai", pai_call(emulator.client()))]


def check(info: ErrorInfo, category: ErrorCategory, retryable: bool) -> None:
    assert info.category is category, info
    assert info.is_retryable is retryable, info


# -- rate limits and quota -------------------------------------------------------------------------------


async def test_429_with_retry_info_is_rate_limited_with_delay(emulator):
    for label, call in both(emulator):
        emulator.faults.add(Fault.rate_limit(retry_delay_s=7))
        exc = await failure(call)
        info = classifier.classify(exc)
        check(info, ErrorCategory.RATE_LIMITED, True)
        assert info.retry_after == 7.0, label
        assert info.is_rate_limit
    assert emulator.count("generateContent", status=429) == 2


async def test_retry_info_parsed_from_raw_sdk_error(emulator):
    emulator.faults.add(Fault.rate_limit(retry_delay_s=2.5))
    exc = await failure(sdk_call(emulator.client()))
    assert isinstance(exc, genai_errors.ClientError) and exc.code == 429
    assert retry_after_of(exc) == 2.5


async def test_pydantic_ai_model_rate_limit_error_keeps_retry_after(emulator):
    emulator.faults.add(Fault.rate_limit(retry_delay_s=7))
    exc = await failure(pai_call(emulator.client()))
    assert isinstance(exc, pai_exc.ModelRateLimitError)
    info = classifier.classify(exc)
    check(info, ErrorCategory.RATE_LIMITED, True)
    assert info.retry_after == 7.0


async def test_daily_quota_is_exhausted_not_retryable(emulator):
    for _label, call in both(emulator):
        emulator.faults.add(Fault.rate_limit(retry_delay_s=30, per_day=True))
        check(classifier.classify(await failure(call)), ErrorCategory.QUOTA_EXHAUSTED, False)


# -- transient and timeouts -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [500, 502, 503, 504])
async def test_server_errors_are_transient(emulator, code):
    for label, call in both(emulator):
        emulator.faults.add(Fault.status(code))
        exc = await failure(call)
        check(classifier.classify(exc), ErrorCategory.TRANSIENT, True)
        if label == "sdk":
            assert isinstance(exc, genai_errors.ServerError) and exc.code == code
    if code == 502:  # an HTML page from a proxy, not the JSON envelope
        assert all(r.status == 502 for r in emulator.requests_for("generateContent"))


async def test_hang_with_short_client_timeout_is_timeout(emulator):
    options = types.HttpOptions(base_url=emulator.base_url, api_version="v1beta", timeout=300)  # ms
    for label, call in (
        ("sdk", sdk_call(genai.Client(api_key="k", http_options=options))),
        ("pydantic-ai", pai_call(genai.Client(api_key="k", http_options=options))),
    ):
        emulator.faults.add(Fault.hang(5))
        exc = await failure(call)
        assert isinstance(exc, TIMEOUTS), label
        check(classifier.classify(exc), ErrorCategory.TIMEOUT, True)


async def test_connection_reset_is_transient(emulator):
    for _label, call in both(emulator):
        emulator.faults.add(Fault.connection_reset())
        exc = await failure(call)
        assert isinstance(exc, TRANSPORT_ERRORS)
        check(classifier.classify(exc), ErrorCategory.TRANSIENT, True)


async def test_malformed_200_body(emulator):
    emulator.faults.add(Fault.malformed_body())
    sdk_exc = await failure(sdk_call(emulator.client()))
    # The SDK raises a raw JSONDecodeError for a malformed body: the server's fault, so transient.
    check(classifier.classify(sdk_exc), ErrorCategory.TRANSIENT, True)
    emulator.faults.add(Fault.malformed_body())
    pai_exc_ = await failure(pai_call(emulator.client()))
    check(classifier.classify(pai_exc_), ErrorCategory.TRANSIENT, True)


# -- fatal ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "category"),
    [(400, ErrorCategory.FATAL), (401, ErrorCategory.AUTH), (403, ErrorCategory.AUTH)],
)
async def test_client_errors_are_not_retried(emulator, code, category):
    for _label, call in both(emulator):
        emulator.faults.add(Fault.status(code))
        check(classifier.classify(await failure(call)), category, False)


async def test_invalid_api_key_is_auth(emulator):
    message = "API key not valid. Please pass a valid API key."
    for _label, call in both(emulator):
        emulator.faults.add(Fault.status(400, message))
        exc = await failure(call)
        check(classifier.classify(exc), ErrorCategory.AUTH, False)
        assert "API key not valid" in str(exc)


async def test_missing_api_key_is_auth(emulator):
    # The SDK refuses an empty key client-side; blank the header to reach the server without one.
    options = types.HttpOptions(
        base_url=emulator.base_url, api_version="v1beta", headers={"x-goog-api-key": ""}
    )
    for label, call in (
        ("sdk", sdk_call(genai.Client(api_key="k", http_options=options))),
        ("pydantic-ai", pai_call(genai.Client(api_key="k", http_options=options))),
    ):
        exc = await failure(call)
        check(classifier.classify(exc), ErrorCategory.AUTH, False)
        assert "unregistered callers" in str(exc), label
    assert emulator.count("generateContent", status=403) == 2


async def test_unknown_model_is_not_found(emulator):
    for _label, call in (
        ("sdk", sdk_call(emulator.client(), "no-such-model")),
        ("pydantic-ai", pai_call(emulator.client(), "no-such-model")),
    ):
        check(classifier.classify(await failure(call)), ErrorCategory.NOT_FOUND, False)
    assert emulator.count("generateContent", status=404) == 2


# -- output problems --------------------------------------------------------------------------------------


async def test_invalid_json_for_schema_is_invalid_output(emulator):
    emulator.faults.add(Fault.invalid_json())
    strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client()), response_schema=Person)
    exc = await failure(lambda: strategy.execute("who?", 1, 10.0))
    assert isinstance(exc, InvalidOutputError)
    check(classifier.classify(exc), ErrorCategory.INVALID_OUTPUT, True)
    assert token_usage_of(exc)["total_tokens"] > 0

    emulator.faults.add(Fault.invalid_json(), times=None)
    pai = PydanticAIStrategy(
        Agent(
            GoogleModel(MODEL, provider=GoogleProvider(client=emulator.client())),
            output_type=Person,
            retries=0,
        )
    )
    exc = await failure(lambda: pai.execute("who?", 1, 10.0))
    assert isinstance(exc, pai_exc.UnexpectedModelBehavior)
    check(classifier.classify(exc), ErrorCategory.INVALID_OUTPUT, True)


@pytest.mark.parametrize("fault", [Fault.safety_block(), Fault.finish_safety()], ids=["prompt", "finish"])
async def test_safety_block_is_blocked_never_retried(emulator, fault):
    for label, call in both(emulator):
        emulator.faults.add(fault)
        exc = await failure(call)
        if label == "sdk":
            assert isinstance(exc, BlockedResponseError)
        else:
            assert isinstance(exc, pai_exc.ContentFilterError)
        check(classifier.classify(exc), ErrorCategory.BLOCKED, False)


# -- context cache ----------------------------------------------------------------------------------------


async def test_missing_cache_answer_is_recognised(emulator):
    client = emulator.client()
    model = GeminiCachedModel(MODEL, client, ["context " * 100])
    await model.prepare()
    emulator.delete_cache_server_side(model.cache_name)
    exc = await failure(lambda: client.aio.caches.get(name=model.cache_name))
    assert isinstance(exc, genai_errors.ClientError) and exc.code == 403
    assert is_missing_cache_error(exc)
    check(classifier.classify(exc), ErrorCategory.TRANSIENT, True)

    emulator.faults.add(Fault.status(403))  # a plain permission error is not a missing cache
    other = await failure(sdk_call(client))
    assert not is_missing_cache_error(other)
    check(classifier.classify(other), ErrorCategory.AUTH, False)


async def test_cache_size_rejection_is_fatal(emulator):
    emulator.min_cache_tokens = 10_000
    model = GeminiCachedModel(MODEL, emulator.client(), ["tiny"])
    exc = await failure(model.prepare)
    check(classifier.classify(exc), ErrorCategory.FATAL, False)
    assert "too small" in str(exc)


def test_httpx2_and_httpx_transport_errors_classify_alike():
    for family in (httpx, httpx2):
        check(classifier.classify(family.ReadTimeout("slow")), ErrorCategory.TIMEOUT, True)
        check(classifier.classify(family.ConnectError("refused")), ErrorCategory.TRANSIENT, True)
        check(classifier.classify(family.RemoteProtocolError("reset")), ErrorCategory.TRANSIENT, True)


async def test_invalid_api_key_is_auth_with_the_real_error_shape() -> None:
    from prefect_batchllm.testing import GeminiEmulator

    with GeminiEmulator(valid_api_keys={"the-right-key"}) as emu:
        exc = await failure(sdk_call(emu.client(api_key="a-wrong-key")))
        assert getattr(exc, "code", None) == 400
        assert exc.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"
        check(classifier.classify(exc), ErrorCategory.AUTH, False)
        ok = await sdk_call(emu.client(api_key="the-right-key"))()
        assert ok.text
