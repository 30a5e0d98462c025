"""Gemini Batch API and Files API state for the emulator (jobs, uploads, stored files).

Wire shapes follow what google-genai's ``batches.py`` / ``files.py`` send and parse (see the project's
gemini-batch notes): a job is a long-running Operation whose ``metadata`` is the ``GenerateContentBatch``
resource (the SDK reads only ``name`` and ``metadata.*``, including ``metadata.output``); files come from
Google's resumable upload protocol and are downloaded from ``files/{id}:download?alt=media``.

The store knows nothing about generation: when a job's processing delay has passed it calls the
``execute`` callback (the emulator's shared generate logic) once per request, in input order.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect_batchllm.core.schema_fake import key_of

from ._wire import (
    Reply,
    content_chars,
    error_reply,
    json_reply,
    rfc3339,
    tokens_for_chars,
    user_text,
)

__all__ = [
    "BATCH_STATES",
    "TERMINAL_STATES",
    "BatchJob",
    "BatchRequest",
    "BatchStore",
    "OutcomeRule",
    "StoredFile",
    "grpc_code",
    "rpc_status",
]

_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
BATCH_STATES = (
    "BATCH_STATE_PENDING",
    "BATCH_STATE_RUNNING",
    "BATCH_STATE_SUCCEEDED",
    "BATCH_STATE_FAILED",
    "BATCH_STATE_CANCELLED",
    "BATCH_STATE_EXPIRED",
)
TERMINAL_STATES = frozenset(BATCH_STATES[2:])
DEFAULT_INLINE_LIMIT_BYTES = 20 * 1024 * 1024  # documented inline batch request size (about 20 MB)
DEFAULT_FILE_LIMIT_BYTES = 2 * 1024 * 1024 * 1024  # documented Files API limit per file (2 GB)
DEFAULT_MAX_ACTIVE_BATCHES = 100  # documented concurrent batch requests
FILE_TTL_S = 48 * 3600.0  # uploaded files are deleted after 48 h
UPLOAD_GRANULARITY = 8 * 1024 * 1024
_ID_ALPHABET = string.ascii_lowercase + string.digits
# google.rpc.Code for the HTTP statuses the emulator produces (Status inside a batch uses these).
_GRPC_CODES = {
    400: 3,
    401: 16,
    403: 7,
    404: 5,
    409: 6,
    429: 8,
    499: 1,
    500: 13,
    501: 12,
    502: 14,
    503: 14,
    504: 4,
}

BatchDelay = float | tuple[float, float]


def grpc_code(http_status: int) -> int:
    """The google.rpc.Code for an HTTP status (2 = UNKNOWN when there is no mapping)."""
    return _GRPC_CODES.get(http_status, 2)


def rpc_status(http_status: int, message: str) -> dict[str, Any]:
    """A google.rpc.Status as batch outputs carry it: ``{"code": <rpc code>, "message": ...}``."""
    return {"code": grpc_code(http_status), "message": message}


def _new_id(rng: random.Random, n: int = 12) -> str:
    return "".join(rng.choice(_ID_ALPHABET) for _ in range(n))


def _int64(n: int) -> str:
    return str(int(n))


def _state(name: str) -> str:
    """Accept "EXPIRED", "expired", "BATCH_STATE_EXPIRED" or "JOB_STATE_EXPIRED"."""
    text = str(name).upper().removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_")
    state = f"BATCH_STATE_{text}"
    if state not in BATCH_STATES:
        raise ValueError(f"unknown batch state {name!r}; expected one of {', '.join(BATCH_STATES)}")
    return state


@dataclass
class StoredFile:
    """A file in the emulated Files API (uploaded by a client or generated as a batch output)."""

    name: str  # "files/ID"
    display_name: str
    mime_type: str
    data: bytes
    create_time: float
    source: str  # "UPLOADED" | "GENERATED"

    def resource(self, base_url: str, api_version: str) -> dict[str, Any]:
        """The File resource as the API returns it."""
        file_id = self.name.removeprefix("files/")
        out: dict[str, Any] = {
            "name": self.name,
            "mimeType": self.mime_type,
            "sizeBytes": _int64(len(self.data)),
            "createTime": rfc3339(self.create_time),
            "updateTime": rfc3339(self.create_time),
            "expirationTime": rfc3339(self.create_time + FILE_TTL_S),
            "sha256Hash": base64.b64encode(hashlib.sha256(self.data).hexdigest().encode()).decode(),
            "uri": f"{base_url}/{api_version or 'v1beta'}/files/{file_id}",
            "state": "ACTIVE",
            "source": self.source,
        }
        if self.display_name:
            out["displayName"] = self.display_name
        if self.source == "GENERATED":
            out["downloadUri"] = (
                f"{base_url}/download/{api_version or 'v1beta'}/files/{file_id}:download?alt=media"
            )
        return out


@dataclass
class _Upload:
    """An open resumable upload session."""

    upload_id: str
    name: str
    display_name: str
    mime_type: str
    size: int | None
    data: bytearray = field(default_factory=bytearray)


@dataclass
class BatchRequest:
    """One request of a job: the GenerateContentRequest JSON plus its inline metadata or file key."""

    request: dict[str, Any] | None
    metadata: dict[str, Any] | None = None  # inline jobs
    key: str | None = None  # file jobs
    error: str | None = None  # set when the input line could not be used

    @property
    def label(self) -> str | None:
        """The key a result is matched by: the file line's key or ``metadata["key"]``."""
        if self.key is not None:
            return self.key
        if isinstance(self.metadata, dict) and self.metadata.get("key") is not None:
            return str(self.metadata["key"])
        return None

    @property
    def prompt_text(self) -> str:
        return user_text((self.request or {}).get("contents"))

    @property
    def input_tokens(self) -> int:
        """The request's prompt tokens by the emulator's tokenizer (what it enqueues)."""
        request = self.request or {}
        chars = content_chars(request.get("contents")) + content_chars(request.get("systemInstruction"))
        return tokens_for_chars(chars) if chars else 0


