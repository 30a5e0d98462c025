"""Call strategies: Gemini, pydantic-ai and direct-call implementations of the core contract (lazy)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect_batchllm._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "LLMCallStrategy": "prefect_batchllm.core.strategy",
    "RetryState": "prefect_batchllm.core.strategy",
    "GeminiStrategy": "prefect_batchllm.strategies.gemini",
    "pydantic_json_parser": "prefect_batchllm.strategies.gemini",
    "mock_output": "prefect_batchllm.strategies.dry_run",
    "PydanticAIStrategy": "prefect_batchllm.strategies.pydantic_ai",
    "AgentFactoryStrategy": "prefect_batchllm.strategies.pydantic_ai",
    "DirectCallStrategy": "prefect_batchllm.strategies.direct",
}

if TYPE_CHECKING:  # what editors and type checkers see; at run time each name loads on first use
    # One import per module; `X as X` marks a re-export for strict type checkers.
    # isort: off
    from prefect_batchllm.core.strategy import LLMCallStrategy as LLMCallStrategy, RetryState as RetryState
    from prefect_batchllm.strategies.direct import DirectCallStrategy as DirectCallStrategy
    from prefect_batchllm.strategies.dry_run import mock_output as mock_output
    from prefect_batchllm.strategies.gemini import (
        GeminiStrategy as GeminiStrategy,
        pydantic_json_parser as pydantic_json_parser,
    )
    from prefect_batchllm.strategies.pydantic_ai import (
        AgentFactoryStrategy as AgentFactoryStrategy,
        PydanticAIStrategy as PydanticAIStrategy,
    )
    # isort: on

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
