"""LLM models: provider-neutral protocols and the Gemini implementations (imported lazily)."""

from __future__ import annotations

from prefect_batchllm._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "LLMResponse": "prefect_batchllm.models.base",
    "LLMModel": "prefect_batchllm.models.base",
    "ManagedLLMModel": "prefect_batchllm.models.base",
    "GeminiModel": "prefect_batchllm.models.gemini",
    "GeminiCachedModel": "prefect_batchllm.models.gemini",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
