"""Publish a batch as Prefect artifacts: markdown summary, failed-items table, live progress bar.

Keys are ``<prefix>-summary``, ``<prefix>-failed-items`` and ``<prefix>-progress``, where the prefix is
``ProcessorConfig.artifact_key`` or a slug of the deployment / flow name, so the UI's Artifacts page keeps
one history per batch job. Artifact writes are best effort: a failing API call is logged, never fails the
batch.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.utilities.urls import url_for

from prefect_batchllm.core.items import BatchResult

logger = logging.getLogger("prefect_batchllm")

__all__ = [
    "MAX_MESSAGE_CHARS",
    "MAX_SUMMARY_FAILURES",
    "MAX_TABLE_ROWS",
    "PROGRESS_MIN_SECONDS",
    "ProgressArtifact",
    "artifact_keys",
    "failed_items_table",
    "publish_batch_artifacts",
    "slugify_key",
    "summary_markdown",
    "task_run_link",
    "task_run_metadata",
]

#: Rows of the failed-items table beyond this are summarised (tables are stored as JSON in the DB).
MAX_TABLE_ROWS = 1000
#: The UI renders table cells on one line (no wrapping; the table scrolls sideways), so the table's
#: ``message`` is cut here (it fits a 1400 px wide window); the summary's failed-items list and the task
#: run carry the whole reason.
MAX_MESSAGE_CHARS = 80
#: Failed items listed, with their full reasons, in the summary markdown (the table has them all).
MAX_SUMMARY_FAILURES = 50
#: ``WorkItemResult.metadata`` keys naming the task run that executed a failed item (its own or its chunk's).
TASK_RUN_ID_KEY = "prefect_task_run_id"
TASK_RUN_NAME_KEY = "prefect_task_run_name"
_KEY_RE = re.compile(r"^[a-z0-9-]+$")
#: Characters that would turn a reason into markup in the UI's markdown (cells and list items alike).
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|])")


def slugify_key(name: str, default: str = "run-batch") -> str:
    """A Prefect artifact key prefix from any name: lowercase, digits and single dashes (max 60 chars)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60].strip("-")
    return slug or default


def artifact_keys(prefix: str) -> dict[str, str]:
    """The three artifact keys of a batch, validated against Prefect's ``^[a-z0-9-]+$``."""
    if not _KEY_RE.match(prefix):
        raise ValueError(f"artifact key prefix must match ^[a-z0-9-]+$, got {prefix!r}")
    return {
        "summary": f"{prefix}-summary",
        "failed": f"{prefix}-failed-items",
        "progress": f"{prefix}-progress",
    }


def _fmt_int(value: int) -> str:
    return f"{value:,}"


def task_run_metadata(ledger: Any) -> dict[str, str]:
    """``WorkItemResult.metadata`` entries naming the task run recorded on an item's ledger (if any)."""
    run_id = getattr(ledger, "task_run_id", None)
    if not run_id:
        return {}
    meta = {TASK_RUN_ID_KEY: str(run_id)}
    name = getattr(ledger, "task_run_name", None)
    if name:
        meta[TASK_RUN_NAME_KEY] = str(name)
    return meta


def task_run_link(task_run_id: str) -> str:
    """The UI address of a task run: absolute when the UI URL is known (``PREFECT_UI_URL``, derived from
    ``PREFECT_API_URL``), else the UI-relative ``/runs/task-run/<id>``, which works inside the UI."""
    try:
        url = url_for("task-run", obj_id=task_run_id)
    except Exception:  # a link is a convenience; never fail an artifact over it
        url = None
    return url or f"/runs/task-run/{task_run_id}"


def _md_text(text: str, limit: int | None = None) -> str:
    """``text`` on one line, cut to ``limit`` characters, with markdown-special characters escaped."""
    flat = " ".join(text.split())
    if limit is not None and len(flat) > limit:
        flat = flat[: limit - 1].rstrip() + "…"
    return _MD_SPECIAL.sub(r"\\\1", flat)


def _linked_id(result: Any) -> str:
    """The item id, linked to its task run (per-item mode: the item's own; chunked: its chunk's)."""
    label = _md_text(result.item_id)
    run_id = (result.metadata or {}).get(TASK_RUN_ID_KEY)
    return f"[{label}]({task_run_link(run_id)})" if run_id else label


