"""The Gemini emulator, exercised only through the real google-genai SDK (and pydantic-ai) over HTTP."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from enum import StrEnum
from typing import Literal

import httpx
import httpx2
import pytest
from google import genai
from google.genai import errors, types
from pydantic import BaseModel, Field, TypeAdapter

from prefect_batchllm.testing import Fault, GeminiEmulator, RecordedRequest

MODEL = "gemini-2.5-flash"
# google-genai 2.34 uses httpx when it is installed (httpx2 only via GOOGLE_GENAI_HTTP_CLIENT=httpx2);
# the two exception families are unrelated, so transport errors are checked against both.
TRANSPORT_ERRORS = (httpx.TransportError, httpx2.TransportError)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_emulator() -> Iterator[GeminiEmulator]:
    with GeminiEmulator(seed=7) as emu:
        yield emu


@pytest.fixture
def emu(shared_emulator: GeminiEmulator) -> Iterator[GeminiEmulator]:
    """The module's emulator, reset to a clean, fast, quota-free state for each test."""
    shared_emulator.reset()
    shared_emulator.latency = 0.0
    shared_emulator.min_cache_tokens = 0
    shared_emulator.set_quota(rpm=None, tpm=None, quota_window_s=60.0)
    yield shared_emulator
    shared_emulator.reset()


@pytest.fixture
async def client(emu: GeminiEmulator) -> AsyncIterator[genai.Client]:
    c = emu.client()
    yield c
    await c.aio.aclose()


def retry_delay(exc: errors.APIError) -> str:
    """RetryInfo.retryDelay from the error body, where the SDK exposes it."""
    details = exc.details["error"]["details"]
    return next(d["retryDelay"] for d in details if d["@type"].endswith("RetryInfo"))


def quota_ids(exc: errors.APIError) -> list[str]:
    details = exc.details["error"]["details"]
    return [
        v["quotaId"] for d in details if d["@type"].endswith("QuotaFailure") for v in d.get("violations", [])
    ]


async def generate(client: genai.Client, prompt: str, **config: object) -> types.GenerateContentResponse:
    cfg = types.GenerateContentConfig(**config) if config else None  # type: ignore[arg-type]
    return await client.aio.models.generate_content(model=MODEL, contents=prompt, config=cfg)


# -- schema models -----------------------------------------------------------------------------------


class Mood(StrEnum):
    happy = "happy"
    sad = "sad"
    neutral = "neutral"


class Address(BaseModel):
    city: str
    postcode: str = Field(min_length=5, max_length=5)


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=130)
    score: float = Field(ge=0.0, le=1.0)
    active: bool
    mood: Mood
    kind: Literal["customer", "vendor"]
    nickname: str | None = None
    addresses: list[Address] = Field(min_length=1, max_length=3)
    tags: list[str]


class Review(BaseModel):
    item_id: str
    sentiment: Literal["positive", "negative"]
    confidence: float = Field(gt=0, lt=1)
    stars: int = Field(ge=1, le=5)
    reviewed_at: dt.datetime
    author: Person | None = None
    extras: dict[str, int] = Field(default_factory=dict)


# -- basic generation --------------------------------------------------------------------------------


async def test_text_generation_and_usage(emu: GeminiEmulator, client: genai.Client) -> None:
    r = await generate(client, "hello emulator", system_instruction="be terse", temperature=0.0)
    assert r.text == "echo: hello emulator"
    assert r.candidates and r.candidates[0].finish_reason == types.FinishReason.STOP
    usage = r.usage_metadata
    assert usage is not None and usage.prompt_token_count == 6  # ceil((14 + 8) / 4)
    assert usage.total_token_count == usage.prompt_token_count + (usage.candidates_token_count or 0)

    again = await generate(client, "hello emulator", system_instruction="be terse")
    assert again.text == r.text  # deterministic

    (rec, _) = emu.requests
    assert isinstance(rec, RecordedRequest)
    assert (rec.method, rec.api_version, rec.endpoint, rec.model, rec.status) == (
        "POST",
        "v1beta",
        "generateContent",
        MODEL,
        200,
    )
    assert rec.path == f"/v1beta/models/{MODEL}:generateContent"
    assert rec.prompt_text == "hello emulator" and rec.api_key == "test-key"
    assert rec.body is not None and rec.body["generationConfig"]["temperature"] == 0.0
    assert rec.usage is not None and rec.usage["totalTokenCount"] == usage.total_token_count
    assert emu.usage_totals()["prompt"] == 12 and emu.count("generateContent", status=200) == 2
    assert rec.finished_at >= rec.started_at


