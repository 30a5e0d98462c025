"""A loopback HTTP emulator of the Gemini Developer API (Generative Language API).

The real ``google-genai`` SDK (``client.aio.models`` / ``client.aio.caches``) and pydantic-ai's
``GoogleModel`` talk to it unchanged: point ``HttpOptions.base_url`` at :attr:`GeminiEmulator.base_url`.
It is both the project's test double and a load-testing target, so it answers deterministically,
enforces rpm/tpm quotas with real 429 bodies, records every request, and can inject scripted faults.

Design: a ``ThreadingHTTPServer`` (one daemon thread per keep-alive connection) on a background thread.
Latency and hangs wait on a stop event, so slow requests never serialise and :meth:`stop` never
blocks on them. Every response is written with one ``sendall`` and an explicit Content-Length.

Batch API (``client.aio.batches.*`` and ``client.aio.files.*``; under /v1, /v1beta and /v1alpha):

- Endpoints: ``POST models/{m}:batchGenerateContent`` (inline ``inputConfig.requests.requests[]`` of
  ``{request, metadata}``, or ``inputConfig.fileName``), ``GET batches/{id}``, ``GET batches``
  (pageSize/pageToken, newest first), ``POST batches/{id}:cancel``, ``DELETE batches/{id}`` (then 404).
  Files: ``POST /upload/v1beta/files`` (resumable: ``start`` answers ``X-Goog-Upload-URL``; ``upload,
  finalize`` answers ``{"file": ...}``), ``GET files/{id}``, ``GET files``, ``DELETE files/{id}``,
  ``GET files/{id}:download?alt=media`` (only GENERATED files, i.e. batch outputs). Unknown file: 403.
- Answers are Operations: ``{"name", "metadata": {GenerateContentBatch: state, batchStats, ...,
  "output"}, "done", "response"}``. When SUCCEEDED: ``output.inlinedResponses.inlinedResponses[]`` of
  ``{response, metadata}`` / ``{error: {code: <google.rpc code>, message}, metadata}`` in input order, or
  for file jobs ``output.responsesFile = "files/batch-ID"``: JSONL lines ``{"key", "response"|"error"}``.
  FAILED / CANCELLED / EXPIRED jobs have no output.
- States: PENDING -> RUNNING -> SUCCEEDED (or the outcome set below), advanced lazily on every read.
  ``batch_delay=d`` keeps a job PENDING d seconds then RUNNING d more; ``batch_delay=(p, r)`` sets both.
  It is an attribute read at every check: ``math.inf`` holds jobs, ``0`` releases them.
- Forcing ends: ``set_batch_outcome("EXPIRED" | "FAILED" | "CANCELLED" | "SUCCEEDED", contains=None,
  times=None)`` (the default for all jobs, or a rule for jobs with a prompt containing the marker and/or
  the next ``times`` jobs to finish); ``expire_batch(name)``, ``fail_batch(name)``,
  ``finish_batch(name, state="SUCCEEDED")`` end a job now. Cancelling a finished job is a no-op (200).
- Each request of a job runs through the same code as online generateContent when the job succeeds:
  same validation (cache 403, conflicts), same deterministic answers (schema-valid JSON, enum, tool
  call), usage with ``cachedContentTokenCount``, and the same fault rules (``endpoint="generateContent"``
  rules hit batch requests too; ``"batch.generateContent"`` hits only them): an error status becomes that
  request's ``error``, ``safety_block``/``invalid_json`` give a blocked / invalid response. Batch requests
  skip the online rpm/tpm quota and latency.
- Limits: ``batch_inline_limit_bytes`` (default 20 MiB; larger inline create bodies -> 400
  INVALID_ARGUMENT "Request payload size exceeds the limit"), ``file_size_limit_bytes`` (default 2 GiB),
  ``max_active_batches`` (default 100 pending/running jobs; more -> 429 RESOURCE_EXHAUSTED) and
  ``batch_enqueued_token_limit`` (prompt tokens of unfinished jobs per model; default None -> 429).
- Log and inspection: HTTP calls are logged with endpoints ``batches.create|get|list|cancel|delete`` and
  ``files.create|upload|get|list|delete|download``; every executed job request is logged with endpoint
  ``"batch.generateContent"``, its ``prompt_text``, ``cached_content``, ``usage``, ``batch`` and
  ``batch_key`` (so :meth:`usage_totals` includes batch usage). Helpers: ``batch_creates``,
  ``batch_requests(name)``, ``batches`` (name -> Operation), ``batch_state(name)``, ``files``,
  ``file_bytes(name)``. :meth:`reset` drops jobs, files and outcome rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import http
import json
import logging
import math
import random
import re
import socket
import socketserver
import string
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from prefect_batchllm.core.errors import parse_duration
from prefect_batchllm.core.schema_fake import fake_for_schema, key_of

from ._batches import (
    DEFAULT_FILE_LIMIT_BYTES,
    DEFAULT_INLINE_LIMIT_BYTES,
    DEFAULT_MAX_ACTIVE_BATCHES,
    BatchDelay,
    BatchJob,
    BatchRequest,
    BatchStore,
    StoredFile,
    rpc_status,
)
from ._wire import (
    CACHE_CONFLICT,
    CACHE_NOT_FOUND,
    DEFAULT_MESSAGES,
    MALFORMED_BODY,
    UNREGISTERED_CALLER,
    Reply,
    content_chars,
    error_body,
    error_reply,
    invalid_api_key_body,
    json_reply,
    parse_rfc3339,
    rate_limit_body,
    rfc3339,
    tokens_for_chars,
    user_text,
)
from .faults import Fault, FaultScript

if TYPE_CHECKING:
    from google import genai

__all__ = ["GeminiEmulator", "RecordedRequest"]

logger = logging.getLogger("prefect_batchllm.testing")

GENERATE_ENDPOINTS = frozenset({"generateContent", "streamGenerateContent"})
_MODEL_ACTIONS = {"generateContent", "streamGenerateContent", "countTokens"}
_PATH_RE = re.compile(r"^/(v1|v1beta|v1alpha)/(.*)$")
_MODEL_RE = re.compile(r"^models/([^/:]+):([A-Za-z]+)$")
_CACHE_RE = re.compile(r"^cachedContents/([^/:]+)$")
_BATCH_RE = re.compile(r"^batches/([^/:]+)(?::([A-Za-z]+))?$")
_FILE_RE = re.compile(r"^files/([^/:]+)(?::([A-Za-z]+))?$")
_SIDE_PATH_RE = re.compile(r"^/(upload|download)/(v1|v1beta|v1alpha)/(.*)$")
BATCH_REQUEST_ENDPOINT = "batch.generateContent"
_DEFAULT_CACHE_TTL_S = 3600.0
_ID_ALPHABET = string.ascii_lowercase + string.digits
_HIGH_RATINGS = [
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True},
    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
]
_OK_RATINGS = [
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
]

Latency = float | tuple[float, float] | Callable[[], float]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the emulator saw and answered it."""

    method: str
    path: str  # request target as sent, including any query string
    api_version: str
    # "generateContent" | "streamGenerateContent" | "countTokens" | "cachedContents.*" | "batches.*" |
    # "files.*" | "batch.generateContent" (one request run inside a batch job) | "unknown"
    endpoint: str
    model: str | None  # without the "models/" prefix
    body: dict[str, Any] | None
    prompt_text: str  # text parts of user contents joined with "\n"
    cached_content: str | None  # "cachedContents/ID" when the request used a cache
    status: int  # HTTP status sent; 0 when the connection was dropped without an answer
    fault: str | None  # Fault.kind applied, if any
    started_at: float  # time.monotonic()
    finished_at: float
    usage: dict[str, Any] | None  # usageMetadata returned
    api_key: str | None = field(default=None, repr=False)
    batch: str | None = None  # "batches/ID" for a request executed inside a batch job
    batch_key: str | None = None  # that request's file key or metadata["key"]


