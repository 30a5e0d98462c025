"""The Prefect layer: the batch flow, its tasks, blocks and artifacts (the only code that imports Prefect).

Names are imported lazily so that importing one module (e.g. the blocks, for ``prefect block register``)
does not pull in the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    "TerminalProgress": "prefect_batchllm.prefect.progress",
}

if TYPE_CHECKING:  # what editors and type checkers see; at run time each name loads on first use
    # One import per module; `X as X` marks a re-export for strict type checkers.
    # isort: off
    from prefect_batchllm.prefect.artifacts import (
        artifact_keys as artifact_keys,
        publish_batch_artifacts as publish_batch_artifacts,
    )
    from prefect_batchllm.prefect.blocks import (
        GeminiCachedModelBlock as GeminiCachedModelBlock,
        GeminiCredentials as GeminiCredentials,
    )
    from prefect_batchllm.prefect.flows import (
        BatchFlow as BatchFlow,
        BatchItemsFailed as BatchItemsFailed,
        run_batch as run_batch,
        run_batch_prompts as run_batch_prompts,
    )
    from prefect_batchllm.prefect.processor import ParallelBatchProcessor as ParallelBatchProcessor
    from prefect_batchllm.prefect.progress import TerminalProgress as TerminalProgress
    # isort: on

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
