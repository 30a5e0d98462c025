"""LLM models: provider-neutral protocols and the Gemini implementations (imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect_batchllm._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "LLMResponse": "prefect_batchllm.models.base",
    "LLMModel": "prefect_batchllm.models.base",
    "ManagedLLMModel": "prefect_batchllm.models.base",
    "GeminiModel": "prefect_batchllm.models.gemini",
    "GeminiCachedModel": "prefect_batchllm.models.gemini",
}

if TYPE_CHECKING:  # what editors and type checkers see; at run time each name loads on first use
    # One import per module; `X as X` marks a re-export for strict type checkers.
    # isort: off
    from prefect_batchllm.models.base import (
        LLMModel as LLMModel,
        LLMResponse as LLMResponse,
        ManagedLLMModel as ManagedLLMModel,
    )
    from prefect_batchllm.models.gemini import (
        GeminiCachedModel as GeminiCachedModel,
        GeminiModel as GeminiModel,
    )
    # isort: on

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