@dataclass
class BatchJob:
    """One batch job and everything the emulator knows about it."""

    name: str  # "batches/ID"
    model: str  # without "models/"
    display_name: str
    requests: list[BatchRequest]
    input_file: str | None
    created: float  # time.time()
    created_mono: float  # time.monotonic(), the base of the processing delay
    state: str = "BATCH_STATE_PENDING"
    updated: float = 0.0
    ended: float | None = None
    running_since: float | None = None  # monotonic
    outputs: list[dict[str, Any]] | None = None
    output_file: str | None = None
    succeeded: int = 0
    failed: int = 0

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    def operation(self, *, include_output: bool = True) -> dict[str, Any]:
        """The Operation the API returns for this job (output only once it SUCCEEDED)."""
        n = len(self.requests)
        pending = 0 if self.state == "BATCH_STATE_SUCCEEDED" else n
        metadata: dict[str, Any] = {
            "@type": _BATCH_TYPE,
            "model": f"models/{self.model}",
            "displayName": self.display_name,
            "createTime": rfc3339(self.created),
            "updateTime": rfc3339(self.updated or self.created),
            "batchStats": {
                "requestCount": _int64(n),
                "pendingRequestCount": _int64(pending),
                "successfulRequestCount": _int64(self.succeeded),
                "failedRequestCount": _int64(self.failed),
            },
            "state": self.state,
            "name": self.name,
        }
        if self.input_file:
            metadata["inputConfig"] = {"fileName": self.input_file}
        if self.ended is not None:
            metadata["endTime"] = rfc3339(self.ended)
        op: dict[str, Any] = {"name": self.name, "metadata": metadata}
        if not self.done:
            return op
        op["done"] = True
        if self.state == "BATCH_STATE_SUCCEEDED" and include_output:
            output: dict[str, Any]
            if self.output_file is not None:
                output = {"responsesFile": self.output_file}
            else:
                output = {"inlinedResponses": {"inlinedResponses": list(self.outputs or [])}}
            metadata["output"] = output
            op["response"] = {"@type": _OUTPUT_TYPE, **output}
        elif self.state == "BATCH_STATE_FAILED":
            op["error"] = {"code": 13, "message": "The batch failed to complete."}
        return op


@dataclass
class OutcomeRule:
    """Jobs with a prompt containing ``contains`` (any job if None) end in ``state``, ``times`` times."""

    state: str
    contains: str | None = None
    times: int | None = None
    hits: int = 0


Execute = Callable[[BatchJob, BatchRequest], dict[str, Any]]


