"""The batch flow end to end: real Prefect engine + test API, real google-genai SDK over HTTP to the emulator.

Every test tags its prompts with a fresh uuid so persisted results of one test are never replayed by another.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName
from pydantic import BaseModel

from prefect_batchllm import (
    BatchResult,
    GeminiCachedModelBlock,
    GeminiCredentials,
    LLMWorkItem,
    ProcessorConfig,
    RateLimitConfig,
    RetryConfig,
    WorkItemResult,
    run_batch,
    run_batch_prompts,
)
from prefect_batchllm.core.events import Middleware, ProcessingEvent
from prefect_batchllm.core.strategy import LLMCallStrategy, RetryState
from prefect_batchllm.models.gemini import GeminiModel
from prefect_batchllm.prefect.flows import BatchItemsFailed
from prefect_batchllm.prefect.processor import ParallelBatchProcessor
from prefect_batchllm.strategies.gemini import GeminiStrategy
from prefect_batchllm.testing import Fault

pytestmark = pytest.mark.usefixtures("prefect_api")

FAST_RETRY = RetryConfig(max_attempts=5, initial_wait=0.01, max_wait=0.05, jitter=False)


def _tag() -> str:
    return uuid.uuid4().hex[:8]


class Label(BaseModel):
    label: str
    score: int


class Counting(LLMCallStrategy[str]):
    """Counts lifecycle calls; fails items listed in ``fail`` (fatal) or ``flaky`` (once, transient)."""

    def __init__(
        self, fail: set[str] = frozenset(), flaky: set[str] = frozenset(), delay: float = 0.0
    ) -> None:
        self.fail, self.flaky, self.delay = set(fail), set(flaky), delay
        self.prepares = 0
        self.cleanups = 0
        self.executes: list[tuple[str, int]] = []
        self.in_flight = 0
        self.in_flight_at_cleanup: int | None = None
        self.executes_after_cleanup = 0

    async def prepare(self) -> None:
        self.prepares += 1

    async def cleanup(self) -> None:
        self.cleanups += 1
        self.in_flight_at_cleanup = self.in_flight

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> Any:
        item = prompt.split("]")[0].lstrip("[")
        if self.cleanups:
            self.executes_after_cleanup += 1
        self.executes.append((item, attempt))
        self.in_flight += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if item in self.fail:
                raise ValueError(f"{item} is malformed")
            if item in self.flaky and attempt == 1:
                raise ConnectionError("connection reset by peer")
            return prompt.upper(), {"input_tokens": 10, "output_tokens": 5}
        finally:
            self.in_flight -= 1

    def fingerprint(self) -> str:
        # A test double: ``fail`` / ``flaky`` are injected faults and the counters are public for
        # assertions, so neither is "what it computes" (the default fingerprint would hash them).
        return "counting-v1"

    def attempts_by_item(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for item, attempt in self.executes:
            out.setdefault(item, []).append(attempt)
        return out


def _items(strategy: LLMCallStrategy[Any], n: int, tag: str, width: int = 3) -> list[LLMWorkItem[Any, Any]]:
    return [
        LLMWorkItem(f"item-{i:0{width}d}", strategy, f"[item-{i:0{width}d}] {tag} describe book {i}")
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------------------
# The headline scenario


async def test_200_items_with_faults_through_the_real_sdk(emulator: Any) -> None:
    tag = _tag()
    fatal = {"item-013", "item-077"}
    emulator.faults.add(Fault.status(400), contains="[item-013]", times=None)
    emulator.faults.add(Fault.status(400), contains="[item-077]", times=None)
    emulator.faults.add(Fault.safety_block(), contains="[item-101]", times=None)
    emulator.faults.add(Fault.invalid_json(), contains="[item-150]", times=1)
    emulator.faults.add(Fault.invalid_json(), contains="[item-151]", times=1)
    transient = emulator.faults.add(Fault.status(503), rate=0.1, times=None)

    strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", emulator.client()), response_schema=Label)
    items = _items(strategy, 200, tag)
    result = await run_batch(items, ProcessorConfig(max_workers=16, retry=FAST_RETRY))

    assert isinstance(result, BatchResult)
    assert [r.item_id for r in result.results] == [i.item_id for i in items]
    assert {r.item_id for r in result.failed_items()} == fatal | {"item-101"}
    by_id = result.by_id()
    assert {by_id[i].error_category for i in fatal} == {"fatal"}
    assert by_id["item-101"].error_category == "blocked"
    assert by_id["item-101"].gemini_safety_ratings  # blocked answers keep their ratings
    assert all(isinstance(r.output, Label) for r in result.results if r.success)
    assert transient.hits >= 10  # the 10 % fault rate really fired

    for r in result.results:
        requests = emulator.requests_for("generateContent", contains=f"[{r.item_id}]")
        statuses = [q.status for q in requests]
        assert r.attempts == len(requests), r.item_id  # one request per attempt, none hidden
        if r.item_id in fatal or r.item_id == "item-101":
            assert len(requests) == 1, (r.item_id, statuses)  # fatal / blocked: tried once
        else:
            assert statuses[-1] == 200 and requests[-1].fault is None, (r.item_id, statuses)
            # every earlier try was an injected transient or invalid-JSON fault, then it stopped
            assert all(q.fault in ("status", "invalid_json") for q in requests[:-1]), r.item_id
    for item_id in ("item-150", "item-151"):
        assert by_id[item_id].success and by_id[item_id].attempts >= 2
        assert by_id[item_id].metadata.get("corrected") is True

    usage = emulator.usage_totals()
    assert result.total_input_tokens == usage["prompt"]
    assert result.total_output_tokens == usage["candidates"]
    assert result.total_input_tokens > 0


# --------------------------------------------------------------------------------------------------
# Shared cached model from a Block


async def test_50_items_share_one_cache_from_a_block(emulator: Any) -> None:
    tag = _tag()
    credentials = GeminiCredentials(api_key="test-key", base_url=emulator.base_url, api_version="v1beta")
    block = GeminiCachedModelBlock(
        model="gemini-2.5-flash",
        credentials=credentials,
        system_instruction="You label books.",
        cached_contents=[f"Catalogue {tag}: " + "a long shared document. " * 200],
        cache_tags={"suite": "flows", "run": tag},
    )
    await block.asave(f"cached-{tag}", overwrite=True)
    loaded = await GeminiCachedModelBlock.aload(f"cached-{tag}")
    model = loaded.get_model()
    assert loaded.get_model() is model  # one shared model per block instance

    strategy = GeminiStrategy(model)
    items = _items(strategy, 50, tag)
    result = await run_batch(items, ProcessorConfig(max_workers=10, retry=FAST_RETRY))

    assert result.succeeded == 50
    assert emulator.count("cachedContents.create") == 1
    generate = emulator.requests_for("generateContent")
    assert len(generate) == 50
    assert {q.cached_content for q in generate} == {model.cache_name}
    usage = emulator.usage_totals()
    assert result.total_cached_tokens == usage["cached"] > 0
    assert result.total_input_tokens == usage["prompt"]
    assert result.cache_hit_rate() == pytest.approx(100.0 * usage["cached"] / usage["prompt"])
    assert model.cache_name in emulator.caches  # cleanup kept the cache for the next run
    assert emulator.count("cachedContents.delete") == 0


# --------------------------------------------------------------------------------------------------
# Lifecycle


async def test_lifecycle_counts_prepare_once_cleanup_once_execute_per_attempt() -> None:
    tag = _tag()
    strategy = Counting(fail={"item-003"}, flaky={"item-001", "item-004"})
    other = Counting()
    items = [*_items(strategy, 8, tag), LLMWorkItem("extra", other, f"[extra] {tag}")]
    result = await run_batch(items, ProcessorConfig(max_workers=3, retry=FAST_RETRY))

    assert (strategy.prepares, strategy.cleanups, other.prepares, other.cleanups) == (1, 1, 1, 1)
    assert len(strategy.executes) + len(other.executes) == sum(r.attempts for r in result.results)
    attempts = strategy.attempts_by_item()
    assert attempts["item-001"] == [1, 2] and attempts["item-004"] == [1, 2]
    assert attempts["item-003"] == [1]  # fatal: never retried
    assert result.by_id()["item-003"].error_category == "fatal"
    assert result.by_id()["item-001"].attempts == 2
    assert strategy.in_flight_at_cleanup == 0


async def test_cancelled_flow_still_cleans_up_once_and_counts_attempts() -> None:
    tag = _tag()
    strategy = Counting(delay=0.2)
    items = _items(strategy, 40, tag)
    job = asyncio.ensure_future(run_batch(items, ProcessorConfig(max_workers=4, persist_results=False)))
    while len(strategy.executes) < 6:  # noqa: ASYNC110 - polling the strategy's call log
        await asyncio.sleep(0.01)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job

    assert strategy.prepares == 1
    assert strategy.cleanups == 1
    assert strategy.in_flight_at_cleanup == 0 and strategy.executes_after_cleanup == 0
    assert 6 <= len(strategy.executes) < 40
    for item, attempts in strategy.attempts_by_item().items():
        assert attempts == list(range(1, len(attempts) + 1)), item


async def test_prepare_failure_fails_only_that_strategys_items() -> None:
    class BrokenPrepare(Counting):
        async def prepare(self) -> None:
            await super().prepare()
            raise RuntimeError("cache service down")

    tag = _tag()
    broken, fine = BrokenPrepare(), Counting()
    items = [*_items(broken, 3, tag), LLMWorkItem("ok-1", fine, f"[ok-1] {tag}")]
    result = await run_batch(items, ProcessorConfig(persist_results=False, retry=FAST_RETRY))
    assert [r.success for r in result.results] == [False, False, False, True]
    assert all("prepare() failed" in (r.error or "") for r in result.failed_items())
    assert broken.executes == [] and broken.cleanups == 1  # cleaned up even though prepare failed


# --------------------------------------------------------------------------------------------------
# Calling styles and parameter size


def test_sync_call_from_plain_code_and_big_batch_parameters() -> None:
    tag = _tag()
    strategy = Counting()
    filler = "x" * 5000
    items = [LLMWorkItem(f"big-{i:04d}", strategy, f"[big-{i:04d}] {tag} {filler}") for i in range(150)]
    assert sum(len(i.prompt) for i in items) > 600 * 1024  # over Prefect's 512 KiB parameter cap
    state = run_batch(items, ProcessorConfig(max_workers=32, persist_results=False), return_state=True)
    result = state.result()
    assert isinstance(result, BatchResult) and result.succeeded == 150

    async def stored_parameters() -> dict[str, Any]:
        async with get_client() as client:
            run = await client.read_flow_run(state.state_details.flow_run_id)
            return run.parameters

    params = asyncio.run(stored_parameters())
    assert params["items"]["count"] == 150
    assert params["items"]["item_ids"][:2] == ["big-0000", "big-0001"]
    assert params["items"]["prompt_chars"] == sum(len(i.prompt) for i in items)
    assert len(str(params)) < 10_000


def test_run_batch_prompts_sync_and_as_subflow_of_a_sync_flow() -> None:
    tag = _tag()
    strategy = Counting()

    @flow(name="sync-parent")
    def parent() -> BatchResult[Any, Any]:
        return run_batch_prompts([f"[p] {tag} one", f"[p] {tag} two"], strategy, ProcessorConfig())

    result = parent()
    assert isinstance(result, BatchResult)
    assert [r.item_id for r in result.results] == ["item-00000", "item-00001"]
    assert [r.output for r in result.results] == [f"[P] {tag.upper()} ONE", f"[P] {tag.upper()} TWO"]

    plain = run_batch_prompts({"a": f"[a] {tag}", "b": f"[b] {tag}"}, strategy)
    assert [r.item_id for r in plain.results] == ["a", "b"]


async def test_await_and_subflow_of_an_async_flow() -> None:
    tag = _tag()
    strategy = Counting()

    @flow(name="async-parent")
    async def parent() -> tuple[BatchResult[Any, Any], BatchResult[Any, Any]]:
        first = await run_batch(_items(strategy, 3, tag))
        second = await run_batch_prompts([f"[q] {tag}"], strategy)
        return first, second

    first, second = await parent()
    assert first.succeeded == 3 and second.succeeded == 1
    direct = await run_batch(_items(strategy, 2, tag + "d"))
    assert direct.succeeded == 2


# --------------------------------------------------------------------------------------------------
# Reruns and failing the flow run


async def test_fresh_run_replays_completed_items_and_reexecutes_only_failures() -> None:
    tag = _tag()
    first = Counting(fail={"item-002", "item-005"})
    run1 = await run_batch(_items(first, 6, tag), ProcessorConfig(retry=FAST_RETRY))
    assert run1.failed == 2

    second = Counting()  # same class, same fingerprint: a rerun of the same job
    run2 = await run_batch(_items(second, 6, tag), ProcessorConfig(retry=FAST_RETRY))
    assert run2.succeeded == 6
    assert sorted(second.attempts_by_item()) == ["item-002", "item-005"]
    replayed = [r.item_id for r in run2.results if r.replayed]
    assert replayed == ["item-000", "item-001", "item-003", "item-004"]
    assert all(r.token_usage["input_tokens"] == 0 and r.attempts == 0 for r in run2.results if r.replayed)
    assert run2.by_id()["item-000"].output == run1.by_id()["item-000"].output
    assert run2.total_input_tokens == 20  # only the two re-executed items were billed this time


async def test_fail_on_item_failure_ends_the_flow_run_failed_with_the_result() -> None:
    tag = _tag()
    strategy = Counting(fail={"item-001"})
    items = _items(strategy, 3, tag)
    config = ProcessorConfig(fail_on_item_failure=True, persist_results=False, artifact_key=f"fail-{tag}")
    state = await run_batch(items, config, return_state=True)
    assert state.is_failed()
    error = await state.aresult(raise_on_failure=False)
    assert isinstance(error, BatchItemsFailed)
    assert error.result.failed == 1 and error.result.total_items == 3
    assert "1/3 items failed (fatal=1)" in str(error)
    with pytest.raises(BatchItemsFailed) as raised:
        await run_batch(_items(Counting(fail={"item-000"}), 2, tag + "x"), config)
    assert raised.value.result.failed == 1

    async with get_client() as client:
        run = await client.read_flow_run(state.state_details.flow_run_id)
    assert run.state is not None and run.state.is_failed()


# --------------------------------------------------------------------------------------------------
# Hooks: post-processor, observers, middleware, progress callback


async def test_post_processor_failures_are_recorded_not_fatal() -> None:
    tag = _tag()
    seen: list[str] = []

    async def post(result: WorkItemResult[Any, Any]) -> None:
        seen.append(result.item_id)
        if result.item_id == "item-001":
            raise RuntimeError("db down")
        if result.item_id == "item-002":
            await asyncio.sleep(5)

    config = ProcessorConfig(post_processor_timeout=0.1, persist_results=False)
    result = await run_batch(_items(Counting(fail={"item-003"}), 4, tag), config, post)
    assert sorted(seen) == ["item-000", "item-001", "item-002"]  # successes only
    by_id = result.by_id()
    assert by_id["item-001"].success and "RuntimeError: db down" in by_id["item-001"].post_processor_error
    assert by_id["item-002"].success and "timed out" in by_id["item-002"].post_processor_error
    assert by_id["item-000"].post_processor_error is None


async def test_observers_middleware_and_progress_fire_in_order() -> None:
    tag = _tag()
    events: list[tuple[str, str | None]] = []
    order: list[str] = []
    progress: list[tuple[int, int, str]] = []

    class Observer:
        async def on_event(self, event: ProcessingEvent, data: dict[str, Any]) -> None:
            events.append((event.value, data.get("item_id")))

    class Tagging(Middleware):
        def __init__(self, name: str) -> None:
            self.name = name

        async def before_process(self, item: LLMWorkItem[Any, Any]) -> LLMWorkItem[Any, Any] | None:
            order.append(f"before-{self.name}-{item.item_id}")
            if item.item_id == "item-002":
                return None  # skip
            return item

        async def after_process(self, result: WorkItemResult[Any, Any]) -> WorkItemResult[Any, Any]:
            order.append(f"after-{self.name}-{result.item_id}")
            return result

        async def on_error(
            self, item: LLMWorkItem[Any, Any], error: Exception
        ) -> WorkItemResult[Any, Any] | None:
            order.append(f"error-{self.name}-{item.item_id}")
            return None

    def on_progress(done: int, total: int, item_id: str) -> None:
        progress.append((done, total, item_id))

    strategy = Counting(fail={"item-001"}, flaky={"item-000"})
    processor = ParallelBatchProcessor(
        config=ProcessorConfig(max_workers=1, persist_results=False, retry=FAST_RETRY),
        observers=[Observer()],
        middlewares=[Tagging("a"), Tagging("b")],
        progress_callback=on_progress,
    )
    for item in _items(strategy, 3, tag):
        await processor.add_work(item)
    result = await processor.process_all()

    assert [r.success for r in result.results] == [True, False, False]
    assert result.by_id()["item-002"].error_category == "skipped"
    assert events == [
        ("batch_started", None),
        ("item_started", "item-000"),
        ("item_retrying", "item-000"),
        ("item_completed", "item-000"),
        ("item_started", "item-001"),
        ("item_failed", "item-001"),
        ("item_failed", "item-002"),
        ("batch_completed", None),
    ]
    assert order == [
        "before-a-item-000",
        "before-b-item-000",
        "after-b-item-000",
        "after-a-item-000",
        "before-a-item-001",
        "before-b-item-001",
        "error-a-item-001",
        "error-b-item-001",
        "before-a-item-002",
    ]
    assert progress == [(1, 3, "item-000"), (2, 3, "item-001"), (3, 3, "item-002")]
    stats = await processor.get_stats()
    assert (stats["total"], stats["processed"], stats["succeeded"], stats["failed"]) == (3, 3, 1, 2)
    assert stats["retries"] == 1 and stats["total_input_tokens"] == 10


# --------------------------------------------------------------------------------------------------
# Dry run, rate-limit seam


async def test_dry_run_makes_no_network_call(emulator: Any) -> None:
    tag = _tag()
    credentials = GeminiCredentials(api_key="test-key", base_url=emulator.base_url, api_version="v1beta")
    block = GeminiCachedModelBlock(credentials=credentials, cached_contents=[f"doc {tag}"])
    strategy = GeminiStrategy(block.get_model(), response_schema=Label)
    result = await run_batch(_items(strategy, 5, tag), ProcessorConfig(dry_run=True))
    assert result.succeeded == 5
    assert all(isinstance(r.output, Label) for r in result.results)
    assert emulator.requests == []  # not even the cache was created


async def test_rate_limited_item_retries_without_burning_attempts(emulator: Any) -> None:
    tag = _tag()
    emulator.faults.add(Fault.rate_limit(retry_delay_s=0), contains="[item-001]", times=2)
    strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", emulator.client()))
    config = ProcessorConfig(
        retry=RetryConfig(max_attempts=1), rate_limit=RateLimitConfig(cooldown_seconds=0.01)
    )
    result = await run_batch(_items(strategy, 3, tag), config)
    assert result.succeeded == 3  # max_attempts=1, yet two 429s did not fail the item
    assert result.by_id()["item-001"].attempts == 1
    assert emulator.count("generateContent", contains="[item-001]", status=429) == 2


# --------------------------------------------------------------------------------------------------
# Seed compatibility and bad input


async def test_seed_readme_example_runs_unchanged_on_prefect(emulator: Any) -> None:
    """The seed README's "Using Context and Post-Processing" + "Error Handling" example, with a
    pydantic-ai agent on the emulator; only the import line differs from the seed library."""
    from dataclasses import dataclass

    from pydantic_ai import Agent
    from pydantic_ai.models.google import GoogleModel
    from pydantic_ai.providers.google import GoogleProvider

    from prefect_batchllm import LLMWorkItem, ParallelBatchProcessor  # the changed import

    class BookSummary(BaseModel):
        title: str
        summary: str

    agent = Agent(
        GoogleModel("gemini-2.0-flash", provider=GoogleProvider(client=emulator.client())),
        output_type=BookSummary,
    )
    saved: dict[str, Any] = {}

    @dataclass
    class EnrichmentContext:
        work_key: str
        original_title: str

    async def save_to_db(result: WorkItemResult[Any, Any]) -> None:
        if result.success and result.context:
            saved[result.context.work_key] = result.output

    processor = ParallelBatchProcessor(max_workers=5, post_processor=save_to_db)
    tag = _tag()
    for n, title in enumerate(["1984", "Emma", "Dune"]):
        context = EnrichmentContext(work_key=f"/works/OL{n}W", original_title=title)
        work_item = LLMWorkItem(
            item_id=f"work_{n}",
            agent=agent,
            prompt=f"[work_{n}] {tag} Enrich this book: {title}",
            context=context,
        )
        await processor.add_work(work_item)
    result = await processor.process_all()

    print(f"Succeeded: {result.succeeded}/{result.total_items}")
    for item_result in result.results:
        if not item_result.success:
            print(f"Failed: {item_result.item_id} - {item_result.error}")
    assert result.succeeded == 3
    assert sorted(saved) == ["/works/OL0W", "/works/OL1W", "/works/OL2W"]
    assert all(isinstance(v, BookSummary) for v in saved.values())
    assert result.results[1].context.original_title == "Emma"
    assert result.total_input_tokens > 0


async def test_seed_readme_direct_call_and_agent_factory_options(emulator: Any) -> None:
    """The seed README's Option 2 (direct_call + input_data) and Option 3 (agent_factory)."""
    from pydantic_ai import Agent
    from pydantic_ai.models.google import GoogleModel
    from pydantic_ai.providers.google import GoogleProvider

    from prefect_batchllm import LLMWorkItem, ParallelBatchProcessor

    client = emulator.client()
    temperatures: list[float] = []

    async def call_gemini(attempt: int, timeout: float) -> tuple[str, dict[str, int]]:
        response = await client.aio.models.generate_content(model="gemini-2.0-flash", contents="[direct] hi")
        usage = response.usage_metadata
        return response.text, {"input_tokens": usage.prompt_token_count, "output_tokens": 5}

    def create_agent(attempt: int) -> Agent:
        temperatures.append(0.7 + attempt * 0.1)
        return Agent(GoogleModel("gemini-2.0-flash", provider=GoogleProvider(client=client)))

    processor = ParallelBatchProcessor(max_workers=2)
    await processor.add_work(LLMWorkItem(item_id="d1", direct_call=call_gemini, input_data={"id": 1}))
    await processor.add_work(
        LLMWorkItem(item_id="f1", agent_factory=create_agent, prompt=f"[f1] {_tag()} hi")
    )
    result = await processor.process_all()
    assert [r.success for r in result.results] == [True, True], [r.error for r in result.results]
    assert result.results[0].output.startswith("echo: [direct]")
    assert temperatures and emulator.count("generateContent", contains="[direct]") == 1


