"""Batch API mode: client-side cost per item, versus chunked online mode, on the same items.

The bundled Gemini-compatible server runs in its own process (``python -m prefect_batchllm.testing``), so
the CPU measured here (``time.process_time`` of this process: flow, tasks, request building, parsing,
result persistence) is the client's only. Batch jobs finish as soon as they are polled (``--batch-delay
0``); online requests have no latency. The Prefect API is the test harness's (a subprocess, not counted).

Measured here (2 shared vCPUs, 5,000 items): batch_api 2.3 ms client CPU/item, wall 42 s; chunked online
(chunk_size=200, 64 in flight) 4.1 ms/item, wall 35 s; the batch cost is half the online one.

    python -m benchmarks.batch_api                # 5,000 items, both modes
    python -m benchmarks.batch_api --items 1000
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=5000)
    args = parser.parse_args(argv)
    home = tempfile.mkdtemp(prefix="batchllm-bench-batch-")
    os.environ.update(
        PREFECT_HOME=home,
        PREFECT_LOCAL_STORAGE_PATH=os.path.join(home, "storage"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect_batchllm.testing", "--port", str(port), "--batch-delay", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from google import genai
        from google.genai import types
        from prefect.testing.utilities import prefect_test_harness

        from prefect_batchllm import LLMWorkItem, ProcessorConfig, run_batch
        from prefect_batchllm.models.gemini import GeminiModel
        from prefect_batchllm.strategies.gemini import GeminiStrategy

        base_url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)

        def client() -> genai.Client:
            options = types.HttpOptions(base_url=base_url, api_version="v1beta", retry_options=None)
            return genai.Client(api_key="bench", http_options=options)

        with prefect_test_harness(server_startup_timeout=180):
            strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", client))
            for mode, config in (
                ("batch_api", ProcessorConfig(execution="batch_api", batch_poll_interval_s=0.2)),
                ("chunked online", ProcessorConfig(chunk_size=200, max_workers=64)),
            ):
                tag = uuid.uuid4().hex[:8]
                items = [
                    LLMWorkItem(
                        item_id=f"{tag}-{i}", strategy=strategy, prompt=f"[{tag}-{i}] Summarize item {i}."
                    )
                    for i in range(args.items)
                ]
                cpu, wall = time.process_time(), time.monotonic()
                result = run_batch(items, config)
                cpu, wall = time.process_time() - cpu, time.monotonic() - wall
                print(
                    f"{mode:15s} {args.items} items: {result.succeeded} ok, wall {wall:6.1f} s, "
                    f"client CPU {cpu:6.1f} s = {1000 * cpu / args.items:.2f} ms/item, "
                    f"cost ${result.estimated_cost_usd:.5f}"
                )
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
