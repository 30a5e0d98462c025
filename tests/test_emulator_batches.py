"""The emulator's Gemini Batch API and Files API, exercised through the real google-genai SDK over HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors, types
from pydantic import BaseModel, Field

from prefect_batchllm.testing import Fault, GeminiEmulator

MODEL = "gemini-2.5-flash"


class Review(BaseModel):
    sentiment: str
    score: int = Field(ge=1, le=5)
    tags: list[str]


@pytest.fixture(scope="module")
def shared_emulator() -> Iterator[GeminiEmulator]:
    with GeminiEmulator(seed=11) as emu:
        yield emu


@pytest.fixture
def emu(shared_emulator: GeminiEmulator) -> Iterator[GeminiEmulator]:
    """The module's emulator, reset to a clean state with immediate batch processing."""
    shared_emulator.reset()
    shared_emulator.batch_delay = 0.0
    shared_emulator.batch_inline_limit_bytes = 20 * 1024 * 1024
    shared_emulator.file_size_limit_bytes = 2 * 1024 * 1024 * 1024
    shared_emulator.max_active_batches = 100
    shared_emulator.batch_enqueued_token_limit = None
    yield shared_emulator
    shared_emulator.reset()


@pytest.fixture
async def client(emu: GeminiEmulator) -> AsyncIterator[genai.Client]:
    c = genai.Client(
        api_key="test-key", http_options=types.HttpOptions(base_url=emu.base_url, api_version="v1beta")
    )
    yield c
    await c.aio.aclose()


def inline(prompt: str, key: str, **config: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"contents": prompt, "metadata": {"key": key}}
    if config:
        request["config"] = config
    return request


async def wait_done(client: genai.Client, name: str, timeout_s: float = 60.0) -> types.BatchJob:
    deadline = time.monotonic() + timeout_s
    while True:
        job = await client.aio.batches.get(name=name)
        if job.done or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.02)


def usage_sum(responses: list[types.GenerateContentResponse]) -> dict[str, int]:
    totals = {"prompt": 0, "candidates": 0, "total": 0, "cached": 0}
    for r in responses:
        u = r.usage_metadata
        assert u is not None
        totals["prompt"] += u.prompt_token_count or 0
        totals["candidates"] += u.candidates_token_count or 0
        totals["total"] += u.total_token_count or 0
        totals["cached"] += u.cached_content_token_count or 0
    return totals


# -- inline jobs -----------------------------------------------------------------------------------


