"""A loopback HTTP emulator of the Gemini Developer API (Generative Language API).

The real ``google-genai`` SDK (``client.aio.models`` / ``client.aio.caches``) and pydantic-ai's
``GoogleModel`` talk to it unchanged: point ``HttpOptions.base_url`` at :attr:`GeminiEmulator.base_url`.
It is both the project's test double and a load-testing target, so it answers deterministically,
enforces rpm/tpm quotas with real 429 bodies, records every request, and can inject scripted faults.

Design: a ``ThreadingHTTPServer`` (one daemon thread per keep-alive connection) on a background thread.
Latency and hangs wait on a stop event, so slow requests never serialise and :meth:`stop` never
blocks on them. Every response is written with one ``sendall`` and an explicit Content-Length.
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

from ._wire import (
    BAD_GATEWAY_HTML,
    CACHE_CONFLICT,
    CACHE_NOT_FOUND,
    MALFORMED_BODY,
    UNREGISTERED_CALLER,
    content_chars,
    error_body,
    invalid_api_key_body,
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
_JSON_TYPE = "application/json; charset=UTF-8"
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
    endpoint: (
        str  # "generateContent" | "streamGenerateContent" | "countTokens" | "cachedContents.*" | "unknown"
    )
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


@dataclass
class _Reply:
    """What the handler thread writes back."""

    status: int
    body: bytes = b""
    content_type: str = _JSON_TYPE
    events: list[bytes] | None = None  # SSE events; body is ignored when set
    drop: bool = False  # close the socket without answering
    usage: dict[str, Any] | None = None


def _json_reply(status: int, payload: Any, usage: dict[str, Any] | None = None) -> _Reply:
    return _Reply(status, json.dumps(payload, ensure_ascii=False).encode(), usage=usage)


def _error(code: int, message: str | None = None) -> _Reply:
    if code == 502:
        return _Reply(502, BAD_GATEWAY_HTML, content_type="text/html; charset=UTF-8")
    return _json_reply(code, error_body(code, message))


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
        return self.rfile.read(length) if length > 0 else b""

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
        """Clear the request log, fault rules, caches and quota counters."""
        self.faults.clear()
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

    def usage_totals(self) -> dict[str, int]:
        """Sums of the usageMetadata actually returned: prompt, candidates, total, cached."""
        totals = {"prompt": 0, "candidates": 0, "total": 0, "cached": 0}
        for r in self.requests:
            if r.usage:
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

    # -- request processing ------------------------------------------------------------------------

    def _serve(self, method: str, target: str, headers: Message, raw: bytes) -> _Reply:
        """Process one request end to end and log it before the reply is written."""
        call = self._parse(method, target, headers, raw)
        with self._lock:
            self._in_flight += 1
        try:
            reply = self._process(call)
        except Exception:
            logger.exception("gemini emulator: internal error for %s %s", method, call.endpoint)
            reply = _error(500)
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
        endpoint, model, cache_id = "unknown", None, None
        if model_match := _MODEL_RE.match(rest):
            model = model_match.group(1)
            if model_match.group(2) in _MODEL_ACTIONS and method == "POST":
                endpoint = model_match.group(2)
        elif rest == "cachedContents":
            endpoint = {"POST": "cachedContents.create", "GET": "cachedContents.list"}.get(method, "unknown")
        elif cache_match := _CACHE_RE.match(rest):
            cache_id = cache_match.group(1)
            endpoint = {
                "GET": "cachedContents.get",
                "PATCH": "cachedContents.patch",
                "DELETE": "cachedContents.delete",
            }.get(method, "unknown")
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
        )

    def _process(self, call: _Call) -> _Reply:
        if call.endpoint == "unknown":
            return _error(404, f"Method not found: {call.method} {urlsplit(call.target).path}")
        if self.require_api_key and not call.api_key:
            return _error(403, UNREGISTERED_CALLER)
        if self.valid_api_keys is not None and call.api_key not in self.valid_api_keys:
            return _json_reply(400, invalid_api_key_body())
        if call.body_error:
            return _error(400, call.body_error)
        if call.endpoint in _MODEL_ACTIONS or call.endpoint == "cachedContents.create":
            if not call.model or not self._model_known(call.model):
                action = "createCachedContent" if call.endpoint == "cachedContents.create" else call.endpoint
                return _error(
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
        return self._cache_endpoint(call)

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

    def _apply_transport_fault(self, call: _Call, fault: Fault) -> _Reply | None:
        """Faults that replace the whole HTTP answer; None means "answer normally" (maybe later)."""
        if fault.kind == "rate_limit":
            return _json_reply(
                429, rate_limit_body(fault.seconds, model=call.model, per_day=fault.per_day, limit=None)
            )
        if fault.kind == "status":
            return _error(int(fault.code or 500), fault.message)
        if fault.kind in ("hang", "delay"):
            return None if self._sleep(fault.seconds) else _Reply(0, drop=True)
        if fault.kind == "connection_reset":
            return _Reply(0, drop=True)
        if fault.kind == "malformed_body":
            return _Reply(200, MALFORMED_BODY, content_type="text/plain; charset=UTF-8")
        return None

    # -- generate ----------------------------------------------------------------------------------

    def _generate(self, call: _Call) -> _Reply:
        body = call.body or {}
        contents = body.get("contents")
        if not contents:
            return _error(400, "* GenerateContentRequest.contents: contents is not specified\n")
        cache: dict[str, Any] | None = None
        if call.cached_content:
            with self._lock:
                cache = self._live_cache(call.cached_content)
            if cache is None:
                return _error(403, CACHE_NOT_FOUND)
            if any(body.get(k) for k in ("systemInstruction", "tools", "toolConfig")):
                return _error(400, CACHE_CONFLICT)
            if cache["model"] != f"models/{call.model}":
                return _error(
                    400,
                    f"Model used by GenerateContent request (models/{call.model}) and CachedContent "
                    f"({cache['model']}) has to be the same.",
                )
        cached_tokens = int(cache["usageMetadata"]["totalTokenCount"]) if cache else 0
        request_chars = content_chars(contents) + content_chars(body.get("systemInstruction"))
        prompt_tokens = tokens_for_chars(request_chars) + cached_tokens

        with self._lock:
            admission, wait_s, kind, limit = self._quota.admit(time.monotonic(), prompt_tokens)
        if admission is None:
            delay = max(1, math.ceil(wait_s))
            return _json_reply(
                429, rate_limit_body(delay, model=call.model, tokens=kind == "tokens", limit=limit)
            )
        fault = self.faults.pick(call.endpoint, call.prompt_text)
        call.fault = fault.kind if fault else None
        if fault is not None and fault.kind == "rate_limit":
            with self._lock:
                self._quota.release(admission)
            return self._apply_transport_fault(call, fault) or _error(429)
        if not self._sleep(self._latency_s()):
            return _Reply(0, drop=True)
        if fault is not None:
            early = self._apply_transport_fault(call, fault)
            if early is not None:
                return early

        payload, usage = self._generation_payload(call, body, cache, prompt_tokens, cached_tokens, fault)
        if call.endpoint == "streamGenerateContent":
            return _Reply(200, events=self._sse_events(payload), usage=usage)
        return _json_reply(200, payload, usage=usage)

    def _generation_payload(
        self,
        call: _Call,
        body: dict[str, Any],
        cache: dict[str, Any] | None,
        prompt_tokens: int,
        cached_tokens: int,
        fault: Fault | None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        with self._lock:
            self._response_seq += 1
            seq = self._response_seq
        response_id = hashlib.blake2b(
            f"{self.seed}:{seq}:{call.prompt_text}".encode(), digest_size=12
        ).hexdigest()
        base: dict[str, Any] = {"modelVersion": call.model, "responseId": response_id}
        kind = fault.kind if fault else None
        if kind == "safety_block":
            usage = _usage(prompt_tokens, 0, cached_tokens)
            feedback = {"blockReason": fault.reason if fault else "SAFETY", "safetyRatings": _HIGH_RATINGS}
            return {"promptFeedback": feedback, "usageMetadata": usage, **base}, usage
        if kind == "finish_safety":
            usage = _usage(prompt_tokens, 0, cached_tokens)
            candidate = {"finishReason": "SAFETY", "index": 0, "safetyRatings": _HIGH_RATINGS}
            return {"candidates": [candidate], "usageMetadata": usage, **base}, usage

        parts, finish = self._answer(call, body, cache, invalid=kind == "invalid_json")
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
        self, call: _Call, body: dict[str, Any], cache: dict[str, Any] | None, *, invalid: bool
    ) -> tuple[list[dict[str, Any]], str]:
        """Deterministic answer parts (text, JSON text, enum or a function call) and the finish reason."""
        gen = key_of(body, "generationConfig") or {}
        tools = body.get("tools") or (cache or {}).get("tools") or []
        tool_config = key_of(body, "toolConfig") or (cache or {}).get("toolConfig") or {}
        seed_text = call.prompt_text or json.dumps(body.get("contents"), sort_keys=True)
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

        echo = "echo: " + call.prompt_text[:200]
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

    def _count_tokens(self, call: _Call) -> _Reply:
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
        return _json_reply(200, payload)

    # -- caches ------------------------------------------------------------------------------------

    def _live_cache(self, name: str) -> dict[str, Any] | None:
        """The cache record if present and unexpired (caller holds the lock)."""
        record = self._caches.get(name)
        if record is None:
            return None
        if self._cache_expiry.get(name, 0.0) <= time.time():
            return None
        return record

    def _cache_endpoint(self, call: _Call) -> _Reply:
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
                return _error(403, CACHE_NOT_FOUND)
            if call.endpoint == "cachedContents.get":
                return _json_reply(200, _cache_view(record))
            if call.endpoint == "cachedContents.delete":
                self._caches.pop(name, None)
                self._cache_expiry.pop(name, None)
                return _json_reply(200, {})
            expiry = _expiry_from(body, now)
            if expiry is None:
                return _error(400, "CachedContent update requires ttl or expire_time.")
            self._cache_expiry[name] = expiry
            record["expireTime"] = rfc3339(expiry)
            record["updateTime"] = rfc3339(now)
            return _json_reply(200, _cache_view(record))

    def _cache_create(self, call: _Call) -> _Reply:
        body = call.body or {}
        chars = content_chars(body.get("contents")) + content_chars(body.get("systemInstruction"))
        if not chars:
            return _error(400, "CachedContent must have at least one of contents or system_instruction.")
        tokens = tokens_for_chars(chars)
        if tokens < self.min_cache_tokens:
            return _error(
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
            return _json_reply(200, _cache_view(record))

    def _cache_list(self, call: _Call) -> _Reply:
        try:
            page_size = int((call.query.get("pageSize") or ["50"])[0])
            offset = int((call.query.get("pageToken") or ["0"])[0] or 0)
        except ValueError:
            return _error(400, "Invalid page token or size.")
        page_size = min(max(page_size, 1), 1000)
        with self._lock:
            live = [_cache_view(r) for n, r in self._caches.items() if self._live_cache(n) is not None]
        page = live[offset : offset + page_size]
        payload: dict[str, Any] = {}
        if page:
            payload["cachedContents"] = page
        if offset + page_size < len(live):
            payload["nextPageToken"] = str(offset + page_size)
        return _json_reply(200, payload)


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
