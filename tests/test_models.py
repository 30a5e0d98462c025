"""GeminiModel / GeminiCachedModel through the real google-genai SDK against the loopback emulator."""

from __future__ import annotations

import asyncio
import threading

import pytest
from google.genai import types
from pydantic import BaseModel

from prefect_batchllm.core.errors import BlockedResponseError, InvalidOutputError
from prefect_batchllm.models import GeminiCachedModel, GeminiModel, LLMModel, ManagedLLMModel
from prefect_batchllm.models.gemini import usage_from_response
from prefect_batchllm.testing import Fault

MODEL = "gemini-2.5-flash"
DOC = ["The collected works of a very long book. " * 50]


class Person(BaseModel):
    name: str
    age: int


def cached(emulator, **kwargs) -> GeminiCachedModel:
    kwargs.setdefault("cached_content", DOC)
    return GeminiCachedModel(MODEL, emulator.client(), **kwargs)


# -- GeminiModel ------------------------------------------------------------------------------------------


async def test_text_generation_usage_and_metadata(emulator):
    model = GeminiModel(MODEL, emulator.client(), system_instruction="be terse")
    assert isinstance(model, LLMModel)
    response = await model.generate("hello [item-1]", temperature=0.3)

    assert response.text == "echo: hello [item-1]"
    assert response.input_tokens > 0 and response.output_tokens > 0
    assert response.total_tokens == response.input_tokens + response.output_tokens
    assert response.cached_input_tokens == 0
    meta = response.metadata
    assert meta["finish_reason"] == "STOP"
    assert meta["safety_ratings"]["HARM_CATEGORY_HARASSMENT"] == "NEGLIGIBLE"
    assert meta["model_version"] == MODEL and meta["response_id"]
    assert meta["prompt_feedback"] is None and meta["parsed"] is None

    (request,) = emulator.requests_for("generateContent")
    assert request.body["systemInstruction"]["parts"][0]["text"] == "be terse"
    assert request.body["generationConfig"]["temperature"] == 0.3
    assert emulator.usage_totals()["total"] == response.total_tokens


async def test_system_instruction_per_call_overrides_default(emulator):
    model = GeminiModel(MODEL, emulator.client(), system_instruction="default")
    await model.generate("x", system_instruction="override")
    assert emulator.requests[-1].body["systemInstruction"]["parts"][0]["text"] == "override"


async def test_structured_output_via_response_schema(emulator):
    model = GeminiModel(MODEL, emulator.client())
    config = {"response_mime_type": "application/json", "response_schema": Person, "max_output_tokens": 256}
    response = await model.generate("who?", config=config)

    assert isinstance(response.metadata["parsed"], Person)
    assert Person.model_validate_json(response.text) == response.metadata["parsed"]
    gen = emulator.requests[-1].body["generationConfig"]
    assert gen["responseMimeType"] == "application/json"
    assert gen["responseSchema"]["type"] == "OBJECT"
    assert gen["maxOutputTokens"] == 256


async def test_multimodal_list_prompt_passes_through(emulator):
    model = GeminiModel(MODEL, emulator.client())
    image = types.Part.from_bytes(data=b"\x89PNG fake image bytes", mime_type="image/png")
    response = await model.generate([image, "describe this image"])

    assert response.text.startswith("echo:")
    parts = emulator.requests[-1].body["contents"][0]["parts"]
    inline = parts[0]["inlineData"]  # the SDK sends this one key in snake_case on the wire
    assert inline.get("mimeType", inline.get("mime_type")) == "image/png"
    assert inline["data"]  # base64 of the bytes
    assert parts[1]["text"] == "describe this image"


async def test_safety_settings_are_sent(emulator):
    settings = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}]
    model = GeminiModel(MODEL, emulator.client(), safety_settings=settings)
    await model.generate("x")
    assert emulator.requests[-1].body["safetySettings"] == settings


async def test_blocked_prompt_raises_with_ratings_and_billed_tokens(emulator):
    emulator.faults.add(Fault.safety_block("PROHIBITED_CONTENT"), contains="[bad]")
    model = GeminiModel(MODEL, emulator.client())
    with pytest.raises(BlockedResponseError) as info:
        await model.generate("something [bad]")
    exc = info.value
    assert exc.block_reason == "PROHIBITED_CONTENT"
    assert exc.safety_ratings["HARM_CATEGORY_DANGEROUS_CONTENT"] == "HIGH"
    assert exc.token_usage["input_tokens"] > 0