async def test_max_output_tokens_truncates(client: genai.Client) -> None:
    r = await generate(client, "x" * 100, max_output_tokens=5)
    assert r.candidates and r.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert r.text == ("echo: " + "x" * 100)[:20]


@pytest.mark.parametrize(
    ("api_version", "prefix"), [(None, "/v1beta/"), ("v1", "/v1/"), ("v1alpha", "/v1alpha/")]
)
async def test_api_versions(emu: GeminiEmulator, api_version: str | None, prefix: str) -> None:
    c = emu.client(api_version=api_version)
    try:
        r = await generate(c, "which path")
    finally:
        await c.aio.aclose()
    assert r.text == "echo: which path"
    assert emu.requests[-1].path.startswith(prefix)


async def test_streaming_chunks_with_usage_last(emu: GeminiEmulator, client: genai.Client) -> None:
    chunks = [
        c async for c in await client.aio.models.generate_content_stream(model=MODEL, contents="stream me")
    ]
    assert len(chunks) >= 2
    assert "".join(c.text or "" for c in chunks) == "echo: stream me"
    assert chunks[-1].usage_metadata is not None and chunks[-1].usage_metadata.total_token_count
    assert chunks[0].usage_metadata is None
    assert emu.requests[-1].endpoint == "streamGenerateContent"


async def test_multimodal_contents_accepted(emu: GeminiEmulator, client: genai.Client) -> None:
    contents = [
        types.Content(
            role="user",
            parts=[
                types.Part.from_text(text="describe [img-1]"),
                types.Part.from_bytes(data=b"\x89PNG\r\n\x1a\nfake", mime_type="image/png"),
            ],
        )
    ]
    r = await client.aio.models.generate_content(model=MODEL, contents=contents)
    assert r.text == "echo: describe [img-1]"
    body = emu.requests[-1].body
    assert body is not None and "inlineData" in body["contents"][0]["parts"][1]


async def test_count_tokens(emu: GeminiEmulator, client: genai.Client) -> None:
    r = await client.aio.models.count_tokens(model=MODEL, contents="a" * 41)
    assert r.total_tokens == 11
    assert emu.requests[-1].endpoint == "countTokens"


# -- structured output -------------------------------------------------------------------------------


async def test_response_schema_nested_model_parses(client: genai.Client) -> None:
    r = await generate(
        client, "profile [item-001]", response_mime_type="application/json", response_schema=Person
    )
    assert isinstance(r.parsed, Person)
    assert 1 <= len(r.parsed.addresses) <= 3
    again = await generate(
        client, "profile [item-001]", response_mime_type="application/json", response_schema=Person
    )
    assert again.text == r.text


async def test_response_schema_list_of_models(client: genai.Client) -> None:
    r = await generate(
        client, "list [item-002]", response_mime_type="application/json", response_schema=list[Address]
    )
    assert isinstance(r.parsed, list) and all(isinstance(a, Address) for a in r.parsed)


@pytest.mark.parametrize("model", [Person, Review])
async def test_response_json_schema_validates(client: genai.Client, model: type[BaseModel]) -> None:
    r = await generate(
        client,
        f"json [{model.__name__}]",
        response_mime_type="application/json",
        response_json_schema=model.model_json_schema(),
    )
    assert r.text is not None
    model.model_validate_json(r.text)


