"""Strategies (Gemini, pydantic-ai, agent factory, direct call) against the loopback emulator."""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from typing import Literal

import pytest
from pydantic import BaseModel, Field
from pydantic_ai import Agent, NativeOutput, PromptedOutput, TextOutput, ToolOutput
from pydantic_ai.exceptions import UnexpectedModelBehavior
from pydantic_ai.models.google import GoogleModel, GoogleModelSettings
from pydantic_ai.providers.google import GoogleProvider
from typing_extensions import TypedDict

from prefect_batchllm.core.errors import InvalidOutputError, token_usage_of
from prefect_batchllm.core.strategy import MOCK_USAGE
from prefect_batchllm.models import GeminiCachedModel, GeminiModel, LLMResponse
from prefect_batchllm.strategies import (
    AgentFactoryStrategy,
    DirectCallStrategy,
    GeminiStrategy,
    LLMCallStrategy,
    PydanticAIStrategy,
    RetryState,
    mock_output,
    pydantic_json_parser,
)
from prefect_batchllm.strategies.gemini import CORRECTION_STATE_KEY
from prefect_batchllm.testing import Fault

MODEL = "gemini-2.5-flash"


class Person(BaseModel):
    name: str
    age: int


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    city: str
    zip_code: str | None


class Profile(BaseModel):
    person: Person
    addresses: list[Address]
    color: Color
    kind: Literal["a", "b"]
    score: float
    active: bool
    tags: dict[str, int]
    note: str = "default note"


def agent(emulator, **kwargs) -> Agent:
    model = GoogleModel(MODEL, provider=GoogleProvider(client=emulator.client()))
    return Agent(model, **kwargs)


# -- GeminiStrategy ---------------------------------------------------------------------------------------


async def test_gemini_strategy_text_returns_output_usage_metadata(emulator):
    strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client()), response_parser=lambda r: r.text.upper())
    assert isinstance(strategy, LLMCallStrategy)
    output, usage, metadata = await strategy.execute("hello", 1, 30.0, RetryState())
    assert output == "ECHO: HELLO"
    assert (
        usage["input_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    )
    assert metadata["finish_reason"] == "STOP"
    assert metadata["safety_ratings"]["HARM_CATEGORY_HARASSMENT"] == "NEGLIGIBLE"
    assert strategy.model_name == MODEL


async def test_gemini_strategy_default_parser_is_text(emulator):
    strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client()), temperature=0.7)
    output, _, _ = await strategy.execute("x", 1, 30.0)
    assert output == "echo: x"
    assert emulator.requests[-1].body["generationConfig"]["temperature"] == 0.7


async def test_gemini_strategy_structured_output(emulator):
    strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client()), response_schema=Person)
    output, usage, _ = await strategy.execute("who is it?", 1, 30.0, RetryState())
    assert usage["output_tokens"] > 0
    assert isinstance(output, Person)
    gen = emulator.requests[-1].body["generationConfig"]
    assert gen["responseMimeType"] == "application/json"
    assert set(gen["responseSchema"]["properties"]) == {"name", "age"}


async def test_gemini_strategy_list_schema_and_generation_config(emulator):
    strategy = GeminiStrategy(
        GeminiModel(MODEL, emulator.client()),
        response_schema=list[Person],
        generation_config={"max_output_tokens": 500, "top_p": 0.5},
    )
    output, _, _ = await strategy.execute("people", 1, 30.0)
    assert isinstance(output, list) and all(isinstance(p, Person) for p in output)
    gen = emulator.requests[-1].body["generationConfig"]
    assert gen["maxOutputTokens"] == 500 and gen["topP"] == 0.5


async def test_correction_retry_appends_validation_error_to_next_prompt(emulator):
    emulator.faults.add(Fault.invalid_json(), contains="[item-3]", times=1)
    strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client()), response_schema=Person)
    state = RetryState()

    with pytest.raises(InvalidOutputError) as info:
        await strategy.execute("Describe [item-3]", 1, 30.0, state)
    failed = info.value
    assert failed.token_usage["total_tokens"] > 0  # failed attempts are billed
    assert failed.raw_text and failed.validation_error is not None
    await strategy.on_error(failed, 1, state)
    assert state.get(CORRECTION_STATE_KEY)

    output, _, metadata = await strategy.execute("Describe [item-3]", 2, 30.0, state)
    assert isinstance(output, Person)
    assert metadata["corrected"] is True

    first, second = emulator.requests_for("generateContent", contains="[item-3]")
    assert "Your previous answer was invalid" not in first.prompt_text
    assert "Your previous answer was invalid:" in second.prompt_text
    assert "Answer again with valid JSON matching the schema." in second.prompt_text
    assert second.prompt_text.startswith("Describe [item-3]")


