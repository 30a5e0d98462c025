"""LLM models: provider-neutral protocols and the Gemini implementations (imported lazily)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "LLMResponse": "prefect_batchllm.models.base",
    "LLMModel": "prefect_batchllm.models.base",
    "ManagedLLMModel": "prefect_batchllm.models.base",
    "GeminiModel": "prefect_batchllm.models.gemini",
    "GeminiCachedModel": "prefect_batchllm.models.gemini",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prefect_batchllm.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
