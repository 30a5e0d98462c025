"""A streaming table run in its own process (killed with SIGKILL by tests/test_streaming.py).

``python tests/_stream_job.py INPUT OUTPUT GEMINI_BASE_URL TEMPLATE CHUNK_SIZE MAX_WORKERS``
"""

from __future__ import annotations

import sys

from google import genai
from google.genai import types

from prefect_batchllm import ProcessorConfig
from prefect_batchllm.models.gemini import GeminiModel
from prefect_batchllm.strategies.gemini import GeminiStrategy
from prefect_batchllm.streaming import enrich_table_file


def main() -> None:
    source, output, base_url, template, chunk, workers = sys.argv[1:7]
    options = types.HttpOptions(base_url=base_url, api_version="v1beta", retry_options=None)
    client = genai.Client(vertexai=False, api_key="test-key", http_options=options)
    strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", client))
    config = ProcessorConfig(max_workers=int(workers), chunk_size=int(chunk), fail_on_item_failure=False)
    result = enrich_table_file(source, output, template, strategy, "isbn", config)
    print(f"done {result.total_items} {result.succeeded} {result.replayed_count}", flush=True)


if __name__ == "__main__":
    main()
