"""GeminiModel / GeminiCachedModel through the real google-genai SDK against the loopback emulator."""

from __future__ import annotations

import asyncio
import threading
import time

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
    started = time.monotonic()
    await owner
    await asyncio.wait_for(slow.delete_cache(), timeout=5)
    assert time.monotonic() - started < 5
    assert emulator.count("cachedContents.create") == 1