def _failed_list(batch: BatchResult[Any, Any], limit: int) -> list[str]:
    """Markdown list of failed items with full reasons (list items wrap; table cells in the UI do not)."""
    failed = batch.failed_items()
    lines = ["", "## Failed items", ""]
    for r in failed[:limit]:
        attempts = f"{r.attempts} attempt{'s' if r.attempts != 1 else ''}"
        where = ""
        run_name = (r.metadata or {}).get(TASK_RUN_NAME_KEY)
        if run_name and run_name != r.item_id:  # chunked mode: say which chunk's task run holds the logs
            where = f" (in task run {_md_text(run_name)})"
        category = _md_text(r.error_category or "unknown")
        reason = _md_text(r.error or "no reason recorded")
        lines.append(f"- {_linked_id(r)}{where} · **{category}** · {attempts}: {reason}")
    if len(failed) > limit:
        lines.append(f"- … and {len(failed) - limit:,} more in the failed-items table artifact")
    return lines


def summary_markdown(batch: BatchResult[Any, Any], title: str = "Batch summary") -> str:
    """Markdown: counts, tokens, cache hit rate, estimated cost, wall time, throughput, error categories."""
    wall = batch.wall_time_s
    rate = batch.total_items / wall if wall > 0 else 0.0
    replayed = batch.replayed_count
    attempts = batch.total_attempts
    failed = f"**{_fmt_int(batch.failed)} failed**" if batch.failed else "none failed"
    lines = [
        f"# {title}",
        "",
        f"{_fmt_int(batch.succeeded)} of {_fmt_int(batch.total_items)} items succeeded, {failed} · "
        f"cache hit rate {batch.cache_hit_rate():.1f} % · estimated cost ${batch.estimated_cost_usd:,.4f} · "
        f"{wall:.1f} s",
        "",
        "| metric | value |",
        "|---|---|",
        f"| items | {_fmt_int(batch.total_items)} |",
        f"| succeeded | {_fmt_int(batch.succeeded)} |",
        f"| failed | {_fmt_int(batch.failed)} |",
        f"| replayed from earlier runs | {_fmt_int(replayed)} |",
        f"| attempts | {_fmt_int(attempts)} |",
        f"| input tokens | {_fmt_int(batch.total_input_tokens)} |",
        f"| output tokens | {_fmt_int(batch.total_output_tokens)} |",
        f"| cached input tokens | {_fmt_int(batch.total_cached_tokens)} |",
        f"| cache hit rate | {batch.cache_hit_rate():.1f} % |",
        f"| estimated cost | ${batch.estimated_cost_usd:,.4f} |",
        f"| wall time | {wall:.2f} s |",
        f"| throughput | {rate:.2f} items/s |",
    ]
    templates = batch.prompt_templates()
    if templates:
        shown = ", ".join(f"{name} ({n} items)" for name, n in sorted(templates.items()))
        lines.append(f"| prompt template | {shown} |")
    unpriced = batch.unpriced_models
    if unpriced:
        lines.append(f"| models without a price (cost 0) | {', '.join(unpriced)} |")
    billed_batch = batch.billed_batch_count
    if billed_batch:
        lines.append(f"| answered by batch jobs (batch prices) | {_fmt_int(billed_batch)} |")
    if batch.batch_jobs:
        lines += [
            "",
            "## Batch jobs",
            "",
            "| job | state | mode | requests | succeeded | failed | re-attached |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {j.get('name') or '(not submitted)'} | {j.get('state')} | {j.get('mode')} | "
            f"{j.get('requests')} | {j.get('succeeded')} | {j.get('failed')} | "
            f"{'yes' if j.get('reattached') else 'no'} |"
            for j in batch.batch_jobs
        ]
    categories = batch.error_categories()
    if categories:
        lines += ["", "## Failures by category", "", "| category | items |", "|---|---|"]
        lines += [f"| {cat} | {n} |" for cat, n in sorted(categories.items(), key=lambda kv: -kv[1])]
        lines += _failed_list(batch, MAX_SUMMARY_FAILURES)
    return "\n".join(lines) + "\n"


def failed_items_table(
    batch: BatchResult[Any, Any], max_rows: int = MAX_TABLE_ROWS, max_message_chars: int = MAX_MESSAGE_CHARS
) -> dict[str, list[Any]]:
    """Columns ``item_id, category, attempts, message`` of the failed items, in input order.

    The UI renders cells as markdown and never wraps them, so ``message`` is escaped, cut to
    ``max_message_chars`` (the summary and the task run have the whole reason) and last, and it links to
    the task run that ran the item (its own in per-item mode, its chunk's in chunked mode).
    """
    failed = batch.failed_items()[:max_rows]
    return {
        "item_id": [r.item_id for r in failed],
        "category": [r.error_category or "unknown" for r in failed],
        "attempts": [r.attempts for r in failed],
        "message": [_linked_message(r, max_message_chars) for r in failed],
    }


