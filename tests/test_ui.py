"""The Prefect UI as a person sees it, checked in a real browser (`make ui-check`; CI runs it too).

Starts ``prefect server start`` with its UI, runs the `make demo` flow (``prefect-batchllm demo``, bundled
Gemini-compatible server, injected faults) against it in its own process, then drives headless Chromium
(Debian's ``chromium``, installed by ``scripts/ensure-chromium.sh`` when missing) through the batch's flow
run page, its task runs, a failed item's task run and each artifact (summary, failed items, progress).
Every number a person needs is read from the *rendered* page and compared with what the demo printed.

Screenshots go to a temp dir, or to ``$BATCHLLM_UI_SHOTS`` (``make ui-check`` sets ``docs/``, which the
README shows). The UI is a single-page app: pages are awaited by their rendered text, never network idle,
with generous timeouts and retried loads, so a loaded 2-core machine is slow but not flaky.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _prefect_server import prefect_env, prefect_server

pytestmark = [pytest.mark.prefect, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
BOOKS = 160  # b013 and b151 (HTTP 400) and b038 (safety block) fail; b101 is corrected after invalid JSON
EXPECTED_FAILED = {"b013": "fatal", "b038": "blocked", "b151": "fatal"}
WAIT_MS = 90_000  # per rendered-text wait; a busy machine renders slowly
LOADS = 3  # page loads tried before giving up
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    """Debian's chromium, installed by the project's own script when missing (CI runs as root)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "ensure-chromium.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"could not install chromium:\n{proc.stderr[-3000:]}"
    return proc.stdout.strip().splitlines()[-1]


def _report(stdout: str) -> dict[str, str]:
    """The numbers `make demo` printed: items, succeeded, failed, cache hit rate, cost."""

    def grab(pattern: str) -> str:
        match = re.search(pattern, stdout, re.MULTILINE)
        assert match, f"{pattern!r} not in the demo's report:\n{stdout}"
        return match.group(1)

    return {
        "items": grab(r"^items\s+(\d+)"),
        "succeeded": grab(r"^succeeded\s+(\d+)"),
        "failed": grab(r"^failed\s+(\d+)"),
        "replayed": grab(r"^replayed\s+(\d+)"),
        "cache hit rate": grab(r"\(([\d.]+ %) cache hit rate\)"),
        "estimated cost": grab(r"^estimated cost\s+(\$[\d.]+)"),
    }