async def _flow_run_count() -> int:
    async with get_client() as client:
        return len(await client.read_flow_runs())


async def test_bad_input_fails_before_any_task_runs() -> None:
    strategy = Counting()
    before = await _flow_run_count()
    dup = [LLMWorkItem("same", strategy, "[same] a"), LLMWorkItem("same", strategy, "[same] b")]
    with pytest.raises(ValueError, match="duplicate item_id values: 'same'"):
        await run_batch(dup)
    with pytest.raises(ValueError, match="the batch is empty"):
        await run_batch([])
    item = LLMWorkItem("x", strategy, "[x] ok")
    item.prompt = 42  # type: ignore[assignment]
    with pytest.raises(TypeError, match="prompt must be a str"):
        await run_batch([item])

    class TextOnly(Counting):
        accepts_content_parts = False

    with pytest.raises(TypeError, match="takes text prompts only"):
        await run_batch([LLMWorkItem("parts", TextOnly(), ["a", "b"])])
    with pytest.raises(TypeError, match="items must be a sequence of LLMWorkItem"):
        await run_batch("not items")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be a ProcessorConfig"):
        await run_batch([LLMWorkItem("y", strategy, "[y] ok")], {"max_workers": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"conflicts with rate_limit\.requests_per_minute"):
        ProcessorConfig(max_requests_per_minute=10, rate_limit=RateLimitConfig(requests_per_minute=20))
    with pytest.raises(ValueError, match=r"max_workers=3 conflicts with config\.max_workers=5"):
        ParallelBatchProcessor(max_workers=3, config=ProcessorConfig(max_workers=5))
    processor = ParallelBatchProcessor()
    await processor.add_work(LLMWorkItem("z", strategy, "[z] ok"))
    with pytest.raises(ValueError, match="duplicate item_id 'z'"):
        await processor.add_work(LLMWorkItem("z", strategy, "[z] again"))

    assert strategy.prepares == 0 and strategy.executes == []
    assert await _flow_run_count() == before  # no flow run was even created


# --------------------------------------------------------------------------------------------------
# Overhead measurement (reported, not asserted)


async def test_per_item_overhead_200_items(capsys: pytest.CaptureFixture[str]) -> None:
    tag = _tag()
    strategy = Counting()
    started = time.perf_counter()
    result = await run_batch(_items(strategy, 200, tag), ProcessorConfig(max_workers=32))
    elapsed = time.perf_counter() - started
    assert result.succeeded == 200
    with capsys.disabled():
        print(
            f"\n[overhead] 200 no-op items: flow call {elapsed:.2f}s, item phase {result.wall_time_s:.2f}s "
            f"= {1000 * result.wall_time_s / 200:.1f} ms/item (persisted results)"
        )


# --------------------------------------------------------------------------------------------------
# Flow-run retry (what the UI's Retry does to a Failed run) and the failed task run in the API


class FailsOnce(Counting):
    """Fails the listed items on their first execution ever (across flow attempts), fatally."""

    def __init__(self, once: set[str]) -> None:
        super().__init__()
        self.once = set(once)

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> Any:
        item = prompt.split("]")[0].lstrip("[")
        if item in self.once:
            self.once.discard(item)
            self.executes.append((item, attempt))
            raise ValueError(f"{item}: upstream record not ready")
        return await super().execute(prompt, attempt, timeout, state)


async def test_flow_retry_reexecutes_only_failed_items_and_ui_shows_the_reason() -> None:
    tag = _tag()
    strategy = FailsOnce({"item-001", "item-003"})
    retrying = run_batch.with_options(retries=1, retry_delay_seconds=0)
    config = ProcessorConfig(fail_on_item_failure=True, retry=FAST_RETRY)
    state = await retrying(_items(strategy, 5, tag), config, return_state=True)

    assert state.is_completed()  # attempt 1 ended Failed (2 items), the flow retry completed it
    result = await state.aresult()
    assert result.succeeded == 5
    executed = strategy.attempts_by_item()
    assert executed == {
        "item-000": [1],
        "item-001": [1, 1],  # fatal in flow attempt 1, then once more in flow attempt 2
        "item-002": [1],
        "item-003": [1, 1],
        "item-004": [1],
    }
    assert sorted(r.item_id for r in result.results if r.replayed) == ["item-000", "item-002", "item-004"]

    flow_run_id = state.state_details.flow_run_id
    async with get_client() as client:
        for _ in range(150):  # task runs reach the API through events: eventually consistent
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["item-001"])),
            )
            failed = [r for r in runs if r.state is not None and r.state.is_failed()]
            if failed:
                break
            await asyncio.sleep(0.2)
    assert failed, "the failed item-001 task run never reached the API"
    assert "[fatal] ValueError: item-001: upstream record not ready" in (failed[0].state.message or "")


