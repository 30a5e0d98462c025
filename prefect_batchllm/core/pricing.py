"""Per-model prices used for ``BatchResult.estimated_cost_usd`` and :func:`estimate_batch`.

Prices are USD per one million tokens. They come from the ``genai-prices`` package (maintained by the
pydantic team, installed with pydantic-ai) for every model it knows, read from its bundled snapshot (no
network). ``register_price(...)`` and the ``prices=`` argument of a ``BatchResult`` override it: an
override always wins, for the exact model name or any name it is a prefix of.

``genai-prices`` has tiered prices for long prompts (Gemini 2.5 Pro charges more above 200k input tokens
per request); the rates used here are those of a request with a few thousand tokens, the batch case.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

logger = logging.getLogger("prefect_batchllm")

__all__ = ["ModelPrice", "bare_model_name", "price_for", "price_source", "register_price"]

#: Tokens of the reference request priced through genai-prices (below every long-context tier).
_PROBE_TOKENS = 1000


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens. ``cached_input`` is what a cache-hit input token costs."""

    input: float
    output: float
    cached_input: float | None = None  # default: 10 % of input (Gemini's cached-token discount)
    batch_factor: float = 0.5  # Batch API price as a fraction of the online price (Gemini: 50 %)

    def cost(
        self, input_tokens: int, output_tokens: int, cached_tokens: int = 0, *, billing: str = "online"
    ) -> float:
        """USD for these tokens; ``billing="batch"`` applies the Batch API price (``batch_factor``)."""
        cached_rate = self.cached_input if self.cached_input is not None else self.input * 0.10
        uncached = max(0, input_tokens - cached_tokens)
        online = (uncached * self.input + cached_tokens * cached_rate + output_tokens * self.output) / 1e6
        return online * self.batch_factor if billing == BATCH_BILLING else online


#: ``WorkItemResult.metadata["billing"]`` of results answered by a Gemini batch job (billed at batch prices).
BATCH_BILLING = "batch"


#: Prices registered with :func:`register_price` (they win over genai-prices).
_PRICES: dict[str, ModelPrice] = {}


def register_price(model: str, price: ModelPrice) -> None:
    """Add or override the price of ``model`` for every later cost estimate in this process."""
    if not model:
        raise ValueError("register_price: model must be a non-empty model name")
    if not isinstance(price, ModelPrice):
        raise TypeError(f"register_price: price must be a ModelPrice, got {type(price).__name__}")
    _PRICES[_bare(model)] = price


def _lookup(table: dict[str, ModelPrice], name: str) -> ModelPrice | None:
    if name in table:
        return table[name]
    matches = [known for known in table if name.startswith(known)]
    return table[max(matches, key=len)] if matches else None


def price_for(model: str | None, overrides: dict[str, ModelPrice] | None = None) -> ModelPrice | None:
    """The price of ``model``: ``overrides``, then :func:`register_price`, then genai-prices.

    Overrides match the exact name or, failing that, their longest prefix of it. ``None`` when nobody
    knows the model (its cost then counts as 0 and ``BatchResult.unpriced_models`` names it).
    """
    if not model:
        return None
    name = _bare(model)
    if overrides:
        found = _lookup({_bare(k): v for k, v in overrides.items()}, name)
        if found is not None:
            return found
    found = _lookup(_PRICES, name)
    if found is not None:
        return found
    return _genai_price(name)


def price_source(model: str | None, overrides: dict[str, ModelPrice] | None = None) -> str | None:
    """Where :func:`price_for` gets ``model``'s price: ``"override"``, ``"genai-prices"`` or ``None``."""
    if not model:
        return None
    name = _bare(model)
    if (overrides and _lookup({_bare(k): v for k, v in overrides.items()}, name)) or _lookup(_PRICES, name):
        return "override"
    return "genai-prices" if _genai_price(name) is not None else None


@functools.lru_cache(maxsize=1024)
def _genai_price(name: str) -> ModelPrice | None:
    """Per-1M-token rates of ``name`` from genai-prices' bundled snapshot, or ``None`` if unknown."""
    try:
        from genai_prices import Usage, calc_price
    except ImportError:  # pragma: no cover - a dependency of pydantic-ai-slim
        return None
    n = _PROBE_TOKENS
    try:
        plain = calc_price(Usage(input_tokens=n, output_tokens=n), name)
        cached = calc_price(Usage(input_tokens=n, cache_read_tokens=n), name)
    except LookupError:
        return None
    except Exception as exc:  # a malformed snapshot entry must not break a batch
        logger.debug("genai-prices could not price %r: %s", name, exc)
        return None
    scale = 1e6 / n
    return ModelPrice(
        input=round(float(plain.input_price) * scale, 9),
        output=round(float(plain.output_price) * scale, 9),
        cached_input=round(float(cached.input_price) * scale, 9),
    )


def bare_model_name(model: str) -> str:
    """``models/gemini-2.5-flash`` and ``google-gla:gemini-2.5-flash`` -> ``gemini-2.5-flash``.

    The one model-name cleanup used for pricing, cache matching and the UI.
    """
    return model.split("/")[-1].split(":")[-1]


_bare = bare_model_name
