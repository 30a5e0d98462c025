"""Strategies that run pydantic-ai agents: one shared agent, or a fresh agent per attempt.

The agent does the model call, tool-mode or native structured output and its own output validation; the
strategy adds what the batch needs: billed token usage (also for runs that failed validation, read from a
``RunUsage`` the run accumulates into), schema-shaped dry-run mocks and a model name for pricing.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections.abc import Callable
from typing import Any

from prefect_batchllm.core.errors import attach_token_usage
from prefect_batchllm.core.identity import callable_identity, schema_identity
from prefect_batchllm.core.pricing import bare_model_name
from prefect_batchllm.core.strategy import MOCK_USAGE, LLMCallStrategy, RetryState, TOutput
from prefect_batchllm.core.tokens import TokenUsage
from prefect_batchllm.models.gemini import register_client_key
from prefect_batchllm.strategies.dry_run import mock_output

__all__ = ["AgentFactoryStrategy", "PydanticAIStrategy", "agent_model_name", "usage_from_run"]


def usage_from_run(usage: Any) -> TokenUsage:
    """A pydantic-ai ``RunUsage`` (or older ``Usage``) as a ``TokenUsage``; cache reads are cached input."""
    if usage is None:
        return {}
    input_tokens = int(getattr(usage, "input_tokens", None) or getattr(usage, "request_tokens", None) or 0)
    output_tokens = int(getattr(usage, "output_tokens", None) or getattr(usage, "response_tokens", None) or 0)
    total = getattr(usage, "total_tokens", None)
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": int(total) if isinstance(total, int) and total else input_tokens + output_tokens,
        "cached_input_tokens": int(getattr(usage, "cache_read_tokens", None) or 0),
    }


def agent_model_name(agent: Any) -> str | None:
    """The bare model name of an agent (``"google-gla:gemini-2.5-flash"`` -> ``"gemini-2.5-flash"``)."""
    model = getattr(agent, "model", None)
    if model is None:
        return None
    name = model if isinstance(model, str) else getattr(model, "model_name", None)
    if not isinstance(name, str) or not name:
        return None
    return bare_model_name(name)


def _result_usage(result: Any) -> Any:
    usage = getattr(result, "usage", None)  # a property in pydantic-ai 2.x, a method before
    if usage is None or hasattr(usage, "input_tokens"):
        return usage
    return usage() if callable(usage) else usage


def _accepts_usage(agent: Any) -> bool:
    try:
        params = inspect.signature(agent.run).parameters
    except (TypeError, ValueError):
        return False
    return "usage" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _check_agent(agent: Any, what: str) -> None:
    if agent is None:
        raise TypeError(f"{what} is None; pass a pydantic_ai.Agent")
    if not callable(getattr(agent, "run", None)):
        raise TypeError(f"{what} must be a pydantic_ai.Agent (with async run()), not {type(agent).__name__}")


async def _run_agent(agent: Any, prompt: Any) -> tuple[Any, TokenUsage]:
    """``agent.run(prompt)`` returning ``(output, usage)``; a failed run re-raises with its billed usage."""
    run_usage: Any = None
    kwargs: dict[str, Any] = {}
    if _accepts_usage(agent):
        from pydantic_ai.usage import RunUsage

        run_usage = RunUsage()  # the run accumulates into it, so a failed run's usage stays readable
        kwargs["usage"] = run_usage
    try:
        result = await agent.run(prompt, **kwargs)
    except Exception as exc:
        usage = usage_from_run(run_usage)
        if usage.get("total_tokens"):
            attach_token_usage(exc, usage)
        raise
    usage = usage_from_run(_result_usage(result) or run_usage)
    return result.output, usage


def register_agent_key(agent: Any) -> None:
    """Register the API key of an agent's model client for masking (e.g. ``GoogleProvider(api_key=...)``)."""
    try:
        client = getattr(getattr(agent, "model", None), "client", None)
    except Exception:  # a model whose client property raises: nothing to register
        return
    if client is not None:
        register_client_key(client)


