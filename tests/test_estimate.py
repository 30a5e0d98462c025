"""``estimate_batch``: countTokens through the real SDK against the bundled server, checked against what the
same batch is then billed by ``run_batch``."""

from __future__ import annotations

import asyncio
import random

import pytest

from prefect_batchllm import (
    BatchEstimate,
    GeminiCachedModel,
    GeminiModel,
    GeminiStrategy,
    LLMWorkItem,
    ProcessorConfig,
    estimate_batch,
    run_batch,
)
from prefect_batchllm.core.pricing import price_for
from prefect_batchllm.strategies.direct import DirectCallStrategy
from prefect_batchllm.testing import GeminiEmulator

pytestmark = pytest.mark.usefixtures("prefect_api")

MODEL = "gemini-2.5-flash"


def _items(strategy, n: int, seed: int = 1) -> list[LLMWorkItem]:
    rng = random.Random(seed)
    return [
        LLMWorkItem(
            item_id=f"row-{i}",
            strategy=strategy,
            prompt=f"[row-{i}] Summarise: "
            + " ".join("word" * rng.randint(1, 3) for _ in range(rng.randint(5, 400))),
        )
        for i in range(n)
    ]


def _within(estimate: float, billed: float, tolerance: float = 0.05) -> bool:
    return abs(estimate - billed) <= tolerance * billed


async def test_estimate_is_within_5_percent_of_the_billed_input_tokens(emulator: GeminiEmulator) -> None:
    model = GeminiModel(MODEL, emulator.client(), system_instruction="You are a careful cataloguer. " * 5)
    items = _items(GeminiStrategy(model), 40)

    estimate = await estimate_batch(items, output_tokens_per_item=50)
    assert isinstance(estimate, BatchEstimate) and not estimate.sampled and estimate.counted_items == 40
    # Counted by the provider (one countTokens per item, plus the system instruction once), nothing generated.
    assert emulator.count("countTokens") == 41 and emulator.count("generateContent") == 0
    assert estimate.output_tokens == 40 * 50 and estimate.cached_input_tokens == 0
    price = price_for(MODEL)
    assert price is not None and estimate.models[MODEL].price_source == "genai-prices"
    assert estimate.cost_usd == pytest.approx(price.cost(estimate.input_tokens, estimate.output_tokens))

    result = await run_batch(items, ProcessorConfig(max_workers=8, persist_results=False))
    assert result.succeeded == 40
    assert _within(estimate.input_tokens, result.total_input_tokens), (
        estimate.input_tokens,
        result.total_input_tokens,
    )


async def test_cached_model_tokens_are_estimated_at_the_cached_rate(emulator: GeminiEmulator) -> None:
    model = GeminiCachedModel(
        MODEL, emulator.client(), ["The cataloguing guide. " * 600], system_instruction="Follow the guide."
    )
    items = _items(GeminiStrategy(model), 25, seed=2)

    estimate = await estimate_batch(items, output_tokens_per_item=0)
    assert emulator.count("cachedContents.create") == 0  # estimating never creates a cache
    per_item_cache = estimate.cached_input_tokens // 25
    assert per_item_cache > 1000 and estimate.cached_input_tokens == 25 * per_item_cache
    price = price_for(MODEL)
    assert price is not None and price.cached_input is not None and price.cached_input < price.input
    assert estimate.cost_usd == pytest.approx(
        price.cost(estimate.input_tokens, 0, estimate.cached_input_tokens)
    )
    assert estimate.cache_savings_usd > 0 and estimate.cost_usd < estimate.cost_without_cache_usd

    result = await run_batch(items, ProcessorConfig(max_workers=8, persist_results=False))
    assert result.succeeded == 25
    assert _within(estimate.input_tokens, result.total_input_tokens)
    assert _within(estimate.cached_input_tokens, result.total_cached_tokens)
    billed_input_cost = price.cost(result.total_input_tokens, 0, result.total_cached_tokens)
    assert _within(estimate.cost_usd, billed_input_cost)
    assert "of which cached" in str(estimate)