async def test_finish_reason_safety_raises_blocked(emulator):
    emulator.faults.add(Fault.finish_safety())
    with pytest.raises(BlockedResponseError) as info:
        await GeminiModel(MODEL, emulator.client()).generate("x")
    assert info.value.block_reason == "SAFETY"
    assert info.value.token_usage["total_tokens"] > 0


async def test_max_tokens_keeps_partial_text(emulator):
    response = await GeminiModel(MODEL, emulator.client()).generate(
        "a long prompt " * 20, config={"max_output_tokens": 2}
    )
    assert response.metadata["finish_reason"] == "MAX_TOKENS"
    assert response.text


async def test_request_config_is_built_once_per_distinct_settings(emulator, monkeypatch):
    """generate() validates a GenerateContentConfig once per distinct (temperature, instruction, config),
    not per call; what reaches the server is the same as with a fresh config each time."""
    model = GeminiModel(MODEL, emulator.client(), system_instruction="be terse")
    built: list[tuple[object, ...]] = []
    original = GeminiModel._build_config

    def counting(self, *args, **kwargs):
        built.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GeminiModel, "_build_config", counting)
    schema_config = {"response_mime_type": "application/json", "response_schema": Person}
    for i in range(5):
        await model.generate(f"q{i}", config=dict(schema_config))
    assert len(built) == 1
    await model.generate("hotter", temperature=0.7, config=dict(schema_config))
    await model.generate("plain")
    await model.generate("plain again")
    assert len(built) == 3
    # A value that cannot be keyed (a pydantic object) is built per call, still sent the same.
    thinking = {"thinking_config": types.ThinkingConfig(thinking_budget=0)}
    await model.generate("t1", config=thinking)
    await model.generate("t2", config=thinking)
    assert len(built) == 5

    bodies = [r.body for r in emulator.requests_for("generateContent")]
    assert [b["generationConfig"].get("temperature") for b in bodies] == [0.0] * 5 + [0.7, 0.0, 0.0, 0.0, 0.0]
    assert all(b["generationConfig"]["responseMimeType"] == "application/json" for b in bodies[:6])
    assert all("responseSchema" in b["generationConfig"] for b in bodies[:6])
    assert all(b["systemInstruction"]["parts"][0]["text"] == "be terse" for b in bodies)
    assert "thinkingConfig" in bodies[-1]["generationConfig"]


async def test_sent_config_matches_a_plain_generate_content_config(emulator):
    """The config generate() sends is the request a plain GenerateContentConfig makes (same body)."""
    config = {
        "max_output_tokens": 64,
        "top_p": 0.5,
        "stop_sequences": ["END"],
        "response_mime_type": "application/json",
        "response_schema": Person,
    }
    settings = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]
    model = GeminiModel(MODEL, emulator.client(), system_instruction="s", safety_settings=settings)
    await model.generate("same [a]", temperature=0.2, config=config)
    plain = types.GenerateContentConfig(
        temperature=0.2, system_instruction="s", safety_settings=settings, **config
    )
    await emulator.client().aio.models.generate_content(model=MODEL, contents="same [a]", config=plain)
    ours, theirs = (r.body for r in emulator.requests_for("generateContent"))
    assert ours == theirs
    sent = model._call_config(0.2, None, config)
    assert isinstance(sent, types.GenerateContentConfig)
    assert "temperature" not in sent and ("temperature", 0.2) in sent  # pydantic's own `in` semantics


def _response(**kwargs) -> types.GenerateContentResponse:
    return types.GenerateContentResponse.model_validate(kwargs)


def test_empty_text_with_max_tokens_is_invalid_output_with_usage():
    model = GeminiModel(MODEL, object.__new__(type("C", (), {"aio": None})))
    raw = _response(
        candidates=[{"finish_reason": "MAX_TOKENS", "content": {"role": "model", "parts": []}}],
        usage_metadata={"prompt_token_count": 10, "thoughts_token_count": 30, "total_token_count": 40},
    )
    with pytest.raises(InvalidOutputError) as info:
        model._to_response(raw, schema_requested=False)
    assert info.value.token_usage == {
        "input_tokens": 10,
        "output_tokens": 30,
        "total_tokens": 40,
        "cached_input_tokens": 0,
    }


