"""`prefect-batchllm demo` (`make demo`): catalogue 250 classic books with Gemini as one observable flow run.

Every book is one Prefect task run. All of them share one Gemini context cache (the cataloguing guide in
``demo_data/cataloguing_guide.md`` plus a system instruction), created once by the flow and kept for the
next run. Output is structured: a pydantic ``CatalogueCard`` per book.

Without ``GEMINI_API_KEY`` the bundled Gemini-compatible server plays Gemini, with a few injected faults
(transient 503s, two permanent 400s, a safety block, invalid JSON once) so retries and the failed-items
table are visible. With ``GEMINI_API_KEY`` set the same flow runs against the real API.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from prefect import flow
from pydantic import BaseModel, Field, SecretStr

from prefect_batchllm import (
    BatchResult,
    GeminiCachedModelBlock,
    GeminiCredentials,
    GeminiStrategy,
    LLMWorkItem,
    ProcessorConfig,
    RateLimitConfig,
    RetryConfig,
    run_batch,
)

DATA = Path(__file__).parent / "demo_data"

Genre = Literal[
    "novel_of_manners",
    "gothic",
    "realist",
    "adventure",
    "science_fiction",
    "mystery",
    "satire",
    "bildungsroman",
    "modernist",
    "epic_poetry",
    "drama",
    "childrens",
    "nonfiction",
    "historical",
    "story_collection",
]
Era = Literal[
    "ancient",
    "medieval",
    "early_modern",
    "eighteenth_century",
    "romantic",
    "victorian",
    "edwardian",
    "interwar",
    "postwar",
]


class CatalogueCard(BaseModel):
    """One catalogue card, as defined by the cataloguing guide."""

    genre: Genre
    era: Era
    summary: str = Field(description="One present-tense sentence of at most 30 words.")
    themes: list[str] = Field(min_length=2, max_length=4)
    audience: Literal["adult", "young_adult", "children"]


SYSTEM_INSTRUCTION = (
    "You are a careful library cataloguer. Follow the cataloguing guide exactly and answer with the JSON "
    "catalogue card only."
)


def load_books(limit: int | None = None) -> list[dict[str, str]]:
    """The demo dataset: id, title, author and year of 250 public-domain classics."""
    with (DATA / "books.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return rows[:limit] if limit else rows


def book_prompt(book: dict[str, str]) -> str:
    """The per-item prompt; the bracketed id lets the local server target faults at exact items."""
    return (
        f"[{book['book_id']}] Catalogue this book.\n"
        f"Title: {book['title']}\nAuthor: {book['author']}\nYear of first publication: {book['year']}"
    )


@contextlib.contextmanager
def gemini_endpoint(inject_faults: bool) -> Iterator[tuple[str, str | None]]:
    """(api_key, base_url): the real Gemini API when GEMINI_API_KEY is set, else the local server."""
    key = os.environ.get("GEMINI_API_KEY")
    if key:
        yield key, None
        return
    from prefect_batchllm.testing import Fault, GeminiEmulator

    with GeminiEmulator(latency=(0.05, 0.25), seed=7) as emu:
        if inject_faults:
            emu.faults.add(Fault.status(503), rate=0.06, times=None)  # transient: retried until success
            for book_id in ("b013", "b151"):
                emu.faults.add(
                    Fault.status(400, "Request contains an invalid argument."), contains=f"[{book_id}]"
                )
            emu.faults.add(Fault.safety_block(), contains="[b038]")  # never retried
            emu.faults.add(Fault.invalid_json(), contains="[b101]")  # retried with a correction prompt
        yield "local-demo-key", emu.base_url


@flow(name="batchllm-demo", flow_run_name="catalogue-{limit}-books")
async def demo_flow(
    limit: int = 250,
    model: str = "gemini-2.5-flash",
    max_workers: int = 16,
    requests_per_minute: float | None = None,
    inject_faults: bool = True,
) -> BatchResult:
    """Catalogue the classics shelf: one task run per book, one shared context cache."""
    with gemini_endpoint(inject_faults) as (api_key, base_url):
        block = GeminiCachedModelBlock(
            model=model,
            credentials=GeminiCredentials(api_key=SecretStr(api_key), base_url=base_url),
            system_instruction=SYSTEM_INSTRUCTION,
            cached_contents=[(DATA / "cataloguing_guide.md").read_text(encoding="utf-8")],
            cache_tags={"app": "batchllm-demo"},
        )
        strategy: GeminiStrategy[CatalogueCard] = GeminiStrategy(
            block.get_model(), response_parser=None, response_schema=CatalogueCard
        )
        items = [
            LLMWorkItem(book["book_id"], strategy, book_prompt(book), context=book)
            for book in load_books(limit)
        ]
        config = ProcessorConfig(
            max_workers=max_workers,
            timeout_per_item=60.0,
            retry=RetryConfig(max_attempts=4, initial_wait=0.2, max_wait=2.0),
            rate_limit=RateLimitConfig(requests_per_minute=requests_per_minute, limit_prefix="batchllm-demo"),
            artifact_key="batchllm-demo",
        )
        result: BatchResult = await run_batch(items, config)
        return result


def print_report(result: BatchResult, seconds: float) -> None:
    """The summary table `make demo` prints."""
    replayed = sum(1 for r in result.results if r.replayed)
    rows = [
        ("items", f"{result.total_items}"),
        ("succeeded", f"{result.succeeded}"),
        ("failed", f"{result.failed}  {result.error_categories() or ''}"),
        ("replayed", f"{replayed}  (completed by an earlier run: loaded, not requested again)"),
        ("input tokens", f"{result.total_input_tokens:,}"),
        (
            "  of which cached",
            f"{result.total_cached_tokens:,}  ({result.cache_hit_rate():.1f} % cache hit rate)",
        ),
        ("output tokens", f"{result.total_output_tokens:,}"),
        ("estimated cost", f"${result.estimated_cost_usd:.4f}"),
        ("wall time", f"{seconds:.1f} s  ({result.total_items / max(seconds, 1e-9):.1f} items/s)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nprefect-batchllm demo")
    print("-" * 60)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if result.failed:
        print("\nfailed items")
        for item in result.failed_items():
            error = (item.error or "")[:70]
            print(f"  {item.item_id:<6} {item.error_category:<15} attempts={item.attempts}  {error}")
    print("\nArtifacts (Prefect UI > Artifacts, or the CLI):")
    for key in ("batchllm-demo-summary", "batchllm-demo-failed-items", "batchllm-demo-progress"):
        print(f"  prefect artifact inspect {key}")


def main(argv: list[str] | None = None) -> int:
    """Run the demo flow once and print its summary."""
    import asyncio

    args = [a for a in (argv or []) if a != "-v"]
    limit = int(args[0]) if args else 250
    where = "Gemini API" if os.environ.get("GEMINI_API_KEY") else "the bundled Gemini-compatible server"
    print(f"Cataloguing {limit} books against {where}: one Prefect task run per book ...", flush=True)
    started = time.perf_counter()
    result = asyncio.run(demo_flow(limit=limit))
    print_report(result, time.perf_counter() - started)
    return 0
