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


class PydanticAIStrategy(LLMCallStrategy[TOutput]):
    """Runs one shared pydantic-ai ``Agent`` per attempt: ``(result.output, usage)``.

    Structured output (``output_type``: tool mode, ``NativeOutput``...) is the agent's business; its
    validation failures surface as ``UnexpectedModelBehavior`` (classified invalid output, tokens kept).
    """

    def __init__(self, agent: Any) -> None:
        _check_agent(agent, "agent")
        self.agent = agent

    def __repr__(self) -> str:
        return f"PydanticAIStrategy(model={self.model_name!r})"

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

    def _agent_for(self, attempt: int) -> Any:
        agent = self.agent_factory(attempt)
        _check_agent(agent, f"agent_factory({attempt}) result")
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