async def test_large_batches_are_sampled_and_extrapolated(emulator: GeminiEmulator) -> None:
    items = _items(GeminiStrategy(GeminiModel(MODEL, emulator.client())), 1000, seed=3)

    sampled = await estimate_batch(items, sample_size=100, seed=7, output_tokens_per_item=10)
    assert sampled.sampled and sampled.counted_items == 100 and sampled.items == 1000
    assert emulator.count("countTokens") == 100
    assert sampled.output_tokens == 1000 * 10
    assert "extrapolated: 100 of 1000 items counted" in sampled.report()

    exact = await estimate_batch(items, sample_size=1000)
    assert not exact.sampled and emulator.count("countTokens") == 1100
    # Prompts of 5-400 words: a 10 % sample lands within its stated 95 % interval of the exact count.
    low, high = sampled.input_tokens_interval or (0, 0)
    assert low <= exact.input_tokens <= high and low < sampled.input_tokens < high
    assert _within(sampled.input_tokens, exact.input_tokens, tolerance=0.15)
    # Same seed, same sample, same answer.
    again = await estimate_batch(items, sample_size=100, seed=7, output_tokens_per_item=10)
    assert again.input_tokens == sampled.input_tokens


def test_from_plain_code_and_other_strategies(emulator: GeminiEmulator) -> None:
    model = GeminiModel(MODEL, lambda: emulator.client())  # a factory: one client per event loop
    direct = DirectCallStrategy(lambda prompt, attempt, timeout: prompt.upper())
    items = _items(GeminiStrategy(model, generation_config={"max_output_tokens": 64}), 5)
    items += [LLMWorkItem(item_id="direct-1", strategy=direct, prompt="x" * 400)]

    estimate = estimate_batch(items)  # no running loop: returns the estimate itself
    assert isinstance(estimate, BatchEstimate)
    assert emulator.count("countTokens") == 5
    gemini = estimate.models[MODEL]
    assert gemini.token_source == "countTokens" and gemini.output_tokens == 5 * 64
    assert "max_output_tokens" in gemini.output_basis
    (other,) = [m for name, m in estimate.models.items() if name != MODEL]
    assert other.token_source.startswith("heuristic") and other.input_tokens == 100
    assert other.price is None and other.model in estimate.unpriced_models

    # Plain prompts with a strategy, as for run_batch_prompts.
    prompts = estimate_batch(["a" * 40, "b" * 80], strategy=GeminiStrategy(model), output_tokens_per_item=1)
    assert isinstance(prompts, BatchEstimate) and prompts.input_tokens == 10 + 20


def test_plain_code_estimates_then_runs_with_the_same_client(emulator: GeminiEmulator) -> None:
    """From plain code the estimate must not bind the model's client to a private event loop: estimating
    twice and then running the batch with the very same ``genai.Client`` works, and they agree."""
    items = _items(GeminiStrategy(GeminiModel(MODEL, emulator.client())), 12, seed=4)
    first = estimate_batch(items)
    second = estimate_batch(items)
    assert isinstance(first, BatchEstimate) and isinstance(second, BatchEstimate)
    assert first.input_tokens == second.input_tokens and emulator.count("countTokens") == 24
    result = run_batch(items, ProcessorConfig(persist_results=False))
    assert result.succeeded == 12 and _within(first.input_tokens, result.total_input_tokens)


async def test_pydantic_ai_agents_on_google_models_are_counted_too(emulator: GeminiEmulator) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.google import GoogleModel
    from pydantic_ai.providers.google import GoogleProvider

    from prefect_batchllm import PydanticAIStrategy

    agent = Agent(GoogleModel(MODEL, provider=GoogleProvider(client=emulator.client())))
    items = _items(PydanticAIStrategy(agent), 10, seed=5)
    estimate = await estimate_batch(items, output_tokens_per_item=20)
    assert emulator.count("countTokens") == 10
    (model,) = estimate.models.values()
    assert model.token_source.startswith("countTokens (pydantic-ai") and model.price is not None
    result = await run_batch(items, ProcessorConfig(persist_results=False))
    assert result.succeeded == 10 and _within(estimate.input_tokens, result.total_input_tokens)


def test_bad_input_is_rejected_early() -> None:
    with pytest.raises(TypeError, match="LLMWorkItem"):
        asyncio.run(_await(estimate_batch(["a prompt"])))  # type: ignore[list-item]
    with pytest.raises(ValueError, match="empty"):
        estimate_batch([])
    direct = DirectCallStrategy(lambda prompt, attempt, timeout: prompt)
    with pytest.raises(ValueError, match="sample_size"):
        estimate_batch([LLMWorkItem(item_id="a", strategy=direct, prompt="p")], sample_size=0)


async def _await(value):
    return await value if asyncio.iscoroutine(value) else value