class _Api:
    """The few REST reads the test needs to know which pages to open (plain HTTP, no Prefect client)."""

    def __init__(self, api_url: str) -> None:
        self.http = httpx.Client(base_url=api_url, timeout=60)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = self.http.post(path, json=body)
        response.raise_for_status()
        return response.json()

    def failed_task_runs(self, flow_run_id: str, expect: set[str], completed: int) -> dict[str, Any]:
        """Failed task runs by name, once the server has recorded ``expect`` of them and ``completed``
        completed ones: task-run states reach the API as events, which the server writes shortly after
        the flow's process has ended."""

        def query(state: str) -> dict[str, Any]:
            return {
                "flow_runs": {"id": {"any_": [flow_run_id]}},
                "task_runs": {"state": {"type": {"any_": [state]}}},
            }

        found: dict[str, Any] = {}
        done = 0
        for _ in range(WAIT_MS // 500):
            found = {t["name"]: t for t in self.post("/task_runs/filter", query("FAILED"))}
            done = self.post("/task_runs/count", query("COMPLETED"))
            if set(found) >= expect and done >= completed:
                break
            time.sleep(0.5)
        assert set(found) == expect and done == completed, (sorted(found), done)
        return found


@contextlib.contextmanager
def _browser(executable: str, shots: Path) -> Iterator[Any]:
    """A fresh headless Chromium profile; yields a page. A failure leaves a screenshot for the person."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="batchllm-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,  # fresh --user-data-dir
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        try:
            yield page
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(shots / "ui-failure.png"), full_page=True)
            raise
        finally:
            context.close()


def _open(page: Any, url: str, *texts: str) -> None:
    """Load ``url`` until every text in ``texts`` is rendered (retrying the load a few times)."""
    from playwright.sync_api import Error as PlaywrightError

    for attempt in range(1, LOADS + 1):
        try:
            page.goto(url, wait_until="domcontentloaded")
            for text in texts:
                page.get_by_text(text, exact=False).first.wait_for(state="visible")
            return
        except PlaywrightError:
            if attempt == LOADS:
                raise


def _rows(page: Any, selector: str = "table") -> list[list[str]]:
    """The rendered cells of every table row on the page."""
    return page.eval_on_selector_all(
        f"{selector} tr",
        "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))",
    )


def _until(check: Callable[[], Any], what: str, page: Any) -> Any:
    """Poll a rendered-page condition (the SPA may render in steps) for up to WAIT_MS."""
    deadline_polls = WAIT_MS // 500
    for _ in range(deadline_polls):
        value = check()
        if value:
            return value
        page.wait_for_timeout(500)
    raise AssertionError(f"never rendered: {what}")


def test_a_person_finds_every_number_in_the_prefect_ui(tmp_path: Path) -> None:
    chromium = _chromium()
    shots = Path(os.environ.get("BATCHLLM_UI_SHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    (shots / "ui-failure.png").unlink(missing_ok=True)  # only a failing run leaves one (git-ignored)

    with prefect_server(ui=True) as api_url:
        ui = api_url.removesuffix("/api")
        env = prefect_env(api_url, home=tmp_path / "prefect-home")  # fresh: no replayed results
        env.pop("CI", None)  # stdout is a pipe here anyway: the terminal bar must stay away by itself
        demo = subprocess.run(
            [sys.executable, "-m", "prefect_batchllm.cli", "demo", str(BOOKS)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "items/s ETA" not in demo.stderr  # no live bar in a pipe
        printed = _report(demo.stdout)
        assert printed["items"] == str(BOOKS) and printed["failed"] == str(len(EXPECTED_FAILED))

        api = _Api(api_url)
        batch_name = f"batchllm-demo: {BOOKS} items"
        (batch_run,) = api.post("/flow_runs/filter", {"flow_runs": {"name": {"any_": [batch_name]}}})
        in_batch = {"flow_run_id": {"any_": [batch_run["id"]]}}
        artifacts = {a["key"]: a for a in api.post("/artifacts/filter", {"artifacts": in_batch})}
        # Rows an earlier demo in this session completed are replayed without a task run of their own.
        replayed = int(printed["replayed"])
        completed = BOOKS - len(EXPECTED_FAILED) - replayed + 3  # + prepare, cleanup, summarize
        failed_runs = api.failed_task_runs(batch_run["id"], expect=set(EXPECTED_FAILED), completed=completed)

        with _browser(chromium, shots) as page:
            # 1. The batch's flow run: a readable name, its state and its task runs.
            parent = f"catalogue-{BOOKS}-books"  # the demo flow's run, named too
            _open(page, f"{ui}/runs/flow-run/{batch_run['id']}", batch_name, "Completed", parent)
            page.wait_for_timeout(3000)  # let the timeline canvas draw before the picture (no assert)
            page.screenshot(path=str(shots / "ui-flow-run.png"))

            page.get_by_text("Task Runs", exact=True).first.click()
            counts = f"({completed} Completed, {len(EXPECTED_FAILED)} Failed)"
            _until(lambda: counts in page.inner_text("body"), f"task-run state counts {counts}", page)
            # A person looks a failed item up by its id: task runs are named after item ids.
            search = page.get_by_placeholder("Search by run name")
            search.evaluate("e => e.scrollIntoView({block: 'start'})")  # the list, not the timeline
            search.fill("b013")
            _until(lambda: "b160" not in page.inner_text("body"), "the task-run list filtered to b013", page)
            page.get_by_role("link", name="b013", exact=True).first.wait_for(state="visible")
            page.get_by_text("Failed", exact=True).first.wait_for(state="visible")
            page.screenshot(path=str(shots / "ui-task-runs.png"))

            # 2. The summary artifact: the numbers the demo printed, as rendered markdown.
            summary = artifacts["batchllm-demo-summary"]
            page.set_viewport_size({"width": 1400, "height": 1800})  # the UI scrolls inside; show it all
            _open(page, f"{ui}/artifacts/artifact/{summary['id']}", "cache hit rate", "Failed items")
            metrics = {row[0]: row[1] for row in _rows(page) if len(row) == 2}
            for name in ("items", "succeeded", "failed", "cache hit rate", "estimated cost"):
                assert metrics.get(name) == printed[name], (name, metrics)
            assert metrics.get("fatal") == "2" and metrics.get("blocked") == "1"  # failures by category
            body = page.inner_text("body")
            assert "Request contains an invalid argument." in body  # full reasons, listed
            assert "Gemini blocked the prompt (SAFETY)" in body
            page.screenshot(path=str(shots / "ui-summary.png"))
            page.set_viewport_size({"width": 1400, "height": 900})

            # 3. The failed-items table: ids, categories and reasons, each id a link to its task run.
            table = artifacts["batchllm-demo-failed-items"]
            _open(page, f"{ui}/artifacts/artifact/{table['id']}", "b013", "b151")
            rows = [row for row in _rows(page) if row and row[0] in EXPECTED_FAILED]
            assert {row[0]: row[1] for row in rows} == EXPECTED_FAILED
            reasons = {row[0]: row[-1] for row in rows}
            assert "INVALID_ARGUMENT" in reasons["b013"] and "SAFETY" in reasons["b038"]
            for item_id, task_run in failed_runs.items():  # each reason links to the item's task run
                link = page.locator("tr", has_text=item_id).get_by_role("link").first
                assert link.get_attribute("href").endswith(f"/runs/task-run/{task_run['id']}")
            overflow = "t => t.parentElement.scrollWidth - t.parentElement.clientWidth"
            wide = page.eval_on_selector("table", overflow)  # the table's scroll box
            assert wide <= 0, f"the table scrolls sideways by {wide}px: a reason is too long for a cell"
            page.screenshot(path=str(shots / "ui-failed-items.png"))

            # ... and the link lands on the failed item's task run, with its reason. Absolute links (they
            # also work from `prefect artifact inspect`) open in a new tab in the UI.
            link = page.locator("tr", has_text="b013").get_by_role("link").first
            if link.get_attribute("target") == "_blank":
                with page.context.expect_page() as opened:
                    link.click()
                run_page = opened.value
                run_page.set_default_timeout(WAIT_MS)
            else:
                link.click()
                run_page = page
            run_page.wait_for_url(f"**/runs/task-run/{failed_runs['b013']['id']}")
            run_page.get_by_text("INVALID_ARGUMENT", exact=False).first.wait_for(state="visible")
            run_page.get_by_text("Failed", exact=True).first.wait_for(state="visible")
            run_page.get_by_text(batch_name).first.wait_for(state="visible")  # breadcrumb: its flow run
            run_page.screenshot(path=str(shots / "ui-task-run.png"))

            # 4. The progress artifact: complete, with the item count.
            progress = artifacts["batchllm-demo-progress"]
            _open(page, f"{ui}/artifacts/artifact/{progress['id']}", "100%", f"{BOOKS}/{BOOKS} items")
            page.screenshot(path=str(shots / "ui-progress.png"))
