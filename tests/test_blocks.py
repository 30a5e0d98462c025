"""Gemini blocks: secrets, per-loop clients, pickling, save/load, and CLI registration."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from prefect.client.orchestration import get_client

from prefect_batchllm import GeminiCachedModelBlock, GeminiCredentials
from prefect_batchllm.core.errors import redact
from prefect_batchllm.models.gemini import GeminiCachedModel

KEY = "AIzaTestOnlyKey0123456789abcdefghijk"


def _block(**kw: Any) -> GeminiCachedModelBlock:
    credentials = GeminiCredentials(api_key=KEY, base_url="http://127.0.0.1:9", api_version="v1beta")
    defaults: dict[str, Any] = {"credentials": credentials, "cached_contents": ["the shared document"]}
    return GeminiCachedModelBlock(**{**defaults, **kw})


def test_api_key_is_secret_and_redacted() -> None:
    credentials = GeminiCredentials(api_key=KEY)
    assert KEY not in repr(credentials) and KEY not in str(credentials.model_dump())
    assert redact(f"failed with key={KEY}") == "failed with key=***"
    with pytest.raises(ValueError, match="api_key must not be empty"):
        GeminiCredentials(api_key="  ")


def test_get_model_returns_one_shared_cached_model() -> None:
    block = _block(
        model="gemini-2.5-flash",
        system_instruction="Be brief.",
        cache_ttl_seconds=600,
        cache_renewal_buffer_seconds=60,
        cache_tags={"team": "books"},
    )
    model = block.get_model()
    assert isinstance(model, GeminiCachedModel)
    assert block.get_model() is model
    assert model.cache_ttl_seconds == 600 and model.cache_renewal_buffer_seconds == 60
    assert model.cache_tags == {"team": "books"} and model.system_instruction == "Be brief."
    assert model.cached_content == ["the shared document"]


def test_get_model_validates_configuration() -> None:
    with pytest.raises(ValueError, match="nothing to cache"):
        _block(cached_contents=[]).get_model()
    with pytest.raises(ValueError, match="must be smaller than cache_ttl_seconds"):
        _block(cache_ttl_seconds=100, cache_renewal_buffer_seconds=100).get_model()
    with pytest.raises(ValueError, match="non-empty strings"):
        _block(cached_contents=["ok", " "])
    system_only = _block(cached_contents=[], system_instruction="You are a librarian.")
    assert system_only.get_model().cached_content == ["You are a librarian."]


def test_clients_are_cached_per_event_loop() -> None:
    credentials = GeminiCredentials(api_key=KEY)

    async def twice() -> tuple[Any, Any]:
        return credentials.get_client(), credentials.get_client()

    a1, a2 = asyncio.run(twice())
    b1, _ = asyncio.run(twice())
    assert a1 is a2  # same loop, same client
    assert a1 is not b1  # a new loop gets its own client (async pools are loop-bound)
    assert credentials.get_client() is credentials.get_client()  # sync use


def test_blocks_pickle_without_live_state() -> None:
    block = _block()
    model = block.get_model()
    block.credentials.get_client()
    copy = cloudpickle.loads(cloudpickle.dumps(block))
    assert copy.model_dump() == block.model_dump()
    assert copy._model is None and copy.credentials._sync_client is None
    assert copy.credentials.api_key.get_secret_value() == KEY
    assert copy.get_model() is not model  # a new process builds its own model
    assert block.get_model() is model  # the original is untouched


@pytest.mark.usefixtures("prefect_api")
async def test_save_and_load_round_trip_with_nested_credentials() -> None:
    name = f"books-{uuid.uuid4().hex[:8]}"
    block = _block(cache_tags={"k": "v"})
    await block.asave(name)
    loaded = await GeminiCachedModelBlock.aload(name)
    assert loaded.credentials.api_key.get_secret_value() == KEY
    assert loaded.cached_contents == ["the shared document"] and loaded.cache_tags == {"k": "v"}
    assert loaded.get_model().display_name == block.get_model().display_name


def test_prefect_block_register_finds_both_block_types(prefect_api: str) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    prefect_cli = Path(sys.executable).with_name("prefect")
    done = subprocess.run(
        [str(prefect_cli), "block", "register", "-m", "prefect_batchllm"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Gemini Credentials" in done.stdout and "Gemini Cached Model" in done.stdout

    async def slugs() -> set[str]:
        async with get_client() as client:
            types = await client.read_block_types()
        return {t.slug for t in types}

    assert {"gemini-credentials", "gemini-cached-model"} <= asyncio.run(slugs())


def test_model_from_plain_code_works_in_separate_event_loops(emulator: Any) -> None:
    """get_model() hands the model a client *factory*: each asyncio.run gets its own loop-bound client."""
    credentials = GeminiCredentials(api_key=KEY, base_url=emulator.base_url, api_version="v1beta")
    block = GeminiCachedModelBlock(credentials=credentials, cached_contents=["the shared document"])
    model = block.get_model()  # plain code, no loop running

    async def generate(i: int) -> str:
        response = await model.generate(f"[loop-{i}] hello")
        return response.text

    texts = [asyncio.run(generate(i)) for i in range(3)]
    assert all(f"[loop-{i}]" in text for i, text in enumerate(texts)), texts
    generated = emulator.requests_for("generateContent")
    assert [q.status for q in generated] == [200, 200, 200]
    assert emulator.count("cachedContents.create") == 1  # one cache, shared by the three loops