async def test_correction_is_per_item_state_and_can_be_disabled(emulator):
    emulator.faults.add(Fault.invalid_json(), times=1)
    strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client()), response_schema=Person)
    state_a = RetryState()
    with pytest.raises(InvalidOutputError) as info:
        await strategy.execute("item a", 1, 30.0, state_a)
    await strategy.on_error(info.value, 1, state_a)
    await strategy.execute("item b", 1, 30.0, RetryState())  # another item: no correction
    assert "invalid" not in emulator.requests[-1].prompt_text

    off = GeminiStrategy(
        GeminiModel(MODEL, emulator.client()), response_schema=Person, correction_retry=False
    )
    await off.execute("item a", 2, 30.0, state_a)
    assert "invalid" not in emulator.requests[-1].prompt_text


async def test_correction_for_list_prompt_appends_a_part(emulator):
    strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client()))
    state = RetryState({CORRECTION_STATE_KEY: "field 'age' missing"})
    await strategy.execute(["part one"], 2, 30.0, state)
    parts = emulator.requests[-1].body["contents"][0]["parts"]
    assert parts[-1]["text"].startswith("Your previous answer was invalid: field 'age' missing")


async def test_parser_value_error_becomes_invalid_output_with_tokens(emulator):
    def parse_int(response: LLMResponse) -> int:
        return int(response.text)

    strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client()), parse_int)
    with pytest.raises(InvalidOutputError) as info:
        await strategy.execute("x", 1, 30.0)
    assert info.value.token_usage["total_tokens"] > 0
    assert isinstance(info.value.validation_error, ValueError)


async def test_parser_bug_keeps_its_type_but_carries_tokens(emulator):
    def broken(response: LLMResponse) -> str:
        return {}["missing"]

    strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client()), broken)
    with pytest.raises(KeyError) as info:
        await strategy.execute("x", 1, 30.0)
    assert token_usage_of(info.value)["total_tokens"] > 0


async def test_strategy_delegates_prepare_and_cleanup_to_cached_model(emulator):
    model = GeminiCachedModel(MODEL, emulator.client(), ["context " * 100])
    strategy = GeminiStrategy(model, response_parser=lambda r: r.text)
    await strategy.prepare()
    assert model.cache_name in emulator.caches
    _, usage, _ = await strategy.execute("q", 1, 30.0)
    assert usage["cached_input_tokens"] > 0
    await strategy.cleanup()
    assert model.cache_name in emulator.caches
    assert strategy.fingerprint() != GeminiStrategy(GeminiModel(MODEL, emulator.client())).fingerprint()


async def test_gemini_strategy_dry_run(emulator):
    model = GeminiModel(MODEL, emulator.client())
    output, usage = await GeminiStrategy(model, response_schema=Person).dry_run("x")
    assert isinstance(output, Person) and usage["total_tokens"] == 150
    text, _ = await GeminiStrategy(model).dry_run("x")
    assert text == "[DRY-RUN] Mock output"
    assert emulator.count() == 0


def test_gemini_strategy_fingerprint_tracks_parser_and_schema(emulator):
    model = GeminiModel(MODEL, emulator.client())
    base = GeminiStrategy(model)
    assert base.fingerprint() == GeminiStrategy(GeminiModel(MODEL, emulator.client())).fingerprint()
    assert base.fingerprint() != GeminiStrategy(model, response_schema=Person).fingerprint()
    assert base.fingerprint() != GeminiStrategy(model, temperature=0.5).fingerprint()


def test_gemini_strategy_bad_input(emulator):
    with pytest.raises(TypeError, match="model"):
        GeminiStrategy(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="response_parser"):
        GeminiStrategy(GeminiModel(MODEL, emulator.client()), "not callable")  # type: ignore[arg-type]


