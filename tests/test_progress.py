"""The live terminal progress bar: drawn for a person at a terminal, never in pipes, logs or CI.

Batches run through the real engine and the real google-genai SDK against the bundled server; the bar is
read back from what rich wrote to a forced-terminal console.
"""

from __future__ import annotations

import io
import re
import uuid
from typing import Any

import pytest
from rich.console import Console

from prefect_batchllm import LLMWorkItem, ProcessorConfig, RetryConfig, TerminalProgress, run_batch
from prefect_batchllm.core.events import ProcessingEvent
from prefect_batchllm.models.gemini import GeminiModel
from prefect_batchllm.prefect.progress import progress_wanted, with_terminal_progress
from prefect_batchllm.strategies.gemini import GeminiStrategy
from prefect_batchllm.testing import Fault

FAST_RETRY = RetryConfig(max_attempts=3, initial_wait=0.01, max_wait=0.05, jitter=False)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Tty(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _screen(buf: io.StringIO) -> str:
    return _ANSI.sub("", buf.getvalue())


def _items(emulator: Any, n: int) -> list[LLMWorkItem[Any, Any]]:
    tag = uuid.uuid4().hex[:8]
    strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", emulator.client()))
    return [LLMWorkItem(f"p-{i:02d}", strategy, f"[p-{i:02d}] {tag} one line on book {i}") for i in range(n)]


@pytest.fixture
def no_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CI", "BATCHLLM_PROGRESS", "TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.usefixtures("no_ci")
def test_wanted_only_on_a_real_terminal_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    tty = Console(file=_Tty(), force_terminal=True)
    assert progress_wanted(tty)
    assert not progress_wanted(Console(file=io.StringIO()))  # a pipe or log file
    # rich calls a pipe a terminal when FORCE_COLOR is set; a bar must still not go into a log file
    assert not progress_wanted(Console(file=io.StringIO(), force_terminal=True))
    assert not progress_wanted(Console(file=_Tty(), force_terminal=True, _environ={"TERM": "dumb"}))
    monkeypatch.setenv("CI", "true")
    assert not progress_wanted(tty)
    monkeypatch.setenv("CI", "false")
    assert progress_wanted(tty)
    monkeypatch.setenv("BATCHLLM_PROGRESS", "0")
    assert not progress_wanted(tty)
    monkeypatch.setenv("BATCHLLM_PROGRESS", "1")
    assert progress_wanted(Console(file=io.StringIO()))


@pytest.mark.usefixtures("no_ci")
def test_auto_observer_follows_the_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = TerminalProgress(Console(file=io.StringIO()))
    assert with_terminal_progress([mine]) == [mine]  # one given: no second bar
    assert with_terminal_progress(None) == []  # pytest captures stderr: not a terminal
    monkeypatch.setenv("BATCHLLM_PROGRESS", "1")
    (auto,) = with_terminal_progress(None, label="books")
    assert isinstance(auto, TerminalProgress) and auto.label == "books"
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("BATCHLLM_PROGRESS")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    assert with_terminal_progress(None) == []


async def test_narrow_terminal_puts_tokens_on_their_own_line() -> None:
    buf = _Tty()
    bar = TerminalProgress(Console(file=buf, force_terminal=True, width=60), label="books")
    await bar.on_event(ProcessingEvent.BATCH_STARTED, {"total": 2})
    for item_id, event in (("a", ProcessingEvent.ITEM_COMPLETED), ("b", ProcessingEvent.ITEM_FAILED)):
        await bar.on_event(ProcessingEvent.ITEM_STARTED, {"item_id": item_id})
        usage = {"input_tokens": 123_456, "output_tokens": 7_890, "cached_input_tokens": 100_000}
        await bar.on_event(event, {"item_id": item_id, "token_usage": usage})
    await bar.on_event(ProcessingEvent.BATCH_COMPLETED, {})
    lines = _screen(buf).rstrip().splitlines()
    assert lines[-2].strip() == "ok 1 · failed 1 · in flight 0"
    assert lines[-1].strip() == "tokens 246,912 in (200,000 cached) / 15,780 out"
    assert bar.close() is None  # idempotent


@pytest.mark.usefixtures("prefect_api")
async def test_bar_counts_a_real_batch_on_a_terminal(emulator: Any) -> None:
    emulator.faults.add(Fault.status(400), contains="[p-03]", times=None)
    emulator.faults.add(Fault.status(503), contains="[p-05]", times=1)  # retried, then fine
    items = _items(emulator, 12)
    buf = _Tty()
    bar = TerminalProgress(Console(file=buf, force_terminal=True, width=140), label="books")

    result = await run_batch(items, ProcessorConfig(max_workers=4, retry=FAST_RETRY), observers=[bar])

    assert (result.succeeded, result.failed) == (11, 1)
    assert (bar.done, bar.failed, bar.in_flight) == (12, 1, 0)
    assert bar.input_tokens == result.total_input_tokens > 0
    assert bar.output_tokens == result.total_output_tokens > 0
    screen = _screen(buf)
    final = screen[screen.rindex("books") :]  # the last frame rich drew, left on screen
    assert "12/12" in final
    assert "ok 11 · failed 1 · in flight 0" in final
    assert f"tokens {result.total_input_tokens:,} in" in final
    assert f"/ {result.total_output_tokens:,} out" in final
    assert "items/s" in final and "ETA" in final


@pytest.mark.usefixtures("prefect_api", "no_ci")
async def test_nothing_printed_off_a_terminal_or_in_ci(
    emulator: Any, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await run_batch(_items(emulator, 3), ProcessorConfig(max_workers=3))
    out, err = capfd.readouterr()
    assert "items/s" not in out + err and "in flight" not in out + err  # stderr is a pipe here

    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich would call the pipe a terminal
    await run_batch(_items(emulator, 3), ProcessorConfig(max_workers=3))
    out, err = capfd.readouterr()
    assert "items/s" not in out + err and "in flight" not in out + err

    # The same auto path does draw when asked to (BATCHLLM_PROGRESS=1): the check above can fail.
    monkeypatch.delenv("CI")
    monkeypatch.delenv("TTY_COMPATIBLE")
    monkeypatch.setenv("BATCHLLM_PROGRESS", "1")  # off a terminal rich prints just the final frame
    await run_batch(_items(emulator, 3), ProcessorConfig(max_workers=3))
    out, err = capfd.readouterr()
    err = _ANSI.sub("", err)
    assert "3/3" in err and "ok 3 · failed 0 · in flight 0" in err