def test_items_may_be_a_generator() -> None:
    tag = _tag()
    strategy = Counting()
    result = run_batch(
        (LLMWorkItem(f"g-{i}", strategy, f"[g-{i}] {tag}") for i in range(3)),
        ProcessorConfig(persist_results=False),
    )
    assert [r.item_id for r in result.results] == ["g-0", "g-1", "g-2"]


# --------------------------------------------------------------------------------------------------
# Review fixes: stale replays, per-item strategies, hooks, robustness, progress, retry timing


async def test_changed_input_data_reexecutes_and_same_inputs_replay() -> None:
    tag = _tag()
    # A deque, not a list: closure values with a stable repr (lists, dicts...) are part of the callable's
    # identity, so a growing call log would (correctly) change the fingerprint on every run.
    calls: collections.deque[Any] = collections.deque()

    async def call(data: dict[str, Any], attempt: int, timeout: float) -> tuple[str, dict[str, int]]:
        calls.append(data["n"])
        return f"{tag}-answer-{data['n']}", {"input_tokens": 3, "output_tokens": 1}

    def items(n: int) -> list[LLMWorkItem[Any, Any]]:
        return [LLMWorkItem(f"d-{tag}", direct_call=call, input_data={"n": n})]

    first = await run_batch(items(1))
    second = await run_batch(items(2))  # same item_id and prompt, different input_data
    assert second.results[0].output == f"{tag}-answer-2" and not second.results[0].replayed
    third = await run_batch(items(2))  # a fresh run with the same inputs still replays
    assert third.results[0].replayed and third.results[0].output == f"{tag}-answer-2"
    assert first.results[0].output == f"{tag}-answer-1"
    assert list(calls) == [1, 2]
    fourth = await run_batch(items(2), ProcessorConfig(refresh_cache=True))
    assert not fourth.results[0].replayed and list(calls) == [1, 2, 2]  # refresh_cache re-executes
    fifth = await run_batch(items(2))
    assert fifth.results[0].replayed and list(calls) == [1, 2, 2]  # and the refreshed result is stored