def test_pydantic_json_parser_strips_fences_and_raises_invalid_output():
    parse = pydantic_json_parser(Person)
    fenced = LLMResponse('```json\n{"name": "Ada", "age": 36}\n```', 1, 2, 3)
    assert parse(fenced) == Person(name="Ada", age=36)
    with pytest.raises(InvalidOutputError) as info:
        parse(LLMResponse('{"name": "Ada"}', 5, 6, 11))
    assert "age" in str(info.value)
    assert info.value.token_usage["total_tokens"] == 11


def test_mock_output_builds_nested_models():
    profile = mock_output(Profile)
    assert isinstance(profile, Profile)
    assert isinstance(profile.person, Person)
    assert isinstance(profile.addresses[0], Address)
    assert profile.color is Color.RED and profile.kind == "a"
    assert profile.note == "default note"
    Profile.model_validate(profile.model_dump())  # shape is valid
    assert mock_output(str) == "[DRY-RUN] Mock output"


# -- PydanticAIStrategy / AgentFactoryStrategy -----------------------------------------------------------


async def test_pydantic_ai_text(emulator):
    strategy = PydanticAIStrategy(agent(emulator))
    output, usage = await strategy.execute("hello", 1, 30.0)
    assert output == "echo: hello"
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert strategy.model_name == MODEL


async def test_pydantic_ai_structured_tool_mode(emulator):
    strategy = PydanticAIStrategy(agent(emulator, output_type=Person))
    output, usage = await strategy.execute("who?", 1, 30.0)
    assert isinstance(output, Person)
    body = emulator.requests[-1].body
    assert body["tools"][0]["functionDeclarations"][0]["name"] == "final_result"
    assert body["toolConfig"]["functionCallingConfig"]["mode"] == "ANY"
    assert usage["total_tokens"] > 0


async def test_pydantic_ai_native_structured_output(emulator):
    strategy = PydanticAIStrategy(agent(emulator, output_type=NativeOutput(Person)))
    output, _ = await strategy.execute("who?", 1, 30.0)
    assert isinstance(output, Person)
    assert emulator.requests[-1].body["generationConfig"]["responseMimeType"] == "application/json"


async def test_pydantic_ai_counts_usage_of_failed_validation(emulator):
    emulator.faults.add(Fault.invalid_json(), times=None)
    strategy = PydanticAIStrategy(agent(emulator, output_type=Person, retries=1))
    with pytest.raises(UnexpectedModelBehavior) as info:
        await strategy.execute("who?", 1, 30.0)
    requests = emulator.count("generateContent")
    assert requests == 2  # the first answer plus pydantic-ai's own output retry
    assert token_usage_of(info.value)["total_tokens"] == emulator.usage_totals()["total"]


async def test_pydantic_ai_validation_retry_recovers_and_sums_usage(emulator):
    emulator.faults.add(Fault.invalid_json(), times=1)
    strategy = PydanticAIStrategy(agent(emulator, output_type=Person, retries=2))
    output, usage = await strategy.execute("who?", 1, 30.0)
    assert isinstance(output, Person)
    assert emulator.count("generateContent") == 2
    assert usage["total_tokens"] == emulator.usage_totals()["total"]


async def test_pydantic_ai_with_gemini_cache_reports_cached_tokens(emulator):
    cache = GeminiCachedModel(MODEL, emulator.client(), ["context " * 200])
    await cache.prepare()
    settings = GoogleModelSettings(google_cached_content=cache.cache_name)
    strategy = PydanticAIStrategy(agent(emulator, model_settings=settings))
    _, usage = await strategy.execute("q", 1, 30.0)
    assert usage["cached_input_tokens"] > 0
    assert emulator.requests[-1].cached_content == cache.cache_name


async def test_pydantic_ai_dry_run_is_schema_shaped(emulator):
    output, usage = await PydanticAIStrategy(agent(emulator, output_type=Profile)).dry_run("x")
    assert isinstance(output, Profile) and isinstance(output.person, Person)
    assert usage["total_tokens"] == 150
    text, _ = await PydanticAIStrategy(agent(emulator)).dry_run("x")
    assert text == "[DRY-RUN] Mock output"
    assert emulator.count() == 0


