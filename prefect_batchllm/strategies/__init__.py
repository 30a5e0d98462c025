"""Call strategies: the contract and the Gemini, pydantic-ai and direct-call implementations (lazy)."""

from __future__ import annotations

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

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
