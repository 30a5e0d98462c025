"""Gemini Batch API jobs over the real ``google-genai`` SDK: build, split, submit, poll, read back.

Provider layer (no Prefect): the orchestration layer decides *which* requests form a job and persists job
names; this module turns :class:`BatchRequest` objects (built by a strategy exactly as its online call
would be) into jobs - inline requests for small jobs, a JSONL file uploaded through the Files API for large
ones, several jobs above the size / count limits - and reads every job's answers back keyed by request key.

Wire facts (google-genai 2.34, ``batches.py``): inline requests carry ``metadata={"key": ...}`` which the
service echoes on each inlined response; file requests are JSONL lines ``{"key", "request"}`` and answers
are JSONL lines ``{"key", "response" | "error"}`` in the file named by ``dest.file_name``. A job can succeed
with some requests failed: each answer is checked on its own.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.genai import errors as genai_errors
from google.genai import types

if TYPE_CHECKING:
    from google import genai

__all__ = [
    "ANSWERED_STATES",
    "BatchAnswer",
    "BatchRequest",
    "FAILED_STATES",
    "JobPlan",
    "JOB_STATE_CATEGORIES",
    "answer_error",
    "find_job",
    "get_job",
    "plan_jobs",
    "read_answers",
    "request_wire",
    "state_name",
    "submit_job",
    "wait_for_job",
]

#: Gemini's documented limits: inline requests under 20 MB in total, an input file up to 2 GB.
INLINE_LIMIT_BYTES = 20_000_000
FILE_LIMIT_BYTES = 2_000_000_000
#: Job states after which no answer will ever arrive (``JobState`` names).
SUCCEEDED = "JOB_STATE_SUCCEEDED"
FAILED_STATES = frozenset({"JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"})
ANSWERED_STATES = frozenset({SUCCEEDED}) | FAILED_STATES
#: Error category of an item left unanswered by a job that ended in that state.
JOB_STATE_CATEGORIES = {
    "JOB_STATE_FAILED": "batch_failed",
    "JOB_STATE_CANCELLED": "batch_cancelled",
    "JOB_STATE_EXPIRED": "batch_expired",
    SUCCEEDED: "batch_no_answer",
}
#: Category of an item whose job had not ended when the run stopped waiting (re-run to collect).
PENDING_CATEGORY = "batch_pending"
#: Prefix of the display names of jobs this package submits (``batchllm-<job key>``).
DISPLAY_PREFIX = "batchllm-"

# google.rpc canonical codes -> HTTP status, so per-request errors classify like online errors.
_RPC_TO_HTTP = {
    1: 499,
    2: 500,
    3: 400,
    4: 504,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    15: 500,
    16: 401,
}


@dataclass
class BatchRequest:
    """One request of a job: ``key`` maps its answer back (the item id); contents and config as online."""

    key: str
    contents: Any
    config: types.GenerateContentConfig | None


@dataclass
class JobPlan:
    """The requests of one job and how they travel: ``"inline"`` or ``"file"`` (uploaded JSONL)."""

    requests: list[BatchRequest]
    mode: str
    size_bytes: int
    lines: list[bytes] = field(default_factory=list, repr=False)  # JSONL lines (file mode)

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.requests]


@dataclass
class BatchAnswer:
    """A job's answer to one request: a ``GenerateContentResponse`` or an error (google.rpc Status)."""

    key: str
    response: types.GenerateContentResponse | None = None
    error: dict[str, Any] | None = None


def state_name(job: types.BatchJob | None) -> str:
    """``JOB_STATE_RUNNING``-style name of a job's state (``JOB_STATE_UNSPECIFIED`` when unknown)."""
    state = getattr(job, "state", None)
    if state is None:
        return "JOB_STATE_UNSPECIFIED"
    return str(getattr(state, "value", state))


def _api_client(client: genai.Client) -> Any:
    return client._api_client  # the SDK's own converters need it (model names, schema transforms)


