"""The Prefect layer: the batch flow, its tasks, blocks and artifacts (the only code that imports Prefect).

Names are imported lazily so that importing one module (e.g. the blocks, for ``prefect block register``)
does not pull in the rest.
"""

from __future__ import annotations

from prefect_batchllm._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "run_batch": "prefect_batchllm.prefect.flows",
    "run_batch_prompts": "prefect_batchllm.prefect.flows",
    "ParallelBatchProcessor": "prefect_batchllm.prefect.processor",
    "BatchItemsFailed": "prefect_batchllm.prefect.flows",
    "BatchFlow": "prefect_batchllm.prefect.flows",
    "GeminiCredentials": "prefect_batchllm.prefect.blocks",
    "GeminiCachedModelBlock": "prefect_batchllm.prefect.blocks",
    "publish_batch_artifacts": "prefect_batchllm.prefect.artifacts",
    "artifact_keys": "prefect_batchllm.prefect.artifacts",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