class BatchStore:
    """Jobs, files and upload sessions, with the state machine PENDING -> RUNNING -> terminal.

    States advance lazily whenever a job is read (GET, list, the emulator's inspection helpers): a job
    is PENDING for ``delay[0]`` seconds after creation, then RUNNING for ``delay[1]`` seconds, then its
    requests run (through ``execute``) and it ends SUCCEEDED, or in the state an outcome rule gives it.
    The delay is read at every check, so raising it holds jobs and lowering it releases them.
    """

    def __init__(self, execute: Execute, *, seed: int = 0) -> None:
        self._execute = execute
        self._lock = threading.RLock()  # taken before the emulator's own lock, never after it
        self._rng = random.Random(f"batches:{seed}")
        self.jobs: dict[str, BatchJob] = {}
        self.files: dict[str, StoredFile] = {}
        self._uploads: dict[str, _Upload] = {}
        self.delay: BatchDelay = 0.0
        self.inline_limit_bytes = DEFAULT_INLINE_LIMIT_BYTES
        self.file_limit_bytes = DEFAULT_FILE_LIMIT_BYTES
        self.max_active: int | None = DEFAULT_MAX_ACTIVE_BATCHES
        self.enqueued_token_limit: int | None = None
        self.default_outcome = "BATCH_STATE_SUCCEEDED"
        self.outcome_rules: list[OutcomeRule] = []

    # -- configuration ---------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.jobs.clear()
            self.files.clear()
            self._uploads.clear()
            self.outcome_rules.clear()
            self.default_outcome = "BATCH_STATE_SUCCEEDED"

    def set_outcome(self, state: str, contains: str | None = None, times: int | None = None) -> None:
        """How jobs end once their delay has passed: the default, or a rule (prompt marker and/or count)."""
        terminal = _state(state)
        if terminal not in TERMINAL_STATES:
            raise ValueError(f"a batch outcome must be a terminal state, got {state!r}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        with self._lock:
            if contains is None and times is None:
                self.default_outcome = terminal
            else:
                self.outcome_rules.append(OutcomeRule(terminal, contains, times))

    def _delays(self) -> tuple[float, float]:
        delay = self.delay
        if isinstance(delay, tuple):
            pending, running = float(delay[0]), float(delay[1])
        else:
            pending = running = float(delay)
        if pending < 0 or running < 0 or math.isnan(pending) or math.isnan(running):
            raise ValueError("batch_delay must be >= 0 (seconds, or a (pending_s, running_s) pair)")
        return pending, running

    # -- state machine -----------------------------------------------------------------------------

    def advance(self, job: BatchJob) -> None:
        """Move a job forward to the state its age and the current delay give it."""
        with self._lock:
            if job.done:
                return
            now = time.monotonic()
            pending_s, running_s = self._delays()
            if job.state == "BATCH_STATE_PENDING" and now - job.created_mono >= pending_s:
                job.state = "BATCH_STATE_RUNNING"
                job.running_since = job.created_mono + pending_s
                job.updated = time.time()
            if (
                job.state == "BATCH_STATE_RUNNING"
                and job.running_since is not None
                and now - job.running_since >= running_s
            ):
                self._finish(job, self._outcome_for(job))

    def _outcome_for(self, job: BatchJob) -> str:
        for rule in self.outcome_rules:
            if rule.times is not None and rule.hits >= rule.times:
                continue
            if rule.contains is None or any(rule.contains in r.prompt_text for r in job.requests):
                rule.hits += 1
                return rule.state
        return self.default_outcome

    def finish(self, name: str, state: str) -> BatchJob:
        """End a job now in ``state`` (a no-op if it already ended)."""
        terminal = _state(state)
        if terminal not in TERMINAL_STATES:
            raise ValueError(f"finish needs a terminal state, got {state!r}")
        with self._lock:
            job = self.jobs.get(_batch_name(name))
            if job is None:
                raise KeyError(f"no batch job named {name!r}")
            if not job.done:
                self._finish(job, terminal)
            return job

    def _finish(self, job: BatchJob, state: str) -> None:
        if state == "BATCH_STATE_SUCCEEDED":
            outputs = [self._run(job, request) for request in job.requests]
            job.succeeded = sum(1 for o in outputs if "response" in o)
            job.failed = len(outputs) - job.succeeded
            if job.input_file is not None:
                job.output_file = self._write_output(job, outputs)
            else:
                job.outputs = outputs
        job.state = state
        job.ended = job.updated = time.time()

    def _run(self, job: BatchJob, request: BatchRequest) -> dict[str, Any]:
        entry = self._execute(job, request)
        if job.input_file is not None:
            line: dict[str, Any] = {}
            if request.key is not None:
                line["key"] = request.key
            line.update(entry)
            return line
        if request.metadata is not None:
            entry = {**entry, "metadata": request.metadata}
        return entry

    def _write_output(self, job: BatchJob, lines: list[dict[str, Any]]) -> str:
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        name = f"files/batch-{job.name.removeprefix('batches/')}"
        self.files[name] = StoredFile(name, "", "application/jsonl", data, time.time(), "GENERATED")
        return name

    # -- batch endpoints ---------------------------------------------------------------------------

    def create(self, model: str, body: dict[str, Any] | None, raw_size: int) -> Reply:
        batch = (body or {}).get("batch")
        if not isinstance(batch, dict):
            return error_reply(400, "* BatchGenerateContentRequest.batch: batch is required\n")
        config = key_of(batch, "inputConfig")
        if not isinstance(config, dict):
            return error_reply(
                400, "* BatchGenerateContentRequest.batch.input_config: input_config is required\n"
            )
        inline = config.get("requests")
        file_name = key_of(config, "fileName")
        if (inline is None) == (file_name is None):
            return error_reply(
                400,
                "* BatchGenerateContentRequest.batch.input_config: exactly one of requests or file_name\n",
            )
        requests: list[BatchRequest]
        if inline is not None:
            if raw_size > self.inline_limit_bytes:
                return error_reply(
                    400, f"Request payload size exceeds the limit: {self.inline_limit_bytes} bytes."
                )
            items = inline.get("requests") if isinstance(inline, dict) else None
            if not isinstance(items, list) or not items:
                return error_reply(
                    400,
                    "* BatchGenerateContentRequest.batch.input_config.requests.requests: must not be empty\n",
                )
            requests = []
            for i, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get("request"), dict):
                    return error_reply(
                        400,
                        f"* BatchGenerateContentRequest.batch.input_config.requests.requests[{i}].request: "
                        "request is required\n",
                    )
                metadata = item.get("metadata")
                requests.append(
                    BatchRequest(
                        _camel_keys(item["request"]), metadata if isinstance(metadata, dict) else None
                    )
                )
            input_file = None
        else:
            input_file = _file_name(str(file_name))
            with self._lock:
                stored = self.files.get(input_file)
            if stored is None:
                return error_reply(403, _file_denied(input_file))
            requests = _parse_jsonl(stored.data)
            if not requests:
                return error_reply(400, f"The input file {input_file} contains no requests.")
        now = time.time()
        with self._lock:
            for existing in self.jobs.values():
                self.advance(existing)
            active = [j for j in self.jobs.values() if not j.done]
            if self.max_active is not None and len(active) >= self.max_active:
                return error_reply(
                    429,
                    f"Too many concurrent batch jobs: {len(active)} are pending or running and the limit "
                    f"is {self.max_active}. Retry after some of them finish.",
                )
            if self.enqueued_token_limit is not None:
                enqueued = sum(r.input_tokens for j in active if j.model == model for r in j.requests)
                wanted = sum(r.input_tokens for r in requests)
                if enqueued + wanted > self.enqueued_token_limit:
                    return error_reply(
                        429,
                        f"Enqueued token limit exceeded for models/{model}: {enqueued} tokens are "
                        f"enqueued, this batch adds {wanted} and the limit is {self.enqueued_token_limit}.",
                    )
            job_id = _new_id(self._rng, 24)
            job = BatchJob(
                name=f"batches/{job_id}",
                model=model,
                display_name=str(key_of(batch, "displayName") or ""),
                requests=requests,
                input_file=input_file,
                created=now,
                created_mono=time.monotonic(),
                updated=now,
            )
            self.jobs[job.name] = job
            return json_reply(200, job.operation())

    def get(self, name: str) -> Reply:
        with self._lock:
            job = self.jobs.get(name)
            if job is None:
                return error_reply(404, f"Batch {name} not found.")
            self.advance(job)
            return json_reply(200, job.operation())

    def list(self, query: dict[str, list[str]]) -> Reply:
        try:
            page_size = int((query.get("pageSize") or ["50"])[0])
            offset = int((query.get("pageToken") or ["0"])[0] or 0)
        except ValueError:
            return error_reply(400, "Invalid page token or size.")
        page_size = min(max(page_size, 1), 1000)
        with self._lock:
            jobs = sorted(self.jobs.values(), key=lambda j: j.created_mono, reverse=True)
            for job in jobs:
                self.advance(job)
            ops = [j.operation(include_output=False) for j in jobs]
        payload: dict[str, Any] = {}
        page = ops[offset : offset + page_size]
        if page:
            payload["operations"] = page
        if offset + page_size < len(ops):
            payload["nextPageToken"] = str(offset + page_size)
        return json_reply(200, payload)

    def cancel(self, name: str) -> Reply:
        with self._lock:
            job = self.jobs.get(name)
            if job is None:
                return error_reply(404, f"Batch {name} not found.")
            self.advance(job)
            if not job.done:
                self._finish(job, "BATCH_STATE_CANCELLED")
            return json_reply(200, {})

    def delete(self, name: str) -> Reply:
        with self._lock:
            if self.jobs.pop(name, None) is None:
                return error_reply(404, f"Batch {name} not found.")
            return json_reply(200, {})

    # -- files -------------------------------------------------------------------------------------

    def start_upload(self, headers: Any, body: dict[str, Any] | None, base_url: str) -> Reply:
        if str(headers.get("X-Goog-Upload-Protocol", "")).lower() != "resumable":
            return error_reply(
                400, "Only the resumable upload protocol is supported (X-Goog-Upload-Protocol)."
            )
        if str(headers.get("X-Goog-Upload-Command", "")).lower() != "start":
            return error_reply(400, "A resumable upload must begin with X-Goog-Upload-Command: start.")
        meta = (body or {}).get("file") or {}
        if not isinstance(meta, dict):
            return error_reply(400, "* CreateFileRequest.file: must be an object\n")
        # The SDK sends the File with snake_case keys; protobuf JSON accepts both spellings.
        size_text = headers.get("X-Goog-Upload-Header-Content-Length") or key_of(meta, "sizeBytes")
        try:
            size = int(size_text) if size_text is not None else None
        except (TypeError, ValueError):
            return error_reply(400, f"Invalid upload size {size_text!r}.")
        if size is not None and size > self.file_limit_bytes:
            return error_reply(
                400, f"File size {size} bytes exceeds the maximum of {self.file_limit_bytes} bytes per file."
            )
        mime = str(headers.get("X-Goog-Upload-Header-Content-Type") or key_of(meta, "mimeType") or "")
        with self._lock:
            requested = meta.get("name")
            name = _file_name(str(requested)) if requested else f"files/{_new_id(self._rng)}"
            if name in self.files:
                return error_reply(409, f"File {name} already exists.")
            upload_id = _new_id(self._rng, 32)
            self._uploads[upload_id] = _Upload(
                upload_id,
                name,
                str(key_of(meta, "displayName") or ""),
                mime or "application/octet-stream",
                size,
            )
        url = f"{base_url}/upload/v1beta/files?upload_id={upload_id}&upload_protocol=resumable"
        return Reply(
            200,
            b"",
            headers={
                "X-Goog-Upload-URL": url,
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-Chunk-Granularity": str(UPLOAD_GRANULARITY),
            },
        )

    def upload_chunk(
        self, upload_id: str, headers: Any, raw: bytes, base_url: str, api_version: str
    ) -> Reply:
        """One ``upload`` / ``upload, finalize`` POST; every answer carries X-Goog-Upload-Status."""

        def fail(code: int, message: str) -> Reply:
            reply = error_reply(code, message)
            reply.headers = {"X-Goog-Upload-Status": "final"}
            return reply

        command = {c.strip().lower() for c in str(headers.get("X-Goog-Upload-Command", "")).split(",")}
        with self._lock:
            session = self._uploads.get(upload_id)
            if session is None:
                return fail(404, "The upload session was not found or has already been finalized.")
            if "cancel" in command:
                del self._uploads[upload_id]
                return Reply(200, b"", headers={"X-Goog-Upload-Status": "cancelled"})
            try:
                offset = int(headers.get("X-Goog-Upload-Offset", len(session.data)))
            except ValueError:
                return fail(400, "Invalid X-Goog-Upload-Offset.")
            if "upload" in command:
                if offset != len(session.data):
                    return fail(
                        400, f"Upload offset {offset} does not match the {len(session.data)} bytes received."
                    )
                session.data.extend(raw)
                if len(session.data) > self.file_limit_bytes:
                    del self._uploads[upload_id]
                    return fail(400, f"File exceeds the maximum of {self.file_limit_bytes} bytes per file.")
            if "finalize" not in command:
                return Reply(200, b"", headers={"X-Goog-Upload-Status": "active"})
            del self._uploads[upload_id]
            if session.size is not None and session.size != len(session.data):
                return fail(
                    400, f"The upload declared {session.size} bytes but {len(session.data)} were received."
                )
            stored = StoredFile(
                session.name,
                session.display_name,
                session.mime_type,
                bytes(session.data),
                time.time(),
                "UPLOADED",
            )
            self.files[stored.name] = stored
        body = json.dumps({"file": stored.resource(base_url, api_version)}).encode()
        return Reply(200, body, headers={"X-Goog-Upload-Status": "final"})

    def get_file(self, name: str, base_url: str, api_version: str) -> Reply:
        with self._lock:
            stored = self.files.get(name)
        if stored is None:
            return error_reply(403, _file_denied(name))
        return json_reply(200, stored.resource(base_url, api_version))

    def list_files(self, query: dict[str, list[str]], base_url: str, api_version: str) -> Reply:
        try:
            page_size = int((query.get("pageSize") or ["10"])[0])
            offset = int((query.get("pageToken") or ["0"])[0] or 0)
        except ValueError:
            return error_reply(400, "Invalid page token or size.")
        page_size = min(max(page_size, 1), 100)
        with self._lock:
            files = sorted(self.files.values(), key=lambda f: f.create_time, reverse=True)
        views = [f.resource(base_url, api_version) for f in files]
        payload: dict[str, Any] = {}
        if page := views[offset : offset + page_size]:
            payload["files"] = page
        if offset + page_size < len(views):
            payload["nextPageToken"] = str(offset + page_size)
        return json_reply(200, payload)

    def delete_file(self, name: str) -> Reply:
        with self._lock:
            if self.files.pop(name, None) is None:
                return error_reply(403, _file_denied(name))
        return json_reply(200, {})

    def download(self, name: str) -> Reply:
        with self._lock:
            stored = self.files.get(name)
        if stored is None:
            return error_reply(403, _file_denied(name))
        if stored.source != "GENERATED":
            return error_reply(400, "Only generated files can be downloaded; uploaded files cannot.")
        return Reply(200, stored.data, content_type="application/octet-stream")


