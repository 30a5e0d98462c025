"""What a batch will cost, before it runs: ``estimate_batch(items)``.

Input tokens are counted by the provider itself (Gemini's ``countTokens`` through the real SDK,
``client.aio.models.count_tokens``), never sent for generation and never billed:

* **Small batches** (at most ``sample_size`` items) are counted exactly, item by item.
* **Large batches**: a seeded random sample of ``sample_size`` items is counted and the totals are scaled by
  ``items / sample_size`` (the report says so, with a 95 % interval for the input tokens).
* A :class:`~prefect_batchllm.models.gemini.GeminiCachedModel`'s cached content (and its system
  instruction) is counted once per model, added to every item's input, and billed at the model's cached
  rate, as Gemini bills it. A plain model's system instruction is counted once and added to each item.
* Output tokens cannot be counted before the answers exist: ``output_tokens_per_item`` if given, else the
  strategy's ``max_output_tokens`` (an upper bound), else :data:`DEFAULT_OUTPUT_TOKENS` (stated as an
  assumption in the report).
* A pydantic-ai agent on a Google model (``GoogleModel``) is counted with that model's ``genai.Client``
  (the agent's instructions are not included). Other strategies (other providers, direct calls) are
  estimated at ~4 characters per token, labelled as such.

Prices come from :mod:`prefect_batchllm.core.pricing` (genai-prices, ``register_price`` overrides win).
Retries, correction prompts and replayed (already persisted) items are not accounted for.

``estimate_batch`` returns a :class:`BatchEstimate` from plain code and an awaitable from async code (like
``run_batch``); ``print(estimate)`` shows the dry-run report.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect_batchllm.core.items import LLMWorkItem
from prefect_batchllm.core.pricing import ModelPrice, price_for, price_source
from prefect_batchllm.core.tokens import estimate_tokens

__all__ = ["DEFAULT_OUTPUT_TOKENS", "DEFAULT_SAMPLE_SIZE", "BatchEstimate", "ModelEstimate", "estimate_batch"]

#: Batches up to this many items are counted exactly; larger ones through a sample of this size.
DEFAULT_SAMPLE_SIZE = 200
#: Output tokens assumed per item when neither ``output_tokens_per_item`` nor ``max_output_tokens`` is set.
DEFAULT_OUTPUT_TOKENS = 500
_HEURISTIC = "heuristic (~4 chars/token)"


@dataclass
class ModelEstimate:
    """Expected tokens and cost of the items of one model (whole batch, extrapolated when sampled)."""

    model: str
    items: int = 0
    input_tokens: int = 0  # cached tokens included, as Gemini reports ``promptTokenCount``
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    cost_without_cache_usd: float = 0.0
    price: ModelPrice | None = None
    price_source: str | None = None  # "genai-prices" | "override" | None (unpriced: cost 0)
    token_source: str = "countTokens"  # or "heuristic (~4 chars/token)"
    output_basis: str = ""


@dataclass
class BatchEstimate:
    """Expected input/output tokens and USD cost of a batch (see the module doc for how it is counted)."""

    items: int
    counted_items: int
    sampled: bool
    seed: int | None
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_usd: float
    cost_without_cache_usd: float
    #: 95 % interval of the input-token total when sampled (``None`` when counted exactly).
    input_tokens_interval: tuple[int, int] | None = None
    models: dict[str, ModelEstimate] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def cache_savings_usd(self) -> float:
        """What the cached-token discount saves against paying the full input rate."""
        return max(0.0, self.cost_without_cache_usd - self.cost_usd)

    @property
    def unpriced_models(self) -> list[str]:
        return sorted(name for name, m in self.models.items() if m.price is None)

    def report(self) -> str:
        """The dry-run report: what will be sent, how it was counted, expected tokens and cost."""
        how = (
            f"counted {self.counted_items} of {self.items} items (seeded sample, seed={self.seed}), scaled "
            f"by {self.items / max(1, self.counted_items):.2f}"
            if self.sampled
            else f"counted all {self.items} items"
        )
        lines = [
            f"Batch estimate: {self.items:,} items ({how})",
            f"  input tokens:   {self.input_tokens:,}"
            + (
                f"  (95 % interval {self.input_tokens_interval[0]:,} .. {self.input_tokens_interval[1]:,})"
                if self.input_tokens_interval
                else ""
            ),
            f"    of which cached: {self.cached_input_tokens:,}",
            f"  output tokens:  {self.output_tokens:,}",
            f"  estimated cost: ${self.cost_usd:,.4f}"
            + (f"  (cache saves ${self.cache_savings_usd:,.4f})" if self.cached_input_tokens else ""),
        ]
        for name, m in sorted(self.models.items()):
            if m.price is not None:
                p = m.price
                cached_rate = p.cached_input if p.cached_input is not None else p.input * 0.10
                price = (
                    f"${p.input:g} in / ${p.output:g} out / ${cached_rate:g} cached per 1M tokens "
                    f"({m.price_source})"
                )
            else:
                price = "no price known (cost 0): register_price() it"
            lines.append(
                f"  - {name}: {m.items:,} items, {m.input_tokens:,} in ({m.cached_input_tokens:,} cached), "
                f"{m.output_tokens:,} out, ${m.cost_usd:,.4f}; tokens by {m.token_source}; output: "
                f"{m.output_basis}; {price}"
            )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


# --------------------------------------------------------------------------------------------------
# Counting


@dataclass(frozen=True, eq=False)
class _Target:
    """Where one strategy's requests go: a model name and a ``genai.Client`` (or a per-loop getter)."""

    key: int  # identity of the model object (its once-per-model counts are shared)
    model: str
    client: Any  # a genai.Client, or a factory returning one
    async_client: Any  # () -> the genai.Client to use on the running loop
    instruction: Any = None
    cached_content: Any = None  # a GeminiCachedModel's cached contents
    source: str = "countTokens"


