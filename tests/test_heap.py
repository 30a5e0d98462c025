"""While a batch runs, the garbage collector's full passes walk only what the run created (prefect/heap.py).

Through the real path: ``run_batch`` on the real Prefect engine and API, the real google-genai SDK over HTTP
to the emulator; what the collector sees is read from inside the strategy's ``execute``.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from typing import Any

import pytest

from prefect_batchllm import LLMWorkItem, ProcessorConfig, run_batch
from prefect_batchllm.core.strategy import RetryState
from prefect_batchllm.models.gemini import GeminiModel
from prefect_batchllm.strategies.gemini import GeminiStrategy

pytestmark = pytest.mark.usefixtures("prefect_api")


class Watching(GeminiStrategy):
    """A Gemini strategy that records, per call, the objects frozen and the objects a full pass walks."""

    def __init__(self, model: GeminiModel) -> None:
        super().__init__(model)
        self.seen: list[tuple[int, int]] = []

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> Any:
        self.seen.append((gc.get_freeze_count(), len(gc.get_objects(generation=2))))
        return await super().execute(prompt, attempt, timeout, state)


def _items(strategy: Watching, n: int) -> list[LLMWorkItem[Any, Any]]:
    tag = uuid.uuid4().hex[:8]
    return [LLMWorkItem(item_id=f"item-{i}", strategy=strategy, prompt=f"{tag} {i}") for i in range(n)]


@pytest.mark.parametrize("chunk_size", [None, 10], ids=["per-item", "chunked"])
async def test_a_run_walks_only_its_own_objects_and_hands_the_heap_back(
    emulator: Any, chunk_size: int | None
) -> None:
    assert gc.get_freeze_count() == 0
    gc.collect()
    walked_before = len(gc.get_objects(generation=2))  # the test process: pytest, Prefect, the SDK, ...
    strategy = Watching(GeminiModel("gemini-2.5-flash", emulator.client()))

    result = await run_batch(_items(strategy, 30), ProcessorConfig(max_workers=5, chunk_size=chunk_size))

    assert result.succeeded == 30
    assert len(strategy.seen) == 30
    # During the run, everything alive at its start sits in the permanent generation ...
    assert all(frozen > walked_before / 2 for frozen, _ in strategy.seen), (walked_before, strategy.seen[:3])
    # ... so a full pass walks a fraction of what it walked before.
    assert max(walked for _, walked in strategy.seen) < walked_before / 2, (walked_before, strategy.seen)
    # Afterwards the heap is the collector's again: nothing stays frozen, so nothing that died leaks.
    assert gc.get_freeze_count() == 0


async def test_overlapping_runs_keep_the_heap_frozen_until_the_last_one_ends(emulator: Any) -> None:
    slow, fast = (Watching(GeminiModel("gemini-2.5-flash", emulator.client())) for _ in range(2))
    emulator.latency = 0.05
    await asyncio.gather(
        run_batch(_items(slow, 20), ProcessorConfig(max_workers=2, chunk_size=5)),
        run_batch(_items(fast, 4), ProcessorConfig(max_workers=4, chunk_size=5)),
    )
    assert all(frozen > 0 for frozen, _ in slow.seen + fast.seen)
    assert len(slow.seen) == 20 and len(fast.seen) == 4
    assert gc.get_freeze_count() == 0


async def test_a_process_that_froze_its_own_heap_is_left_alone(emulator: Any) -> None:
    gc.freeze()  # e.g. a pre-fork server's parent
    try:
        frozen = gc.get_freeze_count()
        strategy = Watching(GeminiModel("gemini-2.5-flash", emulator.client()))
        result = await run_batch(_items(strategy, 5), ProcessorConfig(max_workers=5, chunk_size=5))
        assert result.succeeded == 5
        # Neither added to (frozen objects only die, freed by reference counting) nor taken back.
        assert all(0 < count <= frozen for count, _ in strategy.seen), (frozen, strategy.seen)
        assert frozen / 2 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