def test_usage_counts_thoughts_as_output_and_cached_tokens():
    raw = _response(
        usage_metadata={
            "prompt_token_count": 7036,
            "candidates_token_count": 19,
            "thoughts_token_count": 7,
            "cached_content_token_count": 7021,
            "total_token_count": 7062,
        }
    )
    assert usage_from_response(raw) == {
        "input_tokens": 7036,
        "output_tokens": 26,
        "total_tokens": 7062,
        "cached_input_tokens": 7021,
    }


def test_sdk_retries_stay_off(emulator):
    client = emulator.client()
    assert client._api_client._http_options.retry_options is None
    config = GeminiModel(MODEL, client)._build_config(0.0, None, {"max_output_tokens": 5})
    assert config.http_options is None


def test_fingerprint_is_stable_and_tracks_identity(emulator):
    client = emulator.client()
    a = GeminiModel(MODEL, client, system_instruction="s")
    assert (
        a.fingerprint()
        == GeminiModel(f"models/{MODEL}", emulator.client(), system_instruction="s").fingerprint()
    )
    assert a.fingerprint() != GeminiModel(MODEL, client, system_instruction="t").fingerprint()
    assert a.fingerprint() != GeminiModel("gemini-2.5-pro", client, system_instruction="s").fingerprint()
    settings = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]
    assert (
        a.fingerprint()
        != GeminiModel(MODEL, client, system_instruction="s", safety_settings=settings).fingerprint()
    )


def test_bad_input_is_rejected_clearly(emulator):
    client = emulator.client()
    with pytest.raises(ValueError, match="model"):
        GeminiModel("", client)
    with pytest.raises(ValueError, match="model"):
        GeminiModel("   ", client)
    with pytest.raises(TypeError, match="client is None"):
        GeminiModel(MODEL, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="client"):
        GeminiModel(MODEL, 42)  # type: ignore[arg-type]


async def test_unknown_config_key_names_the_key(emulator):
    model = GeminiModel(MODEL, emulator.client())
    with pytest.raises(ValueError, match="max_tokens"):
        await model.generate("x", config={"max_tokens": 5})
    assert emulator.count("generateContent") == 0


# -- GeminiCachedModel ------------------------------------------------------------------------------------


async def test_cached_model_validates_input(emulator):
    client = emulator.client()
    with pytest.raises(ValueError, match="cached_content"):
        GeminiCachedModel(MODEL, client, [])
    with pytest.raises(ValueError, match="cached_content"):
        GeminiCachedModel(MODEL, client, "")
    with pytest.raises(ValueError, match="cache_ttl_seconds"):
        GeminiCachedModel(MODEL, client, DOC, cache_ttl_seconds=-5)
    with pytest.raises(ValueError, match="cache_ttl_seconds"):
        GeminiCachedModel(MODEL, client, DOC, cache_ttl_seconds=0)
    with pytest.raises(ValueError, match="cache_renewal_buffer_seconds"):
        GeminiCachedModel(MODEL, client, DOC, cache_ttl_seconds=60, cache_renewal_buffer_seconds=60)
    with pytest.raises(ValueError, match="cache_renewal_buffer_seconds"):
        GeminiCachedModel(MODEL, client, DOC, cache_renewal_buffer_seconds=-1)
    with pytest.raises(ValueError, match="model"):
        GeminiCachedModel("", client, DOC)
    with pytest.raises(TypeError, match="client"):
        GeminiCachedModel(MODEL, None, DOC)  # type: ignore[arg-type]


async def test_prepare_creates_exactly_once_under_50_concurrent_callers(emulator):
    model = cached(
        emulator, system_instruction="You answer questions about the book.", cache_tags={"run": "a"}
    )
    assert isinstance(model, ManagedLLMModel)
    await asyncio.gather(*(model.prepare() for _ in range(50)))

    assert emulator.count("cachedContents.create") == 1
    assert model.creates == 1
    assert model.cache_name in emulator.caches
    assert model.expire_time is not None
    (create,) = emulator.requests_for("cachedContents.create")
    assert create.body["displayName"] == model.display_name
    assert len(model.display_name) <= 128
    assert create.body["systemInstruction"]["parts"][0]["text"].startswith("You answer")
    assert create.body["ttl"] == "3600s"


async def test_prepare_is_shared_across_event_loops_and_threads(emulator):
    # A client factory gives every loop its own genai.Client; the lock is not bound to any loop.
    model = GeminiCachedModel(MODEL, emulator.client, DOC)
    errors: list[BaseException] = []

    def worker() -> None:
        async def run() -> None:
            await asyncio.gather(*(model.prepare() for _ in range(10)))
            await model.generate("question")

        try:
            asyncio.run(run())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert emulator.count("cachedContents.create") == 1
    assert emulator.count("generateContent") == 4
    # the current loop works too (a fifth client)
    await model.generate("one more")
    assert emulator.count("cachedContents.create") == 1


