"""Reliability under faults (issue 14): flaky prepare/cleanup, early stop on systematic errors, the cost
budget, malformed input. Real Prefect engine + test API, real google-genai SDK over HTTP to the emulator.

Every test tags its prompts with a fresh uuid so persisted results of one test are never replayed by another.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import SecretStr

from prefect_batchllm import (
    GeminiCachedModelBlock,
    GeminiCredentials,
    LLMWorkItem,
    ProcessorConfig,
    RetryConfig,
    run_batch,
)
from prefect_batchllm.core.events import ProcessingEvent
from prefect_batchllm.models.gemini import GeminiCachedModel, GeminiModel
from prefect_batchllm.strategies.gemini import GeminiStrategy
from prefect_batchllm.testing import Fault, GeminiEmulator

pytestmark = pytest.mark.usefixtures("prefect_api")

MODEL = "gemini-2.5-flash"
FAST_RETRY = RetryConfig(max_attempts=3, initial_wait=0.05, max_wait=0.2, jitter=False)


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _items(strategy: Any, n: int, tag: str) -> list[LLMWorkItem[Any, Any]]:
    return [LLMWorkItem(f"item-{i:03d}", strategy, f"[item-{i:03d}] ({tag}) classify") for i in range(n)]


class Recorder:
    """An observer that keeps every event (with its data)."""

    def __init__(self) -> None:
        self.events: list[tuple[ProcessingEvent, dict[str, Any]]] = []

    async def on_event(self, event: ProcessingEvent, data: dict[str, Any]) -> None:
        self.events.append((event, dict(data)))

    def of(self, kind: ProcessingEvent) -> list[dict[str, Any]]:
        return [data for event, data in self.events if event is kind]


class DeletingStrategy(GeminiStrategy[str]):
    """Deletes its cache in ``cleanup()`` (an API call that can fail), to exercise the cleanup path."""

    async def cleanup(self) -> None:
        await self.model.delete_cache()


# -- 1. prepare() / cleanup() get the items' retries ------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "fault"),
    [
        ("cachedContents.list", Fault.status(503)),
        ("cachedContents.create", Fault.rate_limit(1.0)),
    ],
    ids=["503-on-cache-lookup", "429-retryinfo-on-cache-create"],
)
async def test_one_transient_prepare_error_does_not_fail_the_batch(
    emulator: GeminiEmulator, endpoint: str, fault: Fault
) -> None:
    tag = _tag()
    block = GeminiCachedModelBlock(
        model=MODEL,
        credentials=GeminiCredentials(
            api_key=SecretStr("prepare-key"), base_url=emulator.base_url, api_version="v1beta"
        ),
        cached_contents=[f"({tag}) shared context " * 50],
    )
    strategy = GeminiStrategy(block.get_model())
    emulator.faults.add(fault, endpoint=endpoint, times=1)
    result = await run_batch(_items(strategy, 6, tag), ProcessorConfig(retry=FAST_RETRY, max_workers=3))

    assert result.succeeded == 6, [(r.item_id, r.error_category, r.error) for r in result.failed_items()]
    faulted = emulator.requests_for(endpoint)
    assert [r.status for r in faulted][:2] == [fault.code, 200]
    if fault.kind == "rate_limit":  # the provider's RetryInfo delay was waited out before the retry
        assert faulted[1].started_at - faulted[0].finished_at >= 0.9
    assert emulator.count("cachedContents.create", status=200) == 1
    assert emulator.count("generateContent", status=200) == 6
    assert all(
        r.cached_content == strategy.model.cache_name for r in emulator.requests_for("generateContent")
    )


async def test_permanent_prepare_failure_fails_items_with_the_real_category(emulator: GeminiEmulator) -> None:
    tag = _tag()
    model = GeminiCachedModel(MODEL, emulator.client(), [f"({tag}) context " * 50])
    emulator.faults.add(Fault.status(503), endpoint="cachedContents.list", times=None)
    result = await run_batch(_items(GeminiStrategy(model), 3, tag), ProcessorConfig(retry=FAST_RETRY))

    assert result.failed == 3
    assert {r.error_category for r in result.results} == {"transient"}  # not "fatal" for a 503
    assert {r.attempts for r in result.results} == {0}  # never attempted
    assert all("prepare() failed" in (r.error or "") and "503" in (r.error or "") for r in result.results)
    assert emulator.count("cachedContents.list") == FAST_RETRY.max_attempts
    assert emulator.count("generateContent") == 0


async def test_prepare_with_a_rejected_key_fails_items_as_auth_without_retries() -> None:
    tag = _tag()
    with GeminiEmulator(valid_api_keys={"the-right-key"}) as emu:
        model = GeminiCachedModel(MODEL, emu.client(api_key="a-wrong-key-1"), [f"({tag}) context " * 50])
        result = await run_batch(_items(GeminiStrategy(model), 3, tag), ProcessorConfig(retry=FAST_RETRY))
        assert {r.error_category for r in result.results} == {"auth"}
        assert emu.count("cachedContents.list") == 1 and emu.count("generateContent") == 0


async def test_one_transient_cleanup_error_is_retried(emulator: GeminiEmulator) -> None:
    tag = _tag()
    model = GeminiCachedModel(MODEL, emulator.client(), [f"({tag}) context " * 50])
    strategy = DeletingStrategy(model)
    emulator.faults.add(Fault.status(503), endpoint="cachedContents.delete", times=1)
    result = await run_batch(_items(strategy, 2, tag), ProcessorConfig(retry=FAST_RETRY))
    assert result.succeeded == 2
    assert [r.status for r in emulator.requests_for("cachedContents.delete")] == [503, 200]
    assert emulator.caches == {}


# -- 3. early stop on systematic errors -------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 25], ids=["per-item", "chunked"])
async def test_rejected_key_stops_the_batch_early(chunk_size: int | None) -> None:
    tag = _tag()
    workers = 8
    recorder = Recorder()
    with GeminiEmulator(valid_api_keys={"the-right-key"}) as emu:
        strategy = GeminiStrategy(GeminiModel(MODEL, emu.client(api_key="revoked-key-2")))
        config = ProcessorConfig(max_workers=workers, retry=FAST_RETRY, chunk_size=chunk_size)
        result = await run_batch(_items(strategy, 200, tag), config, observers=[recorder])
        sent = emu.count("generateContent")

        # Rerun with a fixed key: every item runs now (nothing was persisted as a success).
        fixed = GeminiStrategy(GeminiModel(MODEL, emu.client(api_key="the-right-key")))
        rerun = await run_batch(
            _items(fixed, 200, tag), ProcessorConfig(max_workers=workers, chunk_size=chunk_size)
        )

    assert sent <= 2 * workers + 3, sent
    assert [r.item_id for r in result.results] == [f"item-{i:03d}" for i in range(200)]
    assert result.failed == 200 and {r.error_category for r in result.results} == {"auth"}
    not_sent = [r for r in result.results if r.attempts == 0]
    assert len(not_sent) >= 200 - sent
    assert all(
        (r.error or "").startswith("not attempted: batch stopped after 3 consecutive auth errors")
        for r in not_sent
    )
    stops = recorder.of(ProcessingEvent.BATCH_STOPPED)
    assert len(stops) == 1 and stops[0]["category"] == "auth"
    assert recorder.of(ProcessingEvent.BATCH_COMPLETED)[0]["stopped"] == "auth"
    assert rerun.succeeded == 200 and not any(r.replayed for r in rerun.results)


async def test_stop_threshold_is_configurable_and_can_be_disabled() -> None:
    tag = _tag()
    with GeminiEmulator(valid_api_keys={"the-right-key"}) as emu:
        strategy = GeminiStrategy(GeminiModel(MODEL, emu.client(api_key="revoked-key-3")))
        config = ProcessorConfig(max_workers=2, retry=FAST_RETRY, stop_after_systematic_errors=None)
        result = await run_batch(_items(strategy, 12, tag), config)
        assert emu.count("generateContent") == 12  # disabled: every item is tried (once: auth is final)
        assert {r.attempts for r in result.results} == {1}
        emu.reset()
        config = ProcessorConfig(max_workers=1, retry=FAST_RETRY, stop_after_systematic_errors=5)
        result = await run_batch(_items(strategy, 12, f"{tag}-b"), config)
        assert emu.count("generateContent") == 5
        assert [r.attempts for r in result.results] == [1] * 5 + [0] * 7
    with pytest.raises(ValueError, match="stop_after_systematic_errors"):
        ProcessorConfig(stop_after_systematic_errors=-1)


async def test_unknown_model_and_daily_quota_stop_the_batch(emulator: GeminiEmulator) -> None:
    tag = _tag()
    strategy = GeminiStrategy(GeminiModel("no-such-model", emulator.client()))
    result = await run_batch(_items(strategy, 30, tag), ProcessorConfig(max_workers=2, retry=FAST_RETRY))
    assert {r.error_category for r in result.results} == {"not_found"}
    assert emulator.count("generateContent") <= 2 * 2 + 3

    emulator.reset()
    emulator.faults.add(Fault.rate_limit(30.0, per_day=True), times=None)
    strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client()))
    result = await run_batch(_items(strategy, 30, tag), ProcessorConfig(max_workers=2, retry=FAST_RETRY))
    assert {r.error_category for r in result.results} == {"quota_exhausted"}
    assert emulator.count("generateContent") <= 2 * 2 + 3


# -- budget -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 10], ids=["per-item", "chunked"])
async def test_budget_stop_sends_nothing_after_the_stop(
    emulator: GeminiEmulator, chunk_size: int | None
) -> None:
    from prefect_batchllm.core.pricing import price_for

    tag = _tag()
    n = 60
    strategy = GeminiStrategy(
        GeminiModel(MODEL, emulator.client()), generation_config={"max_output_tokens": 64}
    )
    # What the whole batch costs, measured on a dry run of the same prompts through the emulator.
    probe = await run_batch(
        _items(strategy, n, f"{tag}-probe"), ProcessorConfig(max_workers=4, persist_results=False)
    )
    full_cost = sum(
        price_for(MODEL).cost(r.token_usage["input_tokens"], r.token_usage["output_tokens"])
        for r in probe.results
    )
    emulator.reset()
    budget = full_cost / 3
    recorder = Recorder()
    config = ProcessorConfig(max_workers=4, max_cost_usd=budget, chunk_size=chunk_size)
    result = await run_batch(_items(strategy, n, tag), config, observers=[recorder])

    assert [r.item_id for r in result.results] == [f"item-{i:03d}" for i in range(n)]
    stopped = [r for r in result.results if r.error_category == "budget_exceeded"]
    done = [r for r in result.results if r.success]
    assert len(done) + len(stopped) == n
    assert 0 < len(done) <= n // 3 + 4 and len(stopped) >= n - n // 3 - 4
    assert all(r.attempts == 0 and (r.error or "").startswith("not attempted: budget") for r in stopped)
    assert emulator.count("generateContent") == len(done)  # nothing sent for the stopped items
    assert len(recorder.of(ProcessingEvent.BUDGET_EXCEEDED)) == 1
    spent = sum(
        price_for(MODEL).cost(r.token_usage["input_tokens"], r.token_usage["output_tokens"]) for r in done
    )
    assert spent <= budget * 1.05

    # Rerun with a larger budget: the completed items replay, the stopped ones run now.
    more = await run_batch(_items(strategy, n, tag), ProcessorConfig(max_workers=4, chunk_size=chunk_size))
    assert more.succeeded == n and sum(r.replayed for r in more.results) == len(done)


def test_budget_needs_a_known_price(emulator: GeminiEmulator) -> None:
    strategy = GeminiStrategy(GeminiModel("my-custom-model", emulator.client()))
    with pytest.raises(ValueError, match="register_price"):
        run_batch(_items(strategy, 2, _tag()), ProcessorConfig(max_cost_usd=1.0))


# -- 5. malformed input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 5], ids=["per-item", "chunked"])
async def test_malformed_parts_and_overlong_prompts_are_invalid_input_never_sent(
    emulator: GeminiEmulator, chunk_size: int | None
) -> None:
    from prefect_batchllm.core.model_limits import register_input_limit

    tag = _tag()
    strategy = GeminiStrategy(GeminiModel("gemini-test-small", emulator.client()))
    register_input_limit("gemini-test-small", 1000)
    items = [
        LLMWorkItem("none-part", strategy, [None]),
        LLMWorkItem("int-part", strategy, [f"({tag})", 123]),
        LLMWorkItem("too-long", strategy, f"({tag}) " + "word " * 2000),
        LLMWorkItem("fine", strategy, f"({tag}) a fine prompt"),
    ]
    try:
        result = await run_batch(items, ProcessorConfig(retry=FAST_RETRY, chunk_size=chunk_size))
    finally:
        register_input_limit("gemini-test-small", None)
    by_id = result.by_id()
    for item_id in ("none-part", "int-part", "too-long"):
        assert by_id[item_id].error_category == "invalid_input", by_id[item_id]
        assert by_id[item_id].attempts == 0
    assert "content part 0 is NoneType" in by_id["none-part"].error
    assert "content part 1 is int" in by_id["int-part"].error
    assert "estimated input tokens" in by_id["too-long"].error
    assert by_id["fine"].success
    assert emulator.count("generateContent") == 1


# -- 2. secrets never reach Prefect's records -------------------------------------------------------------


def _files_containing(root: str, needle: bytes) -> list[str]:
    import os

    found = []
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            try:
                with open(path, "rb") as handle:
                    if needle in handle.read():
                        found.append(path)
            except OSError:
                continue
    return found


@pytest.mark.parametrize("source", ["credentials-block", "raw-genai-client"])
async def test_echoed_key_appears_nowhere(
    emulator: GeminiEmulator, source: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    import logging
    import os

    from prefect.logging.handlers import APILogHandler

    caplog.set_level(logging.INFO)
    tag = _tag()
    key = f"sk-{source}-{uuid.uuid4().hex}"  # unique per test: the session's PREFECT_HOME is shared

    def model(label: str) -> GeminiCachedModel:
        contents = [f"({tag}-{label}) shared context " * 40]
        if source == "credentials-block":
            credentials = GeminiCredentials(
                api_key=SecretStr(key), base_url=emulator.base_url, api_version="v1beta"
            )
            return GeminiCachedModelBlock(
                model=MODEL, credentials=credentials, cached_contents=contents
            ).get_model()
        from google import genai
        from google.genai import types

        options = types.HttpOptions(base_url=emulator.base_url, api_version="v1beta", retry_options=None)
        return GeminiCachedModel(MODEL, genai.Client(api_key=key, http_options=options), contents)

    echo = Fault.echo_api_key
    # prepare: one 503 echoing the key on the cache lookup (retried), then a permanent 400 on one model's
    # cache creation; items: a retried 500 and a final 400; cleanup: the cache delete fails with a 400.
    emulator.faults.add(echo(503), endpoint="cachedContents.list", times=1)
    emulator.faults.add(echo(400), endpoint="cachedContents.create", contains=f"({tag}-broken)", times=None)
    emulator.faults.add(echo(500), contains="[item-001]", times=None)
    emulator.faults.add(echo(400), contains="[item-002]", times=None)
    emulator.faults.add(echo(400), endpoint="cachedContents.delete", times=None)

    results = []
    for chunk_size in (None, 3):
        good, broken = DeletingStrategy(model("good")), DeletingStrategy(model("broken"))
        items = [*_items(good, 4, f"{tag}-{chunk_size}"), LLMWorkItem("b-0", broken, f"({tag}) b")]
        config = ProcessorConfig(retry=FAST_RETRY, chunk_size=chunk_size, artifact_key=f"secret-{tag}")
        results.append(await run_batch(items, config))
    await APILogHandler.aflush()

    echoed = [r for r in emulator.requests if r.fault == "echo_api_key"]
    assert {r.endpoint for r in echoed} == {
        "cachedContents.list",
        "cachedContents.create",
        "generateContent",
        "cachedContents.delete",
    }
    assert all(r.api_key == key for r in echoed)  # the server really echoed this key
    for result in results:
        by_id = result.by_id()
        assert by_id["item-000"].success and by_id["item-003"].success
        assert by_id["item-001"].error_category == "transient" and by_id["item-002"].error_category == "fatal"
        assert "prepare() failed" in by_id["b-0"].error and "key=***" in by_id["b-0"].error
        assert "key=***" in by_id["item-001"].error
        assert key not in repr(result.results) and key not in result.to_dataframe().to_csv()
    assert key not in caplog.text
    out, err = capfd.readouterr()
    assert key not in out and key not in err
    # Everything Prefect wrote: PREFECT_HOME (results, local storage) and the API's database (the test
    # harness keeps it in its own temp dir), SQLite WAL included.
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    db_dir = os.path.dirname(str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value()).split(":///", 1)[-1])
    roots = [os.environ["PREFECT_HOME"], db_dir]
    for root in roots:
        assert _files_containing(root, key.encode()) == [], root
    # The scan did see this run's records: the masked messages are in the database.
    assert _files_containing(db_dir, b"key=***"), db_dir


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.parquet", b""), ("corrupt.parquet", b"PAR1 not really parquet PAR1"), ("empty.csv", b"")],
)
def test_unreadable_table_names_the_file(tmp_path: Any, name: str, content: bytes) -> None:
    from prefect_batchllm.tables import read_table

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot read") as info:
        read_table(path)
    assert str(path) in str(info.value)


async def test_flow_level_error_reaches_prefect_masked(
    emulator: GeminiEmulator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    from prefect_batchllm.prefect import flows
    from prefect_batchllm.prefect.flows import BatchFlowError

    key = f"sk-flow-{uuid.uuid4().hex}"
    strategy = GeminiStrategy(GeminiModel(MODEL, emulator.client(api_key=key)))

    async def broken_admission(config: ProcessorConfig, **options: Any) -> Any:
        raise RuntimeError(f"limits service rejected request with key={key}")

    monkeypatch.setattr(flows, "_admission_for", broken_admission)
    with pytest.raises(BatchFlowError, match=r"key=\*\*\*") as info:
        await run_batch(_items(strategy, 2, _tag()), ProcessorConfig())
    assert key not in str(info.value) and info.value.__cause__ is None
    await APILogHandler.aflush()
    assert key not in caplog.text
    db_dir = os.path.dirname(str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value()).split(":///", 1)[-1])
    for root in (os.environ["PREFECT_HOME"], db_dir):
        assert _files_containing(root, key.encode()) == [], root


async def test_pydantic_ai_agent_key_is_masked(emulator: GeminiEmulator) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.google import GoogleModel
    from pydantic_ai.providers.google import GoogleProvider

    from prefect_batchllm.strategies.pydantic_ai import PydanticAIStrategy

    key = f"sk-agent-{uuid.uuid4().hex}"
    agent = Agent(GoogleModel(MODEL, provider=GoogleProvider(client=emulator.client(api_key=key))))
    emulator.faults.add(Fault.echo_api_key(400), times=None)
    result = await run_batch(_items(PydanticAIStrategy(agent), 2, _tag()), ProcessorConfig(retry=FAST_RETRY))
    assert result.failed == 2 and all("key=***" in (r.error or "") for r in result.results)
    assert key not in repr(result.results)
    assert all(r.api_key == key for r in emulator.requests)