def _linked_message(result: Any, limit: int) -> str:
    """The (cut, escaped) reason as a link to the item's task run, or plain when no task run ran it."""
    text = _md_text(result.error or "no reason recorded", limit)
    run_id = (result.metadata or {}).get(TASK_RUN_ID_KEY)
    return f"[{text}]({task_run_link(run_id)})" if run_id else text


async def publish_batch_artifacts(
    batch: BatchResult[Any, Any], prefix: str, *, title: str | None = None
) -> dict[str, UUID | None]:
    """Write the summary and failed-items artifacts of ``batch`` (call inside a flow or task run)."""
    keys = artifact_keys(prefix)
    ids: dict[str, UUID | None] = {"summary": None, "failed": None}
    try:
        ids["summary"] = await acreate_markdown_artifact(
            summary_markdown(batch, title or f"Batch summary: {prefix}"),
            key=keys["summary"],
            description=f"{batch.succeeded}/{batch.total_items} items succeeded",
        )
        shown = min(batch.failed, MAX_TABLE_ROWS)
        more = f" (first {shown} shown)" if batch.failed > shown else ""
        ids["failed"] = await acreate_table_artifact(
            failed_items_table(batch),
            key=keys["failed"],
            description=f"{batch.failed} failed item(s){more}; a message links to the task run that ran it",
        )
    except Exception as exc:  # artifacts are a view; never fail the batch over them
        logger.warning("could not publish batch artifacts for %r: %s", prefix, exc)
    return ids


#: Least time between two progress-artifact updates: each one is an API call (and an event) for the server,
#: so a fast batch sends about one a second, not one per ``progress_interval`` items.
PROGRESS_MIN_SECONDS = 1.0


class ProgressArtifact:
    """A progress bar artifact (``<prefix>-progress``) moved as items complete, at most once per
    ``min_seconds`` and only after ``interval`` more items finished (the final count is always sent).

    Each update is an API call and an event for the Prefect server, so they are bounded by time, not by
    item count: a 10,000-item batch that runs for a minute sends ~60 updates, not 1,000. An update never
    waits for one already on its way (it is skipped; the next or the final one carries the newer count),
    except the final one (all items done, or ``force``), which waits and then sends the newest count, so
    concurrent workers can never leave an older percentage as the final value.
    """

    def __init__(
        self,
        prefix: str,
        total: int,
        interval: int,
        *,
        min_seconds: float = PROGRESS_MIN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = artifact_keys(prefix)["progress"]
        self.total = total
        self.interval = max(1, interval)
        self.min_seconds = max(0.0, min_seconds)
        self.artifact_id: UUID | None = None
        self.updates = 0  # updates sent (after the artifact was created)
        self._clock = clock
        self._published = -1
        self._published_at = float("-inf")
        self._latest = 0
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        try:
            self.artifact_id = await acreate_progress_artifact(
                0.0, key=self.key, description=f"0/{self.total} items"
            )
            self._published = 0
            self._published_at = self._clock()
        except Exception as exc:
            logger.warning("could not create progress artifact %r: %s", self.key, exc)

    async def update(self, completed: int, *, force: bool = False) -> None:
        """Publish progress when due (``interval`` more items and ``min_seconds`` since the last update),
        when every item is done, or when ``force``d."""
        self._latest = max(self._latest, completed)
        if self.artifact_id is None or self._latest == self._published:
            return
        final = force or self._latest >= self.total
        if not final:
            due = (
                self._latest - self._published >= self.interval
                and self._clock() - self._published_at >= self.min_seconds
            )
            if not due or self._lock.locked():  # one update at a time; never queue behind it
                return
        async with self._lock:
            latest = self._latest
            if latest == self._published:
                return
            percent = 100.0 if self.total == 0 else min(100.0, 100.0 * latest / self.total)
            try:
                await aupdate_progress_artifact(
                    self.artifact_id, percent, description=f"{latest}/{self.total} items"
                )
                self._published = latest
                self.updates += 1
            except Exception as exc:
                logger.warning("could not update progress artifact %r: %s", self.key, exc)
            finally:
                self._published_at = self._clock()