async def test_agent_factory_builds_one_agent_per_attempt(emulator):
    attempts: list[int] = []

    def factory(attempt: int) -> Agent:
        attempts.append(attempt)
        model = GoogleModel(MODEL, provider=GoogleProvider(client=emulator.client()))
        return Agent(model, output_type=Person, model_settings={"temperature": 0.5 + 0.1 * attempt})

    strategy = AgentFactoryStrategy(factory)
    assert strategy.model_name == MODEL
    for attempt in (1, 2, 3):
        output, usage = await strategy.execute("who?", attempt, 30.0)
        assert isinstance(output, Person) and usage["total_tokens"] > 0
    temperatures = [
        r.body["generationConfig"]["temperature"] for r in emulator.requests_for("generateContent")
    ]
    assert temperatures == pytest.approx([0.6, 0.7, 0.8])
    assert attempts[-3:] == [1, 2, 3]
    mock, _ = await strategy.dry_run("x")
    assert isinstance(mock, Person)


def test_pydantic_ai_bad_input():
    with pytest.raises(TypeError, match="agent"):
        PydanticAIStrategy(None)
    with pytest.raises(TypeError, match="agent"):
        PydanticAIStrategy("gemini-2.5-flash")
    with pytest.raises(TypeError, match="agent_factory"):
        AgentFactoryStrategy("not callable")  # type: ignore[arg-type]


async def test_agent_factory_returning_non_agent_is_a_type_error():
    strategy = AgentFactoryStrategy(lambda attempt: "nope")
    with pytest.raises(TypeError, match="agent_factory"):
        await strategy.execute("x", 1, 30.0)


def test_pydantic_ai_fingerprints(emulator):
    a = PydanticAIStrategy(agent(emulator, output_type=Person))
    assert a.fingerprint() == PydanticAIStrategy(agent(emulator, output_type=Person)).fingerprint()
    assert a.fingerprint() != PydanticAIStrategy(agent(emulator)).fingerprint()


# -- DirectCallStrategy ----------------------------------------------------------------------------------


async def test_direct_call_with_gemini_client(emulator):
    client = emulator.client()

    async def call(prompt: str, attempt: int, timeout: float):
        response = await client.aio.models.generate_content(model=MODEL, contents=prompt)
        meta = response.usage_metadata
        return response.text, {"prompt_tokens": meta.prompt_token_count, "completion_tokens": 3}

    strategy = DirectCallStrategy(call, model_name=MODEL)
    output, usage = await strategy.execute("hi", 1, 30.0)
    assert output == "echo: hi"
    assert usage["input_tokens"] > 0 and usage["output_tokens"] == 3
    assert usage["total_tokens"] == usage["input_tokens"] + 3
    assert strategy.model_name == MODEL


async def test_direct_call_state_and_metadata():
    seen = []

    async def call(prompt, attempt, timeout, state=None):
        seen.append(state)
        state.set("tries", attempt)
        return f"{prompt}:{attempt}", {"input_tokens": 1, "output_tokens": 2}, {"source": "direct"}

    state = RetryState()
    output, usage, metadata = await DirectCallStrategy(call).execute("p", 2, 5.0, state)
    assert output == "p:2" and usage["total_tokens"] == 3 and metadata == {"source": "direct"}
    assert seen == [state] and state.get("tries") == 2


async def test_direct_call_sync_callable_and_bad_returns():
    assert (await DirectCallStrategy(lambda p, a, t: (p, None)).execute("x", 1, 1.0))[0] == "x"
    with pytest.raises(TypeError, match="must return"):
        await DirectCallStrategy(lambda p, a, t: "just text").execute("x", 1, 1.0)
    with pytest.raises(TypeError, match="token_usage"):
        await DirectCallStrategy(lambda p, a, t: ("x", 5)).execute("x", 1, 1.0)


