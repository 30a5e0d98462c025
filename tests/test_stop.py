"""The batch stop switch alone (Prefect-free): systematic-error streaks and the cost budget."""

from __future__ import annotations

from typing import Any

import pytest

from prefect_batchllm.core.errors import ErrorCategory
from prefect_batchllm.core.pricing import price_for
from prefect_batchllm.core.stop import DEFAULT_OUTPUT_ESTIMATE, BatchStop, BatchStopped

AUTH, NOT_FOUND = ErrorCategory.AUTH, ErrorCategory.NOT_FOUND


async def test_streak_needs_consecutive_errors_of_one_systematic_category() -> None:
    stops: list[tuple[ErrorCategory, str, dict[str, Any]]] = []

    async def on_stop(category: ErrorCategory, reason: str, data: dict[str, Any]) -> None:
        stops.append((category, reason, data))

    stop = BatchStop(stop_after_errors=3, on_stop=on_stop)
    for category in (AUTH, AUTH, None, AUTH, NOT_FOUND, AUTH, ErrorCategory.TRANSIENT, AUTH):
        await stop.record(category, "bad key")
    assert not stop.stopped  # a success or another systematic category restarts the streak; 5xx does not
    await stop.record(AUTH, "bad key")
    assert stop.stopped and stop.category is AUTH
    assert [(c, d["consecutive_errors"]) for c, _r, d in stops] == [(AUTH, 3)]
    with pytest.raises(BatchStopped, match="not attempted: batch stopped after 3 consecutive auth errors"):
        stop.check()
    await stop.record(NOT_FOUND, "x")
    await stop.stop(ErrorCategory.BUDGET_EXCEEDED, "later")
    assert stop.category is AUTH and len(stops) == 1  # the first reason wins, reported once


@pytest.mark.parametrize("threshold", [None, 0])
async def test_streak_disabled(threshold: int | None) -> None:
    stop = BatchStop(stop_after_errors=threshold)
    for _ in range(50):
        await stop.record(AUTH, "bad key")
    assert not stop.stopped


async def test_budget_counts_spent_and_in_flight_estimates() -> None:
    model = "gemini-2.5-flash"
    price = price_for(model)
    assert price is not None
    one = price.cost(1000, 100)
    stop = BatchStop(max_cost_usd=one * 2.5)
    first = await stop.reserve(model, 1000, max_output_tokens=100)
    second = await stop.reserve(model, 1000, max_output_tokens=100)
    with pytest.raises(BatchStopped, match="not attempted: budget"):
        await stop.reserve(model, 1000, max_output_tokens=100)  # 2 in flight + 1 > 2.5
    assert stop.category is ErrorCategory.BUDGET_EXCEEDED

    # Settling replaces the estimate with the billed cost, and teaches the output estimate.
    stop = BatchStop(max_cost_usd=1.0)
    reservation = await stop.reserve(model, 1000)
    assert reservation is not None and reservation.estimate_usd == pytest.approx(
        price.cost(1000, DEFAULT_OUTPUT_ESTIMATE)
    )
    stop.settle(reservation, {"input_tokens": 1000, "output_tokens": 10})
    stop.settle(reservation, {"input_tokens": 1000, "output_tokens": 10})  # idempotent
    assert stop.spent_usd == pytest.approx(price.cost(1000, 10)) and stop.reserved_usd == 0
    nxt = await stop.reserve(model, 1000)
    assert nxt is not None and nxt.estimate_usd == pytest.approx(price.cost(1000, 10))
    assert first is not None and second is not None