async def test_second_instance_reuses_live_cache(emulator):
    first = cached(emulator, cache_tags={"book": "1"})
    await first.prepare()
    second = cached(emulator, cache_tags={"book": "1"})
    await second.prepare()
    assert second.cache_name == first.cache_name
    assert emulator.count("cachedContents.create") == 1
    assert first.fingerprint() == second.fingerprint()

    other_tags = cached(emulator, cache_tags={"book": "2"})
    await other_tags.prepare()
    other_content = cached(emulator, cached_content=["different"], cache_tags={"book": "1"})
    await other_content.prepare()
    assert emulator.count("cachedContents.create") == 3
    assert len({first.cache_name, other_tags.cache_name, other_content.cache_name}) == 3
    assert other_content.fingerprint() != first.fingerprint()


async def test_expired_cache_is_not_reused(emulator):
    first = cached(emulator)
    await first.prepare()
    emulator.expire_cache(first.cache_name)
    second = cached(emulator)
    await second.prepare()
    assert second.cache_name != first.cache_name
    assert emulator.count("cachedContents.create") == 2


async def test_generate_uses_cache_without_system_instruction(emulator):
    model = cached(emulator, system_instruction="cache-level instruction")
    response = await model.generate("question [item-1]")
    assert response.cached_input_tokens > 0
    assert response.input_tokens > response.cached_input_tokens
    (request,) = emulator.requests_for("generateContent")
    assert request.cached_content == model.cache_name
    assert "systemInstruction" not in request.body
    assert emulator.count("cachedContents.create") == 1


async def test_cached_generate_rejects_system_instruction_and_tools(emulator):
    model = cached(emulator)
    with pytest.raises(ValueError, match="system_instruction"):
        await model.generate("x", system_instruction="nope")
    with pytest.raises(ValueError, match="tools"):
        await model.generate("x", config={"tools": []})
    assert emulator.count("generateContent") == 0


async def test_renewal_near_expiry_patches_once(emulator):
    model = cached(emulator, cache_ttl_seconds=4, cache_renewal_buffer_seconds=2)
    await model.prepare()
    first_expiry = model.expire_time
    await model.generate("fresh")  # > 2 s left: no renewal
    assert emulator.count("cachedContents.patch") == 0
    await asyncio.sleep(2.2)  # now within the renewal buffer
    await asyncio.gather(*(model.generate(f"q{i}") for i in range(10)))

    assert emulator.count("cachedContents.patch") == 1
    assert model.renewals == 1
    assert model.expire_time > first_expiry
    assert emulator.requests_for("cachedContents.patch")[0].body == {"ttl": "4s"}
    assert emulator.count("cachedContents.create") == 1


async def test_no_renewal_when_auto_renew_is_off(emulator):
    model = cached(emulator, cache_ttl_seconds=60, cache_renewal_buffer_seconds=59.9, auto_renew=False)
    await model.prepare()
    await asyncio.sleep(0.2)  # within the renewal buffer, yet auto_renew is off
    await model.generate("q")
    assert emulator.count("cachedContents.patch") == 0


async def test_cache_deleted_server_side_is_recreated_once(emulator):
    model = cached(emulator)
    await model.prepare()
    old = model.cache_name
    emulator.delete_cache_server_side(old)

    responses = await asyncio.gather(*(model.generate(f"q{i}") for i in range(10)))

    assert all(r.text.startswith("echo:") for r in responses)
    assert emulator.count("cachedContents.create") == 2  # the original plus ONE recreation
    assert model.cache_name != old and model.cache_name in emulator.caches
    failed = emulator.requests_for("generateContent", status=403)
    assert 1 <= len(failed) <= 10
    assert emulator.count("generateContent", status=200) == 10


async def test_expired_cache_is_recreated_on_generate(emulator):
    model = cached(emulator, auto_renew=False)
    await model.prepare()
    emulator.expire_cache(model.cache_name)
    response = await model.generate("q")
    assert response.text == "echo: q"
    assert emulator.count("cachedContents.create") == 2


async def test_cleanup_preserves_cache(emulator):
    model = cached(emulator)
    await model.prepare()
    await model.cleanup()
    await model.cleanup()
    assert model.cache_name in emulator.caches
    assert emulator.count("cachedContents.delete") == 0


