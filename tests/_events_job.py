"""A batch job run in its own process by tests/test_prefect_events.py (against a real Prefect server).

``python tests/_events_job.py BASE_URL MODE [DEPLOYMENT_ID]`` runs 12 items through ``run_batch`` with a
rate limit configured (so 429s pause the shared limiter) and prints one JSON line: the batch's flow run id
and the failed items' categories. ``MODE`` is ``per-item`` or ``chunked``. With a deployment id the batch
runs as a subflow of a flow run created from that deployment, executed here by Prefect's engine.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from google import genai
from google.genai import types
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.flow_engine import run_flow

from prefect_batchllm import (
    BatchItemsFailed,
    GeminiModel,
    GeminiStrategy,
    LLMWorkItem,
    ProcessorConfig,
    RateLimitConfig,
    RetryConfig,
    run_batch,
)


def batch(base_url: str, mode: str) -> Any:
    def client() -> genai.Client:
        options = types.HttpOptions(base_url=base_url, api_version="v1beta", retry_options=None)
        return genai.Client(vertexai=False, api_key="test-key", http_options=options)

    strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", client))
    items = [
        LLMWorkItem(item_id=f"item-{i}", strategy=strategy, prompt=f"[{mode}-item-{i}] say hi")
        for i in range(12)
    ]
    config = ProcessorConfig(
        max_workers=3,
        retry=RetryConfig(max_attempts=1),
        rate_limit=RateLimitConfig(
            requests_per_minute=6000, limit_prefix=f"events-{mode}", cooldown_seconds=1.0, slow_start_items=0
        ),
        chunk_size=4 if mode == "chunked" else None,
        persist_results=False,
    )
    return run_batch(items, config, return_state=True)


@flow(name="events-job")
def job(base_url: str, mode: str) -> dict[str, Any]:
    state = batch(base_url, mode)
    return report(state)


def report(state: Any) -> dict[str, Any]:
    try:
        result = state.result()
    except BatchItemsFailed as failed:
        result = failed.result
    return {
        "flow_run_id": str(state.state_details.flow_run_id),
        "failed": {r.item_id: r.error_category for r in result.failed_items()},
        "estimated_cost_usd": result.estimated_cost_usd,
        "cache_hit_rate": result.cache_hit_rate(),
    }


def main() -> None:
    base_url, mode = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        with get_client(sync_client=True) as client:
            flow_run = client.create_flow_run_from_deployment(
                sys.argv[3], parameters={"base_url": base_url, "mode": mode}
            )
        out = run_flow(job, flow_run=flow_run, parameters={"base_url": base_url, "mode": mode})
        out["parent_flow_run_id"] = str(flow_run.id)
    else:
        out = report(batch(base_url, mode))
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