def _target(strategy: Any) -> _Target | None:
    """The countTokens target of a ``GeminiStrategy`` or of a pydantic-ai agent on a Google model."""
    from prefect_batchllm.models.gemini import GeminiCachedModel, GeminiModel

    model = getattr(strategy, "model", None)
    if isinstance(model, GeminiModel):
        return _Target(
            key=id(model),
            model=model.model,
            client=model.client,
            async_client=model._client,
            instruction=model.system_instruction,
            cached_content=model.cached_content if isinstance(model, GeminiCachedModel) else None,
        )
    agent_model = getattr(getattr(strategy, "agent", None), "model", None)
    client = getattr(agent_model, "client", None) if agent_model is not None else None
    name = getattr(agent_model, "model_name", None)
    if client is not None and hasattr(getattr(client, "aio", None), "models") and isinstance(name, str):
        return _Target(
            key=id(agent_model),
            model=name,
            client=client,
            async_client=lambda: client,
            source="countTokens (pydantic-ai agent; its instructions not counted)",
        )
    return None


def _model_label(strategy: Any) -> str:
    try:
        name = strategy.model_name
    except Exception:
        name = None
    return name if isinstance(name, str) and name else type(strategy).__name__


def _output_basis(strategy: Any, output_tokens_per_item: int | None) -> tuple[int, str]:
    if output_tokens_per_item is not None:
        return output_tokens_per_item, f"{output_tokens_per_item} per item (given)"
    config = getattr(strategy, "generation_config", None) or {}
    limit = config.get("max_output_tokens") if isinstance(config, Mapping) else None
    if isinstance(limit, int) and limit > 0:
        return limit, f"{limit} per item (max_output_tokens: an upper bound)"
    return DEFAULT_OUTPUT_TOKENS, (
        f"{DEFAULT_OUTPUT_TOKENS} per item (assumed; pass output_tokens_per_item for a better estimate)"
    )


def _heuristic_tokens(prompt: Any) -> int:
    if isinstance(prompt, str):
        return estimate_tokens(prompt)
    if isinstance(prompt, list | tuple):
        return sum(_heuristic_tokens(p) for p in prompt)
    text = getattr(prompt, "text", None)
    return estimate_tokens(text) if isinstance(text, str) else 0