async def test_response_json_schema_features(client: genai.Client) -> None:
    """const, tuples, formats, minItems, uniqueItems and multipleOf all come out valid."""
    schema = {
        "type": "object",
        "properties": {
            "version": {"const": 2},
            "pair": {
                "type": "array",
                "prefixItems": [{"type": "integer"}, {"type": "string"}],
                "items": False,
            },
            "ids": {"type": "array", "items": {"type": "string", "format": "uuid"}, "minItems": 3},
            "when": {"type": "string", "format": "date"},
            "email": {"type": "string", "format": "email"},
            "flags": {"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True},
            "step": {"type": "integer", "multipleOf": 5, "minimum": 11, "maximum": 29},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
            "maybe": {"type": ["string", "null"]},
        },
        "required": ["version", "pair", "ids", "when", "email", "flags", "step", "ratio", "maybe"],
        "additionalProperties": False,
    }
    r = await generate(client, "features", response_mime_type="application/json", response_json_schema=schema)
    value = json.loads(r.text or "")
    assert value["version"] == 2 and len(value["pair"]) == 2 and len(value["ids"]) >= 3
    assert len(set(value["flags"])) == len(value["flags"])
    assert value["step"] % 5 == 0 and 11 <= value["step"] <= 29 and 0 < value["ratio"] < 0.5
    dt.date.fromisoformat(value["when"])
    TypeAdapter(list[str]).validate_python(value["ids"])


async def test_enum_output(client: genai.Client) -> None:
    r = await generate(client, "how do you feel", response_mime_type="text/x.enum", response_schema=Mood)
    assert isinstance(r.parsed, Mood) and r.text in {m.value for m in Mood}


# -- caches ------------------------------------------------------------------------------------------


async def test_cache_lifecycle_and_cached_generate(emu: GeminiEmulator, client: genai.Client) -> None:
    doc = "policy text " * 100  # 1200 chars -> 300 tokens
    cache = await client.aio.caches.create(
        model=MODEL,
        config=types.CreateCachedContentConfig(
            contents=[doc], system_instruction="answer from the policy", display_name="policy", ttl="300s"
        ),
    )
    assert cache.name and cache.name.startswith("cachedContents/")
    assert cache.model == f"models/{MODEL}" and cache.display_name == "policy"
    assert cache.usage_metadata and cache.usage_metadata.total_token_count == 306
    assert cache.expire_time and cache.create_time
    assert 295 <= (cache.expire_time - cache.create_time).total_seconds() <= 305
    assert cache.name in emu.caches and emu.caches[cache.name]["contents"]

    got = await client.aio.caches.get(name=cache.name)
    assert got.name == cache.name and got.display_name == "policy"

    updated = await client.aio.caches.update(
        name=cache.name, config=types.UpdateCachedContentConfig(ttl="7200.5s")
    )
    assert updated.expire_time and cache.expire_time and updated.expire_time > cache.expire_time

    r = await client.aio.models.generate_content(
        model=MODEL, contents="question [q-1]", config=types.GenerateContentConfig(cached_content=cache.name)
    )
    usage = r.usage_metadata
    assert usage and usage.cached_content_token_count == 306
    assert usage.prompt_token_count == 306 + 4  # the cache is included in the prompt count
    assert emu.requests[-1].cached_content == cache.name
    assert emu.usage_totals()["cached"] == 306

    await client.aio.caches.delete(name=cache.name)
    assert cache.name not in emu.caches
    with pytest.raises(errors.ClientError) as exc:
        await client.aio.caches.get(name=cache.name)
    assert exc.value.code == 403 and exc.value.status == "PERMISSION_DENIED"
    assert emu.count(".delete") == 1


async def test_cache_list_paginates(emu: GeminiEmulator, client: genai.Client) -> None:
    assert [c async for c in await client.aio.caches.list()] == []
    names = []
    for i in range(5):
        created = await client.aio.caches.create(
            model=MODEL, config=types.CreateCachedContentConfig(contents=[f"doc {i}"], display_name=f"d{i}")
        )
        names.append(created.name)
    pager = await client.aio.caches.list(config=types.ListCachedContentsConfig(page_size=2))
    listed = [c async for c in pager]
    assert [c.name for c in listed] == names
    assert all(c.display_name and c.expire_time and c.model for c in listed)
    assert emu.count("cachedContents.list") == 4  # the empty list + 3 pages of 2
    assert all(r.status == 200 for r in emu.requests)


async def test_expired_or_deleted_cache_is_403_on_generate(emu: GeminiEmulator, client: genai.Client) -> None:
    caches = [
        await client.aio.caches.create(model=MODEL, config=types.CreateCachedContentConfig(contents=["doc"]))
        for _ in range(2)
    ]
    emu.expire_cache(caches[0].name or "")
    emu.delete_cache_server_side(caches[1].name or "")
    for cache in caches:
        with pytest.raises(errors.ClientError) as exc:
            await generate(client, "q", cached_content=cache.name)
        assert exc.value.code == 403 and "CachedContent not found" in (exc.value.message or "")
    with pytest.raises(errors.ClientError) as exc:
        await client.aio.caches.update(
            name=caches[0].name or "", config=types.UpdateCachedContentConfig(ttl="60s")
        )
    assert exc.value.code == 403


async def test_cache_conflicts_and_minimum(emu: GeminiEmulator, client: genai.Client) -> None:
    cache = await client.aio.caches.create(
        model=MODEL, config=types.CreateCachedContentConfig(contents=["doc"])
    )
    with pytest.raises(errors.ClientError) as exc:
        await generate(client, "q", cached_content=cache.name, system_instruction="nope")
    assert exc.value.code == 400 and exc.value.status == "INVALID_ARGUMENT"
    assert "system_instruction, tools or tool_config" in (exc.value.message or "")

    with pytest.raises(errors.ClientError) as exc:
        await client.aio.models.generate_content(
            model="gemini-2.0-flash",
            contents="q",
            config=types.GenerateContentConfig(cached_content=cache.name),
        )
    assert exc.value.code == 400

    emu.min_cache_tokens = 1024
    with pytest.raises(errors.ClientError) as exc:
        await client.aio.caches.create(model=MODEL, config=types.CreateCachedContentConfig(contents=["tiny"]))
    assert exc.value.code == 400
    assert "total_token_count=1, min_total_token_count=1024" in (exc.value.message or "")


# -- auth and routing --------------------------------------------------------------------------------


async def test_missing_api_key_and_unknown_model(emu: GeminiEmulator, client: genai.Client) -> None:
    async with httpx2.AsyncClient() as http:
        resp = await http.post(
            f"{emu.base_url}/v1beta/models/{MODEL}:generateContent",
            json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
        )
    assert resp.status_code == 403 and resp.json()["error"]["status"] == "PERMISSION_DENIED"
    assert "unregistered callers" in resp.json()["error"]["message"]

    with pytest.raises(errors.ClientError) as exc:
        await client.aio.models.generate_content(model="gpt-4o", contents="hi")
    assert exc.value.code == 404 and exc.value.status == "NOT_FOUND"
    assert "models/gpt-4o is not found for API version v1beta" in (exc.value.message or "")


# -- faults ------------------------------------------------------------------------------------------


async def test_fault_rate_limit_carries_retry_info(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.faults.add(Fault.rate_limit(2.5))
    emu.faults.add(Fault.rate_limit(per_day=True))
    with pytest.raises(errors.ClientError) as exc:
        await generate(client, "one")
    assert exc.value.code == 429 and exc.value.status == "RESOURCE_EXHAUSTED"
    assert retry_delay(exc.value) == "2.5s"
    assert quota_ids(exc.value) == ["GenerateRequestsPerMinutePerProjectPerModel"]
    with pytest.raises(errors.ClientError) as exc:
        await generate(client, "two")
    assert "PerDay" in quota_ids(exc.value)[0] and retry_delay(exc.value) == "1s"
    assert (await generate(client, "three")).text == "echo: three"
    assert [r.fault for r in emu.requests] == ["rate_limit", "rate_limit", None]
    assert [r.status for r in emu.requests] == [429, 429, 200]


@pytest.mark.parametrize(
    ("code", "exc_type", "status"),
    [
        (400, errors.ClientError, "INVALID_ARGUMENT"),
        (401, errors.ClientError, "UNAUTHENTICATED"),
        (403, errors.ClientError, "PERMISSION_DENIED"),
        (404, errors.ClientError, "NOT_FOUND"),
        (500, errors.ServerError, "INTERNAL"),
        (503, errors.ServerError, "UNAVAILABLE"),
        (504, errors.ServerError, "DEADLINE_EXCEEDED"),
    ],
)
async def test_fault_status_codes(
    emu: GeminiEmulator, client: genai.Client, code: int, exc_type: type[errors.APIError], status: str
) -> None:
    emu.faults.add(Fault.status(code))
    with pytest.raises(exc_type) as exc:
        await generate(client, "status please")
    assert exc.value.code == code and exc.value.status == status
    if code == 503:
        assert "overloaded" in (exc.value.message or "")
    assert emu.requests[-1].status == code and emu.requests[-1].fault == "status"


async def test_fault_502_is_html(client: genai.Client, emu: GeminiEmulator) -> None:
    emu.faults.add(Fault.status(502))
    with pytest.raises(errors.ServerError) as exc:
        await generate(client, "gateway")
    assert exc.value.code == 502 and "<html" in (exc.value.message or "")


@pytest.mark.parametrize(
    ("backend", "timeout_exc"), [("httpx", httpx.ReadTimeout), ("httpx2", httpx2.ReadTimeout)]
)
async def test_fault_hang_times_out_without_blocking_others(
    emu: GeminiEmulator, monkeypatch: pytest.MonkeyPatch, backend: str, timeout_exc: type[Exception]
) -> None:
    monkeypatch.setenv("GOOGLE_GENAI_HTTP_CLIENT", backend)
    emu.faults.add(Fault.hang(30), contains="[slow]")
    slow_client = genai.Client(
        api_key="k", http_options=types.HttpOptions(base_url=emu.base_url, api_version="v1beta", timeout=300)
    )
    fast_client = emu.client()
    try:
        slow = asyncio.create_task(generate(slow_client, "[slow] item"))
        fast = await asyncio.gather(*(generate(fast_client, f"fast {i}") for i in range(5)))
        assert all(r.text for r in fast) and not slow.done()  # the hung request blocks nobody
        with pytest.raises(timeout_exc):
            await slow
    finally:
        await slow_client.aio.aclose()
        await fast_client.aio.aclose()


async def test_fault_delay_adds_latency(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.faults.add(Fault.delay(0.3))
    started = time.monotonic()
    assert (await generate(client, "late")).text == "echo: late"
    assert time.monotonic() - started >= 0.3
    rec = emu.requests[-1]
    assert rec.fault == "delay" and rec.finished_at - rec.started_at >= 0.3


async def test_fault_malformed_body(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.faults.add(Fault.malformed_body())
    with pytest.raises(json.JSONDecodeError):
        await generate(client, "garbage")


async def test_fault_safety_block_and_finish_safety(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.faults.add(Fault.safety_block("PROHIBITED_CONTENT"))
    r = await generate(client, "blocked")
    assert r.text is None and r.candidates is None
    assert r.prompt_feedback and r.prompt_feedback.block_reason == types.BlockedReason.PROHIBITED_CONTENT
    assert any(s.probability == types.HarmProbability.HIGH for s in r.prompt_feedback.safety_ratings or [])

    emu.faults.add(Fault.finish_safety())
    r = await generate(client, "unsafe answer")
    assert r.text is None and r.candidates and r.candidates[0].finish_reason == types.FinishReason.SAFETY


async def test_fault_connection_reset(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.faults.add(Fault.connection_reset())
    with pytest.raises(TRANSPORT_ERRORS):
        await generate(client, "reset")
    assert emu.requests[-1].status == 0 and emu.requests[-1].fault == "connection_reset"
    assert (await generate(client, "after reset")).text == "echo: after reset"


async def test_fault_invalid_json_then_valid(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.faults.add(Fault.invalid_json(), contains="[item-009]")
    kwargs = {"response_mime_type": "application/json", "response_schema": Person}
    first = await generate(client, "person [item-009]", **kwargs)
    assert first.parsed is None and first.text
    with pytest.raises(ValueError):
        json.loads(first.text)
    second = await generate(client, "person [item-009]", **kwargs)
    assert isinstance(second.parsed, Person)


async def test_fault_on_cache_endpoint(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.faults.add(Fault.status(500), endpoint="cachedContents.create")
    with pytest.raises(errors.ServerError):
        await client.aio.caches.create(model=MODEL, config=types.CreateCachedContentConfig(contents=["d"]))
    assert (await generate(client, "unaffected")).text  # generate endpoints are not targeted
    created = await client.aio.caches.create(
        model=MODEL, config=types.CreateCachedContentConfig(contents=["d"])
    )
    assert created.name in emu.caches


async def test_fault_targeting_semantics(emu: GeminiEmulator, client: genai.Client) -> None:
    async def statuses(prompts: list[str]) -> list[int]:
        out = []
        for p in prompts:
            try:
                await generate(client, p)
                out.append(200)
            except errors.APIError as exc:
                out.append(exc.code)
        return out

    # contains + times: only the targeted item fails, and only twice.
    rule = emu.faults.add(Fault.status(503), contains="[item-007]", times=2)
    result = await statuses(["[item-006]", "[item-007]", "[item-0070]", "[item-007]", "[item-007]"])
    assert result == [200, 503, 200, 503, 200]  # "[item-0070]" is a different item
    assert rule.hits == 2
    assert emu.count(contains="[item-007]", status=503) == 2

    # every + after: skip two matches, then fault every third of the rest.
    emu.reset()
    rule = emu.faults.add(Fault.status(500), times=None, every=3, after=2)
    result = await statuses([f"p{i}" for i in range(11)])
    assert [i for i, s in enumerate(result) if s == 500] == [4, 7, 10] and rule.hits == 3

    # rate: seeded and reproducible.
    prompts = [f"[item-{i:03d}]" for i in range(40)]
    runs = []
    for _ in range(2):
        emu.reset()
        emu.faults.add(Fault.status(500), times=None, rate=0.5)
        runs.append(await statuses(prompts))
    assert runs[0] == runs[1] and 5 < runs[0].count(500) < 35


# -- quotas ------------------------------------------------------------------------------------------


async def test_rpm_quota_429_and_window_counts() -> None:
    with GeminiEmulator(rpm=360, quota_window_s=0.5) as emu:  # 3 requests per 0.5 s window
        client = emu.client()
        try:
            burst = await asyncio.gather(
                *(generate(client, f"b{i}") for i in range(5)), return_exceptions=True
            )
            limited = [e for e in burst if isinstance(e, errors.ClientError)]
            assert len(limited) == 2 and all(e.code == 429 for e in limited)
            assert retry_delay(limited[0]) == "1s"
            assert quota_ids(limited[0]) == ["GenerateRequestsPerMinutePerProjectPerModel"]
            assert emu.window_counts(0.5) == [3]

            # A client that honours RetryInfo gets everything through and never exceeds the window.
            emu.reset()
            for i in range(7):
                while True:
                    try:
                        await generate(client, f"polite {i}")
                        break
                    except errors.ClientError as exc:
                        assert exc.code == 429
                        await asyncio.sleep(float(retry_delay(exc)[:-1]) / 4)
            assert sum(emu.window_counts(0.5)) == 7
            assert emu.max_in_window(0.5) <= 3
            assert emu.max_in_window(0.5, accepted_only=False) >= 3
            assert emu.count(status=429) > 0
        finally:
            await client.aio.aclose()


async def test_tpm_quota_and_runtime_change() -> None:
    with GeminiEmulator(tpm=600, quota_window_s=1.0) as emu:  # 10 input tokens per second
        client = emu.client()
        try:
            await generate(client, "x" * 36)  # 9 tokens
            with pytest.raises(errors.ClientError) as exc:
                await generate(client, "y" * 36)
            assert quota_ids(exc.value) == ["GenerateContentInputTokensPerModelPerMinute"]
            emu.set_quota(rpm=None, tpm=None)
            assert (await generate(client, "y" * 36)).text
        finally:
            await client.aio.aclose()


# -- pydantic-ai -------------------------------------------------------------------------------------


async def test_pydantic_ai_tool_and_native_output(emu: GeminiEmulator) -> None:
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.google import GoogleModel
    from pydantic_ai.providers.google import GoogleProvider

    sdk = emu.client()
    model = GoogleModel(MODEL, provider=GoogleProvider(client=sdk))
    try:
        tool_run = await Agent(model, output_type=Review).run("review [item-100]")
        assert isinstance(tool_run.output, Review)
        body = emu.requests[-1].body or {}
        assert body["toolConfig"]["functionCallingConfig"]["mode"] == "ANY"

        native_run = await Agent(model, output_type=NativeOutput(Person)).run("person [item-101]")
        assert isinstance(native_run.output, Person)
        body = emu.requests[-1].body or {}
        assert body["generationConfig"]["responseMimeType"] == "application/json"

        text_run = await Agent(model).run("hello")
        assert text_run.output == "echo: hello"

        # An invalid tool call is retried by pydantic-ai and then succeeds.
        emu.faults.add(Fault.invalid_json(), contains="[item-102]")
        retried = await Agent(model, output_type=Person, retries=2).run("person [item-102]")
        assert isinstance(retried.output, Person) and emu.count(contains="[item-102]") == 2
    finally:
        await sdk.aio.aclose()


# -- concurrency, lifecycle, CLI -----------------------------------------------------------------------


async def test_concurrent_slow_requests_do_not_serialise(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.latency = 0.2
    results = await asyncio.gather(*(generate(client, f"[c-{i}]") for i in range(50)))
    assert all(r.text for r in results)
    assert emu.max_in_window(0.2) > 10  # they really overlapped on the server


async def test_latency_range_and_callable(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.latency = (0.05, 0.1)
    await generate(client, "ranged")
    emu.latency = lambda: 0.05
    await generate(client, "callable")
    assert all(r.finished_at - r.started_at >= 0.05 for r in emu.requests)


async def test_stop_does_not_wait_for_hanging_requests() -> None:
    emu = GeminiEmulator().start()
    emu.faults.add(Fault.hang(60))
    client = emu.client()
    task = asyncio.create_task(generate(client, "hang forever"))
    try:
        for _ in range(500):  # wait until the server holds the request
            if emu.in_flight or task.done():
                break
            await asyncio.sleep(0.01)
        assert emu.in_flight == 1
        # The hang lasts 60 s; a stop() that waited for it would blow this generous bound.
        await asyncio.wait_for(asyncio.to_thread(emu.stop), 30)
        with pytest.raises(TRANSPORT_ERRORS):
            await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        await client.aio.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serves_until_terminated() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect_batchllm.testing",
            "--port",
            str(port),
            "--latency",
            "0.01",
            "--verbose",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url == f"http://127.0.0.1:{port}"
        resp = httpx2.post(
            f"{base_url}/v1beta/models/{MODEL}:generateContent",
            json={"contents": [{"role": "user", "parts": [{"text": "cli"}]}]},
            headers={"x-goog-api-key": "secret-key"},
            timeout=10,
        )
        assert resp.status_code == 200
        assert resp.json()["candidates"][0]["content"]["parts"][0]["text"] == "echo: cli"
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "generateContent -> 200" in stderr and "secret-key" not in stderr


# -- shared helpers (review fixes) -------------------------------------------------------------------------


def test_emulator_tokenizer_matches_the_client_side_estimate():
    from prefect_batchllm.core.tokens import estimate_tokens
    from prefect_batchllm.testing._wire import tokens_for_chars

    for n in (0, 1, 3, 4, 5, 399, 400, 401, 10_001):
        assert tokens_for_chars(n) == estimate_tokens("x" * n), n


def test_schema_faker_lives_in_core_and_the_emulator_uses_it():
    from prefect_batchllm.core import schema_fake
    from prefect_batchllm.testing import emulator as emulator_module

    assert emulator_module.fake_for_schema is schema_fake.fake_for_schema
    assert emulator_module.key_of is schema_fake.key_of
    source = open(schema_fake.__file__, encoding="utf-8").read()
    assert "import pydantic" not in source and "from pydantic" not in source  # stdlib only


async def test_emulator_cache_ttl_uses_the_shared_duration_parser():
    from prefect_batchllm.core.errors import parse_duration
    from prefect_batchllm.testing import emulator as emulator_module

    assert emulator_module.parse_duration is parse_duration
