"""Per-model prices used for ``BatchResult.estimated_cost_usd``.

Prices are USD per one million tokens. They change; users override them with
``register_price(...)`` or by passing ``prices=`` where a ``BatchResult`` is built.
"""

from __future__ import annotations

from dataclasses import dataclass


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


# Gemini Developer API list prices (standard tier, text, prompts <= 200k tokens), checked 2026-11.
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gemini-2.5-pro": ModelPrice(1.25, 10.00, 0.125),
    "gemini-2.5-flash": ModelPrice(0.30, 2.50, 0.03),
    "gemini-2.5-flash-lite": ModelPrice(0.10, 0.40, 0.01),
    "gemini-2.0-flash": ModelPrice(0.10, 0.40, 0.025),
    "gemini-2.0-flash-lite": ModelPrice(0.075, 0.30, 0.01875),
}

_PRICES: dict[str, ModelPrice] = dict(DEFAULT_PRICES)


def register_price(model: str, price: ModelPrice) -> None:
    """Add or override the price of ``model`` for every later cost estimate in this process."""
    if not model:
        raise ValueError("register_price: model must be a non-empty model name")
    _PRICES[_bare(model)] = price


def price_for(model: str | None, overrides: dict[str, ModelPrice] | None = None) -> ModelPrice | None:
    """The price of ``model`` (overrides first, then the registry; longest known prefix wins)."""
    if not model:
        return None
    name = _bare(model)
    table = {**_PRICES, **{_bare(k): v for k, v in (overrides or {}).items()}}
    if name in table:
        return table[name]
    matches = [known for known in table if name.startswith(known)]
    return table[max(matches, key=len)] if matches else None


def bare_model_name(model: str) -> str:
    """``models/gemini-2.5-flash`` and ``google-gla:gemini-2.5-flash`` -> ``gemini-2.5-flash``.

    The one model-name cleanup used for pricing, cache matching and the UI.
    """
    return model.split("/")[-1].split(":")[-1]


_bare = bare_model_name
