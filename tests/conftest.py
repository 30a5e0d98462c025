"""Session-wide test environment: Prefect state in a temp dir, no telemetry, no real Gemini.

Environment variables are set before anything imports Prefect, so its settings pick them up.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

_HOME = tempfile.mkdtemp(prefix="batchllm-test-prefect-")
os.environ.update(
    {
        "PREFECT_HOME": _HOME,
        "PREFECT_LOCAL_STORAGE_PATH": os.path.join(_HOME, "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
)
# Tests must never reach the real Gemini API or Vertex.
for _var in (
    "PREFECT_API_URL",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_GENAI_USE_VERTEXAI",
    "GOOGLE_GEMINI_BASE_URL",
    "GOOGLE_CLOUD_PROJECT",
):
    os.environ.pop(_var, None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One Prefect API (temp SQLite) for the whole session; it takes ~10-20 s to start on 2 cores."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        from prefect.settings import PREFECT_API_URL

        yield str(PREFECT_API_URL.value())


@pytest.fixture
def emulator():
    """A fresh Gemini-compatible server per test (cheap: a thread on a free loopback port)."""
    from prefect_batchllm.testing import GeminiEmulator

    with GeminiEmulator() as emu:
        yield emu


#: Fixtures that start a Prefect API server: the session harness here, and the module fixtures that run a
#: real ``prefect server start`` through tests/_prefect_server.py. A test using any of them is marked
#: ``prefect``, so ``pytest -m "not prefect"`` is a fast lane that starts no server.
SERVER_FIXTURES = frozenset({"prefect_api", "api_url", "real_server"})


#: Per-test timeouts (pytest-timeout; they include fixture setup) beyond pyproject's 300 s default, for tests
#: that share a server start of up to 180 s on a busy machine, or run flows in subprocesses of a real server.
SERVER_TIMEOUTS = {"prefect_api": 600, "api_url": 900, "real_server": 900}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if not used:
            continue
        item.add_marker(pytest.mark.prefect)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(max(SERVER_TIMEOUTS[name] for name in used)))
