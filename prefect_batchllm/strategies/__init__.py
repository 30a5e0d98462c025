"""Call strategies: the contract and the Gemini, pydantic-ai and direct-call implementations (lazy)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "LLMCallStrategy": "prefect_batchllm.strategies.base",
    "RetryState": "prefect_batchllm.strategies.base",
    "GeminiStrategy": "prefect_batchllm.strategies.gemini",
    "pydantic_json_parser": "prefect_batchllm.strategies.gemini",
    "mock_output": "prefect_batchllm.strategies.gemini",
    "PydanticAIStrategy": "prefect_batchllm.strategies.pydantic_ai",
    "AgentFactoryStrategy": "prefect_batchllm.strategies.pydantic_ai",
    "DirectCallStrategy": "prefect_batchllm.strategies.direct",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prefect_batchllm.strategies' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
