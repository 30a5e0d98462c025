"""Models, strategies and blocks pickle (plain ``pickle`` and ``cloudpickle``) for Dask / Ray workers.

What travels is configuration: a live ``genai.Client`` becomes a :class:`GenaiClientFactory` recipe, locks
and per-loop clients are rebuilt lazily, a prepared ``GeminiCachedModel`` carries its cache's name. The
API key travels (the worker must call with it) but is registered for masking again in the process that
unpickles it, and never shows in ``repr``. The subprocess test runs the unpickled model against the
bundled Gemini-compatible server over HTTP and counts cache creates there.
"""

from __future__ import annotations

import asyncio
import functools
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from pydantic import BaseModel

from prefect_batchllm import GeminiCachedModelBlock, GeminiCredentials
from prefect_batchllm.core.errors import describe_error
from prefect_batchllm.models.gemini import GeminiCachedModel, GeminiModel, GenaiClientFactory
from prefect_batchllm.strategies.direct import DirectCallStrategy
from prefect_batchllm.strategies.gemini import GeminiStrategy
from prefect_batchllm.strategies.pydantic_ai import AgentFactoryStrategy, PydanticAIStrategy
from prefect_batchllm.testing import Fault

MODEL = "gemini-2.5-flash"
# Not shaped like a Google key (``AIza...``), so only registration can mask it.
KEY = "distributed-secret-0123456789"
PICKLERS = [pytest.param(pickle, id="pickle"), pytest.param(cloudpickle, id="cloudpickle")]


class Book(BaseModel):
    title: str
    pages: int


def _client(base_url: str = "http://127.0.0.1:9", key: str = KEY) -> Any:
    from google import genai
    from google.genai import types

    options = types.HttpOptions(base_url=base_url, api_version="v1beta", retry_options=None, timeout=30_000)
    return genai.Client(vertexai=False, api_key=key, http_options=options)


async def echo(prompt: str, attempt: int, timeout: float) -> tuple[str, dict[str, int]]:
    return prompt, {"input_tokens": 1, "output_tokens": 1}


def make_agent(attempt: int) -> Any:
    from pydantic_ai import Agent

    return Agent("test", output_type=Book)


def _round_trip(mod: Any, obj: Any) -> Any:
    return mod.loads(mod.dumps(obj))


@pytest.mark.parametrize("mod", PICKLERS)
def test_models_pickle_with_their_client_as_a_recipe(mod: Any) -> None:
    client = _client()
    plain = GeminiModel(MODEL, client, system_instruction="Be brief.", safety_settings=[{"a": "b"}])
    cached = GeminiCachedModel(MODEL, client, ["the shared document"], cache_tags={"team": "books"})
    factory = GeminiModel(MODEL, functools.partial(_client, "http://127.0.0.1:9"))
    for model in (plain, cached, factory):
        copy = _round_trip(mod, model)
        assert type(copy) is type(model)
        assert copy.fingerprint() == model.fingerprint()
        assert KEY not in repr(copy) and KEY not in str(copy)
    copy = _round_trip(mod, cached)
    assert copy.display_name == cached.display_name and copy.cache_tags == {"team": "books"}
    assert isinstance(copy.client, GenaiClientFactory) and KEY not in repr(copy.client)
    assert plain.client is client  # the original keeps its live client

    async def built() -> Any:
        return copy.client_for_loop()

    rebuilt = asyncio.run(built())
    api = rebuilt._api_client
    assert api.api_key == KEY and api._http_options.base_url == "http://127.0.0.1:9"
    assert api._http_options.api_version == "v1beta" and api._http_options.timeout == 30_000


def test_a_client_with_live_transport_objects_says_how_to_ship_it() -> None:
    import httpx
    from google import genai
    from google.genai import types

    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(httpx_async_client=httpx.AsyncClient()))
    with pytest.raises(TypeError, match="zero-argument factory"):
        cloudpickle.dumps(GeminiModel(MODEL, client))


@pytest.mark.parametrize("mod", PICKLERS)
def test_strategies_pickle_with_equal_fingerprints(mod: Any) -> None:
    model = GeminiModel(MODEL, _client())
    strategies: list[Any] = [
        GeminiStrategy(model),  # the text parser
        GeminiStrategy(model, response_schema=Book),  # a parser built from the schema (a closure)
        DirectCallStrategy(echo, model_name=MODEL),
        AgentFactoryStrategy(make_agent),
    ]
    if mod is cloudpickle:  # user lambdas travel by value under cloudpickle (what Dask and Ray use)
        strategies.append(GeminiStrategy(model, lambda r: r.text.upper()))
        strategies.append(DirectCallStrategy(lambda p, a, t: (p, {})))
    for strategy in strategies:
        before = strategy.fingerprint()
        copy = _round_trip(mod, strategy)
        assert copy.fingerprint() == before, strategy
        assert type(copy) is type(strategy)
    schema_copy = _round_trip(mod, strategies[1])
    from prefect_batchllm.models.base import LLMResponse

    answer = LLMResponse(
        text='{"title": "Dune", "pages": 412}', input_tokens=1, output_tokens=1, total_tokens=2
    )
    assert schema_copy.response_parser(answer) == Book(title="Dune", pages=412)
    factory_copy = _round_trip(mod, strategies[3])
    assert factory_copy.model_name == "test"  # builds its own agent where it lands


