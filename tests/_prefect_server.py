"""A real ``prefect server start`` on a free loopback port (temp PREFECT_HOME, SQLite) for tests.

Used by tests that need what the in-process test harness cannot give: a server that outlives one process,
served or deployed flows running in their own processes, and the API calls the UI makes. Starting one
takes ~10-20 s on 2 cores, so share one per test module::

    with prefect_server() as api_url, connected(api_url):   # this process talks to it too
        env = prefect_env(api_url)          # for subprocesses (flows, `prefect deploy`, `serve`)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["connected", "prefect_env", "prefect_server"]

_PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prefect_env(api_url: str, home: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Environment for a subprocess that talks to ``api_url``: quiet, no telemetry, no real Gemini.

    ``home`` defaults to this process's ``PREFECT_HOME``, so item results persisted by a subprocess
    (``$PREFECT_HOME/storage``) are visible to later runs in any process of the test.
    """
    env = dict(os.environ)
    home = str(home or env.get("PREFECT_HOME") or tempfile.mkdtemp(prefix="batchllm-prefect-"))
    env.update(
        {
            "PREFECT_API_URL": api_url,
            "PREFECT_HOME": home,
            "PREFECT_LOCAL_STORAGE_PATH": env.get("PREFECT_LOCAL_STORAGE_PATH")
            or os.path.join(home, "storage"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_LOGGING_LEVEL": env.get("PREFECT_LOGGING_LEVEL", "WARNING"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    for var in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GEMINI_BASE_URL"):
        env.pop(var, None)
    return env


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def prefect_server(*, timeout: float = 240.0, ui: bool = False) -> Iterator[str]:
    """Start ``prefect server start`` on 127.0.0.1 with its own temp home and SQLite DB; yield the API URL.

    With ``ui=True`` the server also serves the Prefect UI at the API URL without ``/api``, pointed at
    this server's API (the UI otherwise assumes port 4200). The server log goes to ``<home>/server.log``
    and is shown if startup fails. On exit the server's process group (started here, in its own session)
    is terminated, then killed if it lingers, and its home removed.
    """
    home = tempfile.mkdtemp(prefix="batchllm-server-")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        {
            "PREFECT_HOME": home,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_UI_ENABLED": "true" if ui else "false",
            "PREFECT_UI_API_URL": api_url,
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
    )
    log_path = Path(home) / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [_PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(api_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"prefect server did not become healthy at {api_url}:\n{tail}")
            time.sleep(0.5)
        yield api_url
    finally:
        stop_process_group(proc)
        shutil.rmtree(home, ignore_errors=True)


def stop_process_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its children; SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def connected(api_url: str) -> Iterator[str]:
    """Point this process's Prefect client at ``api_url``; on exit, drain its log and event workers.

    Draining before the server stops matters: a worker still holding logs or events for a server that
    is gone retries at interpreter exit and can keep the test process from ending.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        try:
            yield api_url
        finally:
            _drain_workers()


def _drain_workers() -> None:
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        with contextlib.suppress(RuntimeError):  # the log worker may never have started
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())