@dataclass
class _Call:
    """Parsed request plus what happened to it (mutable while it is processed)."""

    method: str
    target: str
    api_version: str
    endpoint: str
    model: str | None
    cache_id: str | None
    body: dict[str, Any] | None
    body_error: str | None
    prompt_text: str
    cached_content: str | None
    api_key: str | None
    query: dict[str, list[str]]
    started_at: float
    fault: str | None = None
    resource_id: str | None = None  # batch or file id from the path
    headers: Message | None = None
    raw: bytes = b""


@dataclass(frozen=True)
class _Prepared:
    """A validated GenerateContentRequest with its prompt token count (cache included)."""

    model: str
    body: dict[str, Any]
    prompt_text: str
    cache: dict[str, Any] | None
    prompt_tokens: int
    cached_tokens: int


class _Admission:
    """One request counted in the sliding quota window."""

    __slots__ = ("t", "tokens")

    def __init__(self, t: float, tokens: int) -> None:
        self.t = t
        self.tokens = tokens


class _SlidingQuota:
    """rpm/tpm limits over a sliding window of ``window_s`` (allowance scaled by window/60)."""

    def __init__(self, rpm: int | None, tpm: int | None, window_s: float) -> None:
        self.configure(rpm, tpm, window_s)
        self._entries: deque[_Admission] = deque()
        self._tokens = 0

    def configure(self, rpm: int | None, tpm: int | None, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("quota_window_s must be > 0")
        self.rpm, self.tpm, self.window_s = rpm, tpm, float(window_s)

    def reset(self) -> None:
        self._entries.clear()
        self._tokens = 0

    def _allowance(self, per_minute: int) -> int:
        return max(1, math.floor(per_minute * self.window_s / 60.0))

    def admit(self, now: float, tokens: int) -> tuple[_Admission | None, float, str, int]:
        """Count the request, or return (None, seconds until admissible, "requests"|"tokens", limit)."""
        if self.rpm is None and self.tpm is None:
            return _Admission(now, tokens), 0.0, "", 0
        horizon = now - self.window_s
        while self._entries and self._entries[0].t <= horizon:
            self._tokens -= self._entries.popleft().tokens
        if self.rpm is not None:
            allow = self._allowance(self.rpm)
            if len(self._entries) >= allow:
                oldest = self._entries[len(self._entries) - allow]
                return None, oldest.t + self.window_s - now, "requests", allow
        if self.tpm is not None:
            allow = self._allowance(self.tpm)
            if self._tokens + tokens > allow:
                wait = self.window_s
                if tokens <= allow:
                    remaining = self._tokens
                    for entry in self._entries:
                        remaining -= entry.tokens
                        if remaining + tokens <= allow:
                            wait = entry.t + self.window_s - now
                            break
                return None, wait, "tokens", allow
        entry = _Admission(now, tokens)
        self._entries.append(entry)
        self._tokens += tokens
        return entry, 0.0, "", 0

    def release(self, entry: _Admission) -> None:
        """Un-count an admitted request (scripted 429s must not use up the window)."""
        with contextlib.suppress(ValueError):
            self._entries.remove(entry)
            self._tokens -= entry.tokens


class _DropConnection(Exception):
    """Raised in a handler to reset the connection without answering."""


class _Server(ThreadingHTTPServer):
    """Threaded server tuned for bursts of concurrent keep-alive clients."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024  # the default of 5 drops SYNs under a burst of 50-100 new connections

    def __init__(self, address: tuple[str, int], emulator: GeminiEmulator) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.emulator = emulator
        self._conns: set[socket.socket] = set()
        self._dropped: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), which can stall in sandboxes.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(conn)

    def mark_dropped(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._dropped.add(conn)

    def close_all_connections(self) -> None:
        """Wake every handler blocked on a keep-alive read so its thread ends."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            dropped = request in self._dropped
            self._dropped.discard(request)
        if dropped:  # skip the FIN: closing with SO_LINGER=0 sends a bare RST
            self.close_request(request)
        else:
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, _DropConnection | ConnectionError | TimeoutError | BrokenPipeError):
            return  # client went away or a scripted reset: not worth a stack trace
        logger.exception("gemini emulator: unexpected error serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, lets the emulator decide, writes the reply in one go."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError, ValueError):
                super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the stdlib access log (the emulator logs requests itself when asked to)."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length > 0 else b""
        if len(data) < length:  # the connection closed mid-body (e.g. the server is stopping): no request
            raise ConnectionError(f"request body cut short: {len(data)} of {length} bytes")
        return data

    def _dispatch(self) -> None:
        try:
            raw = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        reply = self.server.emulator._serve(self.command, self.path, self.headers, raw)
        if reply.drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.server.mark_dropped(self.connection)
            raise _DropConnection
        chunks = reply.events if reply.events is not None else [reply.body]
        length = sum(len(c) for c in chunks)
        content_type = "text/event-stream" if reply.events is not None else reply.content_type
        head = [
            f"HTTP/1.1 {reply.status} {http.HTTPStatus(reply.status).phrase}",
            f"Content-Type: {content_type}",
            f"Content-Length: {length}",
            "Vary: Origin, X-Origin, Referer",
            "Server: scaffolding on HTTPServer2",
            "X-Content-Type-Options: nosniff",
        ]
        head.extend(f"{k}: {v}" for k, v in (reply.headers or {}).items())
        if self.close_connection:
            head.append("Connection: close")
        header_bytes = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(header_bytes + chunks[0])
            for chunk in chunks[1:]:
                self.wfile.write(chunk)
        except OSError:
            self.close_connection = True


