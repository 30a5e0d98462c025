"""prefect-batchllm: large batches of LLM calls as observable, retryable, rate-limited Prefect work.

Public names are imported lazily, so ``import prefect_batchllm`` stays cheap and the provider layer can be
used without importing Prefect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    "FingerprintError": "prefect_batchllm.core.identity",
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
    "GlobalRateLimiter": "prefect_batchllm.prefect.limits",
    "RateLimitConfigurationError": "prefect_batchllm.prefect.limits",
    # prompt templates in files
    "PromptTemplate": "prefect_batchllm.core.templates",
    "load_prompt_template": "prefect_batchllm.core.templates",
    # cost before the run
    "estimate_batch": "prefect_batchllm.estimate",
    "BatchEstimate": "prefect_batchllm.estimate",
    # a live progress bar in a terminal
    "TerminalProgress": "prefect_batchllm.prefect.progress",
    # data pipelines
    "enrich_dataframe": "prefect_batchllm.dataframe",
    "EnrichmentFailed": "prefect_batchllm.dataframe",
    "enrich_table_file": "prefect_batchllm.streaming",
    "read_table": "prefect_batchllm.tables",
    "write_table": "prefect_batchllm.tables",
}

if TYPE_CHECKING:  # what editors and type checkers see; at run time each name loads on first use
    # One import per module; `X as X` marks a re-export for strict type checkers.
    # isort: off
    from prefect_batchllm.core.config import (
        ProcessorConfig as ProcessorConfig,
        RateLimitConfig as RateLimitConfig,
        RetryConfig as RetryConfig,
    )
    from prefect_batchllm.core.errors import (
        BlockedResponseError as BlockedResponseError,
        DefaultErrorClassifier as DefaultErrorClassifier,
        ErrorCategory as ErrorCategory,
        ErrorClassifier as ErrorClassifier,
        ErrorInfo as ErrorInfo,
        InvalidOutputError as InvalidOutputError,
    )
    from prefect_batchllm.core.events import (
        Middleware as Middleware,
        ProcessingEvent as ProcessingEvent,
        ProcessorObserver as ProcessorObserver,
    )
    from prefect_batchllm.core.identity import FingerprintError as FingerprintError
    from prefect_batchllm.core.items import (
        BatchResult as BatchResult,
        LLMWorkItem as LLMWorkItem,
        WorkItemResult as WorkItemResult,
    )
    from prefect_batchllm.core.pricing import ModelPrice as ModelPrice, register_price as register_price
    from prefect_batchllm.core.strategy import LLMCallStrategy as LLMCallStrategy, RetryState as RetryState
    from prefect_batchllm.core.templates import (
        PromptTemplate as PromptTemplate,
        load_prompt_template as load_prompt_template,
    )
    from prefect_batchllm.core.tokens import TokenUsage as TokenUsage
    from prefect_batchllm.dataframe import (
        EnrichmentFailed as EnrichmentFailed,
        enrich_dataframe as enrich_dataframe,
    )
    from prefect_batchllm.estimate import BatchEstimate as BatchEstimate, estimate_batch as estimate_batch
    from prefect_batchllm.models.base import (
        LLMModel as LLMModel,
        LLMResponse as LLMResponse,
        ManagedLLMModel as ManagedLLMModel,
    )
    from prefect_batchllm.models.gemini import (
        GeminiCachedModel as GeminiCachedModel,
        GeminiModel as GeminiModel,
    )
    from prefect_batchllm.prefect.blocks import (
        GeminiCachedModelBlock as GeminiCachedModelBlock,
        GeminiCredentials as GeminiCredentials,
    )
    from prefect_batchllm.prefect.flows import (
        BatchItemsFailed as BatchItemsFailed,
        run_batch as run_batch,
        run_batch_prompts as run_batch_prompts,
    )
    from prefect_batchllm.prefect.limit_admin import ensure_rate_limits as ensure_rate_limits
    from prefect_batchllm.prefect.limits import (
        GlobalRateLimiter as GlobalRateLimiter,
        RateLimitConfigurationError as RateLimitConfigurationError,
    )
    from prefect_batchllm.prefect.processor import ParallelBatchProcessor as ParallelBatchProcessor
    from prefect_batchllm.prefect.progress import TerminalProgress as TerminalProgress
    from prefect_batchllm.strategies.direct import DirectCallStrategy as DirectCallStrategy
    from prefect_batchllm.strategies.gemini import GeminiStrategy as GeminiStrategy
    from prefect_batchllm.strategies.pydantic_ai import (
        AgentFactoryStrategy as AgentFactoryStrategy,
        PydanticAIStrategy as PydanticAIStrategy,
    )
    from prefect_batchllm.streaming import enrich_table_file as enrich_table_file
    from prefect_batchllm.tables import read_table as read_table, write_table as write_table
    # isort: on

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