async def test_delete_cache_racing_itself_hits_api_once(emulator):
    model = cached(emulator)
    await model.prepare()
    name = model.cache_name
    await asyncio.gather(*(model.delete_cache() for _ in range(10)))

    assert emulator.count("cachedContents.delete") == 1
    assert name not in emulator.caches
    assert model.cache_name is None and model.expire_time is None
    await model.delete_cache()  # later calls return silently
    assert emulator.count("cachedContents.delete") == 1


async def test_delete_cache_of_unprepared_instance_finds_the_shared_cache(emulator):
    await cached(emulator).prepare()
    assert len(emulator.caches) == 1
    await cached(emulator).delete_cache()
    assert emulator.caches == {}
    assert emulator.count("cachedContents.delete") == 1


async def test_delete_cache_tolerates_cache_already_gone(emulator):
    model = cached(emulator)
    await model.prepare()
    emulator.delete_cache_server_side(model.cache_name)
    await model.delete_cache()
    assert model.cache_name is None


async def test_generate_after_delete_creates_a_new_cache(emulator):
    model = cached(emulator)
    await model.generate("a")
    await model.delete_cache()
    await model.generate("b")
    assert emulator.count("cachedContents.create") == 2
    assert len(emulator.caches) == 1


async def test_cache_create_error_surfaces_from_prepare(emulator):
    emulator.faults.add(Fault.status(500), endpoint="cachedContents.create")
    model = cached(emulator)
    with pytest.raises(Exception, match="500"):
        await model.prepare()
    assert model.cache_name is None
    await model.prepare()  # the next caller tries again
    assert model.cache_name is not None


async def test_waiter_cancellation_does_not_wedge_the_lock(emulator):
    slow = cached(emulator)
    emulator.faults.add(Fault.delay(0.3), endpoint="cachedContents.create")
    owner = asyncio.ensure_future(slow.prepare())
    await asyncio.sleep(0.05)
    waiter = asyncio.ensure_future(slow.prepare())
    await asyncio.sleep(0.05)
    waiter.cancel()
    await owner
    await asyncio.wait_for(slow.delete_cache(), timeout=30)  # a wedged lock would never return
    assert emulator.count("cachedContents.create") == 1


# -- review fixes ------------------------------------------------------------------------------------------


async def test_invalid_config_value_is_a_fatal_value_error(emulator):
    from prefect_batchllm.core.errors import DefaultErrorClassifier, ErrorCategory

    model = GeminiModel(MODEL, emulator.client())
    with pytest.raises(ValueError, match="invalid Gemini config") as info:
        await model.generate("x", config={"max_output_tokens": "lots"})
    assert DefaultErrorClassifier().classify(info.value).category is ErrorCategory.FATAL
    assert emulator.count("generateContent") == 0


def test_recitation_without_text_is_blocked_and_malformed_call_is_invalid_output():
    from prefect_batchllm.core.errors import DefaultErrorClassifier, ErrorCategory

    model = GeminiModel(MODEL, object.__new__(type("C", (), {"aio": None})))
    usage = {"prompt_token_count": 10, "candidates_token_count": 3, "total_token_count": 13}
    recitation = _response(
        candidates=[{"finish_reason": "RECITATION", "content": {"role": "model", "parts": []}}],
        usage_metadata=usage,
    )
    with pytest.raises(BlockedResponseError) as info:
        model._to_response(recitation, schema_requested=False)
    assert info.value.block_reason == "RECITATION" and info.value.token_usage["total_tokens"] == 13
    verdict = DefaultErrorClassifier().classify(info.value)
    assert verdict.category is ErrorCategory.BLOCKED and not verdict.is_retryable

    malformed = _response(
        candidates=[{"finish_reason": "MALFORMED_FUNCTION_CALL", "content": {"role": "model", "parts": []}}],
        usage_metadata=usage,
    )
    with pytest.raises(InvalidOutputError):
        model._to_response(malformed, schema_requested=False)


def test_usage_without_metadata_is_normalised_and_response_token_usage():
    from prefect_batchllm.models import LLMResponse

    assert usage_from_response(_response()) == {
        "input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
        "cached_input_tokens": 0,
    }
    assert LLMResponse("t", 3, 4, 7, 2).token_usage() == {
        "input_tokens": 3,
        "output_tokens": 4,
        "total_tokens": 7,
        "cached_input_tokens": 2,
    }


