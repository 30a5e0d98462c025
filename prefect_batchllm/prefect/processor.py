"""``ParallelBatchProcessor``: the seed library's processor API (``add_work`` / ``process_all`` /
``get_stats``), executing every batch as one ``run_batch`` flow run.

A compatibility facade for code written against the original batch-llm; new code calls ``run_batch``.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Generic

from prefect_batchllm.core.config import ProcessorConfig
from prefect_batchllm.core.errors import ErrorClassifier
from prefect_batchllm.core.events import (
    Middleware,
    PostProcessorFunc,
    ProcessingEvent,
    ProcessorObserver,
    ProgressCallbackFunc,
)
from prefect_batchllm.core.items import BatchResult, LLMWorkItem, TContext, TInput, TOutput
from prefect_batchllm.prefect.flows import BatchItemsFailed, run_batch

__all__ = ["ParallelBatchProcessor"]


class _StatsObserver:
    """Counts events for ``ParallelBatchProcessor.get_stats()`` while the flow runs."""

    def __init__(self) -> None:
        self.started = 0
        self.succeeded = 0
        self.failed = 0
        self.retries = 0
        self.rate_limit_count = 0

    async def on_event(self, event: ProcessingEvent, data: dict[str, Any]) -> None:
        if event is ProcessingEvent.ITEM_STARTED:
            self.started += 1
        elif event is ProcessingEvent.ITEM_COMPLETED:
            self.succeeded += 1
        elif event is ProcessingEvent.ITEM_FAILED:
            self.failed += 1
        elif event is ProcessingEvent.ITEM_RETRYING:
            self.retries += 1
        elif event is ProcessingEvent.RATE_LIMIT_HIT:
            self.rate_limit_count += 1


class ParallelBatchProcessor(Generic[TInput, TOutput, TContext]):
    """The seed library's processor, executing through the ``run_batch`` flow.

    ``add_work`` queues items, ``process_all`` runs them as one Prefect flow run and returns the
    :class:`BatchResult`. Instances are one-shot. Legacy keyword arguments (``max_workers``,
    ``timeout_per_item``, ``rate_limit_cooldown``) are merged into ``config``; giving one that disagrees
    with ``config`` is an error.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        post_processor: PostProcessorFunc | None = None,
        timeout_per_item: float | None = None,
        rate_limit_cooldown: float | None = None,
        config: ProcessorConfig | None = None,
        error_classifier: ErrorClassifier | None = None,
        rate_limit_strategy: Any | None = None,
        middlewares: list[Middleware] | None = None,
        observers: list[ProcessorObserver] | None = None,
        progress_callback: ProgressCallbackFunc | None = None,
    ) -> None:
        self.config = _merge_legacy_config(config, max_workers, timeout_per_item, rate_limit_cooldown)
        if rate_limit_strategy is not None:
            warnings.warn(
                "ParallelBatchProcessor(rate_limit_strategy=...) is not used: 429 pauses follow "
                "ProcessorConfig.rate_limit (RateLimitConfig.cooldown_seconds, backoff_multiplier)",
                UserWarning,
                stacklevel=2,
            )
        self.post_processor = post_processor
        self.error_classifier = error_classifier
        self.middlewares = list(middlewares or [])
        self.observers = list(observers or [])
        self.progress_callback = progress_callback
        self._items: list[LLMWorkItem[Any, Any]] = []
        self._ids: set[str] = set()
        self._stats = _StatsObserver()
        self._result: BatchResult[Any, Any] | None = None
        self._state = "open"  # open -> running -> done
        self._started: float | None = None
        self._finished: float | None = None

    async def add_work(self, work_item: LLMWorkItem[TInput, TOutput, TContext]) -> None:
        """Queue one item (rejects duplicates and additions after ``process_all`` started)."""
        if self._state != "open":
            raise RuntimeError("ParallelBatchProcessor: add_work after process_all(); create a new processor")
        if not isinstance(work_item, LLMWorkItem):
            raise TypeError(f"add_work expects an LLMWorkItem, got {type(work_item).__name__}")
        if work_item.item_id in self._ids:
            raise ValueError(
                f"duplicate item_id {work_item.item_id!r}; every LLMWorkItem needs a unique item_id"
            )
        if self.config.max_queue_size and len(self._items) >= self.config.max_queue_size:
            raise ValueError(
                f"queue is full (max_queue_size={self.config.max_queue_size}); in batch mode the queue "
                "must hold every item: raise max_queue_size or set it to 0 (unbounded)"
            )
        self._ids.add(work_item.item_id)
        self._items.append(work_item)

    async def process_all(self) -> BatchResult[TOutput, TContext]:
        """Run every queued item through the ``run_batch`` flow; results are in ``add_work`` order."""
        if self._state != "open":
            raise RuntimeError("ParallelBatchProcessor.process_all() can run only once per instance")
        self._state = "running"
        self._started = time.monotonic()
        try:
            result: BatchResult[TOutput, TContext] = await run_batch(
                self._items,
                self.config,
                self.post_processor,
                error_classifier=self.error_classifier,
                middlewares=self.middlewares,
                observers=[self._stats, *self.observers],
                progress_callback=self.progress_callback,
            )
        except BatchItemsFailed as failed:
            self._result = failed.result
            raise
        finally:
            self._state = "done"
            self._finished = time.monotonic()
        self._result = result
        return result

    async def get_stats(self) -> dict[str, Any]:
        """Counts and tokens so far (live while ``process_all`` runs)."""
        s, r = self._stats, self._result
        end = self._finished if self._finished is not None else time.monotonic()
        stats: dict[str, Any] = {
            "total": len(self._items),
            "started": s.started,
            "processed": s.succeeded + s.failed,
            "succeeded": s.succeeded,
            "failed": s.failed,
            "retries": s.retries,
            "rate_limit_count": s.rate_limit_count,
            "duration": (end - self._started) if self._started is not None else 0.0,
        }
        if r is not None:
            stats.update(
                total_input_tokens=r.total_input_tokens,
                total_output_tokens=r.total_output_tokens,
                total_cached_tokens=r.total_cached_tokens,
                cache_hit_rate=r.cache_hit_rate(),
                error_counts=r.error_categories(),
                estimated_cost_usd=r.estimated_cost_usd,
            )
        return stats

    async def __aenter__(self) -> ParallelBatchProcessor[TInput, TOutput, TContext]:
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> bool:
        # Strategies are prepared and cleaned up inside the flow run, so nothing is left open here.
        return False