def test_pydantic_ai_strategy_refuses_to_pickle_and_names_the_fix() -> None:
    from pydantic_ai import Agent

    strategy = PydanticAIStrategy(Agent("test", output_type=Book))
    for mod in (pickle, cloudpickle):
        with pytest.raises(TypeError, match="AgentFactoryStrategy"):
            mod.dumps(strategy)


@pytest.mark.parametrize("mod", PICKLERS)
def test_blocks_pickle_and_reregister_the_key(mod: Any) -> None:
    credentials = GeminiCredentials(api_key=KEY, base_url="http://127.0.0.1:9", api_version="v1beta")
    block = GeminiCachedModelBlock(credentials=credentials, cached_contents=["doc"])
    model = block.get_model()
    copy = _round_trip(mod, block)
    assert copy.model_dump() == block.model_dump() and copy._model is None
    assert copy.get_model().fingerprint() == model.fingerprint()
    assert KEY not in repr(copy) and KEY not in str(copy)
    strategy = GeminiStrategy(block.get_model())  # a block-built model: its client factory is the block's
    assert _round_trip(mod, strategy).fingerprint() == strategy.fingerprint()


WORKER = """
import asyncio, pickle, sys
from prefect_batchllm.core.errors import describe_error, redact

model = pickle.loads(open(sys.argv[1], "rb").read())
key = sys.argv[2]
assert redact(f"key={key}") == "key=***", "the key was not re-registered for masking on unpickling"
assert key not in repr(model)

async def main():
    texts = []
    for i in range(3):
        texts.append((await model.generate(f"[worker-{i}] summarize")).text)
    await model.prepare()
    try:
        await model.generate("[echo-key] please")
    except Exception as exc:
        message = describe_error(exc)
        assert key not in message and "***" in message, message
    else:
        raise AssertionError("the echo_api_key fault did not fire")
    print("creates", model.creates, "cache", model.cache_name)
    return texts

print(asyncio.run(main()))
"""


def test_unpickled_cached_model_in_a_subprocess_uses_the_drivers_cache(emulator: Any, tmp_path: Path) -> None:
    """The driver prepares (one create); a spawned process with the pickled model only uses that cache."""
    emulator.faults.add(Fault.echo_api_key(), contains="[echo-key]", times=None)
    model = GeminiCachedModel(MODEL, _client(emulator.base_url), ["the shared document"])

    async def prepare() -> None:
        await model.prepare()

    asyncio.run(prepare())
    assert emulator.count("cachedContents.create") == 1 and model.cache_name
    for name, payload in {"prepared.pkl": pickle.dumps(model), "cloud.pkl": cloudpickle.dumps(model)}.items():
        path = tmp_path / name
        path.write_bytes(payload)
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(WORKER), str(path), KEY],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"creates 0 cache {model.cache_name}" in done.stdout
        assert KEY not in done.stdout + done.stderr

    assert emulator.count("cachedContents.create") == 1  # never a second cache
    generated = emulator.requests_for("generateContent")
    assert len(generated) == 8 and {r.cached_content for r in generated} == {model.cache_name}
    assert describe_error(RuntimeError(KEY)) == "RuntimeError: ***"


def test_unpickled_unprepared_model_finds_the_cache_by_display_name(emulator: Any, tmp_path: Path) -> None:
    """A copy pickled *before* the driver's prepare looks the cache up (same display name) and adopts it."""
    emulator.faults.add(Fault.echo_api_key(), contains="[echo-key]", times=None)
    model = GeminiCachedModel(MODEL, _client(emulator.base_url), ["another shared document"])
    path = tmp_path / "early.pkl"
    path.write_bytes(pickle.dumps(model))  # shipped before prepare: no cache name travels

    async def prepare() -> None:
        await model.prepare()

    asyncio.run(prepare())
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WORKER), str(path), KEY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"creates 0 cache {model.cache_name}" in done.stdout
    assert emulator.count("cachedContents.create") == 1
    assert emulator.count("cachedContents.list") >= 1


async def test_copies_that_race_to_replace_a_cache_converge_on_one(emulator: Any) -> None:
    """Two worker copies that both found no cache and both created one end on the earlier one."""
    model = GeminiCachedModel(MODEL, _client(emulator.base_url), ["a document that vanished"])
    first, second = pickle.loads(pickle.dumps(model)), pickle.loads(pickle.dumps(model))
    await first._create()  # both looked (nothing was there) and create, one after the other
    await second._create()
    assert emulator.count("cachedContents.create") == 2
    assert second.cache_name == first.cache_name  # the later copy adopted the earlier cache ...
    assert list(emulator.caches) == [first.cache_name]  # ... and deleted its own
    answer = await second.generate("still answered")
    assert answer.text and emulator.requests_for("generateContent")[-1].cached_content == first.cache_name