def _batch_name(name: str) -> str:
    return name if name.startswith("batches/") else f"batches/{name}"


def _file_name(name: str) -> str:
    return name if name.startswith("files/") else f"files/{name}"


def _file_denied(name: str) -> str:
    return f"You do not have permission to access the File {name.removeprefix('files/')} or it may not exist."


def _camel_keys(request: dict[str, Any]) -> dict[str, Any]:
    """Top-level snake_case fields to camelCase (protobuf JSON accepts both; the SDK sends camel)."""

    def camel(key: str) -> str:
        head, *rest = key.split("_")
        return head + "".join(p[:1].upper() + p[1:] for p in rest)

    return {camel(k): v for k, v in request.items()}


def _parse_jsonl(data: bytes) -> list[BatchRequest]:
    """Input file lines ``{"key": ..., "request": {...}}``; unusable lines become per-request errors."""
    requests: list[BatchRequest] = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except ValueError as exc:
            requests.append(BatchRequest(None, error=f"Line {number} is not valid JSON: {exc}"))
            continue
        if not isinstance(parsed, dict):
            requests.append(BatchRequest(None, error=f"Line {number} is not a JSON object."))
            continue
        key = parsed.get("key")
        request = parsed.get("request")
        if not isinstance(request, dict):
            requests.append(
                BatchRequest(
                    None, key=None if key is None else str(key), error=f"Line {number} has no request."
                )
            )
            continue
        requests.append(BatchRequest(_camel_keys(request), key=None if key is None else str(key)))
    return requests