def test_direct_call_validates_callable():
    with pytest.raises(TypeError, match="callable"):
        DirectCallStrategy(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        DirectCallStrategy("call")  # type: ignore[arg-type]

    async def two_args(attempt, timeout):  # the old README shape without the prompt
        return "x", {}

    with pytest.raises(TypeError, match=r"\(prompt, attempt, timeout\)"):
        DirectCallStrategy(two_args)


def test_direct_call_fingerprint():
    def call(prompt, attempt, timeout):
        return prompt, {}

    assert DirectCallStrategy(call).fingerprint() == DirectCallStrategy(call).fingerprint()
    assert DirectCallStrategy(call).fingerprint() != DirectCallStrategy(call, identity="v2").fingerprint()


# -- review fixes ------------------------------------------------------------------------------------------


class Adult(BaseModel):
    name: str
    age: int = Field(ge=18)
    note: str = "kept default"


@dataclasses.dataclass
class Point:
    x: int
    y: float


class Row(TypedDict):
    key: str
    count: int


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        (Adult, lambda v: isinstance(v, Adult) and v.age >= 18 and v.note == "kept default"),
        (NativeOutput(Adult), lambda v: isinstance(v, Adult)),
        (ToolOutput(Adult), lambda v: isinstance(v, Adult)),
        (PromptedOutput([Point, Adult]), lambda v: isinstance(v, Point)),
        ([Point, Adult], lambda v: isinstance(v, Point)),
        (Point, lambda v: isinstance(v, Point)),
        (Row, lambda v: isinstance(v, dict) and set(v) == {"key", "count"}),
        (tuple[int, str], lambda v: isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], str)),
        (list[Adult], lambda v: all(isinstance(a, Adult) for a in v)),
        (Literal["x", "y"], lambda v: v == "x"),
        (Color, lambda v: v is Color.RED),
        (TextOutput(str.upper), lambda v: v == "[DRY-RUN] Mock output"),
    ],
)
def test_mock_output_is_schema_shaped_and_valid(spec, check):
    value = mock_output(spec)
    assert check(value), value
    assert mock_output(spec) == value  # deterministic


def test_mock_output_validates_against_the_type():
    from pydantic import TypeAdapter

    for output_type in (Adult, Profile, list[Person], tuple[int, str]):
        adapter = TypeAdapter(output_type)
        adapter.validate_python(adapter.dump_python(mock_output(output_type)))  # constraints hold


async def test_pydantic_ai_dry_run_unwraps_output_specs(emulator):
    for spec in (NativeOutput(Person), ToolOutput(Person), [Person, Point]):
        output, usage = await PydanticAIStrategy(agent(emulator, output_type=spec)).dry_run("x")
        assert isinstance(output, Person), spec
        assert usage == MOCK_USAGE
    assert emulator.count() == 0


async def test_gemini_strategy_dry_run_with_a_json_schema(emulator):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5}}, "required": ["n"]}
    strategy = GeminiStrategy(
        GeminiModel(MODEL, emulator.client()),
        generation_config={"response_mime_type": "application/json", "response_json_schema": schema},
        response_parser=lambda r: r.text,
    )
    output, _ = await strategy.dry_run("x")
    assert output == {"n": 5}


async def test_default_dry_run_uses_the_shared_mock_usage():
    class Plain(LLMCallStrategy[str]):
        async def execute(self, prompt, attempt, timeout, state=None):
            raise AssertionError("no call in a dry run")

    assert await Plain().dry_run("x") == ("[DRY-RUN] Mock output", MOCK_USAGE)


async def test_parser_exception_keeps_its_cause(emulator):
    class ParseBug(Exception):
        pass

    def broken(response: LLMResponse) -> str:
        try:
            return {}["missing"]
        except KeyError as exc:
            raise ParseBug("could not parse") from exc

    strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client()), broken)
    with pytest.raises(ParseBug) as info:
        await strategy.execute("x", 1, 30.0)
    assert isinstance(info.value.__cause__, KeyError)
    assert token_usage_of(info.value)["total_tokens"] > 0


async def test_agent_factory_builds_the_attempt_one_agent_once(emulator):
    built: list[int] = []

    def factory(attempt: int) -> Agent:
        built.append(attempt)
        return agent(emulator)

    strategy = AgentFactoryStrategy(factory)
    strategy.fingerprint()
    assert strategy.model_name == MODEL
    await strategy.execute("q", 1, 30.0)
    assert built == [1]
    await strategy.execute("q", 1, 30.0)  # a later item: a fresh agent again
    await strategy.execute("q", 2, 30.0)
    assert built == [1, 1, 2]