async def test_changed_lambda_parser_reexecutes(emulator: Any) -> None:
    tag = _tag()
    model = GeminiModel("gemini-2.5-flash", emulator.client())
    items_a = _items(GeminiStrategy(model, response_parser=lambda r: r.text), 2, tag)
    run_a = await run_batch(items_a)
    items_b = _items(GeminiStrategy(model, response_parser=lambda r: r.text.upper()), 2, tag)
    run_b = await run_batch(items_b)
    assert not any(r.replayed for r in run_b.results)
    assert [r.output for r in run_b.results] == [r.output.upper() for r in run_a.results]
    items_c = _items(GeminiStrategy(model, response_parser=lambda r: r.text.upper()), 2, tag)
    run_c = await run_batch(items_c)  # same parser code in a fresh strategy: replayed
    assert all(r.replayed for r in run_c.results)
    assert emulator.count("generateContent") == 4


async def test_custom_strategy_constructor_args_are_part_of_the_fingerprint() -> None:
    class Suffix(LLMCallStrategy[str]):
        def __init__(self, suffix: str) -> None:
            self.suffix = suffix

        async def execute(self, prompt: Any, attempt: int, timeout: float, state: Any = None) -> Any:
            return prompt + self.suffix, {"input_tokens": 1}

    tag = _tag()
    first = await run_batch(_items(Suffix("!"), 1, tag))
    second = await run_batch(_items(Suffix("?"), 1, tag))
    assert first.results[0].output.endswith("!") and second.results[0].output.endswith("?")
    assert not second.results[0].replayed
    assert (await run_batch(_items(Suffix("?"), 1, tag))).results[0].replayed