def _merge_legacy_config(
    config: ProcessorConfig | None,
    max_workers: int | None,
    timeout_per_item: float | None,
    rate_limit_cooldown: float | None,
) -> ProcessorConfig:
    """Fold the seed's deprecated keyword arguments into a ProcessorConfig; conflicts are errors."""
    if config is not None and not isinstance(config, ProcessorConfig):
        raise TypeError(f"config must be a ProcessorConfig, got {type(config).__name__}")
    legacy: dict[str, Any] = {"max_workers": max_workers, "timeout_per_item": timeout_per_item}
    if config is None:
        base = ProcessorConfig(**{k: v for k, v in legacy.items() if v is not None})
    else:
        for name, value in legacy.items():
            if value is not None and value != getattr(config, name):
                raise ValueError(
                    f"ParallelBatchProcessor: {name}={value!r} conflicts with config.{name}="
                    f"{getattr(config, name)!r}; set it in one place"
                )
        base = config
    if rate_limit_cooldown is not None:
        current = base.rate_limit.cooldown_seconds
        if config is not None and rate_limit_cooldown != current:
            raise ValueError(
                f"ParallelBatchProcessor: rate_limit_cooldown={rate_limit_cooldown!r} conflicts with "
                f"config.rate_limit.cooldown_seconds={current!r}; set it in one place"
            )
        from dataclasses import replace

        base = replace(
            base,
            rate_limit=replace(
                base.rate_limit,
                cooldown_seconds=rate_limit_cooldown,
                max_cooldown_seconds=max(base.rate_limit.max_cooldown_seconds, rate_limit_cooldown),
            ),
        )
    return base
