"""Session-wide test environment: Prefect state in a temp dir, no telemetry, no real Gemini.

Environment variables are set before anything imports Prefect, so its settings pick them up.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

_HOME = tempfile.mkdtemp(prefix="batchllm-test-prefect-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)  # the session's Prefect state and results
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


#: What starts a Prefect API server, and the per-test timeout (pytest-timeout; it includes fixture setup)
#: a test using it gets instead of pyproject's 300 s: the session harness (its start takes up to 180 s on a
#: busy machine) and a real ``prefect server start`` through tests/_prefect_server.py (flows in subprocesses).
SERVER_STARTERS = {"prefect_test_harness": 600, "prefect_server": 900}


def _server_timeout(item: pytest.Item) -> int | None:
    """The largest timeout among the server starters that the test or any fixture it uses calls."""
    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in info.name2fixturedefs.values() if info is not None else ():
        functions.extend(d.func for d in defs)
    names: set[str] = set()
    for fn in functions:
        code = getattr(fn, "__code__", None)
        if code is not None:
            names.update(code.co_names)
    found = [SERVER_STARTERS[name] for name in names.intersection(SERVER_STARTERS)]
    return max(found) if found else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that starts a Prefect server ``prefect`` (so ``pytest -m "not prefect"`` is a fast
    lane that starts none) and give it a timeout that fits a server start."""
    for item in items:
        timeout = _server_timeout(item)
        if timeout is None:
            continue
        item.add_marker(pytest.mark.prefect)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(timeout))
