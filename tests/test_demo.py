"""The `make demo` flow, run inside the test session's Prefect API against the bundled server."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client

from prefect_batchllm.demo import CatalogueCard, demo_flow, load_books

pytestmark = pytest.mark.usefixtures("prefect_api")


async def test_demo_flow_catalogues_books_with_visible_faults() -> None:
    result = await demo_flow(limit=40, max_workers=8)
    books = load_books(40)
    assert [r.item_id for r in result.results] == [b["book_id"] for b in books]  # input order
    failed = {r.item_id: r.error_category for r in result.failed_items()}
    assert failed == {"b013": "fatal", "b038": "blocked"}  # injected permanent faults, tried once
    assert all(r.attempts == 1 for r in result.failed_items())
    assert all(isinstance(r.output, CatalogueCard) for r in result.results if r.success)
    assert result.cache_hit_rate() > 90.0  # every item read the shared cataloguing guide from the cache
    async with get_client() as client:
        keys = {a.key for a in await client.read_artifacts()}
    assert {"batchllm-demo-summary", "batchllm-demo-failed-items", "batchllm-demo-progress"} <= keys