class _Counter:
    """Counts tokens with each model's own client; caches the once-per-model counts (cache, instruction).

    ``blocking=True`` (a call from plain code, on a private event loop) uses the SDK's synchronous client in
    worker threads: a ``genai.Client``'s async pool is bound to the first loop that uses it, and the batch
    itself will run on another loop, so the estimate must not touch it there.
    """

    def __init__(self, concurrency: int, *, blocking: bool = False) -> None:
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        self._fixed: dict[int, asyncio.Task[tuple[int, int]]] = {}
        self._blocking = blocking
        self._sync_clients: dict[int, Any] = {}
        self.requests = 0

    def _sync_client(self, target: _Target) -> Any:
        client = self._sync_clients.get(target.key)
        if client is None:
            given = target.client
            client = self._sync_clients[target.key] = given if hasattr(given, "models") else given()
        return client

    async def _count(self, target: _Target, contents: Any) -> int:
        async with self._semaphore:
            self.requests += 1
            if self._blocking:
                client = self._sync_client(target)
                response = await asyncio.to_thread(
                    client.models.count_tokens, model=target.model, contents=contents
                )
            else:
                client = target.async_client()
                response = await client.aio.models.count_tokens(model=target.model, contents=contents)
        return int(response.total_tokens or 0)

    async def fixed(self, target: _Target) -> tuple[int, int]:
        """``(extra input tokens per request, of which cached)`` for a model (counted once per model)."""
        task = self._fixed.get(target.key)
        if task is None:
            task = self._fixed[target.key] = asyncio.ensure_future(self._fixed_tokens(target))
        return await task

    async def _fixed_tokens(self, target: _Target) -> tuple[int, int]:
        extra = await self._count(target, target.instruction) if target.instruction else 0
        if target.cached_content is not None:
            # The whole cache (its content and its system instruction) bills at the cached rate.
            cached = extra + await self._count(target, target.cached_content)
            return cached, cached
        return extra, 0

    async def item(self, item: LLMWorkItem[Any, Any]) -> tuple[int, int, str]:
        """``(input tokens, cached tokens, how they were counted)`` of one item's request."""
        target = _target(item.strategy)
        if target is None:
            return _heuristic_tokens(item.prompt), 0, _HEURISTIC
        fixed, cached = await self.fixed(target)
        return await self._count(target, item.prompt) + fixed, cached, target.source


def _check_items(items: Any, strategy: Any = None) -> list[LLMWorkItem[Any, Any]]:
    if strategy is not None and isinstance(items, Mapping):
        items = [LLMWorkItem(item_id=str(k), strategy=strategy, prompt=v) for k, v in items.items()]
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise TypeError(
            f"estimate_batch: items must be a sequence of LLMWorkItem (or of prompts, with strategy=), "
            f"got {type(items).__name__}"
        )
    listed = list(items)
    if strategy is not None:
        listed = [
            p
            if isinstance(p, LLMWorkItem)
            else LLMWorkItem(item_id=f"item-{i:05d}", strategy=strategy, prompt=p)
            for i, p in enumerate(listed)
        ]
    if not listed:
        raise ValueError("estimate_batch: the batch is empty; pass at least one LLMWorkItem")
    for index, item in enumerate(listed):
        if not isinstance(item, LLMWorkItem):
            raise TypeError(
                f"estimate_batch: items[{index}] is a {type(item).__name__}, expected an LLMWorkItem"
            )
    return listed