async def test_post_processor_runs_for_replayed_successes() -> None:
    tag = _tag()
    seen: list[tuple[str, bool]] = []
    fail_first = {"item-001"}

    async def post(result: WorkItemResult[Any, Any]) -> None:
        seen.append((result.item_id, result.replayed))
        if result.item_id in fail_first:
            fail_first.clear()
            raise RuntimeError("db down")

    run1 = await run_batch(_items(Counting(), 2, tag), None, post)
    assert run1.by_id()["item-001"].post_processor_error
    run2 = await run_batch(_items(Counting(), 2, tag), None, post)
    assert all(r.replayed for r in run2.results)
    assert sorted(seen) == [("item-000", False), ("item-000", True), ("item-001", False), ("item-001", True)]
    assert run2.by_id()["item-001"].post_processor_error is None  # the lost write happened now


async def test_middleware_on_error_gets_the_original_exception_with_its_cause() -> None:
    seen: list[BaseException] = []

    class Broken(Counting):
        async def execute(self, prompt: Any, attempt: int, timeout: float, state: Any = None) -> Any:
            try:
                raise KeyError("missing field")
            except KeyError as exc:
                raise ValueError("bad record") from exc

    class Spy(Middleware):
        async def on_error(self, item: Any, error: Exception) -> None:
            seen.append(error)

    tag = _tag()
    result = await run_batch(
        _items(Broken(), 1, tag), ProcessorConfig(persist_results=False), middlewares=[Spy()]
    )
    assert result.failed == 1 and result.results[0].error_category == "fatal"
    assert len(seen) == 1 and isinstance(seen[0], ValueError)
    assert isinstance(seen[0].__cause__, KeyError) and seen[0].__traceback__ is not None