class PydanticAIStrategy(LLMCallStrategy[TOutput]):
    """Runs one shared pydantic-ai ``Agent`` per attempt: ``(result.output, usage)``.

    Structured output (``output_type``: tool mode, ``NativeOutput``...) is the agent's business; its
    validation failures surface as ``UnexpectedModelBehavior`` (classified invalid output, tokens kept).
    """

    def __init__(self, agent: Any) -> None:
        _check_agent(agent, "agent")
        register_agent_key(agent)
        self.agent = agent

    def __repr__(self) -> str:
        return f"PydanticAIStrategy(model={self.model_name!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Refuse clearly: a pydantic-ai ``Agent`` holds context variables, weak references and (for Gemini)
        a live client, so it cannot travel to another process (Dask / Ray workers, process pools)."""
        raise TypeError(
            "PydanticAIStrategy cannot be pickled for another process (a pydantic_ai.Agent holds context "
            "variables and live clients); to run on Dask / Ray task runners use "
            "AgentFactoryStrategy(make_agent) with a module-level make_agent(attempt) that builds the Agent, "
            "so each worker builds its own"
        )

    @property
    def model_name(self) -> str | None:
        """The agent's model name (for pricing and the UI)."""
        return agent_model_name(self.agent)

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> tuple[TOutput, TokenUsage]:
        """One ``agent.run(prompt)``; the framework enforces ``timeout``."""
        return await _run_agent(self.agent, prompt)

    async def dry_run(self, prompt: Any) -> tuple[TOutput, TokenUsage]:
        """A placeholder shaped like the agent's ``output_type`` (pydantic models field by field)."""
        return mock_output(_output_type(self.agent)), dict(MOCK_USAGE)  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """Model name, output type and instructions of the agent."""
        return _fingerprint(type(self), self.model_name, _output_type(self.agent), _agent_prompts(self.agent))

    # -- Gemini batch jobs (execution="batch_api") ---------------------------------------------------
    #
    # A batch request is one model call, so only an agent whose run is one call can become one: a Gemini
    # ``GoogleModel``, no tools, toolsets or output validators, static instructions. Its output type
    # becomes ``response_json_schema`` and each answer is validated into that same type.

    def check_batch(self) -> None:
        """Raise ``TypeError`` naming what stops this agent from running as Gemini batch requests."""
        self._batch_spec()

    def batch_client(self) -> Any:
        """The agent's ``genai.Client`` (its ``GoogleModel``'s), which submits the batch jobs."""
        return self._batch_spec().client

    @property
    def batch_model(self) -> str:
        """The model name the batch job is created for."""
        return str(self._batch_spec().model.model)

    async def batch_request(self, prompt: Any) -> tuple[Any, Any]:
        """``(contents, GenerateContentConfig)`` of the single call this agent's run makes: its
        instructions, model settings, and its output type as ``response_json_schema``."""
        spec = self._batch_spec()
        if not isinstance(prompt, str | list):
            raise TypeError(f"PydanticAIStrategy batch prompts must be text or content parts, got {prompt!r}")
        config = spec.model._build_config(  # the same config builder GeminiModel.generate uses
            spec.temperature, None, spec.config, cached_content=spec.cached_content
        )
        return prompt, config

    def parse_batch_response(self, response: Any) -> tuple[Any, TokenUsage, dict[str, Any]]:
        """``(output, usage, metadata)``: GeminiModel's blocked / empty checks, then the answer validated
        into the agent's output type (``InvalidOutputError`` with billed tokens when it does not fit)."""
        spec = self._batch_spec()
        llm_response = spec.model.to_llm_response(response)
        output = spec.parse(llm_response)
        meta = llm_response.metadata or {}
        metadata = {k: meta[k] for k in ("finish_reason", "safety_ratings", "model_version") if meta.get(k)}
        return output, llm_response.token_usage(), metadata

    def _batch_spec(self) -> _AgentBatchSpec:
        spec = getattr(self, "_batch_spec_cache", None)
        if spec is None:
            spec = _AgentBatchSpec.of(self.agent)
            self._batch_spec_cache = spec
        return spec