async def aestimate_batch(
    items: Sequence[LLMWorkItem[Any, Any]],
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    output_tokens_per_item: int | None = None,
    concurrency: int = 8,
    prices: dict[str, ModelPrice] | None = None,
    strategy: Any = None,
    _blocking: bool = False,
) -> BatchEstimate:
    """Async :func:`estimate_batch`."""
    listed = _check_items(items, strategy)
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
        raise ValueError(f"estimate_batch: sample_size must be an int >= 1, got {sample_size!r}")
    if output_tokens_per_item is not None and (
        isinstance(output_tokens_per_item, bool)
        or not isinstance(output_tokens_per_item, int)
        or output_tokens_per_item < 0
    ):
        raise ValueError(
            f"estimate_batch: output_tokens_per_item must be an int >= 0, got {output_tokens_per_item!r}"
        )
    total = len(listed)
    sampled = total > sample_size
    chosen = sorted(random.Random(seed).sample(range(total), sample_size)) if sampled else list(range(total))
    counter = _Counter(concurrency, blocking=_blocking)
    counts = await asyncio.gather(*(counter.item(listed[i]) for i in chosen))
    scale = total / len(chosen)

    per_model: dict[str, dict[str, Any]] = {}
    per_item_inputs: list[int] = []
    for index, (input_tokens, cached, source) in zip(chosen, counts, strict=True):
        strategy = listed[index].strategy
        label = _model_label(strategy)
        slot = per_model.setdefault(
            label,
            {"items": 0, "input": 0, "cached": 0, "output": 0, "sources": set(), "strategy": strategy},
        )
        output, _ = _output_basis(strategy, output_tokens_per_item)
        slot["items"] += 1
        slot["input"] += input_tokens
        slot["cached"] += cached
        slot["output"] += output
        slot["sources"].add(source)
        per_item_inputs.append(input_tokens)

    models: dict[str, ModelEstimate] = {}
    for label, slot in per_model.items():
        price = price_for(label, prices)
        inp, cached, out = (round(slot[k] * scale) for k in ("input", "cached", "output"))
        estimate = ModelEstimate(
            model=label,
            items=round(slot["items"] * scale),
            input_tokens=inp,
            cached_input_tokens=cached,
            output_tokens=out,
            price=price,
            price_source=price_source(label, prices),
            token_source=" + ".join(sorted(slot["sources"])),
            output_basis=_output_basis(slot["strategy"], output_tokens_per_item)[1],
        )
        if price is not None:
            estimate.cost_usd = price.cost(inp, out, cached)
            estimate.cost_without_cache_usd = price.cost(inp, out, 0)
        models[label] = estimate

    interval: tuple[int, int] | None = None
    notes: list[str] = []
    input_total = sum(m.input_tokens for m in models.values())
    if sampled:
        n = len(per_item_inputs)
        mean = sum(per_item_inputs) / n
        variance = sum((x - mean) ** 2 for x in per_item_inputs) / max(1, n - 1)
        half = 1.96 * math.sqrt(variance / n) * math.sqrt(max(0.0, 1 - n / total)) * total
        interval = (max(0, round(input_total - half)), round(input_total + half))
        notes.append(
            f"extrapolated: {n} of {total} items counted (random sample, seed={seed}); totals scaled by "
            f"{scale:.3f}"
        )
    notes.append("retries, correction prompts and items replayed from earlier runs are not included")
    return BatchEstimate(
        items=total,
        counted_items=len(chosen),
        sampled=sampled,
        seed=seed if sampled else None,
        input_tokens=input_total,
        cached_input_tokens=sum(m.cached_input_tokens for m in models.values()),
        output_tokens=sum(m.output_tokens for m in models.values()),
        cost_usd=sum(m.cost_usd for m in models.values()),
        cost_without_cache_usd=sum(m.cost_without_cache_usd for m in models.values()),
        input_tokens_interval=interval,
        models=models,
        notes=notes,
    )


def estimate_batch(
    items: Sequence[LLMWorkItem[Any, Any]],
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    output_tokens_per_item: int | None = None,
    concurrency: int = 8,
    prices: dict[str, ModelPrice] | None = None,
    strategy: Any = None,
) -> BatchEstimate | Awaitable[BatchEstimate]:
    """Expected input/output tokens and cost of running ``items`` (nothing is generated or billed).

    Input tokens come from the provider's ``countTokens``: every item when there are at most
    ``sample_size``, else a random sample of ``sample_size`` items (``seed``) scaled to the batch. Cached
    tokens of a ``GeminiCachedModel`` are priced at its cached rate. Returns a :class:`BatchEstimate`
    (``print()`` it for the report) from plain code, an awaitable from async code. ``concurrency`` bounds the
    ``countTokens`` calls in flight; ``prices`` overrides prices for this estimate. With ``strategy=``,
    ``items`` may also be plain prompts (a list, or a mapping of id to prompt), as for ``run_batch_prompts``.
    """
    options: dict[str, Any] = {
        "sample_size": sample_size,
        "seed": seed,
        "output_tokens_per_item": output_tokens_per_item,
        "concurrency": concurrency,
        "prices": prices,
        "strategy": strategy,
    }
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(aestimate_batch(items, **options, _blocking=True))
    return aestimate_batch(items, **options)
