"""A live progress bar for a batch in a terminal: done / failed / in flight / items per s / ETA / tokens.

``run_batch`` (and so ``enrich_dataframe`` and ``ParallelBatchProcessor``) adds a :class:`TerminalProgress`
observer by itself when a person is watching: stderr is a real terminal (not a dumb one) and ``CI`` is not
set. Nothing is drawn in logs, pipes, CI, or a worker running a deployment. ``BATCHLLM_PROGRESS=0`` turns it
off; ``BATCHLLM_PROGRESS=1`` turns it on anyway (off a terminal, rich then prints only the final line).
Pass ``observers=[TerminalProgress(console=...)]`` to draw on a console of your own.

The bar is fed by the same :class:`ProcessingEvent` stream as any observer, so it costs the batch nothing
but a counter update per event; rich redraws it from its own thread a few times per second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prefect.logging.handlers import PrefectConsoleHandler
from rich.console import Console, RenderableType
from rich.errors import LiveError
from rich.file_proxy import FileProxy
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from prefect_batchllm.core.events import ProcessingEvent, ProcessorObserver

logger = logging.getLogger("prefect_batchllm")

__all__ = ["TerminalProgress", "close_terminal_progress", "progress_wanted", "with_terminal_progress"]

_ON = {"1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off"}


def progress_wanted(console: Console) -> bool:
    """Whether to draw on ``console``: ``BATCHLLM_PROGRESS`` if set, else a real terminal and not CI."""
    flag = os.environ.get("BATCHLLM_PROGRESS", "").strip().lower()
    if flag in _OFF:
        return False
    if flag in _ON:
        return True
    if os.environ.get("CI", "").strip().lower() not in ("", *_OFF):
        return False
    # A real terminal: rich's own test also says yes to FORCE_COLOR / TTY_COMPATIBLE on a pipe or log file.
    return console.is_terminal and _is_tty(console.file) and not console.is_dumb_terminal


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class _LogProxy(FileProxy):
    """rich's ``FileProxy`` (writes go above the live display) that a ``Console`` will not unwrap.

    ``Console.file`` deliberately looks through ``rich_proxied_file`` to the real stream; a log handler's
    own console must write into the proxy instead, so the attribute is hidden here.
    """

    @property
    def rich_proxied_file(self) -> Any:  # type: ignore[override]
        raise AttributeError("rich_proxied_file")


def _route_terminal_logs(console: Console) -> Callable[[], None]:
    """Send log handlers that write to the terminal (Prefect's console handlers, plain stream handlers)
    through ``console`` while its live display runs, so log lines print above the bar instead of through
    it. Returns the function that puts every handler back."""
    undo: list[Callable[[], None]] = []
    loggers = [logging.getLogger()] + [
        lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)
    ]
    seen: set[int] = set()
    for handler in (h for lg in loggers for h in lg.handlers):
        if id(handler) in seen:
            continue
        seen.add(id(handler))
        if isinstance(handler, PrefectConsoleHandler):
            own = handler.console
            if _is_tty(own.file) and not isinstance(own.file, FileProxy):
                original = own.file
                own.file = _LogProxy(console, original)
                undo.append(lambda own=own, original=original: setattr(own, "file", original))
        elif type(handler) is logging.StreamHandler and _is_tty(handler.stream):
            if not isinstance(handler.stream, FileProxy):
                original = handler.stream
                handler.setStream(_LogProxy(console, original))
                undo.append(lambda handler=handler, original=original: handler.setStream(original))

    def restore() -> None:
        for step in reversed(undo):
            with contextlib.suppress(Exception):
                step()

    return restore


class _RateColumn(ProgressColumn):
    """Finished items per second (rich's moving estimate)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} items/s" if speed else "- items/s", style="progress.data.speed")


class _TwoLineProgress(Progress):
    """Line 1: spinner, batch, bar, done/total, items/s, ETA. Line 2: outcome counts and tokens."""

    def __init__(self, owner: TerminalProgress, *columns: Any, **kwargs: Any) -> None:
        self._owner = owner  # before super().__init__, which renders once
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.tasks:
            counts, tokens = self._owner.counts_text(), self._owner.tokens_text()
            line = Text.from_markup(f"  {counts} · {tokens}")
            if line.cell_len <= self.console.width:
                yield line
            else:  # a narrow terminal: tokens on a line of their own rather than wrapped mid-phrase
                yield Text.from_markup(f"  {counts}")
                yield Text.from_markup(f"  {tokens}")


class TerminalProgress(ProcessorObserver):
    """A :class:`ProcessorObserver` that draws one batch as a rich progress bar on ``console`` (stderr).

    The bar starts at ``BATCH_STARTED`` and stops (leaving its final line on screen) when the batch's items
    are done, at ``BATCH_COMPLETED`` or :meth:`close`, whichever comes first. Only one live display can be
    active per console; a second concurrent batch quietly draws nothing.
    """

    def __init__(
        self, console: Console | None = None, *, label: str = "batch", refresh_per_second: float = 4
    ) -> None:
        self.console = console if console is not None else Console(stderr=True)
        self.label = label
        self.total = 0
        self.done = 0
        self.failed = 0
        self.replayed = 0
        self.rate_limited = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cached_tokens = 0
        self.paused = False
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._task: TaskID | None = None
        self._closed = False
        self._restore_logs: Callable[[], None] = lambda: None
        self._progress = _TwoLineProgress(
            self,
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            _RateColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            refresh_per_second=refresh_per_second,
            transient=False,
        )

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def on_event(self, event: ProcessingEvent, data: dict[str, Any]) -> None:
        """Update the counters from one processing event (never raises into the batch)."""
        if self._closed:
            return
        if event is ProcessingEvent.BATCH_STARTED:
            self.start(int(data.get("total") or 0))
            return
        if event is ProcessingEvent.BATCH_COMPLETED:
            self.close()
            return
        item_id = str(data.get("item_id", ""))
        with self._lock:
            if event is ProcessingEvent.ITEM_STARTED:
                self._in_flight.add(item_id)
            elif event in (ProcessingEvent.ITEM_COMPLETED, ProcessingEvent.ITEM_FAILED):
                self._in_flight.discard(item_id)
                self.done += 1
                if event is ProcessingEvent.ITEM_FAILED:
                    self.failed += 1
                elif data.get("replayed"):
                    self.replayed += 1
                usage = data.get("token_usage") or {}
                self.input_tokens += int(usage.get("input_tokens") or 0)
                self.output_tokens += int(usage.get("output_tokens") or 0)
                self.cached_tokens += int(usage.get("cached_input_tokens") or 0)
            elif event is ProcessingEvent.RATE_LIMIT_HIT:
                self.rate_limited += 1
            elif event is ProcessingEvent.COOLDOWN_STARTED:
                self.paused = True
            elif event is ProcessingEvent.COOLDOWN_ENDED:
                self.paused = False
            else:
                return
        self._refresh()

    def start(self, total: int) -> None:
        """Show the bar for ``total`` items (no-op if already started or another live display is active)."""
        if self._task is not None or self._closed:
            return
        self.total = total
        try:
            self._progress.start()
        except LiveError:  # another batch in this process already draws on this console
            self._closed = True
            return
        self._restore_logs = _route_terminal_logs(self.console)
        self._task = self._progress.add_task(self.label, total=total)
        self._refresh()

    def close(self) -> None:
        """Draw the final counts and stop the live display (idempotent; the last line stays on screen)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._refresh()
            try:
                self._progress.stop()
            finally:
                self._restore_logs()

    def counts_text(self) -> str:
        """``ok 158 · failed 2 · in flight 16`` (plus replayed / 429s / a pause when there are any)."""
        with self._lock:
            parts = [
                f"[green]ok {self.done - self.failed:,}[/]",
                f"[red]failed {self.failed:,}[/]" if self.failed else "failed 0",
                f"in flight {len(self._in_flight):,}",
            ]
            if self.replayed:
                parts.append(f"replayed {self.replayed:,}")
            if self.rate_limited:
                parts.append(f"[yellow]429s {self.rate_limited:,}[/]")
            if self.paused:
                parts.append("[yellow]rate-limit pause[/]")
        return " · ".join(parts)

    def tokens_text(self) -> str:
        """``tokens 102,019 in (100,418 cached) / 2,075 out``."""
        cached = f" ({self.cached_tokens:,} cached)" if self.cached_tokens else ""
        return f"tokens {self.input_tokens:,} in{cached} / {self.output_tokens:,} out"

    def _refresh(self) -> None:
        if self._task is None:
            return
        self._progress.update(self._task, completed=self.done)


def with_terminal_progress(
    observers: Iterable[ProcessorObserver] | None, *, label: str = "batch"
) -> list[ProcessorObserver]:
    """``observers`` plus a :class:`TerminalProgress` when a person is watching and none was given."""
    chosen = list(observers or [])
    if any(isinstance(o, TerminalProgress) for o in chosen):
        return chosen
    try:
        console = Console(stderr=True)
        if not progress_wanted(console):
            return chosen
        return [*chosen, TerminalProgress(console, label=label)]
    except Exception as exc:  # a progress bar is a view; never fail the batch over it
        logger.debug("no terminal progress bar: %s", exc)
        return chosen


def close_terminal_progress(observers: Iterable[Any]) -> None:
    """Stop every live bar among ``observers`` (the batch's ``finally``: also on errors and cancellation)."""
    for observer in observers:
        if isinstance(observer, TerminalProgress):
            observer.close()
