"""The Prefect layer: the batch flow, its tasks, blocks and artifacts (the only code that imports Prefect).

Names are imported lazily so that importing one module (e.g. the blocks, for ``prefect block register``)
does not pull in the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "run_batch": "prefect_batchllm.prefect.flows",
    "run_batch_prompts": "prefect_batchllm.prefect.flows",
    "ParallelBatchProcessor": "prefect_batchllm.prefect.flows",
    "BatchItemsFailed": "prefect_batchllm.prefect.flows",
    "BatchFlow": "prefect_batchllm.prefect.flows",
    "GeminiCredentials": "prefect_batchllm.prefect.blocks",
    "GeminiCachedModelBlock": "prefect_batchllm.prefect.blocks",
    "publish_batch_artifacts": "prefect_batchllm.prefect.artifacts",
    "artifact_keys": "prefect_batchllm.prefect.artifacts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prefect_batchllm.prefect' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