class GeminiEmulator:
    """Loopback Gemini API server for tests, demos and load tests.

    ``latency`` applies to generate endpoints: fixed seconds, a uniform ``(lo, hi)`` range or a callable.
    ``rpm``/``tpm`` enable sliding-window quotas (allowance ``rpm * quota_window_s / 60``).
    ``models`` adds accepted model names besides ``gemini-*``. ``log_requests`` logs one INFO line per
    request on the ``prefect_batchllm.testing`` logger (never the API key).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: Latency = 0.0,
        rpm: int | None = None,
        tpm: int | None = None,
        quota_window_s: float = 60.0,
        require_api_key: bool = True,
        min_cache_tokens: int = 0,
        seed: int = 0,
        models: set[str] | None = None,
        log_requests: bool = False,
        valid_api_keys: set[str] | None = None,
        batch_delay: BatchDelay = 0.0,
        batch_inline_limit_bytes: int = DEFAULT_INLINE_LIMIT_BYTES,
        file_size_limit_bytes: int = DEFAULT_FILE_LIMIT_BYTES,
        max_active_batches: int | None = DEFAULT_MAX_ACTIVE_BATCHES,
        batch_enqueued_token_limit: int | None = None,
    ) -> None:
        self.host = host
        self.valid_api_keys = set(valid_api_keys) if valid_api_keys is not None else None
        self.port = port
        self.latency = latency
        self.require_api_key = require_api_key
        self.min_cache_tokens = min_cache_tokens
        self.seed = seed
        self.models = {m.removeprefix("models/") for m in (models or set())}
        self.log_requests = log_requests
        self.faults = FaultScript(seed)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._quota = _SlidingQuota(rpm, tpm, quota_window_s)
        self._log: list[RecordedRequest] = []
        self._caches: dict[str, dict[str, Any]] = {}
        self._cache_expiry: dict[str, float] = {}
        self._stop_evt = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._base_url: str | None = None
        self._response_seq = 0
        self._in_flight = 0
        self._store = BatchStore(self._run_batch_request, seed=seed)
        self.batch_delay = batch_delay
        self.batch_inline_limit_bytes = batch_inline_limit_bytes
        self.file_size_limit_bytes = file_size_limit_bytes
        self.max_active_batches = max_active_batches
        self.batch_enqueued_token_limit = batch_enqueued_token_limit

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> GeminiEmulator:
        """Bind and serve on a background thread; returns self (idempotent)."""
        if self._server is not None:
            return self
        self._stop_evt = threading.Event()
        server = _Server((self.host, self.port), self)
        host, port = server.server_address[:2]
        self.port = int(port)
        shown = f"[{host}]" if ":" in str(host) else str(host)
        self._base_url = f"http://{shown}:{self.port}"
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="gemini-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hanging/slow requests are cut off instead of awaited."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stop_evt.set()
        server.shutdown()
        server.close_all_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> GeminiEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of the running server."""
        if self._base_url is None:
            raise RuntimeError("GeminiEmulator is not started; call start() or use it as a context manager")
        return self._base_url

    def client(self, *, api_key: str = "test-key", api_version: str | None = "v1beta") -> genai.Client:
        """A real ``genai.Client`` pointed at this emulator, with SDK retries off."""
        from google import genai
        from google.genai import types

        options = types.HttpOptions(base_url=self.base_url, api_version=api_version, retry_options=None)
        return genai.Client(vertexai=False, api_key=api_key, http_options=options)

    # -- configuration & state ---------------------------------------------------------------------

    def set_quota(self, *, rpm: int | None, tpm: int | None, quota_window_s: float | None = None) -> None:
        """Change the quota at runtime (requests already counted stay in the window)."""
        with self._lock:
            window = self._quota.window_s if quota_window_s is None else quota_window_s
            self._quota.configure(rpm, tpm, window)

    def reset(self) -> None:
        """Clear the request log, fault rules, caches, quota counters, batch jobs, files and outcomes."""
        self.faults.clear()
        self._store.reset()
        with self._lock:
            self._log.clear()
            self._caches.clear()
            self._cache_expiry.clear()
            self._quota.reset()

    @property
    def in_flight(self) -> int:
        """Requests received but not answered yet (e.g. sleeping in latency or a hang)."""
        with self._lock:
            return self._in_flight

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of the request log, oldest first."""
        with self._lock:
            return list(self._log)

    def requests_for(
        self, endpoint: str | None = None, *, contains: str | None = None, status: int | None = None
    ) -> list[RecordedRequest]:
        """Logged requests filtered by endpoint, prompt substring and HTTP status."""
        if endpoint is not None and endpoint.startswith("."):
            endpoint = "cachedContents" + endpoint
        return [
            r
            for r in self.requests
            if (endpoint is None or r.endpoint == endpoint)
            and (contains is None or contains in r.prompt_text)
            and (status is None or r.status == status)
        ]

    def count(
        self, endpoint: str | None = None, *, contains: str | None = None, status: int | None = None
    ) -> int:
        """Number of logged requests matching the filters."""
        return len(self.requests_for(endpoint, contains=contains, status=status))

    def window_counts(self, window_s: float, endpoint: str = "generateContent") -> list[int]:
        """Accepted (non-429) requests per consecutive window, starting at the first such request."""
        times = sorted(r.started_at for r in self.requests_for(endpoint) if r.status != 429)
        if not times:
            return []
        first = times[0]
        counts = [0] * (int((times[-1] - first) // window_s) + 1)
        for t in times:
            counts[int((t - first) // window_s)] += 1
        return counts

    def max_in_window(
        self, window_s: float, endpoint: str = "generateContent", *, accepted_only: bool = True
    ) -> int:
        """Most requests that started within any sliding window of ``window_s`` seconds."""
        times = sorted(
            r.started_at for r in self.requests_for(endpoint) if not (accepted_only and r.status == 429)
        )
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= window_s:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def usage_totals(self, endpoint: str | None = None) -> dict[str, int]:
        """Sums of the usageMetadata actually returned: prompt, candidates, total, cached.

        Requests run inside batch jobs count too; ``endpoint`` narrows the sum, e.g. to
        "batch.generateContent" (batch-priced tokens) or "generateContent" (online ones).
        """
        totals = {"prompt": 0, "candidates": 0, "total": 0, "cached": 0}
        for r in self.requests:
            if r.usage and (endpoint is None or r.endpoint == endpoint):
                totals["prompt"] += int(r.usage.get("promptTokenCount", 0))
                totals["candidates"] += int(r.usage.get("candidatesTokenCount", 0))
                totals["total"] += int(r.usage.get("totalTokenCount", 0))
                totals["cached"] += int(r.usage.get("cachedContentTokenCount", 0))
        return totals

    @property
    def caches(self) -> dict[str, dict[str, Any]]:
        """Live (unexpired) caches: name -> record (wire fields plus contents/systemInstruction/tools)."""
        now = time.time()
        with self._lock:
            return {n: dict(r) for n, r in self._caches.items() if self._cache_expiry.get(n, 0) > now}

    def expire_cache(self, name: str) -> None:
        """Make a cache expire now (it stays stored but answers 403 like an expired one)."""
        name = _cache_name(name)
        with self._lock:
            if name in self._caches:
                self._cache_expiry[name] = time.time() - 1.0
                self._caches[name]["expireTime"] = rfc3339(self._cache_expiry[name])

    def delete_cache_server_side(self, name: str) -> None:
        """Delete a cache out of band, as if another process or the TTL had removed it."""
        name = _cache_name(name)
        with self._lock:
            self._caches.pop(name, None)
            self._cache_expiry.pop(name, None)

    # -- batch jobs & files ------------------------------------------------------------------------

    @property
    def batch_delay(self) -> BatchDelay:
        """Seconds a job stays PENDING, then RUNNING: ``d`` means (d, d); or a ``(pending_s, running_s)``.

        Read at every state check, so it applies to existing jobs: ``math.inf`` holds them, 0 releases them.
        """
        return self._store.delay

    @batch_delay.setter
    def batch_delay(self, value: BatchDelay) -> None:
        pairs = value if isinstance(value, tuple) else (value, value)
        if len(pairs) != 2 or any(not float(v) >= 0 for v in pairs):
            raise ValueError("batch_delay must be seconds >= 0 or a (pending_s, running_s) pair")
        self._store.delay = value

    @property
    def batch_inline_limit_bytes(self) -> int:
        """Largest inline batchGenerateContent body accepted; bigger ones get 400 INVALID_ARGUMENT."""
        return self._store.inline_limit_bytes

    @batch_inline_limit_bytes.setter
    def batch_inline_limit_bytes(self, value: int) -> None:
        self._store.inline_limit_bytes = int(value)

    @property
    def file_size_limit_bytes(self) -> int:
        """Largest file the Files API accepts (2 GB like the real one); bigger uploads get 400."""
        return self._store.file_limit_bytes

    @file_size_limit_bytes.setter
    def file_size_limit_bytes(self, value: int) -> None:
        self._store.file_limit_bytes = int(value)

    @property
    def max_active_batches(self) -> int | None:
        """Jobs that may be PENDING or RUNNING at once (100 like the real API); 429 beyond (None: no cap)."""
        return self._store.max_active

    @max_active_batches.setter
    def max_active_batches(self, value: int | None) -> None:
        self._store.max_active = None if value is None else int(value)

    @property
    def batch_enqueued_token_limit(self) -> int | None:
        """Prompt tokens enqueued per model across unfinished jobs; 429 beyond it (None: no cap)."""
        return self._store.enqueued_token_limit

    @batch_enqueued_token_limit.setter
    def batch_enqueued_token_limit(self, value: int | None) -> None:
        self._store.enqueued_token_limit = None if value is None else int(value)

    def set_batch_outcome(self, state: str, *, contains: str | None = None, times: int | None = None) -> None:
        """How jobs end when their delay has passed (default SUCCEEDED).

        ``state`` is "SUCCEEDED", "FAILED", "EXPIRED" or "CANCELLED" (a ``BATCH_STATE_*`` or ``JOB_STATE_*``
        name works too). Without ``contains``/``times`` it sets the default for every job. Otherwise it adds
        a rule, checked in order before the default: only jobs with a request whose prompt contains
        ``contains`` (any job if None), for the next ``times`` such jobs (None = forever). E.g.
        ``set_batch_outcome("EXPIRED", times=1)`` expires the next job to finish and no later one.
        Only SUCCEEDED jobs run their requests and have an output.
        """
        self._store.set_outcome(state, contains, times)

    def finish_batch(self, name: str, state: str = "SUCCEEDED") -> dict[str, Any]:
        """End a job now, whatever its delay; returns its Operation. SUCCEEDED runs its requests."""
        job = self._store.finish(name, state)
        return job.operation()

    def expire_batch(self, name: str) -> dict[str, Any]:
        """End a job now as EXPIRED (as if it sat pending or running past 48 h): no output."""
        return self.finish_batch(name, "EXPIRED")

    def fail_batch(self, name: str) -> dict[str, Any]:
        """End a job now as FAILED: no output."""
        return self.finish_batch(name, "FAILED")

    @property
    def batches(self) -> dict[str, dict[str, Any]]:
        """Every stored job: name -> its Operation as ``GET batches/ID`` returns it (states advanced)."""
        with self._store._lock:
            jobs = list(self._store.jobs.values())
            for job in jobs:
                self._store.advance(job)
            return {job.name: job.operation() for job in jobs}

    def batch_state(self, name: str) -> str:
        """A job's ``BATCH_STATE_*`` now (advanced like a GET would)."""
        key = name if name.startswith("batches/") else f"batches/{name}"
        with self._store._lock:
            job = self._store.jobs.get(key)
            if job is None:
                raise KeyError(f"no batch job named {name!r}")
            self._store.advance(job)
            return job.state

    @property
    def batch_creates(self) -> int:
        """Jobs created successfully (``batches.create`` answered 200), deleted ones included."""
        return self.count("batches.create", status=200)

    def batch_requests(self, name: str | None = None) -> list[RecordedRequest]:
        """Requests executed inside batch jobs (all, or one job's), in execution order."""
        return [r for r in self.requests_for(BATCH_REQUEST_ENDPOINT) if name is None or r.batch == name]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """Stored files (uploaded and batch outputs): name -> File resource."""
        with self._store._lock:
            stored = list(self._store.files.values())
        return {f.name: f.resource(self.base_url, "v1beta") for f in stored}

    def file_bytes(self, name: str) -> bytes:
        """The content of a stored file ("files/ID" or "ID")."""
        key = name if name.startswith("files/") else f"files/{name}"
        with self._store._lock:
            stored: StoredFile | None = self._store.files.get(key)
        if stored is None:
            raise KeyError(f"no file named {name!r}")
        return stored.data

    # -- request processing ------------------------------------------------------------------------

    def _serve(self, method: str, target: str, headers: Message, raw: bytes) -> Reply:
        """Process one request end to end and log it before the reply is written."""
        call = self._parse(method, target, headers, raw)
        with self._lock:
            self._in_flight += 1
        try:
            reply = self._process(call)
        except Exception:
            logger.exception("gemini emulator: internal error for %s %s", method, call.endpoint)
            reply = error_reply(500)
        finished = time.monotonic()
        record = RecordedRequest(
            method=method,
            path=target,
            api_version=call.api_version,
            endpoint=call.endpoint,
            model=call.model,
            body=call.body,
            prompt_text=call.prompt_text,
            cached_content=call.cached_content,
            status=0 if reply.drop else reply.status,
            fault=call.fault,
            started_at=call.started_at,
            finished_at=finished,
            usage=reply.usage,
            api_key=call.api_key,
        )
        with self._lock:
            self._log.append(record)
            self._in_flight -= 1
        if self.log_requests:
            logger.info(
                "%s %s -> %s%s %.0fms",
                method,
                urlsplit(target).path,
                record.status or "dropped",
                f" [fault {call.fault}]" if call.fault else "",
                (finished - call.started_at) * 1000,
            )
        return reply

    def _parse(self, method: str, target: str, headers: Message, raw: bytes) -> _Call:
        started = time.monotonic()
        split = urlsplit(target)
        query = parse_qs(split.query)
        match = _PATH_RE.match(split.path)
        api_version, rest = (match.group(1), unquote(match.group(2))) if match else ("", "")
        endpoint, model, cache_id, resource_id = "unknown", None, None, None
        if model_match := _MODEL_RE.match(rest):
            model = model_match.group(1)
            action = model_match.group(2)
            if action in _MODEL_ACTIONS and method == "POST":
                endpoint = action
            elif action == "batchGenerateContent" and method == "POST":
                endpoint = "batches.create"
        elif rest == "cachedContents":
            endpoint = {"POST": "cachedContents.create", "GET": "cachedContents.list"}.get(method, "unknown")
        elif cache_match := _CACHE_RE.match(rest):
            cache_id = cache_match.group(1)
            endpoint = {
                "GET": "cachedContents.get",
                "PATCH": "cachedContents.patch",
                "DELETE": "cachedContents.delete",
            }.get(method, "unknown")
        elif rest in ("batches", "files"):
            endpoint = f"{rest}.list" if method == "GET" else "unknown"
        elif batch_match := _BATCH_RE.match(rest):
            resource_id, action = batch_match.group(1), batch_match.group(2)
            endpoint = {
                ("GET", None): "batches.get",
                ("DELETE", None): "batches.delete",
                ("POST", "cancel"): "batches.cancel",
            }.get((method, action), "unknown")
        elif file_match := _FILE_RE.match(rest):
            resource_id, action = file_match.group(1), file_match.group(2)
            endpoint = {
                ("GET", None): "files.get",
                ("DELETE", None): "files.delete",
                ("GET", "download"): "files.download",
            }.get((method, action), "unknown")
        elif side_match := _SIDE_PATH_RE.match(split.path):
            # /upload/{ver}/files (resumable start, then chunks on ?upload_id=) and /download/{ver}/files/ID
            api_version, rest = side_match.group(2), unquote(side_match.group(3))
            if side_match.group(1) == "upload" and rest == "files" and method == "POST":
                endpoint = "files.upload" if query.get("upload_id") else "files.create"
                resource_id = (query.get("upload_id") or [None])[0]
            elif (dl_match := _FILE_RE.match(rest)) and dl_match.group(2) == "download" and method == "GET":
                endpoint, resource_id = "files.download", dl_match.group(1)
        if endpoint == "files.upload":  # chunk bytes are file content, not JSON
            return _Call(
                method=method,
                target=target,
                api_version=api_version,
                endpoint=endpoint,
                model=None,
                cache_id=None,
                body=None,
                body_error=None,
                prompt_text="",
                cached_content=None,
                api_key=headers.get("x-goog-api-key") or None,
                query=query,
                started_at=started,
                resource_id=resource_id,
                headers=headers,
                raw=raw,
            )
        body: dict[str, Any] | None = None
        body_error: str | None = None
        if raw.strip():
            try:
                parsed = json.loads(raw)
            except ValueError as exc:
                body_error = f"Invalid JSON payload received. {exc}"
            else:
                if isinstance(parsed, dict):
                    body = parsed
                else:
                    body_error = "Invalid JSON payload received. Expected an object."
        contents = None
        if body is not None:
            contents = body.get("contents")
            if contents is None and isinstance(body.get("generateContentRequest"), dict):
                contents = body["generateContentRequest"].get("contents")
            if endpoint == "batches.create":  # every inline request's prompt, so faults can target a job
                contents = [
                    content
                    for item in _inline_items(body)
                    for content in _as_list(item["request"].get("contents"))
                ]
        cached = body.get("cachedContent") if body else None
        if model is None and endpoint == "cachedContents.create" and body:
            model = str(body.get("model") or "").removeprefix("models/") or None
        key = headers.get("x-goog-api-key") or (query.get("key") or [None])[0]
        return _Call(
            method=method,
            target=target,
            api_version=api_version,
            endpoint=endpoint,
            model=model,
            cache_id=cache_id,
            body=body,
            body_error=body_error,
            prompt_text=user_text(contents),
            cached_content=_cache_name(cached) if isinstance(cached, str) and cached else None,
            api_key=key or None,
            query=query,
            started_at=started,
            resource_id=resource_id,
            headers=headers,
            raw=raw,
        )

    def _process(self, call: _Call) -> Reply:
        if call.endpoint == "unknown":
            return error_reply(404, f"Method not found: {call.method} {urlsplit(call.target).path}")
        # A resumable upload's chunk requests are authorised by their upload_id, like the real service.
        if call.endpoint != "files.upload":
            if self.require_api_key and not call.api_key:
                return error_reply(403, UNREGISTERED_CALLER)
            if self.valid_api_keys is not None and call.api_key not in self.valid_api_keys:
                return json_reply(400, invalid_api_key_body())
        if call.body_error:
            return error_reply(400, call.body_error)
        if call.endpoint in _MODEL_ACTIONS or call.endpoint in ("cachedContents.create", "batches.create"):
            if not call.model or not self._model_known(call.model):
                action = {
                    "cachedContents.create": "createCachedContent",
                    "batches.create": "batchGenerateContent",
                }.get(call.endpoint, call.endpoint)
                return error_reply(
                    404,
                    f"models/{call.model} is not found for API version {call.api_version}, or is not "
                    f"supported for {action}. Call ListModels to see the list of available models and "
                    "their supported methods.",
                )
        if call.endpoint in GENERATE_ENDPOINTS:
            return self._generate(call)
        fault = self.faults.pick(call.endpoint, call.prompt_text)
        if fault is not None:
            call.fault = fault.kind
            early = self._apply_transport_fault(call, fault)
            if early is not None:
                return early
        if call.endpoint == "countTokens":
            return self._count_tokens(call)
        if call.endpoint.startswith(("batches.", "files.")):
            return self._batch_or_file_endpoint(call)
        return self._cache_endpoint(call)

    def _batch_or_file_endpoint(self, call: _Call) -> Reply:
        store, rid = self._store, call.resource_id or ""
        base, version = self.base_url, call.api_version
        if call.endpoint == "batches.create":
            return store.create(str(call.model), call.body, len(call.raw))
        if call.endpoint == "batches.list":
            return store.list(call.query)
        if call.endpoint == "batches.get":
            return store.get(f"batches/{rid}")
        if call.endpoint == "batches.cancel":
            return store.cancel(f"batches/{rid}")
        if call.endpoint == "batches.delete":
            return store.delete(f"batches/{rid}")
        if call.endpoint == "files.create":
            return store.start_upload(call.headers or Message(), call.body, base)
        if call.endpoint == "files.upload":
            return store.upload_chunk(rid, call.headers or Message(), call.raw, base, version)
        if call.endpoint == "files.list":
            return store.list_files(call.query, base, version)
        if call.endpoint == "files.get":
            return store.get_file(f"files/{rid}", base, version)
        if call.endpoint == "files.delete":
            return store.delete_file(f"files/{rid}")
        if call.endpoint == "files.download":
            return store.download(f"files/{rid}")
        return error_reply(404, f"Method not found: {call.method} {urlsplit(call.target).path}")

    def _model_known(self, model: str) -> bool:
        return model.startswith("gemini-") or model in self.models

    def _latency_s(self) -> float:
        latency = self.latency
        if callable(latency):
            return max(0.0, float(latency()))
        if isinstance(latency, tuple):
            with self._lock:
                return max(0.0, self._rng.uniform(float(latency[0]), float(latency[1])))
        return max(0.0, float(latency))

    def _sleep(self, seconds: float) -> bool:
        """Wait without blocking other requests; False if the emulator is stopping."""
        if seconds <= 0:
            return not self._stop_evt.is_set()
        return not self._stop_evt.wait(seconds)

    def _apply_transport_fault(self, call: _Call, fault: Fault) -> Reply | None:
        """Faults that replace the whole HTTP answer; None means "answer normally" (maybe later)."""
        if fault.kind == "rate_limit":
            return json_reply(
                429, rate_limit_body(fault.seconds, model=call.model, per_day=fault.per_day, limit=None)
            )
        if fault.kind == "status":
            return error_reply(int(fault.code or 500), fault.message)
        if fault.kind == "echo_api_key":
            return json_reply(
                int(fault.code or 400),
                error_body(int(fault.code or 400), f"{fault.message} (key={call.api_key})"),
            )
        if fault.kind in ("hang", "delay"):
            return None if self._sleep(fault.seconds) else Reply(0, drop=True)
        if fault.kind == "connection_reset":
            return Reply(0, drop=True)
        if fault.kind == "malformed_body":
            return Reply(200, MALFORMED_BODY, content_type="text/plain; charset=UTF-8")
        return None

    # -- generate ----------------------------------------------------------------------------------

    def _prepare(
        self, model: str, body: dict[str, Any], prompt_text: str, cached_content: str | None
    ) -> _Prepared | tuple[int, str]:
        """Validate a GenerateContentRequest and count its prompt; (HTTP status, message) if invalid.

        Shared by online generateContent and the requests inside batch jobs.
        """
        contents = body.get("contents")
        if not contents:
            return 400, "* GenerateContentRequest.contents: contents is not specified\n"
        cache: dict[str, Any] | None = None
        if cached_content:
            with self._lock:
                cache = self._live_cache(cached_content)
            if cache is None:
                return 403, CACHE_NOT_FOUND
            if any(body.get(k) for k in ("systemInstruction", "tools", "toolConfig")):
                return 400, CACHE_CONFLICT
            if cache["model"] != f"models/{model}":
                return (
                    400,
                    f"Model used by GenerateContent request (models/{model}) and CachedContent "
                    f"({cache['model']}) has to be the same.",
                )
        cached_tokens = int(cache["usageMetadata"]["totalTokenCount"]) if cache else 0
        request_chars = content_chars(contents) + content_chars(body.get("systemInstruction"))
        prompt_tokens = tokens_for_chars(request_chars) + cached_tokens
        return _Prepared(model, body, prompt_text, cache, prompt_tokens, cached_tokens)

    def _generate(self, call: _Call) -> Reply:
        prepared = self._prepare(str(call.model), call.body or {}, call.prompt_text, call.cached_content)
        if isinstance(prepared, tuple):
            return error_reply(*prepared)
        with self._lock:
            admission, wait_s, kind, limit = self._quota.admit(time.monotonic(), prepared.prompt_tokens)
        if admission is None:
            delay = max(1, math.ceil(wait_s))
            return json_reply(
                429, rate_limit_body(delay, model=call.model, tokens=kind == "tokens", limit=limit)
            )
        fault = self.faults.pick(call.endpoint, call.prompt_text)
        call.fault = fault.kind if fault else None
        if fault is not None and fault.kind == "rate_limit":
            with self._lock:
                self._quota.release(admission)
            return self._apply_transport_fault(call, fault) or error_reply(429)
        if not self._sleep(self._latency_s()):
            return Reply(0, drop=True)
        if fault is not None:
            early = self._apply_transport_fault(call, fault)
            if early is not None:
                return early

        payload, usage = self._generation_payload(prepared, fault)
        if call.endpoint == "streamGenerateContent":
            return Reply(200, events=self._sse_events(payload), usage=usage)
        return json_reply(200, payload, usage=usage)

    def _run_batch_request(self, job: BatchJob, request: BatchRequest) -> dict[str, Any]:
        """Answer one request of a batch job with the online generate logic; log it like a request.

        Returns ``{"response": GenerateContentResponse}`` or ``{"error": google.rpc.Status}``. Fault rules
        for "generateContent" (and "batch.generateContent") apply: an error status becomes the request's
        ``error``, a safety block a blocked response, invalid JSON an invalid text; hangs and delays are
        ignored (a batch has no client waiting); rate limits, resets and malformed bodies become errors.
        Batch requests never count against the online rpm/tpm quota.
        """
        started = time.monotonic()
        body = request.request or {}
        cached = body.get("cachedContent")
        cached_content = _cache_name(cached) if isinstance(cached, str) and cached else None
        prompt_text = request.prompt_text
        fault: Fault | None = None
        usage: dict[str, Any] | None = None
        entry: dict[str, Any]
        prepared: _Prepared | tuple[int, str] = (400, request.error or "")
        if request.error is None:
            prepared = self._prepare(job.model, body, prompt_text, cached_content)
        if isinstance(prepared, tuple):
            status, entry = prepared[0], {"error": rpc_status(prepared[0], prepared[1])}
        else:
            fault = self.faults.pick((BATCH_REQUEST_ENDPOINT, "generateContent"), prompt_text)
            failure = _batch_fault_status(fault, job.model)
            if failure is not None:
                status, entry = failure[0], {"error": rpc_status(*failure)}
            else:
                payload, usage = self._generation_payload(prepared, fault)
                status, entry = 200, {"response": payload}
        record = RecordedRequest(
            method="BATCH",
            path=job.name,
            api_version="",
            endpoint=BATCH_REQUEST_ENDPOINT,
            model=job.model,
            body=request.request,
            prompt_text=prompt_text,
            cached_content=cached_content,
            status=status,
            fault=fault.kind if fault else None,
            started_at=started,
            finished_at=time.monotonic(),
            usage=usage,
            batch=job.name,
            batch_key=request.label,
        )
        with self._lock:
            self._log.append(record)
        return entry

    def _generation_payload(
        self, prepared: _Prepared, fault: Fault | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The GenerateContentResponse for a valid request (online and in batch jobs alike)."""
        prompt_tokens, cached_tokens = prepared.prompt_tokens, prepared.cached_tokens
        with self._lock:
            self._response_seq += 1
            seq = self._response_seq
        response_id = hashlib.blake2b(
            f"{self.seed}:{seq}:{prepared.prompt_text}".encode(), digest_size=12
        ).hexdigest()
        base: dict[str, Any] = {"modelVersion": prepared.model, "responseId": response_id}
        kind = fault.kind if fault else None
        if kind == "safety_block":
            usage = _usage(prompt_tokens, 0, cached_tokens)
            feedback = {"blockReason": fault.reason if fault else "SAFETY", "safetyRatings": _HIGH_RATINGS}
            return {"promptFeedback": feedback, "usageMetadata": usage, **base}, usage
        if kind == "finish_safety":
            usage = _usage(prompt_tokens, 0, cached_tokens)
            candidate = {"finishReason": "SAFETY", "index": 0, "safetyRatings": _HIGH_RATINGS}
            return {"candidates": [candidate], "usageMetadata": usage, **base}, usage

        parts, finish = self._answer(
            prepared.prompt_text, prepared.body, prepared.cache, invalid=kind == "invalid_json"
        )
        out_chars = sum(len(p["text"]) if "text" in p else content_chars([{"parts": [p]}]) for p in parts)
        usage = _usage(prompt_tokens, tokens_for_chars(out_chars), cached_tokens)
        candidate = {
            "content": {"parts": parts, "role": "model"},
            "finishReason": finish,
            "index": 0,
            "safetyRatings": _OK_RATINGS,
        }
        return {"candidates": [candidate], "usageMetadata": usage, **base}, usage

    def _answer(
        self, prompt_text: str, body: dict[str, Any], cache: dict[str, Any] | None, *, invalid: bool
    ) -> tuple[list[dict[str, Any]], str]:
        """Deterministic answer parts (text, JSON text, enum or a function call) and the finish reason."""
        gen = key_of(body, "generationConfig") or {}
        tools = body.get("tools") or (cache or {}).get("tools") or []
        tool_config = key_of(body, "toolConfig") or (cache or {}).get("toolConfig") or {}
        seed_text = prompt_text or json.dumps(body.get("contents"), sort_keys=True)
        rng = random.Random(hashlib.blake2b(f"{self.seed}\0{seed_text}".encode(), digest_size=8).digest())

        calling = key_of(tool_config, "functionCallingConfig") or {}
        declarations = [
            d for t in tools if isinstance(t, dict) for d in (key_of(t, "functionDeclarations") or [])
        ]
        if declarations and str(calling.get("mode", "")).upper() == "ANY":
            allowed = key_of(calling, "allowedFunctionNames") or []
            pool = [d for d in declarations if not allowed or d.get("name") in allowed] or declarations
            # Prefer pydantic-ai's output tool so an agent with extra tools still terminates.
            chosen = next((d for d in pool if str(d.get("name", "")).startswith("final_result")), pool[0])
            schema = key_of(chosen, "parametersJsonSchema") or chosen.get("parameters") or {"type": "object"}
            args = fake_for_schema(schema, rng)
            if not isinstance(args, dict):
                args = {}
            if invalid:
                args = {
                    k: ({"invalid": True} if not isinstance(v, dict) else "invalid") for k, v in args.items()
                }
            return [{"functionCall": {"name": chosen.get("name", "tool"), "args": args}}], "STOP"

        echo = "echo: " + prompt_text[:200]
        mime = str(key_of(gen, "responseMimeType") or "")
        if mime == "application/json":
            schema = key_of(gen, "responseJsonSchema") or key_of(gen, "responseSchema")
            value = fake_for_schema(schema, rng) if schema else {"text": echo}
            text = json.dumps(value, ensure_ascii=False)
            if invalid:
                text = _truncate_json(text)
            return [{"text": text}], "STOP"
        if mime == "text/x.enum":
            schema = key_of(gen, "responseSchema") or key_of(gen, "responseJsonSchema") or {}
            options = schema.get("enum") if isinstance(schema, dict) else None
            if options:
                return [{"text": str(options[rng.randrange(len(options))])}], "STOP"
        max_tokens = key_of(gen, "maxOutputTokens")
        if isinstance(max_tokens, int) and max_tokens > 0 and tokens_for_chars(len(echo)) > max_tokens:
            return [{"text": echo[: max_tokens * 4]}], "MAX_TOKENS"
        return [{"text": echo}], "STOP"

    def _sse_events(self, payload: dict[str, Any]) -> list[bytes]:
        """Split a response into a few SSE chunks; usage and finishReason go in the last one."""
        candidates = payload.get("candidates")
        if not candidates or "content" not in candidates[0]:
            return [b"data: " + json.dumps(payload).encode() + b"\r\n\r\n"]
        candidate = candidates[0]
        parts = candidate["content"]["parts"]
        pieces: list[list[dict[str, Any]]] = []
        if len(parts) == 1 and "text" in parts[0] and len(parts[0]["text"]) >= 3:
            text = parts[0]["text"]
            cut1, cut2 = len(text) // 3, 2 * len(text) // 3
            pieces = [[{"text": text[:cut1]}], [{"text": text[cut1:cut2]}], [{"text": text[cut2:]}]]
        else:
            pieces = [parts]
        base = {k: v for k, v in payload.items() if k not in ("candidates", "usageMetadata")}
        events: list[bytes] = []
        for i, piece in enumerate(pieces):
            chunk_candidate: dict[str, Any] = {"content": {"parts": piece, "role": "model"}, "index": 0}
            chunk: dict[str, Any] = {"candidates": [chunk_candidate], **base}
            if i == len(pieces) - 1:
                chunk_candidate["finishReason"] = candidate.get("finishReason", "STOP")
                chunk_candidate["safetyRatings"] = candidate.get("safetyRatings", [])
                chunk["usageMetadata"] = payload.get("usageMetadata")
            events.append(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\r\n\r\n")
        return events

    def _count_tokens(self, call: _Call) -> Reply:
        body = call.body or {}
        request = (
            body.get("generateContentRequest")
            if isinstance(body.get("generateContentRequest"), dict)
            else body
        )
        chars = content_chars(request.get("contents")) + content_chars(request.get("systemInstruction"))
        total = tokens_for_chars(chars) if chars else 0
        payload: dict[str, Any] = {"totalTokens": total}
        if total:
            payload["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": total}]
        return json_reply(200, payload)

    # -- caches ------------------------------------------------------------------------------------

    def _live_cache(self, name: str) -> dict[str, Any] | None:
        """The cache record if present and unexpired (caller holds the lock)."""
        record = self._caches.get(name)
        if record is None:
            return None
        if self._cache_expiry.get(name, 0.0) <= time.time():
            return None
        return record

    def _cache_endpoint(self, call: _Call) -> Reply:
        if call.endpoint == "cachedContents.create":
            return self._cache_create(call)
        if call.endpoint == "cachedContents.list":
            return self._cache_list(call)
        name = f"cachedContents/{call.cache_id}"
        body = call.body or {}
        now = time.time()
        with self._lock:
            record = self._live_cache(name)
            if record is None:
                return error_reply(403, CACHE_NOT_FOUND)
            if call.endpoint == "cachedContents.get":
                return json_reply(200, _cache_view(record))
            if call.endpoint == "cachedContents.delete":
                self._caches.pop(name, None)
                self._cache_expiry.pop(name, None)
                return json_reply(200, {})
            expiry = _expiry_from(body, now)
            if expiry is None:
                return error_reply(400, "CachedContent update requires ttl or expire_time.")
            self._cache_expiry[name] = expiry
            record["expireTime"] = rfc3339(expiry)
            record["updateTime"] = rfc3339(now)
            return json_reply(200, _cache_view(record))

    def _cache_create(self, call: _Call) -> Reply:
        body = call.body or {}
        chars = content_chars(body.get("contents")) + content_chars(body.get("systemInstruction"))
        if not chars:
            return error_reply(400, "CachedContent must have at least one of contents or system_instruction.")
        tokens = tokens_for_chars(chars)
        if tokens < self.min_cache_tokens:
            return error_reply(
                400,
                f"Cached content is too small. total_token_count={tokens}, "
                f"min_total_token_count={self.min_cache_tokens}",
            )
        now = time.time()
        expiry = _expiry_from(body, now)
        if expiry is None:
            expiry = now + _DEFAULT_CACHE_TTL_S
        with self._lock:
            cache_id = "".join(self._rng.choice(_ID_ALPHABET) for _ in range(12))
            name = f"cachedContents/{cache_id}"
            record: dict[str, Any] = {
                "name": name,
                "model": f"models/{call.model}",
                "displayName": str(body.get("displayName") or ""),
                "createTime": rfc3339(now),
                "updateTime": rfc3339(now),
                "expireTime": rfc3339(expiry),
                "usageMetadata": {"totalTokenCount": tokens},
                "contents": body.get("contents"),
                "systemInstruction": body.get("systemInstruction"),
                "tools": body.get("tools"),
                "toolConfig": body.get("toolConfig"),
            }
            self._caches[name] = record
            self._cache_expiry[name] = expiry
            return json_reply(200, _cache_view(record))

    def _cache_list(self, call: _Call) -> Reply:
        try:
            page_size = int((call.query.get("pageSize") or ["50"])[0])
            offset = int((call.query.get("pageToken") or ["0"])[0] or 0)
        except ValueError:
            return error_reply(400, "Invalid page token or size.")
        page_size = min(max(page_size, 1), 1000)
        with self._lock:
            live = [_cache_view(r) for n, r in self._caches.items() if self._live_cache(n) is not None]
        page = live[offset : offset + page_size]
        payload: dict[str, Any] = {}
        if page:
            payload["cachedContents"] = page
        if offset + page_size < len(live):
            payload["nextPageToken"] = str(offset + page_size)
        return json_reply(200, payload)


def _inline_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``{request, metadata}`` entries of an inline batchGenerateContent body (empty if malformed)."""
    batch = body.get("batch")
    config = key_of(batch, "inputConfig") if isinstance(batch, dict) else None
    inline = config.get("requests") if isinstance(config, dict) else None
    items = inline.get("requests") if isinstance(inline, dict) else None
    if not isinstance(items, list):
        return []
    return [i for i in items if isinstance(i, dict) and isinstance(i.get("request"), dict)]


def _as_list(contents: Any) -> list[Any]:
    if isinstance(contents, list):
        return contents
    return [] if contents is None else [contents]


def _batch_fault_status(fault: Fault | None, model: str) -> tuple[int, str] | None:
    """The (HTTP status, message) a fault gives one request inside a batch; None = answer it."""
    if fault is None:
        return None
    if fault.kind == "status":
        code = int(fault.code or 500)
        return code, fault.message or DEFAULT_MESSAGES.get(code, "Unknown error.")
    if fault.kind == "rate_limit":
        return 429, rate_limit_body(fault.seconds, model=model, per_day=fault.per_day)["error"]["message"]
    if fault.kind in ("connection_reset", "malformed_body"):
        return 500, DEFAULT_MESSAGES[500]
    return None


def _cache_name(name: str) -> str:
    """Normalise "ID" or "cachedContents/ID" to "cachedContents/ID"."""
    return name if name.startswith("cachedContents/") else f"cachedContents/{name}"


def _cache_view(record: dict[str, Any]) -> dict[str, Any]:
    """The CachedContent resource as the API returns it (no contents, instruction or tools)."""
    keys = ("name", "model", "displayName", "createTime", "updateTime", "expireTime", "usageMetadata")
    return {k: record[k] for k in keys}


def _expiry_from(body: dict[str, Any], now: float) -> float | None:
    """Absolute expiry from ``ttl`` ("300s") or ``expireTime`` (RFC3339); None if neither is usable."""
    ttl = parse_duration(body.get("ttl"))
    if ttl is not None:
        return now + ttl
    return parse_rfc3339(body.get("expireTime"))


def _usage(prompt: int, candidates: int, cached: int) -> dict[str, Any]:
    """usageMetadata: promptTokenCount includes cached tokens; total = prompt + candidates."""
    usage: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + candidates,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if cached:
        usage["cachedContentTokenCount"] = cached
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cached}]
    if candidates:
        usage["candidatesTokensDetails"] = [{"modality": "TEXT", "tokenCount": candidates}]
    return usage


def _truncate_json(text: str) -> str:
    """Cut JSON text in half, like an output that hit a limit; guaranteed not to parse."""
    cut = text[: max(1, len(text) // 2)]
    try:
        json.loads(cut)
    except ValueError:
        return cut
    return cut + ","
