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
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)

from prefect_batchllm.core.items import BatchResult

logger = logging.getLogger("prefect_batchllm")

__all__ = [
    "MAX_TABLE_ROWS",
    "ProgressArtifact",
    "artifact_keys",
    "failed_items_table",
    "publish_batch_artifacts",
    "slugify_key",
    "summary_markdown",
]

#: Rows of the failed-items table beyond this are summarised (tables are stored as JSON in the DB).
MAX_TABLE_ROWS = 1000
_KEY_RE = re.compile(r"^[a-z0-9-]+$")


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


def summary_markdown(batch: BatchResult[Any, Any], title: str = "Batch summary") -> str:
    """Markdown: counts, tokens, cache hit rate, estimated cost, wall time, throughput, error categories."""
    wall = batch.wall_time_s
    rate = batch.total_items / wall if wall > 0 else 0.0
    replayed = sum(1 for r in batch.results if r.replayed)
    attempts = sum(r.attempts for r in batch.results)
    lines = [
        f"# {title}",
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
    unpriced = batch.unpriced_models
    if unpriced:
        lines.append(f"| models without a price (cost 0) | {', '.join(unpriced)} |")
    billed_batch = sum(1 for r in batch.results if r.metadata.get("billing") == "batch")
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
    return "\n".join(lines) + "\n"


def failed_items_table(batch: BatchResult[Any, Any], max_rows: int = MAX_TABLE_ROWS) -> dict[str, list[Any]]:
    """Columns ``item_id, category, message, attempts`` of the failed items, in input order."""
    failed = batch.failed_items()[:max_rows]
    return {
        "item_id": [r.item_id for r in failed],
        "category": [r.error_category or "unknown" for r in failed],
        "message": [r.error or "" for r in failed],
        "attempts": [r.attempts for r in failed],
    }


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
            description=f"{batch.failed} failed item(s){more}",
        )
    except Exception as exc:  # artifacts are a view; never fail the batch over them
        logger.warning("could not publish batch artifacts for %r: %s", prefix, exc)
    return ids


class ProgressArtifact:
    """A progress bar artifact (``<prefix>-progress``) moved every ``interval`` completed items.

    Updates are serialised and always send the newest count, so concurrent workers can never leave an
    older percentage as the final value.
    """

    def __init__(self, prefix: str, total: int, interval: int) -> None:
        self.key = artifact_keys(prefix)["progress"]
        self.total = total
        self.interval = max(1, interval)
        self.artifact_id: UUID | None = None
        self._published = -1
        self._latest = 0
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        try:
            self.artifact_id = await acreate_progress_artifact(
                0.0, key=self.key, description=f"0/{self.total} items"
            )
            self._published = 0
        except Exception as exc:
            logger.warning("could not create progress artifact %r: %s", self.key, exc)

    async def update(self, completed: int, *, force: bool = False) -> None:
        """Publish progress when ``interval`` more items finished, at the end, or when ``force``d."""
        self._latest = max(self._latest, completed)
        if self.artifact_id is None:
            return
        due = self._latest - self._published >= self.interval or self._latest >= self.total
        if not (due or force) or self._latest == self._published:
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
            except Exception as exc:
                logger.warning("could not update progress artifact %r: %s", self.key, exc)