class AgentFactoryStrategy(LLMCallStrategy[TOutput]):
    """Builds a fresh agent per attempt with ``agent_factory(attempt)`` (e.g. rising temperature on retries).

    Otherwise identical to :class:`PydanticAIStrategy`.
    """

    def __init__(self, agent_factory: Callable[[int], Any]) -> None:
        if not callable(agent_factory):
            raise TypeError(
                "agent_factory must be a callable taking the attempt number, "
                f"got {type(agent_factory).__name__}"
            )
        self.agent_factory = agent_factory
        self._first_agent: Any = None
        self._probe_unused = False  # the probe agent is handed to the first attempt-1 execute()
        self._probe_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AgentFactoryStrategy({getattr(self.agent_factory, '__qualname__', self.agent_factory)!r})"

    def __getstate__(self) -> dict[str, Any]:
        """The factory only: agents (which cannot be pickled) and the lock are rebuilt where it lands."""
        state = self.__dict__.copy()
        state.update(_first_agent=None, _probe_unused=False)
        state.pop("_probe_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._probe_lock = threading.Lock()

    def _agent_for(self, attempt: int) -> Any:
        agent = self.agent_factory(attempt)
        _check_agent(agent, f"agent_factory({attempt}) result")
        register_agent_key(agent)
        return agent

    def _probe_agent(self) -> Any:
        """The attempt-1 agent, built once, for the model name, output type and fingerprint."""
        with self._probe_lock:
            if self._first_agent is None:
                self._first_agent = self._agent_for(1)
                self._probe_unused = True
            return self._first_agent

    def _take_agent(self, attempt: int) -> Any:
        """A fresh agent for ``attempt``; the first attempt-1 call reuses the probe agent (built once)."""
        if attempt == 1:
            with self._probe_lock:
                if self._probe_unused:
                    self._probe_unused = False
                    return self._first_agent
        return self._agent_for(attempt)

    @property
    def model_name(self) -> str | None:
        """Model name of the attempt-1 agent (for pricing and the UI)."""
        return agent_model_name(self._probe_agent())

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> tuple[TOutput, TokenUsage]:
        """Build the agent for this attempt and run it once."""
        return await _run_agent(self._take_agent(attempt), prompt)

    async def dry_run(self, prompt: Any) -> tuple[TOutput, TokenUsage]:
        """A placeholder shaped like the attempt-1 agent's ``output_type``."""
        return mock_output(_output_type(self._probe_agent())), dict(MOCK_USAGE)  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """Factory identity plus the attempt-1 agent's model, output type and instructions."""
        factory = callable_identity(self.agent_factory)
        agent = self._probe_agent()
        return _fingerprint(type(self), factory, self.model_name, _output_type(agent), _agent_prompts(agent))


#: pydantic-ai model settings -> GenerateContentConfig fields, for batch requests.
_SETTING_FIELDS = {
    "max_tokens": "max_output_tokens",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop_sequences": "stop_sequences",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "google_safety_settings": "safety_settings",
    "google_thinking_config": "thinking_config",
    "google_labels": "labels",
}


class _AgentBatchSpec:
    """What a one-call agent sends to Gemini, read once from the agent (see ``check_batch``)."""

    def __init__(
        self,
        model: Any,
        client: Any,
        temperature: float | None,
        config: dict[str, Any],
        cached_content: str | None,
        parse: Callable[[Any], Any],
    ) -> None:
        self.model, self.client, self.temperature = model, client, temperature
        self.config, self.cached_content, self.parse = config, cached_content, parse

    @classmethod
    def of(cls, agent: Any) -> _AgentBatchSpec:
        from pydantic import TypeAdapter

        from prefect_batchllm.models.gemini import GeminiModel
        from prefect_batchllm.strategies.dry_run import unwrap_output_spec
        from prefect_batchllm.strategies.gemini import _text_parser, pydantic_json_parser

        fix = "keep this agent with execution='online', or use GeminiStrategy for batch jobs"
        model = getattr(agent, "model", None)
        client: Any = getattr(model, "client", None)
        if not hasattr(client, "aio") or not hasattr(client, "batches"):
            raise TypeError(
                f"PydanticAIStrategy cannot run with execution='batch_api': the agent's model "
                f"({type(model).__name__}) must be a pydantic_ai GoogleModel on the Gemini API "
                f"(provider=GoogleProvider(client=genai.Client(...))); {fix}"
            )
        problems = []
        if getattr(getattr(agent, "_function_toolset", None), "tools", None):
            problems.append("tools")
        if getattr(agent, "_user_toolsets", None) or getattr(agent, "_dynamic_toolsets", None):
            problems.append("toolsets")
        if getattr(agent, "_output_validators", None):
            problems.append("output validators")
        if getattr(agent, "_system_prompt_functions", None) or getattr(
            agent, "_system_prompt_dynamic_functions", None
        ):
            problems.append("dynamic system prompts")
        instructions = [getattr(i, "instruction", i) for i in getattr(agent, "_instructions", None) or []]
        if any(not isinstance(i, str) for i in instructions):
            problems.append("dynamic instructions")
        if problems:
            raise TypeError(
                f"PydanticAIStrategy cannot run with execution='batch_api': the agent has "
                f"{', '.join(problems)}, so its run is more than one model call and a batch job cannot "
                f"answer it; {fix}"
            )
        settings = {
            **(getattr(model, "settings", None) or {}),
            **(getattr(agent, "model_settings", None) or {}),
        }
        unknown = sorted(
            k
            for k in settings
            if k not in _SETTING_FIELDS and k not in ("temperature", "google_cached_content")
        )
        if unknown:
            raise TypeError(
                f"PydanticAIStrategy cannot run with execution='batch_api': model settings {unknown} have no "
                f"batch-request equivalent here; drop them or {fix}"
            )
        system = "\n\n".join(
            [p for p in getattr(agent, "_system_prompts", ()) if isinstance(p, str)] + instructions
        )
        cached = settings.get("google_cached_content")
        if cached and system:
            raise TypeError(
                "PydanticAIStrategy cannot run with execution='batch_api': Gemini rejects a system "
                "instruction next to google_cached_content; put the instructions into the cache"
            )
        config = {_SETTING_FIELDS[k]: v for k, v in settings.items() if k in _SETTING_FIELDS}
        spec = _output_type(agent)
        outputs = getattr(spec, "outputs", spec)
        if isinstance(outputs, list | tuple) and len(outputs) > 1:
            raise TypeError(
                f"PydanticAIStrategy cannot run with execution='batch_api': the agent has several output "
                f"types ({outputs!r}); one response schema needs one type (e.g. a Union in one model); {fix}"
            )
        output_type = unwrap_output_spec(spec)
        if output_type is str:
            parse: Callable[[Any], Any] = _text_parser
        else:
            try:
                schema = TypeAdapter(output_type).json_schema()
            except Exception as exc:
                raise TypeError(
                    f"PydanticAIStrategy cannot run with execution='batch_api': output type {output_type!r} "
                    f"has no JSON schema ({exc}); {fix}"
                ) from None
            config.update(response_mime_type="application/json", response_json_schema=schema)
            parse = pydantic_json_parser(output_type)
        gemini = GeminiModel(
            bare_model_name(str(getattr(model, "model_name", ""))), client, system_instruction=system or None
        )
        return cls(gemini, client, settings.get("temperature"), config, cached, parse)


def _output_type(agent: Any) -> Any:
    return getattr(agent, "output_type", str)


def _agent_prompts(agent: Any) -> str:
    prompts = getattr(agent, "_system_prompts", None) or ()
    instructions = getattr(agent, "_instructions", None)
    texts = tuple(p for p in prompts if isinstance(p, str))
    return repr((texts, instructions if isinstance(instructions, str) else None))


def _fingerprint(cls: type, *parts: Any) -> str:
    text = "|".join([cls.__module__, cls.__qualname__, *(schema_identity(p) for p in parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
