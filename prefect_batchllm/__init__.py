"""prefect-batchllm: large batches of LLM calls as observable, retryable, rate-limited Prefect work.

Public names are imported lazily, so ``import prefect_batchllm`` stays cheap and the provider layer can be
used without importing Prefect.
"""

from __future__ import annotations

from prefect_batchllm._lazy import lazy_exports

# Installs the builder behind LLMWorkItem's seed keywords (agent=, direct_call=) into core (cheap: it
# imports only core; the strategies it builds are imported when first used).
from prefect_batchllm.strategies import seed_keywords as _seed_keywords  # noqa: F401

_EXPORTS: dict[str, str] = {
    # core
    "LLMWorkItem": "prefect_batchllm.core.items",
    "WorkItemResult": "prefect_batchllm.core.items",
    "BatchResult": "prefect_batchllm.core.items",
    "TokenUsage": "prefect_batchllm.core.tokens",
    "ProcessorConfig": "prefect_batchllm.core.config",
    "RetryConfig": "prefect_batchllm.core.config",
    "RateLimitConfig": "prefect_batchllm.core.config",
    "ModelPrice": "prefect_batchllm.core.pricing",
    "register_price": "prefect_batchllm.core.pricing",
    "ErrorCategory": "prefect_batchllm.core.errors",
    "ErrorInfo": "prefect_batchllm.core.errors",
    "ErrorClassifier": "prefect_batchllm.core.errors",
    "DefaultErrorClassifier": "prefect_batchllm.core.errors",
    "InvalidOutputError": "prefect_batchllm.core.errors",
    "BlockedResponseError": "prefect_batchllm.core.errors",
    "ProcessingEvent": "prefect_batchllm.core.events",
    "ProcessorObserver": "prefect_batchllm.core.events",
    "Middleware": "prefect_batchllm.core.events",
    # models
    "LLMResponse": "prefect_batchllm.models.base",
    "LLMModel": "prefect_batchllm.models.base",
    "ManagedLLMModel": "prefect_batchllm.models.base",
    "GeminiModel": "prefect_batchllm.models.gemini",
    "GeminiCachedModel": "prefect_batchllm.models.gemini",
    # strategies
    "LLMCallStrategy": "prefect_batchllm.core.strategy",
    "RetryState": "prefect_batchllm.core.strategy",
    "GeminiStrategy": "prefect_batchllm.strategies.gemini",
    "PydanticAIStrategy": "prefect_batchllm.strategies.pydantic_ai",
    "DirectCallStrategy": "prefect_batchllm.strategies.direct",
    "AgentFactoryStrategy": "prefect_batchllm.strategies.pydantic_ai",
    # prefect layer
    "run_batch": "prefect_batchllm.prefect.flows",
    "run_batch_prompts": "prefect_batchllm.prefect.flows",
    "ParallelBatchProcessor": "prefect_batchllm.prefect.processor",
    "BatchItemsFailed": "prefect_batchllm.prefect.flows",
    "GeminiCredentials": "prefect_batchllm.prefect.blocks",
    "GeminiCachedModelBlock": "prefect_batchllm.prefect.blocks",
    "ensure_rate_limits": "prefect_batchllm.prefect.limit_admin",
    # data pipelines
    "enrich_dataframe": "prefect_batchllm.dataframe",
    "read_table": "prefect_batchllm.tables",
    "write_table": "prefect_batchllm.tables",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