async def test_cache_ttl_and_buffer_are_validated_and_never_truncated(emulator):
    client = emulator.client()
    with pytest.raises(ValueError, match="cache_ttl_seconds"):
        GeminiCachedModel(MODEL, client, DOC, cache_ttl_seconds=0.5, cache_renewal_buffer_seconds=0)
    with pytest.raises(TypeError, match="cache_renewal_buffer_seconds"):
        GeminiCachedModel(MODEL, client, DOC, cache_renewal_buffer_seconds="300")  # type: ignore[arg-type]
    model = cached(emulator, cache_ttl_seconds=90.5, cache_renewal_buffer_seconds=10)
    await model.prepare()
    (create,) = emulator.requests_for("cachedContents.create")
    assert create.body["ttl"] == "90.5s"


def test_display_name_is_hashed_once_and_fingerprint_includes_safety(emulator, monkeypatch):
    from prefect_batchllm.models import gemini as gemini_module

    model = cached(emulator, cache_tags={"run": "a"})
    calls = []
    real = gemini_module._sha256
    monkeypatch.setattr(gemini_module, "_sha256", lambda payload: calls.append(1) or real(payload))
    names = {model.display_name for _ in range(20)}
    model.fingerprint()
    assert len(names) == 1 and calls == []  # no re-hashing of the cached content per call

    settings = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]
    strict = cached(emulator, cache_tags={"run": "a"}, safety_settings=settings)
    assert strict.fingerprint() != model.fingerprint()
    assert strict.display_name == model.display_name  # safety is per request: the cache is shared


def test_unfingerprintable_content_is_rejected_not_repr_hashed(emulator):
    class Opaque:
        pass

    with pytest.raises(TypeError, match="cannot fingerprint"):
        GeminiCachedModel(MODEL, emulator.client(), [Opaque()])


async def test_generate_never_sees_a_cleared_cache_name_across_threads(emulator):
    """Thread A recreates a vanished cache while this loop's generate() is between prepare() and reading
    the name: the name must stay readable (the stale one) until the replacement is adopted."""
    model = GeminiCachedModel(MODEL, emulator.client, DOC)  # a factory: one client per loop
    await model.prepare()
    emulator.delete_cache_server_side(model.cache_name)
    main_thread = threading.get_ident()
    a_in_network = threading.Event()
    errors: list[BaseException] = []

    def slow(original):
        async def wrapper(*args, **kwargs):
            if threading.get_ident() != main_thread:
                a_in_network.set()
                await asyncio.sleep(0.3)
            return await original(*args, **kwargs)

        return wrapper

    model._create = slow(model._create)  # type: ignore[method-assign]
    model._find_live = slow(model._find_live)  # type: ignore[method-assign]

    def thread_a() -> None:
        try:
            asyncio.run(model.generate("from thread a"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=thread_a)
    real_needs_renewal = model._needs_renewal
    started = []

    def needs_renewal() -> bool:
        if threading.get_ident() == main_thread and not started:
            started.append(1)
            worker.start()  # A fails with 403 and starts recreating while we sit after prepare()
            assert a_in_network.wait(5)
        return real_needs_renewal()

    model._needs_renewal = needs_renewal  # type: ignore[method-assign]
    response = await model.generate("from the main loop")
    await asyncio.to_thread(worker.join, 10)
    assert errors == []
    assert response.text == "echo: from the main loop"
    assert emulator.count("cachedContents.create") == 2  # the original plus ONE replacement


async def test_generate_racing_delete_cache_does_not_resurrect_the_cache(emulator):
    model = cached(emulator)
    await model.prepare()
    results = await asyncio.gather(
        model.generate("a"), model.delete_cache(), model.generate("b"), return_exceptions=True
    )
    assert emulator.caches == {}  # delete_cache() won: nothing was recreated behind its back
    assert model.creates == 1 and model.cache_name is None
    for result in results:
        if isinstance(result, BaseException):
            assert isinstance(result, RuntimeError) and "delete_cache" in str(result)


async def test_copies_of_a_model_adopt_one_replacement_cache(emulator):
    # Two instances with the same content stand in for pickled copies in separate processes.
    first, second = cached(emulator), cached(emulator)
    await first.prepare()
    await second.prepare()
    assert first.cache_name == second.cache_name
    emulator.delete_cache_server_side(first.cache_name)

    await first.generate("q1")
    await second.generate("q2")

    assert emulator.count("cachedContents.create") == 2  # the original plus ONE replacement
    assert second.cache_name == first.cache_name and second.creates == 0
