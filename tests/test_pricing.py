"""Prices come from genai-prices for models it knows; ``register_price`` and ``prices=`` override them."""

from __future__ import annotations

import pytest
from genai_prices import Usage, calc_price

from prefect_batchllm import ModelPrice, register_price
from prefect_batchllm.core import pricing
from prefect_batchllm.core.items import BatchResult, WorkItemResult
from prefect_batchllm.core.pricing import price_for, price_source


@pytest.fixture(autouse=True)
def _clean_registry():
    saved = dict(pricing._PRICES)
    yield
    pricing._PRICES.clear()
    pricing._PRICES.update(saved)


@pytest.mark.parametrize("model", ["gemini-2.5-flash", "gemini-2.0-flash", "gpt-4o-mini"])
def test_known_models_are_priced_by_genai_prices(model: str) -> None:
    price = price_for(model)
    assert price is not None and price_source(model) == "genai-prices"
    reference = calc_price(Usage(input_tokens=2000, output_tokens=300, cache_read_tokens=500), model)
    ours = price.cost(2000, 300, cached_tokens=500)
    assert ours == pytest.approx(float(reference.total_price), rel=1e-6)


def test_model_name_prefixes_are_stripped_and_unknown_models_unpriced() -> None:
    assert price_for("models/gemini-2.5-flash") == price_for("google-gla:gemini-2.5-flash")
    assert price_for("no-such-model-xyz") is None and price_source("no-such-model-xyz") is None
    batch = BatchResult(
        [WorkItemResult("a", True, token_usage={"input_tokens": 10}, model="no-such-model-xyz")]
    )
    assert batch.unpriced_models == ["no-such-model-xyz"] and batch.estimated_cost_usd == 0.0


def test_overrides_win_over_genai_prices() -> None:
    known = price_for("gemini-2.5-flash")
    register_price("gemini-2.5-flash", ModelPrice(1.0, 2.0, 0.5))
    assert price_for("gemini-2.5-flash") == ModelPrice(1.0, 2.0, 0.5) != known
    assert price_source("gemini-2.5-flash") == "override"
    # A prefix override covers versioned names; a per-result ``prices=`` override wins over both.
    register_price("gemini-2.5-flash-", ModelPrice(3.0, 3.0))
    assert price_for("gemini-2.5-flash-preview-09-2025") == ModelPrice(3.0, 3.0)
    result = WorkItemResult(
        "a", True, token_usage={"input_tokens": 1_000_000, "output_tokens": 0}, model="gemini-2.5-flash"
    )
    assert BatchResult([result]).estimated_cost_usd == pytest.approx(1.0)
    local = BatchResult([result], prices={"gemini-2.5-flash": ModelPrice(7.0, 0.0)})
    assert local.estimated_cost_usd == pytest.approx(7.0)


def test_register_price_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        register_price("", ModelPrice(1, 1))
    with pytest.raises(TypeError, match="ModelPrice"):
        register_price("m", (1.0, 2.0))  # type: ignore[arg-type]