async def test_direct_call_runs_sync_callables_off_the_loop():
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def blocking(prompt, attempt, timeout):
        seen.append(threading.get_ident())
        time.sleep(0.05)
        return prompt, {"input_tokens": 1}

    async def native(prompt, attempt, timeout):
        seen.append(threading.get_ident())
        return prompt, {}

    assert (await DirectCallStrategy(blocking).execute("x", 1, 1.0))[0] == "x"
    assert (await DirectCallStrategy(native).execute("y", 1, 1.0))[0] == "y"
    assert seen[0] != loop_thread and seen[1] == loop_thread


def test_schema_identity_is_shared():
    from prefect_batchllm.core.identity import schema_identity
    from prefect_batchllm.strategies import gemini as gemini_strategies
    from prefect_batchllm.strategies import pydantic_ai as pai_strategies

    assert not hasattr(gemini_strategies, "_schema_identity") and not hasattr(pai_strategies, "_type_name")
    assert schema_identity(Point) != schema_identity(Row)
    assert schema_identity(None) == "" and schema_identity("gemini-2.5-flash") == "gemini-2.5-flash"


# -- fingerprints: callable_identity and the default fingerprint ------------------------------------------


def test_callable_identity_sees_code_closures_and_defaults() -> None:
    import functools
    import subprocess
    import sys

    from prefect_batchllm.core.identity import callable_identity

    a, b = (lambda r: r.text), (lambda r: r.text.upper())
    assert callable_identity(a) != callable_identity(b)  # both are "<lambda>"
    assert callable_identity(a) == callable_identity(lambda r: r.text)  # same code, same identity

    def make(suffix: str):
        return lambda r: r + suffix

    assert callable_identity(make("!")) != callable_identity(make("?"))
    assert callable_identity(make("!")) == callable_identity(make("!"))

    def with_default(r, n=1):
        return r * n

    def with_default_2(r, n=2):
        return r * n

    with_default_2.__qualname__ = with_default.__qualname__
    assert callable_identity(with_default) != callable_identity(with_default_2)
    assert callable_identity(functools.partial(with_default, n=3)) != callable_identity(
        functools.partial(with_default, n=4)
    )
    # Stable across processes (hash randomisation included).
    code = (
        "from prefect_batchllm.core.identity import callable_identity\n"
        "S = {'x', 'y', 'z'}\n"
        "f = lambda r: r in S and {'k': frozenset({'a', 'b'})}\n"
        "print(callable_identity(f))\n"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout for _ in range(2)
    }
    assert len(outs) == 1 and "#" in outs.pop()


def test_gemini_fingerprint_changes_with_the_lambda_parser(emulator) -> None:
    model = GeminiModel(MODEL, emulator.client())
    fp = lambda parser: GeminiStrategy(model, response_parser=parser).fingerprint()  # noqa: E731
    assert fp(lambda r: r.text) != fp(lambda r: r.text.upper())
    assert fp(lambda r: r.text) == fp(lambda r: r.text)


def test_default_fingerprint_hashes_public_constructor_state() -> None:
    from prefect_batchllm.core.strategy import LLMCallStrategy

    class Opts(BaseModel):
        temperature: float = 0.0

    class Custom(LLMCallStrategy[str]):
        def __init__(self, suffix: str, opts: Opts, parser=None) -> None:
            self.suffix, self.opts, self.parser = suffix, opts, parser or (lambda t: t)
            self.client = threading.Lock()  # unrepresentable: counted by type name only
            self._calls = 0  # private run-time state: ignored

        async def execute(self, prompt, attempt, timeout, state=None):
            return prompt + self.suffix, {}

    base = Custom("!", Opts()).fingerprint()
    assert Custom("!", Opts()).fingerprint() == base
    assert Custom("?", Opts()).fingerprint() != base
    assert Custom("!", Opts(temperature=0.5)).fingerprint() != base
    assert Custom("!", Opts(), parser=lambda t: t.upper()).fingerprint() != base
    changed = Custom("!", Opts())
    changed._calls = 99
    assert changed.fingerprint() == base


def test_direct_call_identity_defaults_to_callable_identity() -> None:
    def make(n: int):
        async def call(prompt, attempt, timeout):
            return prompt * n, {}

        return call

    assert DirectCallStrategy(make(1)).fingerprint() != DirectCallStrategy(make(2)).fingerprint()
    assert DirectCallStrategy(make(1)).fingerprint() == DirectCallStrategy(make(1)).fingerprint()