async def test_unexpected_error_outside_the_task_fails_only_that_item() -> None:
    class BadName(Counting):
        @property
        def model_name(self) -> str | None:
            raise RuntimeError("model_name exploded")

        def fingerprint(self) -> str:
            return "bad-name"

    tag = _tag()
    good = Counting()
    items = [*_items(BadName(), 3, tag), LLMWorkItem("fine", good, f"[fine] {tag}")]
    result = await run_batch(items, ProcessorConfig(persist_results=False, retry=FAST_RETRY))
    assert [r.item_id for r in result.results] == [i.item_id for i in items]  # each exactly once
    assert [r.success for r in result.results] == [False, False, False, True]
    assert {r.error_category for r in result.failed_items()} == {"unknown"}
    assert all("model_name exploded" in (r.error or "") for r in result.failed_items())


async def test_unpicklable_persisted_result_becomes_a_failed_item(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect_batchllm.prefect.execution import BatchExecution

    original = BatchExecution._attempts

    async def broken(self: Any, run: Any, item: Any) -> Any:
        if item.item_id == "item-001":
            raise ModuleNotFoundError("No module named 'renamed_module'")
        return await original(self, run, item)

    monkeypatch.setattr(BatchExecution, "_attempts", broken)
    result = await run_batch(_items(Counting(), 3, _tag()), ProcessorConfig(persist_results=False))
    assert [r.success for r in result.results] == [True, False, True]
    failed = result.by_id()["item-001"]
    assert failed.error_category == "unknown" and "renamed_module" in (failed.error or "")


async def test_prepare_runs_before_the_first_execute() -> None:
    log: list[str] = []

    class Logged(Counting):
        async def prepare(self) -> None:
            log.append("prepare-start")
            await asyncio.sleep(0.2)
            log.append("prepare-end")

        async def execute(self, prompt: Any, attempt: int, timeout: float, state: Any = None) -> Any:
            log.append("execute")
            return await super().execute(prompt, attempt, timeout, state)

        async def cleanup(self) -> None:
            log.append("cleanup")

    await run_batch(_items(Logged(), 4, _tag()), ProcessorConfig(max_workers=4, persist_results=False))
    assert log == ["prepare-start", "prepare-end", *["execute"] * 4, "cleanup"]


async def test_strategy_swapped_in_by_middleware_is_prepared_once_and_cleaned_up() -> None:
    log: list[str] = []

    class Ordered(Counting):
        async def prepare(self) -> None:
            await asyncio.sleep(0.1)
            log.append("prepare")
            await super().prepare()

        async def execute(self, prompt: Any, attempt: int, timeout: float, state: Any = None) -> Any:
            log.append("execute")
            return await super().execute(prompt, attempt, timeout, state)

    swapped = Ordered()

    class Swap(Middleware):
        async def before_process(self, item: LLMWorkItem[Any, Any]) -> LLMWorkItem[Any, Any]:
            return LLMWorkItem(item.item_id, swapped, item.prompt, item.context)

    original = Counting()
    result = await run_batch(
        _items(original, 6, _tag()),
        ProcessorConfig(max_workers=6, persist_results=False),
        middlewares=[Swap()],
    )
    assert result.succeeded == 6
    assert (swapped.prepares, swapped.cleanups) == (1, 1)
    assert log == ["prepare", *["execute"] * 6]
    assert original.executes == [] and (original.prepares, original.cleanups) == (1, 1)


async def test_per_item_strategies_skip_noop_lifecycle_tasks_and_bound_prepares(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect_batchllm.prefect import execution as flows_module

    task_calls: list[str] = []
    real_prepare, real_cleanup = flows_module.prepare_strategy, flows_module.cleanup_strategy

    async def spy_prepare(*args: Any, **kwargs: Any) -> Any:
        task_calls.append("prepare")
        return await real_prepare(*args, **kwargs)

    async def spy_cleanup(*args: Any, **kwargs: Any) -> Any:
        task_calls.append("cleanup")
        return await real_cleanup(*args, **kwargs)

    monkeypatch.setattr(flows_module, "prepare_strategy", spy_prepare)
    monkeypatch.setattr(flows_module, "cleanup_strategy", spy_cleanup)

    async def call(data: int, attempt: int, timeout: float) -> tuple[int, dict[str, int]]:
        return data * 2, {"input_tokens": 1}

    items = [LLMWorkItem(f"n-{i}", direct_call=call, input_data=i) for i in range(20)]
    result = await run_batch(items, ProcessorConfig(max_workers=4, persist_results=False))
    assert result.succeeded == 20 and task_calls == []  # 20 strategies, no no-op lifecycle tasks

    in_flight = peak = 0

    class Slow(Counting):
        async def prepare(self) -> None:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1
            await super().prepare()

    strategies = [Slow() for _ in range(8)]
    tag = _tag()
    items = [LLMWorkItem(f"s-{i}", s, f"[s-{i}] {tag}") for i, s in enumerate(strategies)]
    result = await run_batch(items, ProcessorConfig(max_workers=2, persist_results=False))
    assert result.succeeded == 8 and peak <= 2
    assert all((s.prepares, s.cleanups) == (1, 1) for s in strategies)
    assert task_calls.count("prepare") == 8 and task_calls.count("cleanup") == 8


async def test_two_concurrent_batches_in_one_loop_stay_separate() -> None:
    tag = _tag()
    a, b = Counting(fail={"a-001"}), Counting()
    items_a = [LLMWorkItem(f"a-{i:03d}", a, f"[a-{i:03d}] {tag}") for i in range(7)]
    items_b = [LLMWorkItem(f"b-{i:03d}", b, f"[b-{i:03d}] {tag}") for i in range(4)]
    config = ProcessorConfig(max_workers=3, persist_results=False, retry=FAST_RETRY)
    ra, rb = await asyncio.gather(run_batch(items_a, config), run_batch(items_b, config))
    assert (ra.total_items, ra.succeeded, ra.failed) == (7, 6, 1)
    assert (rb.total_items, rb.succeeded, rb.failed) == (4, 4, 0)
    assert [r.item_id for r in ra.results] == [i.item_id for i in items_a]
    assert [r.item_id for r in rb.results] == [i.item_id for i in items_b]
    assert ra.total_input_tokens == 60 and rb.total_input_tokens == 40
    assert (a.prepares, a.cleanups, b.prepares, b.cleanups) == (1, 1, 1, 1)


async def test_progress_artifact_moves_while_the_batch_runs() -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = f"progress-{_tag()}"
    seen: list[float] = []

    async def on_progress(done: int, total: int, item_id: str) -> None:
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{key}-progress"]))
            )
        seen.extend(float(a.data) for a in artifacts if a.data is not None)

    config = ProcessorConfig(
        max_workers=1,
        progress_interval=1,
        persist_results=False,
        artifact_key=key,
        progress_callback_timeout=30,
    )
    # Progress is published at most once a second: 5 items x 0.4 s one at a time outlast that.
    await run_batch(_items(Counting(delay=0.4), 5, _tag()), config, progress_callback=on_progress)
    assert any(0 < value < 100 for value in seen), seen  # an intermediate value, read mid-run


async def test_retryable_503_with_retry_info_waits_at_least_the_delay(emulator: Any) -> None:
    from google.genai import errors as genai_errors

    client = emulator.client()
    delay = 1.5

    async def call(prompt: str, attempt: int, timeout: float) -> tuple[str, dict[str, int]]:
        response = await client.aio.models.generate_content(model="gemini-2.5-flash", contents=prompt)
        if attempt == 1:
            raise genai_errors.ServerError(
                503,
                {
                    "error": {
                        "code": 503,
                        "message": "The model is overloaded.",
                        "status": "UNAVAILABLE",
                        "details": [
                            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{delay}s"}
                        ],
                    }
                },
            )
        return response.text, {"input_tokens": 1}

    from prefect_batchllm.strategies.direct import DirectCallStrategy

    tag = _tag()
    fast = RetryConfig(max_attempts=3, initial_wait=0.01, max_wait=0.01, jitter=False)
    result = await run_batch(
        [LLMWorkItem("r", DirectCallStrategy(call), f"[r] {tag}")], ProcessorConfig(retry=fast)
    )
    assert result.succeeded == 1 and result.results[0].attempts == 2
    first, second = emulator.requests_for("generateContent", contains=f"[r] {tag}")
    assert second.started_at - first.finished_at >= delay


async def test_persisted_results_expire_after_cache_expiration_s() -> None:
    # A long expiry replays; a short one that has certainly passed re-executes (both hold on slow machines).
    kept, expiring = _tag(), _tag()
    await run_batch(_items(Counting(), 1, kept), ProcessorConfig(cache_expiration_s=600))
    assert (
        (await run_batch(_items(Counting(), 1, kept), ProcessorConfig(cache_expiration_s=600)))
        .results[0]
        .replayed
    )
    await run_batch(_items(Counting(), 1, expiring), ProcessorConfig(cache_expiration_s=0.5))
    await asyncio.sleep(1.5)
    later = Counting()
    rerun = await run_batch(_items(later, 1, expiring), ProcessorConfig(cache_expiration_s=0.5))
    assert not rerun.results[0].replayed
    assert later.executes == [("item-000", 1)]


# --------------------------------------------------------------------------------------------------
# Chunked execution (ProcessorConfig.chunk_size): one task run per chunk, same per-item guarantees


async def _task_runs_of(flow_run_id: Any, expected: int) -> list[Any]:
    """The flow run's task runs once ``expected`` of them reached the API (events: eventually consistent)."""
    async with get_client() as client:
        for _ in range(150):
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            finals = [r for r in runs if r.state is not None and r.state.is_final()]
            if len(finals) >= expected:
                return runs
            await asyncio.sleep(0.2)
    raise AssertionError(f"only {len(finals)} of {expected} final task runs reached the API")


async def test_chunked_run_keeps_per_item_guarantees_over_the_real_sdk(emulator: Any) -> None:
    tag = _tag()
    emulator.faults.add(Fault.status(400), contains="[item-013]", times=None)
    emulator.faults.add(Fault.safety_block(), contains="[item-101]", times=None)
    emulator.faults.add(Fault.invalid_json(), contains="[item-050]", times=1)
    transient = emulator.faults.add(Fault.status(503), rate=0.1, times=None)

    strategy = GeminiStrategy(GeminiModel("gemini-2.5-flash", emulator.client()), response_schema=Label)
    items = _items(strategy, 120, tag)
    config = ProcessorConfig(max_workers=8, retry=FAST_RETRY, chunk_size=25)
    state = await run_batch(items, config, return_state=True)
    result = await state.aresult()

    assert [r.item_id for r in result.results] == [i.item_id for i in items]
    by_id = result.by_id()
    assert {r.item_id for r in result.failed_items()} == {"item-013", "item-101"}
    assert by_id["item-013"].error_category == "fatal"
    assert by_id["item-101"].error_category == "blocked"
    assert by_id["item-050"].success and by_id["item-050"].metadata.get("corrected") is True
    assert transient.hits >= 5
    for r in result.results:
        requests = emulator.requests_for("generateContent", contains=f"[{r.item_id}]")
        assert r.attempts == len(requests), r.item_id  # one request per attempt, in the same chunk task
        if not r.success:
            assert len(requests) == 1, r.item_id  # fatal / blocked: tried once, never retried
    usage = emulator.usage_totals()
    assert result.total_input_tokens == usage["prompt"] > 0
    assert result.total_output_tokens == usage["candidates"]

    runs = await _task_runs_of(state.state_details.flow_run_id, expected=5)
    chunks = {r.name: r for r in runs if r.name.startswith("chunk-")}
    assert sorted(chunks) == [
        "chunk-1: item-000 .. item-024",
        "chunk-2: item-025 .. item-049",
        "chunk-3: item-050 .. item-074",
        "chunk-4: item-075 .. item-099",
        "chunk-5: item-100 .. item-119",
    ]
    assert not [r for r in runs if r.name.startswith("item-")]  # no per-item task runs
    failed = {name for name, r in chunks.items() if r.state.is_failed()}
    assert failed == {"chunk-1: item-000 .. item-024", "chunk-5: item-100 .. item-119"}
    message = chunks["chunk-1: item-000 .. item-024"].state.message or ""
    assert "1 of 25 items failed (fatal=1): item-013" in message


async def test_chunked_items_run_concurrently_within_max_workers_and_retry_transients() -> None:
    tag = _tag()
    strategy = Counting(fail={"item-007"}, flaky={"item-003", "item-021"}, delay=0.02)
    peak = 0
    original = strategy.execute

    async def tracking(*args: Any, **kwargs: Any) -> Any:
        nonlocal peak
        peak = max(peak, strategy.in_flight + 1)
        return await original(*args, **kwargs)

    strategy.execute = tracking  # type: ignore[method-assign]
    config = ProcessorConfig(max_workers=6, chunk_size=4, retry=FAST_RETRY)
    result = await run_batch(_items(strategy, 30, tag), config)

    assert result.total_items == 30 and result.failed == 1
    assert 2 <= peak <= 6  # items ran concurrently, across chunks, never beyond max_workers
    attempts = strategy.attempts_by_item()
    assert attempts["item-003"] == [1, 2] and attempts["item-021"] == [1, 2]  # transient: retried once
    assert attempts["item-007"] == [1]  # fatal: not retried
    assert result.by_id()["item-003"].attempts == 2
    assert strategy.prepares == 1 and strategy.cleanups == 1


async def test_chunked_and_per_item_runs_replay_each_others_results() -> None:
    tag = _tag()
    first = Counting(fail={"item-002", "item-005"})
    run1 = await run_batch(_items(first, 8, tag), ProcessorConfig(retry=FAST_RETRY, chunk_size=3))
    assert run1.failed == 2

    second = Counting()  # per-item mode replays what the chunked run persisted
    run2 = await run_batch(_items(second, 8, tag), ProcessorConfig(retry=FAST_RETRY))
    assert sorted(second.attempts_by_item()) == ["item-002", "item-005"]
    assert [r.item_id for r in run2.results if not r.replayed] == ["item-002", "item-005"]
    assert run2.by_id()["item-000"].output == run1.by_id()["item-000"].output
    assert run2.total_input_tokens == 20

    third = Counting()  # and chunked mode replays what the per-item run persisted
    run3 = await run_batch(_items(third, 8, tag), ProcessorConfig(retry=FAST_RETRY, chunk_size=5))
    assert third.executes == [] and all(r.replayed for r in run3.results) and run3.succeeded == 8
    assert run3.total_input_tokens == 0

    fourth = Counting()  # refresh_cache re-executes everything in chunked mode too
    config = ProcessorConfig(retry=FAST_RETRY, chunk_size=5, refresh_cache=True)
    run4 = await run_batch(_items(fourth, 8, tag), config)
    assert len(fourth.executes) == 8 and not any(r.replayed for r in run4.results)


async def test_chunked_flow_retry_reexecutes_only_failed_items() -> None:
    tag = _tag()
    strategy = FailsOnce({"item-001", "item-006"})
    retrying = run_batch.with_options(retries=1, retry_delay_seconds=0)
    config = ProcessorConfig(fail_on_item_failure=True, retry=FAST_RETRY, chunk_size=4)
    state = await retrying(_items(strategy, 8, tag), config, return_state=True)

    assert state.is_completed()
    result = await state.aresult()
    assert result.succeeded == 8
    executed = strategy.attempts_by_item()
    assert executed["item-001"] == [1, 1] and executed["item-006"] == [1, 1]
    assert all(executed[f"item-{i:03d}"] == [1] for i in (0, 2, 3, 4, 5, 7))
    assert sorted(r.item_id for r in result.results if not r.replayed) == ["item-001", "item-006"]


async def test_chunk_size_is_validated() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"ProcessorConfig\.chunk_size"):
            ProcessorConfig(chunk_size=bad)
    with pytest.raises(TypeError, match=r"ProcessorConfig\.chunk_size"):
        ProcessorConfig(chunk_size=2.5)  # type: ignore[arg-type]


async def test_a_failed_chunk_logs_counts_not_outputs(caplog: pytest.LogCaptureFixture) -> None:
    """A chunk with a failed item ends Failed carrying its results; what Prefect logs of that state names
    counts and ids, never the items' outputs."""
    tag = _tag()
    strategy = Counting(fail={"item-002"})
    with caplog.at_level(logging.DEBUG):
        result = await run_batch(
            _items(strategy, 6, tag), ProcessorConfig(chunk_size=3, persist_results=False, retry=FAST_RETRY)
        )
    assert result.failed == 1 and result.succeeded == 5
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "1 of 3 items failed (fatal=1): item-002" in logged
    assert tag.upper() not in logged  # every output is the upper-cased prompt, which holds the tag