def request_wire(client: genai.Client, request: BatchRequest) -> dict[str, Any]:
    """The JSON the SDK sends for ``request`` as an inlined request: ``{"request": {...}, "metadata"}``.

    Built by the SDK's own converter (``_InlinedRequest_to_mldev``), so a JSONL line carries exactly the
    ``GenerateContentRequest`` an inline job (or an online call) would.
    """
    from google.genai import _common
    from google.genai import batches as sdk_batches

    inlined = types.InlinedRequest(
        contents=request.contents, config=request.config, metadata={"key": request.key}
    )
    wire = sdk_batches._InlinedRequest_to_mldev(_api_client(client), inlined)
    return _common.encode_unserializable_types(_common.convert_to_dict(wire))


def plan_jobs(
    client: genai.Client,
    requests: Sequence[BatchRequest],
    *,
    inline_max_bytes: int = 10_000_000,
    max_requests_per_job: int = 50_000,
    file_max_bytes: int = FILE_LIMIT_BYTES,
) -> list[JobPlan]:
    """Split ``requests`` (in order) into jobs: inline while the whole job stays under ``inline_max_bytes``,
    else JSONL files, each under ``file_max_bytes`` and at most ``max_requests_per_job`` requests.

    Deterministic: the same requests always give the same jobs (job keys derive from them).
    """
    if not requests:
        return []
    lines: list[bytes] = []
    for request in requests:
        wire = request_wire(client, request)
        entry = {"key": request.key, "request": wire.get("request", {})}
        encoded = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode()
        if len(encoded) + 1 > file_max_bytes:
            raise ValueError(
                f"batch request {request.key!r} is {len(encoded):,} bytes, above the {file_max_bytes:,}-byte "
                "input file limit of a Gemini batch job; shorten its prompt or run it online"
            )
        lines.append(encoded)
    total = sum(len(line) + 1 for line in lines)
    if total <= inline_max_bytes and len(requests) <= max_requests_per_job:
        return [JobPlan(list(requests), "inline", total)]
    plans: list[JobPlan] = []
    start, size = 0, 0
    for index, line in enumerate(lines):
        count = index - start
        if count and (count >= max_requests_per_job or size + len(line) + 1 > file_max_bytes):
            plans.append(JobPlan(list(requests[start:index]), "file", size, lines[start:index]))
            start, size = index, 0
        size += len(line) + 1
    plans.append(JobPlan(list(requests[start:]), "file", size, lines[start:]))
    return plans


async def submit_job(client: genai.Client, model: str, plan: JobPlan, display_name: str) -> types.BatchJob:
    """Create one job for ``plan`` through ``client.aio.batches.create`` (uploading its JSONL first)."""
    config = types.CreateBatchJobConfig(display_name=display_name)
    if plan.mode == "inline":
        src: Any = [
            types.InlinedRequest(contents=r.contents, config=r.config, metadata={"key": r.key})
            for r in plan.requests
        ]
    else:
        data = b"\n".join(plan.lines) + b"\n"
        uploaded = await client.aio.files.upload(
            file=io.BytesIO(data),
            config=types.UploadFileConfig(display_name=display_name, mime_type="jsonl"),
        )
        if not uploaded.name:
            raise RuntimeError("the Files API returned no file name for the batch input")
        src = uploaded.name
    return await client.aio.batches.create(model=model, src=src, config=config)


async def get_job(client: genai.Client, name: str) -> types.BatchJob:
    """``client.aio.batches.get`` (one request)."""
    return await client.aio.batches.get(name=name)


async def find_job(client: genai.Client, display_name: str, *, max_jobs: int = 1000) -> types.BatchJob | None:
    """The newest job named ``display_name`` that is running or succeeded (a crashed submitter's job),
    among the ``max_jobs`` most recently listed.

    Jobs that ended FAILED / CANCELLED / EXPIRED are never adopted: their items are submitted again.
    """
    best: types.BatchJob | None = None
    pager = await client.aio.batches.list(config=types.ListBatchJobsConfig(page_size=100))
    seen = 0
    async for job in pager:
        seen += 1
        if seen > max_jobs:
            break
        if job.display_name != display_name or state_name(job) in FAILED_STATES:
            continue
        if best is None or (job.create_time and best.create_time and job.create_time > best.create_time):
            best = job
    return best