async def test_inline_job_lifecycle_outputs_equal_online(emu: GeminiEmulator, client: genai.Client) -> None:
    schema_cfg = {"response_mime_type": "application/json", "response_schema": Review}
    requests = [
        inline("summarise item 0", "k0"),
        inline("summarise item 1", "k1", temperature=0.2, system_instruction="be terse"),
        inline("review item 2", "k2", **schema_cfg),
        inline("review item 3", "k3", **schema_cfg),
    ]
    job = await client.aio.batches.create(model=MODEL, src=requests, config={"display_name": "nightly"})
    assert job.name is not None and job.name.startswith("batches/")
    assert job.state == types.JobState.JOB_STATE_PENDING and not job.done
    assert job.display_name == "nightly" and job.model == f"models/{MODEL}"

    done = await wait_done(client, job.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED and done.done and done.end_time is not None
    assert done.dest is not None and done.dest.inlined_responses is not None
    answers = done.dest.inlined_responses
    assert [a.metadata for a in answers] == [{"key": f"k{i}"} for i in range(4)]
    assert all(a.error is None and a.response is not None for a in answers)
    batch_responses = [a.response for a in answers if a.response is not None]
    for structured in batch_responses[2:]:
        Review.model_validate_json(structured.text or "")
    batch_usage = usage_sum(batch_responses)
    assert emu.usage_totals() == batch_usage  # batch usage is counted in the server's totals

    online = []
    for request in requests:
        cfg = types.GenerateContentConfig(**request["config"]) if "config" in request else None
        online.append(
            await client.aio.models.generate_content(model=MODEL, contents=request["contents"], config=cfg)
        )
    assert [r.text for r in batch_responses] == [r.text for r in online]
    assert usage_sum(online) == batch_usage
    assert emu.usage_totals("batch.generateContent") == batch_usage == emu.usage_totals("generateContent")
    assert emu.usage_totals()["total"] == 2 * batch_usage["total"]

    logged = emu.batch_requests(job.name)
    assert [r.prompt_text for r in logged] == [r["contents"] for r in requests]
    assert [r.batch_key for r in logged] == ["k0", "k1", "k2", "k3"] and {r.status for r in logged} == {200}
    assert emu.batch_creates == 1 and emu.count("batches.get") >= 1
    assert emu.count("generateContent") == 4  # the batch requests are not online calls
    raw = emu.batches[job.name]
    assert raw["metadata"]["batchStats"] == {
        "requestCount": "4",
        "pendingRequestCount": "0",
        "successfulRequestCount": "4",
        "failedRequestCount": "0",
    }
    assert raw["response"]["inlinedResponses"] == raw["metadata"]["output"]["inlinedResponses"]


async def test_structured_batch_on_a_shared_cache(emu: GeminiEmulator, client: genai.Client) -> None:
    cache = await client.aio.caches.create(
        model=MODEL,
        config=types.CreateCachedContentConfig(
            system_instruction="You review products. " * 50, contents=["shared context " * 100]
        ),
    )
    assert cache.name is not None
    cfg = {"cached_content": cache.name, "response_mime_type": "application/json", "response_schema": Review}
    job = await client.aio.batches.create(
        model=MODEL, src=[inline(f"product {i}", f"p{i}", **cfg) for i in range(5)]
    )
    assert job.name is not None
    done = await wait_done(client, job.name)
    assert done.dest is not None and done.dest.inlined_responses is not None
    cached_tokens = cache.usage_metadata.total_token_count if cache.usage_metadata else None
    assert cached_tokens
    for answer in done.dest.inlined_responses:
        assert answer.response is not None and answer.response.usage_metadata is not None
        assert answer.response.usage_metadata.cached_content_token_count == cached_tokens
        Review.model_validate_json(answer.response.text or "")
    logged = emu.batch_requests(job.name)
    assert len(logged) == 5 and {r.cached_content for r in logged} == {cache.name}
    assert len(emu.caches) == 1

    # A cache that is gone makes each request fail with PERMISSION_DENIED (rpc code 7), like online's 403.
    emu.expire_cache(cache.name)
    job2 = await client.aio.batches.create(model=MODEL, src=[inline("product 9", "p9", **cfg)])
    assert job2.name is not None
    done2 = await wait_done(client, job2.name)
    assert done2.state == types.JobState.JOB_STATE_SUCCEEDED and done2.dest is not None
    (only,) = done2.dest.inlined_responses or []
    assert only.response is None and only.error is not None and only.error.code == 7
    assert only.metadata == {"key": "p9"}


async def test_per_request_faults_by_prompt_marker(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.faults.add(Fault.status(400), contains="#BAD", times=None)
    emu.faults.add(Fault.status(500), contains="#CRASH", times=None)
    emu.faults.add(Fault.status(503), contains="#BUSY", times=None)
    emu.faults.add(Fault.safety_block(), contains="#UNSAFE", times=None)
    emu.faults.add(Fault.invalid_json(), contains="#GARBLED", times=None)
    json_cfg = {"response_mime_type": "application/json", "response_schema": Review}
    prompts = ["fine a", "x #BAD", "x #CRASH", "x #BUSY", "x #UNSAFE", "x #GARBLED", "fine b"]
    job = await client.aio.batches.create(
        model=MODEL, src=[inline(p, f"k{i}", **json_cfg) for i, p in enumerate(prompts)]
    )
    assert job.name is not None
    done = await wait_done(client, job.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED  # a job succeeds with failed requests in it
    answers = done.dest.inlined_responses if done.dest else None
    assert answers is not None and [a.metadata for a in answers] == [{"key": f"k{i}"} for i in range(7)]
    codes = [a.error.code if a.error else None for a in answers]
    assert codes == [
        None,
        3,
        13,
        14,
        None,
        None,
        None,
    ]  # google.rpc codes: INVALID_ARGUMENT, INTERNAL, UNAVAILABLE
    blocked = answers[4].response
    assert blocked is not None and blocked.prompt_feedback is not None
    assert blocked.prompt_feedback.block_reason == types.BlockedReason.SAFETY and not blocked.candidates
    garbled = answers[5].response
    assert garbled is not None and garbled.text
    with pytest.raises(ValueError):
        json.loads(garbled.text)
    for ok in (answers[0], answers[6]):
        assert ok.response is not None
        Review.model_validate_json(ok.response.text or "")
    raw = emu.batches[job.name]["metadata"]["batchStats"]
    assert raw["successfulRequestCount"] == "4" and raw["failedRequestCount"] == "3"
    assert [r.fault for r in emu.batch_requests(job.name)] == [
        None,
        "status",
        "status",
        "status",
        "safety_block",
        "invalid_json",
        None,
    ]

    # The same markers fail the same prompts online.
    with pytest.raises(errors.ServerError) as busy:
        await client.aio.models.generate_content(model=MODEL, contents="x #BUSY")
    assert busy.value.code == 503
    with pytest.raises(errors.ClientError) as bad:
        await client.aio.models.generate_content(model=MODEL, contents="x #BAD")
    assert bad.value.code == 400


async def test_batch_only_fault_rules_and_faults_on_batch_endpoints(
    emu: GeminiEmulator, client: genai.Client
) -> None:
    emu.faults.add(Fault.status(500), contains="#B", endpoint="batch.generateContent", times=None)
    emu.faults.add(Fault.status(503), endpoint="batches.create", times=1)
    with pytest.raises(errors.ServerError):
        await client.aio.batches.create(model=MODEL, src=[inline("a #B", "a")])
    assert emu.batch_creates == 0 and emu.batches == {}
    job = await client.aio.batches.create(model=MODEL, src=[inline("a #B", "a")])
    assert job.name is not None
    done = await wait_done(client, job.name)
    assert done.dest is not None and done.dest.inlined_responses is not None
    assert done.dest.inlined_responses[0].error is not None
    online = await client.aio.models.generate_content(model=MODEL, contents="a #B")  # online is untouched
    assert online.text == "echo: a #B"

    # A create can be targeted by the prompts it carries.
    emu.faults.add(Fault.status(429), endpoint="batches.create", contains="#REJECT", times=None)
    with pytest.raises(errors.ClientError) as rejected:
        await client.aio.batches.create(model=MODEL, src=[inline("fine", "1"), inline("x #REJECT", "2")])
    assert rejected.value.code == 429
    assert emu.requests_for("batches.create", contains="#REJECT")[0].status == 429
    assert (await client.aio.batches.create(model=MODEL, src=[inline("fine", "1")])).name


async def test_malformed_create_bodies_are_400(emu: GeminiEmulator) -> None:
    url = f"{emu.base_url}/v1beta/models/{MODEL}:batchGenerateContent"
    bodies: list[Any] = [
        {},
        {"batch": []},
        {"batch": {"inputConfig": {"requests": []}}},
        {"batch": {"inputConfig": {"requests": {"requests": []}}}},
        {"batch": {"inputConfig": {"requests": {"requests": [{"metadata": {"key": "k"}}]}}}},
        {"batch": {"inputConfig": {"requests": {"requests": [{"request": {}}]}, "fileName": "files/x"}}},
    ]
    async with httpx.AsyncClient() as http:
        for body in bodies:
            resp = await http.post(url, json=body, headers={"x-goog-api-key": "k"})
            assert resp.status_code == 400, body
            assert resp.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert emu.batches == {}


# -- states ----------------------------------------------------------------------------------------


async def test_delay_holds_pending_then_running_then_done(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.batch_delay = (math.inf, math.inf)
    job = await client.aio.batches.create(model=MODEL, src=[inline("slow", "s")])
    assert job.name is not None
    for _ in range(3):
        assert (await client.aio.batches.get(name=job.name)).state == types.JobState.JOB_STATE_PENDING
    emu.batch_delay = (0.0, math.inf)
    running = await client.aio.batches.get(name=job.name)
    assert running.state == types.JobState.JOB_STATE_RUNNING and not running.done and running.dest is None
    assert emu.batch_requests() == []  # nothing runs before the job finishes
    emu.batch_delay = 0.0
    done = await client.aio.batches.get(name=job.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    assert len(emu.batch_requests(job.name)) == 1


async def test_timed_delay_passes_through_the_states_in_order(
    emu: GeminiEmulator, client: genai.Client
) -> None:
    emu.batch_delay = 0.3  # 0.3 s PENDING, then 0.3 s RUNNING
    started = time.monotonic()
    job = await client.aio.batches.create(model=MODEL, src=[inline("timed", "t")])
    assert job.name is not None
    seen = [job.state]
    while not (current := await client.aio.batches.get(name=job.name)).done:
        seen.append(current.state)
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - started
    seen.append(current.state)
    order = [
        types.JobState.JOB_STATE_PENDING,
        types.JobState.JOB_STATE_RUNNING,
        types.JobState.JOB_STATE_SUCCEEDED,
    ]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen)  # never goes backwards
    assert seen[-1] == types.JobState.JOB_STATE_SUCCEEDED and elapsed >= 0.6


async def test_cancel_expire_and_fail(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.batch_delay = math.inf
    a = await client.aio.batches.create(model=MODEL, src=[inline("a", "a")])
    b = await client.aio.batches.create(model=MODEL, src=[inline("b", "b")])
    c = await client.aio.batches.create(model=MODEL, src=[inline("c", "c")])
    assert a.name and b.name and c.name
    await client.aio.batches.cancel(name=a.name)
    cancelled = await client.aio.batches.get(name=a.name)
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED and cancelled.done and cancelled.dest is None
    emu.expire_batch(b.name)
    expired = await client.aio.batches.get(name=b.name)
    assert expired.state == types.JobState.JOB_STATE_EXPIRED and expired.done and expired.dest is None
    emu.fail_batch(c.name)
    failed = await client.aio.batches.get(name=c.name)
    assert failed.state == types.JobState.JOB_STATE_FAILED and failed.done and failed.dest is None
    assert emu.batch_requests() == []  # none of them ran a request
    await client.aio.batches.cancel(name=b.name)  # cancelling a finished job changes nothing
    assert emu.batch_state(b.name) == "BATCH_STATE_EXPIRED"
    assert emu.count("batches.cancel", status=200) == 2


async def test_outcome_rules_by_marker_and_default(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.set_batch_outcome("EXPIRED", contains="#LATE")
    emu.set_batch_outcome("FAILED", contains="#DOOM")
    late = await client.aio.batches.create(model=MODEL, src=[inline("ok", "1"), inline("x #LATE", "2")])
    doom = await client.aio.batches.create(model=MODEL, src=[inline("x #DOOM", "1")])
    fine = await client.aio.batches.create(model=MODEL, src=[inline("fine", "1")])
    assert late.name and doom.name and fine.name
    assert (await wait_done(client, late.name)).state == types.JobState.JOB_STATE_EXPIRED
    assert (await wait_done(client, doom.name)).state == types.JobState.JOB_STATE_FAILED
    assert (await wait_done(client, fine.name)).state == types.JobState.JOB_STATE_SUCCEEDED
    emu.set_batch_outcome("JOB_STATE_EXPIRED")  # the default for every other job
    other = await client.aio.batches.create(model=MODEL, src=[inline("fine", "1")])
    assert other.name and (await wait_done(client, other.name)).state == types.JobState.JOB_STATE_EXPIRED
    with pytest.raises(ValueError, match="terminal"):
        emu.set_batch_outcome("RUNNING")


async def test_outcome_rule_for_the_next_job_only(emu: GeminiEmulator, client: genai.Client) -> None:
    """An expired job's follow-up over the same prompts succeeds: ``times`` bounds a rule."""
    emu.set_batch_outcome("CANCELLED", times=1)
    src = [inline("same 1", "1"), inline("same 2", "2")]
    first = await client.aio.batches.create(model=MODEL, src=src)
    assert first.name and (await wait_done(client, first.name)).state == types.JobState.JOB_STATE_CANCELLED
    again = await client.aio.batches.create(model=MODEL, src=src)
    assert again.name
    done = await wait_done(client, again.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED and done.dest is not None
    assert [r.metadata for r in done.dest.inlined_responses or []] == [{"key": "1"}, {"key": "2"}]
    assert [r.batch for r in emu.batch_requests()] == [again.name, again.name]


async def test_list_pages_and_delete(emu: GeminiEmulator, client: genai.Client) -> None:
    names = []
    for i in range(3):
        job = await client.aio.batches.create(model=MODEL, src=[inline(f"l{i}", str(i))])
        assert job.name
        names.append(job.name)
    pager = await client.aio.batches.list(config={"page_size": 2})
    listed = [job.name async for job in pager]
    assert sorted(listed) == sorted(names) and listed[0] == names[-1]  # newest first
    assert emu.count("batches.list") == 2  # two pages

    await client.aio.batches.delete(name=names[0])
    with pytest.raises(errors.ClientError) as gone:
        await client.aio.batches.get(name=names[0])
    assert gone.value.code == 404 and gone.value.status == "NOT_FOUND"
    assert sorted([job.name async for job in await client.aio.batches.list()]) == sorted(names[1:])
    assert emu.batch_creates == 3 and emu.count("batches.delete", status=200) == 1


async def test_validation_errors(emu: GeminiEmulator, client: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as unknown_model:
        await client.aio.batches.create(model="nope-1", src=[inline("a", "a")])
    assert unknown_model.value.code == 404
    with pytest.raises(errors.ClientError) as missing:
        await client.aio.batches.get(name="batches/doesnotexist")
    assert missing.value.code == 404
    with pytest.raises(errors.ClientError) as no_file:
        await client.aio.batches.create(model=MODEL, src="files/doesnotexist")
    assert no_file.value.code == 403

    # The inline size limit (20 MB on the real API) is configurable.
    emu.batch_inline_limit_bytes = 4096
    with pytest.raises(errors.ClientError) as too_big:
        await client.aio.batches.create(model=MODEL, src=[inline("x" * 1000, str(i)) for i in range(5)])
    assert too_big.value.code == 400 and too_big.value.status == "INVALID_ARGUMENT"
    assert "payload size exceeds the limit" in (too_big.value.message or "")
    small = await client.aio.batches.create(model=MODEL, src=[inline("x" * 1000, "0")])
    assert small.name


async def test_other_api_versions(emu: GeminiEmulator) -> None:
    c = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=emu.base_url, api_version="v1"))
    try:
        job = await c.aio.batches.create(model=MODEL, src=[inline("v1 prompt", "v")])
        assert job.name
        done = await wait_done(c, job.name)
        assert done.dest is not None and done.dest.inlined_responses is not None
        assert done.dest.inlined_responses[0].response is not None
        assert done.dest.inlined_responses[0].response.text == "echo: v1 prompt"
    finally:
        await c.aio.aclose()
    assert emu.requests_for("batches.create")[0].api_version == "v1"


# -- file jobs & the Files API ---------------------------------------------------------------------


async def test_file_job_upload_create_download(
    emu: GeminiEmulator, client: genai.Client, tmp_path: Path
) -> None:
    schema = Review.model_json_schema()
    lines = [
        {"key": "r0", "request": {"contents": [{"parts": [{"text": "file prompt 0"}], "role": "user"}]}},
        {
            "key": "r1",
            "request": {
                "contents": [{"parts": [{"text": "file prompt 1"}], "role": "user"}],
                "generationConfig": {"responseMimeType": "application/json", "responseJsonSchema": schema},
            },
        },
        {"key": "r2", "request": {"contents": [{"parts": [{"text": "file prompt #BUSY"}], "role": "user"}]}},
    ]
    emu.faults.add(Fault.status(503), contains="#BUSY", times=None)
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    uploaded = await client.aio.files.upload(file=path, config={"mime_type": "jsonl", "display_name": "in"})
    assert uploaded.name and uploaded.name.startswith("files/") and uploaded.size_bytes == path.stat().st_size
    assert uploaded.state == types.FileState.ACTIVE and uploaded.display_name == "in"
    assert emu.file_bytes(uploaded.name) == path.read_bytes()
    assert emu.count("files.create") == 1 and emu.count("files.upload") == 1
    fetched = await client.aio.files.get(name=uploaded.name)
    assert fetched.size_bytes == uploaded.size_bytes and fetched.mime_type == "jsonl"

    job = await client.aio.batches.create(model=MODEL, src=uploaded.name)
    assert job.name and job.state == types.JobState.JOB_STATE_PENDING
    done = await wait_done(client, job.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    assert done.dest is not None and done.dest.file_name and done.dest.inlined_responses is None
    result_file = await client.aio.files.get(name=done.dest.file_name)
    assert result_file.download_uri and result_file.source == types.FileSource.GENERATED
    data = await client.aio.files.download(file=done.dest.file_name)
    results = [json.loads(line) for line in data.decode().splitlines()]
    assert [r["key"] for r in results] == ["r0", "r1", "r2"]
    assert results[2]["error"]["code"] == 14 and "response" not in results[2]
    answer = types.GenerateContentResponse.model_validate(results[1]["response"])
    Review.model_validate_json(answer.text or "")

    online0 = await client.aio.models.generate_content(model=MODEL, contents="file prompt 0")
    online1 = await client.aio.models.generate_content(
        model=MODEL,
        contents="file prompt 1",
        config=types.GenerateContentConfig(
            response_mime_type="application/json", response_json_schema=schema
        ),
    )
    assert results[0]["response"]["candidates"][0]["content"]["parts"][0]["text"] == online0.text
    assert answer.text == online1.text
    assert [r.batch_key for r in emu.batch_requests(job.name)] == ["r0", "r1", "r2"]

    listed = {f.name async for f in await client.aio.files.list()}
    assert listed == {uploaded.name, done.dest.file_name}
    with pytest.raises(errors.ClientError) as not_downloadable:
        await client.aio.files.download(file=uploaded.name)
    assert not_downloadable.value.code == 400
    await client.aio.files.delete(name=uploaded.name)
    with pytest.raises(errors.ClientError) as deleted:
        await client.aio.files.get(name=uploaded.name)
    assert deleted.value.code == 403 and deleted.value.status == "PERMISSION_DENIED"


async def test_file_job_bad_lines_become_request_errors(
    emu: GeminiEmulator, client: genai.Client, tmp_path: Path
) -> None:
    path = tmp_path / "mixed.jsonl"
    good = {"key": "good", "request": {"contents": [{"parts": [{"text": "ok"}]}]}}
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"key": "empty", "request": {}}) + "\n")
    uploaded = await client.aio.files.upload(file=path, config={"mime_type": "jsonl"})
    assert uploaded.name
    job = await client.aio.batches.create(model=MODEL, src=uploaded.name)
    assert job.name
    done = await wait_done(client, job.name)
    assert done.dest is not None and done.dest.file_name
    results = [
        json.loads(x) for x in (await client.aio.files.download(file=done.dest.file_name)).splitlines()
    ]
    assert "response" in results[0] and results[0]["key"] == "good"
    assert results[1]["error"]["code"] == 3 and "key" not in results[1]
    assert results[2] == {"key": "empty", "error": results[2]["error"]} and results[2]["error"]["code"] == 3


async def test_file_size_limit_and_chunked_resumable_upload(
    emu: GeminiEmulator, client: genai.Client
) -> None:
    emu.file_size_limit_bytes = 100
    with pytest.raises(errors.ClientError) as too_big:
        await client.aio.files.upload(file=io.BytesIO(b"x" * 101), config={"mime_type": "jsonl"})
    assert too_big.value.code == 400
    emu.file_size_limit_bytes = 10_000

    # The protocol step by step, in two chunks, as the SDK does for files over 8 MB.
    async with httpx.AsyncClient(base_url=emu.base_url) as http:
        start = await http.post(
            "/upload/v1beta/files",
            headers={
                "x-goog-api-key": "k",
                "X-Goog-Upload-Protocol": "resumable",
                "X-Goog-Upload-Command": "start",
                "X-Goog-Upload-Header-Content-Length": "10",
                "X-Goog-Upload-Header-Content-Type": "jsonl",
            },
            json={"file": {"displayName": "two-chunks"}},
        )
        assert start.status_code == 200 and start.headers["x-goog-upload-status"] == "active"
        url = start.headers["x-goog-upload-url"]
        first = await http.post(
            url, content=b"01234", headers={"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"}
        )
        assert first.status_code == 200 and first.headers["x-goog-upload-status"] == "active"
        wrong = await http.post(
            url,
            content=b"56789",
            headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "3"},
        )
        assert wrong.status_code == 400 and wrong.headers["x-goog-upload-status"] == "final"
        last = await http.post(
            url,
            content=b"56789",
            headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "5"},
        )
        assert last.status_code == 200 and last.headers["x-goog-upload-status"] == "final"
        name = last.json()["file"]["name"]
    assert emu.file_bytes(name) == b"0123456789"
    assert (await client.aio.files.get(name=name)).display_name == "two-chunks"


def test_cli_batch_options() -> None:
    """The standalone server takes --batch-delay and --batch-outcome (the sync SDK surface works too)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect_batchllm.testing",
            "--port",
            "0",
            "--batch-delay",
            "0,0",
            "--batch-outcome",
            "EXPIRED",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        c = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=base_url, api_version="v1beta"))
        job = c.batches.create(model=MODEL, src=[inline("cli batch", "c")])
        assert job.name and job.state == types.JobState.JOB_STATE_PENDING
        done = c.batches.get(name=job.name)
        assert done.state == types.JobState.JOB_STATE_EXPIRED and done.dest is None
        c.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


async def test_concurrent_job_and_enqueued_token_limits(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.batch_delay = math.inf
    emu.max_active_batches = 2
    first = await client.aio.batches.create(model=MODEL, src=[inline("one", "1")])
    await client.aio.batches.create(model=MODEL, src=[inline("two", "2")])
    with pytest.raises(errors.ClientError) as too_many:
        await client.aio.batches.create(model=MODEL, src=[inline("three", "3")])
    assert too_many.value.code == 429 and too_many.value.status == "RESOURCE_EXHAUSTED"
    assert first.name
    await client.aio.batches.cancel(name=first.name)  # a finished job frees its slot
    await client.aio.batches.create(model=MODEL, src=[inline("three", "3")])
    assert emu.batch_creates == 3

    emu.max_active_batches = None
    emu.batch_enqueued_token_limit = 15  # enqueued now: "two" (1 token) and "three" (2 tokens)
    await client.aio.batches.create(model=MODEL, src=[inline("x" * 40, "big")])  # 10 tokens: fits
    with pytest.raises(errors.ClientError) as tokens:
        await client.aio.batches.create(model=MODEL, src=[inline("x" * 40, "big2")])
    assert tokens.value.code == 429 and "Enqueued token limit" in (tokens.value.message or "")
    emu.batch_delay = 0.0  # once the jobs finish, their tokens are no longer enqueued
    await client.aio.batches.create(model=MODEL, src=[inline("x" * 40, "big2")])


async def test_file_lines_may_use_snake_case_fields(
    emu: GeminiEmulator, client: genai.Client, tmp_path: Path
) -> None:
    """Protobuf JSON accepts both spellings, so hand-written JSONL with snake_case keys works as well."""
    cache = await client.aio.caches.create(
        model=MODEL, config=types.CreateCachedContentConfig(contents=["cached context " * 40])
    )
    assert cache.name and cache.usage_metadata
    line = {
        "key": "s",
        "request": {
            "contents": [{"parts": [{"text": "snake prompt"}], "role": "user"}],
            "cached_content": cache.name,
            "generation_config": {
                "response_mime_type": "application/json",
                "response_json_schema": Review.model_json_schema(),
            },
        },
    }
    path = tmp_path / "snake.jsonl"
    path.write_text(json.dumps(line) + "\n")
    uploaded = await client.aio.files.upload(file=path, config={"mime_type": "jsonl"})
    assert uploaded.name
    job = await client.aio.batches.create(model=MODEL, src=uploaded.name)
    assert job.name
    done = await wait_done(client, job.name)
    assert done.dest is not None and done.dest.file_name
    (result,) = [
        json.loads(x) for x in (await client.aio.files.download(file=done.dest.file_name)).splitlines()
    ]
    answer = types.GenerateContentResponse.model_validate(result["response"])
    Review.model_validate_json(answer.text or "")
    assert answer.usage_metadata is not None
    assert answer.usage_metadata.cached_content_token_count == cache.usage_metadata.total_token_count
    assert [r.cached_content for r in emu.batch_requests(job.name)] == [cache.name]


async def test_concurrent_polls_run_a_job_once(emu: GeminiEmulator, client: genai.Client) -> None:
    emu.batch_delay = math.inf
    job = await client.aio.batches.create(model=MODEL, src=[inline(f"c{i}", str(i)) for i in range(20)])
    assert job.name
    emu.batch_delay = 0.0
    polls = await asyncio.gather(*(client.aio.batches.get(name=job.name) for _ in range(8)))
    assert {p.state for p in polls} == {types.JobState.JOB_STATE_SUCCEEDED}
    assert len(emu.batch_requests(job.name)) == 20  # executed once, whoever polled first
    texts = {
        tuple(r.response.text for r in p.dest.inlined_responses or [] if r.response) for p in polls if p.dest
    }
    assert len(texts) == 1


async def test_result_file_downloads_from_its_file_object(
    emu: GeminiEmulator, client: genai.Client, tmp_path: Path
) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"key": "a", "request": {"contents": [{"parts": [{"text": "obj"}]}]}}) + "\n")
    uploaded = await client.aio.files.upload(file=path, config={"mime_type": "jsonl"})
    assert uploaded.name
    with pytest.raises(ValueError, match="uploaded files can't be downloaded"):
        await client.aio.files.download(file=uploaded)  # the SDK refuses: no download_uri
    job = await client.aio.batches.create(model=MODEL, src=uploaded.name)
    assert job.name
    done = await wait_done(client, job.name)
    assert done.dest is not None and done.dest.file_name
    result = await client.aio.files.get(name=done.dest.file_name)
    data = await client.aio.files.download(file=result)
    assert json.loads(data)["response"]["candidates"][0]["content"]["parts"][0]["text"] == "echo: obj"
    assert emu.count("files.download", status=200) == 1


async def test_sdk_uploads_a_large_file_in_chunks(emu: GeminiEmulator, client: genai.Client) -> None:
    """Over 8 MB the SDK sends ``upload`` then ``upload, finalize``; the emulator assembles the bytes."""
    data = (
        b'{"key": "k", "request": {"contents": [{"parts": [{"text": "' + b"z" * 1000 + b'"}]}]}}\n'
    ) * 9000
    assert len(data) > 8 * 1024 * 1024
    uploaded = await client.aio.files.upload(file=io.BytesIO(data), config={"mime_type": "jsonl"})
    assert uploaded.name and uploaded.size_bytes == len(data)
    assert emu.count("files.upload", status=200) == 2
    assert emu.file_bytes(uploaded.name) == data


async def test_tool_call_answers_match_online(emu: GeminiEmulator, client: genai.Client) -> None:
    """A forced function call (pydantic-ai's tool output mode) is answered in a batch as online."""
    tool = types.Tool(
        function_declarations=[
            types.FunctionDeclaration(name="final_result", parameters_json_schema=Review.model_json_schema())
        ]
    )
    cfg = {
        "tools": [tool],
        "tool_config": types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(mode=types.FunctionCallingConfigMode.ANY)
        ),
    }
    job = await client.aio.batches.create(model=MODEL, src=[inline("rate the tent", "t", **cfg)])
    assert job.name
    done = await wait_done(client, job.name)
    assert done.dest is not None and done.dest.inlined_responses
    batch_answer = done.dest.inlined_responses[0].response
    online = await client.aio.models.generate_content(
        model=MODEL, contents="rate the tent", config=types.GenerateContentConfig(**cfg)
    )
    assert batch_answer is not None and batch_answer.function_calls and online.function_calls
    assert batch_answer.function_calls[0].name == "final_result"
    assert batch_answer.function_calls[0].args == online.function_calls[0].args
    Review.model_validate(batch_answer.function_calls[0].args)
