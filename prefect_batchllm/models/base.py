"""Provider-neutral model protocols and the normalised response (seed contract)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from prefect_batchllm.core.tokens import TokenUsage


@dataclass
class LLMResponse:
    """Normalised response from any LLM provider, returned by ``LLMModel.generate()``."""

    text: str
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cached_input_tokens: int = 0
    metadata: dict[str, Any] | None = None
    raw: Any = None

    def token_usage(self) -> TokenUsage:
        """The billed tokens of this response as a complete ``TokenUsage``."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "cached_input_tokens": self.cached_input_tokens,
        }


@runtime_checkable
class LLMModel(Protocol):
    """Something that turns a prompt into an :class:`LLMResponse`."""

    async def generate(
        self,
        prompt: str | list[Any],
        *,
        temperature: float = 0.0,
        system_instruction: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> LLMResponse: ...


@runtime_checkable
class ManagedLLMModel(LLMModel, Protocol):
    """An :class:`LLMModel` with one-time setup and teardown (e.g. a context cache)."""

    async def prepare(self) -> None: ...

    async def cleanup(self) -> None: ...