async def wait_for_job(
    client: genai.Client,
    name: str,
    *,
    interval_s: float,
    max_interval_s: float,
    deadline: float | None,
    on_poll: Callable[[types.BatchJob], Awaitable[None]] | None = None,
    on_error: Callable[[Exception], Awaitable[bool]] | None = None,
    backoff: float = 1.5,
) -> types.BatchJob:
    """Poll ``name`` until it ends or ``deadline`` (``time.monotonic()``) passes; returns the last state.

    Waits on the event loop (``asyncio.sleep``: no thread held), ``interval_s`` first, growing by
    ``backoff`` per poll up to ``max_interval_s``, never sleeping past the deadline. A failed poll is
    raised unless ``on_error(exc)`` returns True (keep polling: a 503 must not end a day-long wait).
    """
    delay = interval_s
    job: types.BatchJob | None = None
    while True:
        try:
            job = await get_job(client, name)
        except Exception as exc:
            if on_error is None or not await on_error(exc):
                raise
        else:
            if on_poll is not None:
                await on_poll(job)
            if state_name(job) in ANSWERED_STATES:
                return job
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            if job is None:
                job = await get_job(client, name)  # never polled successfully: one last try, or raise
            return job
        sleep = delay if deadline is None else min(delay, max(0.0, deadline - now))
        await asyncio.sleep(sleep)
        delay = min(delay * backoff, max_interval_s)


async def read_answers(
    client: genai.Client, job: types.BatchJob, keys: Sequence[str] | None = None
) -> dict[str, BatchAnswer]:
    """Every answer a finished job holds, by request key (inline responses or the responses file).

    Answers are matched by their key (``metadata.key`` inline, ``key`` in the file). An answer without one
    falls back to its position, which the API documents as the input order, when ``keys`` (the job's
    request keys in order) is given and the counts agree; otherwise it is an error, never a guess.
    """
    dest = job.dest
    answers: dict[str, BatchAnswer] = {}
    if dest is None:
        return answers
    if dest.inlined_responses:
        inlined_all = dest.inlined_responses
        for index, inlined in enumerate(inlined_all):
            key = (inlined.metadata or {}).get("key") or _positional(keys, index, len(inlined_all), job)
            error = inlined.error.model_dump(exclude_none=True) if inlined.error is not None else None
            answers[key] = BatchAnswer(key, inlined.response, error)
        return answers
    if dest.file_name:
        data = await client.aio.files.download(file=dest.file_name)
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        for index, line in enumerate(lines):
            if not isinstance(line.get("key"), str):
                line = {**line, "key": _positional(keys, index, len(lines), job)}
            answers.update([_file_answer(line)])
    return answers


def _positional(keys: Sequence[str] | None, index: int, count: int, job: types.BatchJob) -> str:
    if keys is None or len(keys) != count:
        raise RuntimeError(
            f"batch job {job.name}: answer {index} carries no request key and the answers ({count}) cannot "
            f"be matched to the requests ({len(keys) if keys is not None else 'unknown'}) by position"
        )
    return keys[index]


def _file_answer(line: dict[str, Any]) -> tuple[str, BatchAnswer]:
    from google.genai import batches as sdk_batches

    key = line["key"]
    if isinstance(line.get("error"), dict):
        return key, BatchAnswer(key, None, line["error"])
    raw = line.get("response")
    if not isinstance(raw, dict):
        return key, BatchAnswer(key, None, {"code": 13, "message": "the batch answer has no response"})
    converted = sdk_batches._GenerateContentResponse_from_mldev(raw)
    return key, BatchAnswer(key, types.GenerateContentResponse._from_response(response=converted, kwargs={}))


def answer_error(error: dict[str, Any]) -> genai_errors.APIError:
    """The SDK exception an online call would have raised for a per-request error (google.rpc Status),
    so the error classifier treats both modes alike (429 rate limited, 5xx transient, 400 fatal...)."""
    code = error.get("code")
    status = error.get("status")
    http = code if isinstance(code, int) and code >= 100 else _RPC_TO_HTTP.get(code or 2, 500)
    body = {"error": {"code": http, "message": str(error.get("message") or "batch request failed")}}
    if status:
        body["error"]["status"] = status
    if error.get("details"):
        body["error"]["details"] = error["details"]
    cls = genai_errors.ClientError if 400 <= http < 500 else genai_errors.ServerError
    return cls(http, body)
