"""Gemini models over the real ``google-genai`` SDK: plain calls and a shared context cache.

``GeminiModel`` turns one ``client.aio.models.generate_content`` call into an :class:`LLMResponse`, raising
our own exceptions (with the billed tokens attached) for blocked and empty answers, because the SDK never
raises for those. ``GeminiCachedModel`` adds the context-cache lifecycle: find-or-create by content
fingerprint, in-place TTL renewal, one serialised recreation when the API says the cache is gone, and a
concurrency-safe explicit delete. Its serialisation works from any event loop or thread (Prefect runs
mapped async tasks on their own loops), so one instance can be shared by a whole flow run.

Both models pickle (Dask / Ray workers, process pools): a live client travels as a
:class:`GenaiClientFactory` recipe and clients and locks are rebuilt lazily where the copy lands. A
prepared ``GeminiCachedModel`` carries its cache's name, so a worker's copy uses the cache the driver's
``prepare()`` found or created; a copy pickled before that looks it up by display name, like ``prepare``.

The SDK's own retries stay off (``retry_options=None``): retries, backoff and ``RetryInfo`` belong to the
orchestration layer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any, Union

from google.genai import types
from pydantic import ValidationError

from prefect_batchllm.core.errors import (
    BlockedResponseError,
    InvalidOutputError,
    is_missing_cache_error,
    register_secret,
)
from prefect_batchllm.core.identity import sha256_of
from prefect_batchllm.core.pricing import bare_model_name
from prefect_batchllm.core.tokens import TokenUsage, normalize_usage
from prefect_batchllm.models.base import LLMResponse

if TYPE_CHECKING:
    from google import genai

__all__ = ["GeminiCachedModel", "GeminiModel", "GenaiClientFactory", "usage_from_response"]

#: Finish reasons that mean the answer was withheld on safety/policy grounds (never worth retrying).
BLOCKING_FINISH_REASONS = frozenset(
    {"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT"}
)
#: Finish reasons that, with no text, mean the answer was withheld and a retry would repeat it (at a fixed
#: temperature the model recites the same source again): treated as blocked, never retried.
WITHHELD_FINISH_REASONS = frozenset({"RECITATION"})
#: ``GenerateContentConfig`` keys a caller may pass through ``generate(config=...)``.
CONFIG_KEYS = frozenset(types.GenerateContentConfig.model_fields) - {"cached_content", "http_options"}
#: Keys Gemini rejects in a request that uses a context cache (they belong to the cache itself).
CACHE_CONFLICTING_KEYS = frozenset({"system_instruction", "tools", "tool_config"})
DISPLAY_NAME_PREFIX = "batchllm"
#: Request configs a model keeps built (per temperature, instruction, config, cache name); a batch uses 1-2.
_CONFIG_CACHE_SIZE = 64


class _CallConfig(types.GenerateContentConfig):
    """A ``GenerateContentConfig`` (same fields, same request) that google-genai converts in less CPU.

    The SDK reads every config field with ``key in config`` first; on a pydantic model ``in`` iterates all
    ~50 ``(name, value)`` pairs, ~2,000 iterations per request (~0.15 ms). A model never contains a bare
    string (it iterates pairs), so answering ``False`` at once is exactly the iteration's answer, and the
    SDK goes on to ``getattr``. Only :meth:`GeminiModel.generate` sends these; configs handed to callers
    (``request_config``) stay plain ``GenerateContentConfig``.
    """

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            return False
        return any(key == pair for pair in self)  # pydantic's own: membership among (field, value) pairs


def _freeze(value: Any) -> Any:
    """A hashable, type-exact key for a config value (``0`` and ``False`` differ); raises ``TypeError`` for
    values that cannot be keyed (then the config is built per call)."""
    if isinstance(value, Mapping):
        return (dict, tuple((_freeze(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return (type(value), tuple(_freeze(v) for v in value))
    hash(value)
    return (type(value), value)


def _enum_text(value: Any) -> str | None:
    """``FinishReason.STOP`` -> ``"STOP"``; plain strings pass through; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _ratings(ratings: Any) -> dict[str, str]:
    """Safety ratings as ``{category: probability}`` strings (JSON-friendly for results and the UI)."""
    out: dict[str, str] = {}
    for rating in ratings or []:
        category = _enum_text(getattr(rating, "category", None))
        if category:
            out[category] = _enum_text(getattr(rating, "probability", None)) or "UNKNOWN"
    return out


def _sha256(payload: Any) -> str:
    return sha256_of(payload)


def usage_from_response(response: Any) -> TokenUsage:
    """Billed tokens of a ``GenerateContentResponse``; thinking tokens are billed, so they count as output."""
    meta = getattr(response, "usage_metadata", None)
    if meta is None:
        return normalize_usage(None)
    prompt = (meta.prompt_token_count or 0) + (meta.tool_use_prompt_token_count or 0)
    output = (meta.candidates_token_count or 0) + (meta.thoughts_token_count or 0)
    return {
        "input_tokens": prompt,
        "output_tokens": output,
        "total_tokens": meta.total_token_count or prompt + output,
        "cached_input_tokens": meta.cached_content_token_count or 0,
    }


#: A ``genai.Client``, or a zero-argument factory of them (then one client is kept per event loop).
ClientOrFactory = Union["genai.Client", Callable[[], "genai.Client"]]


def _validate_model_and_client(model: Any, client: Any) -> None:
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a non-empty model name such as 'gemini-2.5-flash', got {model!r}")
    if client is None:
        raise TypeError("client is None; pass a google.genai.Client (e.g. genai.Client(api_key=...))")
    if not hasattr(client, "aio") and not callable(client):
        raise TypeError(
            f"client must be a google.genai.Client or a factory returning one, got {type(client).__name__}"
        )


#: Headers the SDK adds itself (the key, its version tags): never copied into a client recipe.
_SDK_HEADERS = frozenset({"x-goog-api-key", "user-agent", "x-goog-api-client", "content-type"})
#: ``HttpOptions`` fields that hold live transport objects; a client using them cannot be rebuilt elsewhere.
_LIVE_HTTP_FIELDS = ("httpx_client", "httpx_async_client", "aiohttp_client")


class GenaiClientFactory:
    """A picklable recipe for a ``genai.Client``: what another process needs to build its own.

    A ``genai.Client`` holds locks and loop-bound connection pools, so it cannot travel to a Dask / Ray
    worker; a model pickles its client as this recipe instead (API key or Vertex project/location and
    credentials, endpoint, API version, headers, timeout, retry options) and the worker builds one
    client per event loop from it. The API key travels (the worker must call the API with it) but never
    shows in ``repr``, and it is registered for masking again in the process that unpickles it.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        vertexai: bool | None = None,
        project: str | None = None,
        location: str | None = None,
        credentials: Any = None,
        http_options: dict[str, Any] | None = None,
    ) -> None:
        self._api_key = api_key
        self.vertexai = vertexai
        self.project = project
        self.location = location
        self.credentials = credentials
        self.http_options = dict(http_options or {})
        register_secret(api_key)

    @classmethod
    def of(cls, client: genai.Client) -> GenaiClientFactory:
        """The recipe of an existing client (read from its settings, the SDK's own headers left out)."""
        api = getattr(client, "_api_client", None)
        options = getattr(api, "_http_options", None)
        if api is None or options is None:
            raise TypeError(f"cannot read the settings of {type(client).__name__}; pass a client factory")
        live = [name for name in _LIVE_HTTP_FIELDS if getattr(options, name, None) is not None]
        if live:
            raise TypeError(
                f"this genai.Client was built with http_options {live} (live transport objects), which "
                "cannot be pickled for another process; give the model a zero-argument factory that "
                "builds the client (e.g. GeminiModel(model, lambda: genai.Client(...))) instead"
            )
        fields: dict[str, Any] = {}
        vertex = bool(getattr(api, "vertexai", False))
        if not vertex or getattr(api, "custom_base_url", None):
            fields["base_url"] = options.base_url
        for name in ("api_version", "timeout", "client_args", "async_client_args", "extra_body"):
            value = getattr(options, name, None)
            if value is not None:
                fields[name] = value
        if options.retry_options is not None:
            fields["retry_options"] = options.retry_options.model_dump(exclude_none=True)
        headers = {k: v for k, v in (options.headers or {}).items() if k.lower() not in _SDK_HEADERS}
        if headers:
            fields["headers"] = headers
        return cls(
            api_key=getattr(api, "api_key", None),
            vertexai=vertex or None,
            project=getattr(api, "project", None),
            location=getattr(api, "location", None),
            credentials=getattr(api, "_credentials", None),
            http_options=fields,
        )

    def __call__(self) -> genai.Client:
        """A new ``genai.Client`` built from this recipe."""
        from google import genai

        return genai.Client(
            vertexai=self.vertexai,
            api_key=self._api_key,
            project=self.project,
            location=self.location,
            credentials=self.credentials,
            http_options=types.HttpOptions(**self.http_options),
        )

    def __repr__(self) -> str:
        where = self.http_options.get("base_url") or (self.location if self.vertexai else None)
        key = "***" if self._api_key else None
        return f"GenaiClientFactory(api_key={key!r}, vertexai={self.vertexai!r}, base_url={where!r})"

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        register_secret(self._api_key)  # this process masks the key from now on


def register_client_key(client: Any) -> None:
    """Register the API key a ``genai.Client`` was built with for masking (however the key came in).

    A model built on ``genai.Client(api_key=...)`` never passes through ``GeminiCredentials``; without this
    an error message echoing the key (a proxy, a gateway) would reach results, artifacts and logs.
    """
    api_client = getattr(client, "_api_client", None)
    for key in (getattr(api_client, "api_key", None), getattr(client, "api_key", None)):
        if isinstance(key, str):
            register_secret(key)


class GeminiModel:
    """An :class:`~prefect_batchllm.models.base.LLMModel` backed by ``client.aio.models.generate_content``.

    ``safety_settings`` and ``system_instruction`` are defaults for every call; ``generate(config=...)``
    merges any ``GenerateContentConfig`` field (``response_mime_type``, ``response_schema``,
    ``max_output_tokens``...) on top. ``client`` may be a zero-argument factory instead of a client: the
    model then keeps one client per event loop, which a model shared by Prefect tasks needs.
    """

    def __init__(
        self,
        model: str,
        client: ClientOrFactory,
        *,
        safety_settings: list[dict[str, Any]] | None = None,
        system_instruction: str | None = None,
    ) -> None:
        _validate_model_and_client(model, client)
        if system_instruction is not None and not isinstance(system_instruction, str):
            raise TypeError(
                f"system_instruction must be a str or None, not {type(system_instruction).__name__}"
            )
        self.model = model
        #: The client as given (a ``genai.Client`` or a factory); requests go through :meth:`_client`.
        self.client = client
        self._client_factory: Callable[[], genai.Client] | None = None if hasattr(client, "aio") else client
        if self._client_factory is None:
            register_client_key(client)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, genai.Client] = (
            weakref.WeakKeyDictionary()
        )
        self._clients_lock = threading.Lock()
        #: Built request configs by what they were built from (see :meth:`_call_config`).
        self._call_configs: dict[Any, types.GenerateContentConfig] = {}
        self.safety_settings = list(safety_settings) if safety_settings else None
        self.system_instruction = system_instruction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r})"

    # -- pickling: to Dask / Ray workers, process pools, persisted results ---------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Configuration only: a live ``genai.Client`` travels as a :class:`GenaiClientFactory` recipe,
        per-loop clients and locks stay behind (the unpickled copy builds its own, lazily)."""
        state = self.__dict__.copy()
        state.pop("_clients", None)
        state.pop("_clients_lock", None)
        state.pop("_call_configs", None)
        if self._client_factory is None:
            recipe = GenaiClientFactory.of(self.client)  # type: ignore[arg-type]
            state["client"] = recipe
            state["_client_factory"] = recipe
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._clients = weakref.WeakKeyDictionary()
        self._clients_lock = threading.Lock()
        self._call_configs = {}

    def _client(self) -> genai.Client:
        """The client to use on the running event loop.

        A ``genai.Client``'s HTTP pool is bound to the loop that first used it, and Prefect runs mapped
        async tasks on their own loops; given a factory, the model keeps one client per loop.
        """
        if self._client_factory is None:
            return self.client  # type: ignore[return-value]
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            client = self._clients.get(loop)
            if client is None:
                client = self._client_factory()
                if not hasattr(client, "aio"):
                    raise TypeError(f"client factory returned {type(client).__name__}, not a genai.Client")
                register_client_key(client)
                self._clients[loop] = client
        return client

    @property
    def model_name(self) -> str:
        """Bare model name (no ``models/`` prefix), for pricing and the UI."""
        return bare_model_name(self.model)

    def fingerprint(self) -> str:
        """Stable hash of what this model computes (model, system instruction, safety settings)."""
        return _sha256(
            {
                "model": self.model_name,
                "system_instruction": self.system_instruction,
                "safety_settings": self.safety_settings,
            }
        )[:16]

    async def generate(
        self,
        prompt: str | list[Any],
        *,
        temperature: float = 0.0,
        system_instruction: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> LLMResponse:
        """One ``generateContent`` call; raises ``BlockedResponseError`` / ``InvalidOutputError`` (billed)."""
        request_config = self._call_config(temperature, system_instruction, config)
        response = await self._client().aio.models.generate_content(
            model=self.model, contents=prompt, config=request_config
        )
        return self._to_response(response, schema_requested=_schema_requested(config))

    # -- the two halves of ``generate``, for callers that send requests another way (batch jobs) ------

    def client_for_loop(self) -> genai.Client:
        """The ``genai.Client`` this model uses on the running event loop (e.g. to submit batch jobs)."""
        return self._client()

    async def request_config(
        self, *, temperature: float = 0.0, config: dict[str, Any] | None = None
    ) -> types.GenerateContentConfig:
        """The ``GenerateContentConfig`` :meth:`generate` would send (system instruction, safety, schema)."""
        return self._build_config(temperature, None, config)

    def to_llm_response(
        self, response: types.GenerateContentResponse, *, config: dict[str, Any] | None = None
    ) -> LLMResponse:
        """What :meth:`generate` returns for ``response`` (same blocked / empty-answer checks and errors)."""
        return self._to_response(response, schema_requested=_schema_requested(config))

    # -- building blocks shared with the cached model ------------------------------------------------

    def _call_config(
        self,
        temperature: float,
        system_instruction: str | None,
        config: dict[str, Any] | None,
        *,
        cached_content: str | None = None,
    ) -> types.GenerateContentConfig:
        """The config :meth:`generate` sends, built and validated once per distinct input and reused.

        Safe to share between concurrent calls: the SDK deep-copies a config before it uses it. A config
        holding values that cannot be keyed (e.g. pydantic objects) is built per call.
        """
        try:
            key: Any = (
                _freeze(temperature),
                system_instruction,
                cached_content,
                _freeze(self.safety_settings),
                self.system_instruction,
                _freeze(config),
            )
        except TypeError:
            key = None
        cache = self._call_configs
        built = cache.get(key) if key is not None else None
        if built is None:
            built = self._build_config(
                temperature, system_instruction, config, cached_content=cached_content, kind=_CallConfig
            )
            if key is not None:
                if len(cache) >= _CONFIG_CACHE_SIZE:
                    cache.clear()
                cache[key] = built
        return built

    def _build_config(
        self,
        temperature: float,
        system_instruction: str | None,
        config: dict[str, Any] | None,
        *,
        cached_content: str | None = None,
        kind: type[types.GenerateContentConfig] = types.GenerateContentConfig,
    ) -> types.GenerateContentConfig:
        fields: dict[str, Any] = {"temperature": temperature}
        if self.safety_settings:
            fields["safety_settings"] = self.safety_settings
        if cached_content is None:
            instruction = system_instruction if system_instruction is not None else self.system_instruction
            if instruction is not None:
                fields["system_instruction"] = instruction
        else:
            fields["cached_content"] = cached_content
        if config:
            if not isinstance(config, Mapping):
                raise TypeError(f"config must be a dict of GenerateContentConfig fields, got {type(config)}")
            unknown = sorted(k for k in config if k not in CONFIG_KEYS)
            if unknown:
                raise ValueError(
                    f"unknown Gemini config key(s) {unknown}; expected GenerateContentConfig fields such as "
                    "response_mime_type, response_schema, max_output_tokens, top_p, thinking_config"
                )
            fields.update(config)
        # retry_options stay None: the orchestration layer owns retries and honours RetryInfo.
        try:
            return kind(**fields)
        except ValidationError as exc:
            # A ValidationError would be classified invalid *output* (retryable); this is a caller bug.
            raise ValueError(f"invalid Gemini config: {exc}") from None

    def _to_response(self, response: types.GenerateContentResponse, *, schema_requested: bool) -> LLMResponse:
        usage = usage_from_response(response)
        candidates = response.candidates or []
        candidate = candidates[0] if candidates else None
        finish_reason = _enum_text(getattr(candidate, "finish_reason", None))
        feedback = response.prompt_feedback
        block_reason = _enum_text(getattr(feedback, "block_reason", None))
        safety = _ratings(getattr(candidate, "safety_ratings", None))
        feedback_ratings = _ratings(getattr(feedback, "safety_ratings", None))
        metadata: dict[str, Any] = {
            "finish_reason": finish_reason,
            "safety_ratings": safety or feedback_ratings,
            "prompt_feedback": (
                {"block_reason": block_reason, "safety_ratings": feedback_ratings} if feedback else None
            ),
            "model_version": response.model_version,
            "response_id": response.response_id,
            "parsed": None,
        }
        if candidate is None or block_reason:
            reason = block_reason or "NO_CANDIDATES"
            raise BlockedResponseError(
                f"Gemini blocked the prompt ({reason})",
                block_reason=reason,
                safety_ratings=feedback_ratings or safety,
                token_usage=usage,
            )
        if finish_reason in BLOCKING_FINISH_REASONS:
            raise BlockedResponseError(
                f"Gemini withheld the answer (finish_reason={finish_reason})",
                block_reason=finish_reason,
                safety_ratings=safety,
                token_usage=usage,
            )
        text = _candidate_text(candidate)
        has_calls = any(getattr(p, "function_call", None) for p in _parts(candidate))
        if not text and not has_calls and finish_reason in WITHHELD_FINISH_REASONS:
            raise BlockedResponseError(
                f"Gemini withheld the answer (finish_reason={finish_reason})",
                block_reason=finish_reason,
                safety_ratings=safety,
                token_usage=usage,
            )
        if not text and not has_calls:
            raise InvalidOutputError(
                f"Gemini returned no text (finish_reason={finish_reason or 'unknown'})",
                raw_text="",
                token_usage=usage,
            )
        if schema_requested:
            metadata["parsed"] = response.parsed
        return LLMResponse(
            text=text,
            input_tokens=usage["input_tokens"],
            output_tokens=usage["output_tokens"],
            total_tokens=usage["total_tokens"],
            cached_input_tokens=usage["cached_input_tokens"],
            metadata=metadata,
            raw=response,
        )


def _parts(candidate: Any) -> list[Any]:
    content = getattr(candidate, "content", None)
    return list(getattr(content, "parts", None) or [])


def _candidate_text(candidate: Any) -> str:
    """Joined text parts of a candidate, skipping thoughts (what ``response.text`` does, without warnings)."""
    return "".join(
        p.text for p in _parts(candidate) if isinstance(getattr(p, "text", None), str) and not p.thought
    )


def _schema_requested(config: Mapping[str, Any] | None) -> bool:
    return config is not None and (
        config.get("response_schema") is not None or config.get("response_json_schema") is not None
    )


# ---------------------------------------------------------------------------------------------------------
# Serialisation that works across event loops and threads.


class _AnyLoopLock:
    """An async mutex that any task on any event loop or thread may use; FIFO, never bound to a loop.

    ``asyncio.Lock`` binds to the first loop that waits on it, and Prefect runs mapped async tasks on
    their own loops, so a shared model needs a lock built on a thread lock and ``concurrent.futures``.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locked = False
        self._waiters: deque[concurrent.futures.Future[None]] = deque()

    async def __aenter__(self) -> None:
        with self._mutex:
            if not self._locked:
                self._locked = True
                return
            waiter: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._waiters.append(waiter)
        try:
            await asyncio.wrap_future(waiter)
        except asyncio.CancelledError:
            with self._mutex:
                if waiter in self._waiters:  # still queued: simply leave the queue
                    self._waiters.remove(waiter)
                    raise
            if not waiter.cancelled():  # ownership was handed over just as we were cancelled
                self._release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def _release(self) -> None:
        with self._mutex:
            while self._waiters:
                waiter = self._waiters.popleft()
                if waiter.set_running_or_notify_cancel():
                    waiter.set_result(None)  # hand the lock straight to the next waiter
                    return
            self._locked = False


class GeminiCachedModel(GeminiModel):
    """A Gemini model whose requests share one context cache (``cachedContents``).

    Share ONE instance across every item that uses the same context: ``prepare()`` finds a live cache
    with the same content fingerprint and tags (encoded in ``display_name``) or creates one, exactly once
    per instance however many callers race; ``generate()`` renews the TTL near expiry and recreates the
    cache once if the API says it is gone; ``cleanup()`` keeps the cache for the next run;
    ``delete_cache()`` removes it explicitly. ``system_instruction`` belongs to the cache, not the request.
    """

    def __init__(
        self,
        model: str,
        client: ClientOrFactory,
        cached_content: Any,
        *,
        cache_ttl_seconds: int = 3600,
        cache_renewal_buffer_seconds: int = 300,
        auto_renew: bool = True,
        cache_tags: dict[str, str] | None = None,
        safety_settings: list[dict[str, Any]] | None = None,
        system_instruction: str | None = None,
    ) -> None:
        super().__init__(
            model, client, safety_settings=safety_settings, system_instruction=system_instruction
        )
        if cached_content is None or (isinstance(cached_content, str | list | tuple) and not cached_content):
            raise ValueError("cached_content must be non-empty: the documents/instructions to cache")
        if isinstance(cache_ttl_seconds, bool) or not isinstance(cache_ttl_seconds, int | float):
            raise TypeError(f"cache_ttl_seconds must be a number of seconds, got {cache_ttl_seconds!r}")
        if not cache_ttl_seconds >= 1 or cache_ttl_seconds == float("inf"):
            raise ValueError(f"cache_ttl_seconds must be a finite number >= 1, got {cache_ttl_seconds}")
        if isinstance(cache_renewal_buffer_seconds, bool) or not isinstance(
            cache_renewal_buffer_seconds, int | float
        ):
            raise TypeError(
                "cache_renewal_buffer_seconds must be a number of seconds, got "
                f"{cache_renewal_buffer_seconds!r}"
            )
        if not 0 <= cache_renewal_buffer_seconds < cache_ttl_seconds:
            raise ValueError(
                "cache_renewal_buffer_seconds must be >= 0 and < cache_ttl_seconds, got "
                f"{cache_renewal_buffer_seconds} (ttl {cache_ttl_seconds})"
            )
        if cache_tags is not None and not isinstance(cache_tags, Mapping):
            raise TypeError(f"cache_tags must be a dict of str to str, got {type(cache_tags).__name__}")
        self.cached_content = list(cached_content) if isinstance(cached_content, tuple) else cached_content
        self.cache_ttl_seconds = cache_ttl_seconds
        self.cache_renewal_buffer_seconds = cache_renewal_buffer_seconds
        self.auto_renew = auto_renew
        self.cache_tags = {str(k): str(v) for k, v in (cache_tags or {}).items()}
        self._lock = _AnyLoopLock()
        self._cache_name: str | None = None
        self._expire_time: datetime | None = None
        self._deleted = False
        self._shipped = False  # True in a copy unpickled in another process
        #: How many caches this instance created / renewed (for tests and stats).
        self.creates = 0
        self.renewals = 0
        # Hash the (possibly megabytes of) content once: display_name is read for every listed cache.
        self._content_hash_value = self._content_hash()
        self._display_name = f"{DISPLAY_NAME_PREFIX}:{self._content_hash_value[:16]}"
        if self.cache_tags:
            self._display_name += f":{_sha256(self.cache_tags)[:8]}"

    def __getstate__(self) -> dict[str, Any]:
        """What a worker needs: configuration plus the prepared cache's name and expiry (so the worker
        uses the cache the driver's ``prepare()`` found or created, and never creates another); the lock
        and the counters stay behind."""
        state = super().__getstate__()
        state.pop("_lock", None)
        state["creates"] = state["renewals"] = 0  # the copy counts what *it* does
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = _AnyLoopLock()
        #: A copy in another process: copies may race to replace a vanished cache (see ``_converge``).
        self._shipped = True

    # -- identity -------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """What this model computes: the content fingerprint (cached content, cache system instruction and
        model), plus the per-request safety settings when set (16 hex)."""
        if not self.safety_settings:
            return self._content_hash_value[:16]
        return _sha256({"content": self._content_hash_value, "safety_settings": self.safety_settings})[:16]

    def _content_hash(self) -> str:
        return _sha256(
            {
                "model": self.model_name,
                "system_instruction": self.system_instruction,
                "contents": self.cached_content,
            }
        )

    @property
    def display_name(self) -> str:
        """``batchllm:<content fp16>[:<tags hash8>]``, well under Gemini's 128-character limit.

        Computed once at construction. Safety settings are per request, so they are not part of it: models
        that differ only in safety settings share one cache.
        """
        return self._display_name

    @property
    def cache_name(self) -> str | None:
        """``cachedContents/<id>`` once prepared, else ``None``."""
        return self._cache_name

    @property
    def expire_time(self) -> datetime | None:
        """When the cache expires (UTC), as last reported by the API."""
        return self._expire_time

    # -- lifecycle -----------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Find a live cache with this content and tags, or create one. Idempotent and race-safe."""
        if self._cache_name is not None:
            return
        async with self._lock:
            if self._cache_name is None:
                await self._find_or_create()

    async def cleanup(self) -> None:
        """Keep the cache (it is reused by later runs until its TTL ends). Idempotent."""

    async def delete_cache(self) -> None:
        """Delete the cache explicitly; concurrent and repeated calls hit the API at most once."""
        async with self._lock:
            if self._deleted and self._cache_name is None:
                return
            name = self._cache_name
            if name is None:  # never prepared here: delete the live cache another instance made
                found = await self._find_live()
                name = found.name if found is not None else None
            if name is not None:
                try:
                    await self._client().aio.caches.delete(name=name)
                except Exception as exc:
                    if not is_missing_cache_error(exc):
                        raise
            self._cache_name = None
            self._expire_time = None
            self._deleted = True

    async def generate(
        self,
        prompt: str | list[Any],
        *,
        temperature: float = 0.0,
        system_instruction: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> LLMResponse:
        """Generate with the cached context; renews near expiry and recreates a vanished cache once."""
        if system_instruction is not None:
            raise ValueError(
                "system_instruction cannot be sent with a context cache; pass it to GeminiCachedModel(...) "
                "so it becomes part of the cache"
            )
        conflicting = sorted(CACHE_CONFLICTING_KEYS & set(config or {}))
        if conflicting:
            raise ValueError(f"config key(s) {conflicting} cannot be used with a context cache (Gemini rule)")
        await self.prepare()
        if self.auto_renew and self._needs_renewal():
            await self._renew()
        name = await self._current_name()
        try:
            return await self._generate_with(name, prompt, temperature, config)
        except Exception as exc:
            if not is_missing_cache_error(exc):
                raise
        await self._recreate(stale=name)
        name = await self._current_name()
        return await self._generate_with(name, prompt, temperature, config)

    async def request_config(
        self, *, temperature: float = 0.0, config: dict[str, Any] | None = None
    ) -> types.GenerateContentConfig:
        """The config :meth:`generate` would send now: ``cached_content`` is this model's (prepared, renewed
        near expiry) cache, so requests built from it reference the shared context cache."""
        conflicting = sorted(CACHE_CONFLICTING_KEYS & set(config or {}))
        if conflicting:
            raise ValueError(f"config key(s) {conflicting} cannot be used with a context cache (Gemini rule)")
        await self.prepare()
        if self.auto_renew and self._needs_renewal():
            await self._renew()
        return self._build_config(temperature, None, config, cached_content=await self._current_name())

    # -- internals -----------------------------------------------------------------------------------

    async def _current_name(self) -> str:
        """The cache name to use now; finds or creates one if it was cleared (e.g. by ``delete_cache``).

        Read once into a local: another thread may change ``_cache_name`` at any time, but the lifecycle
        never clears it while awaiting the network (``_adopt`` replaces it in one step).
        """
        name = self._cache_name
        if name is None:
            async with self._lock:
                if self._cache_name is None:
                    await self._find_or_create()
                name = self._cache_name
        if name is None:  # pragma: no cover - _find_or_create adopts a cache or raises
            raise RuntimeError("no context cache available")
        return name

    async def _generate_with(
        self, name: str, prompt: str | list[Any], temperature: float, config: dict[str, Any] | None
    ) -> LLMResponse:
        request_config = self._call_config(temperature, None, config, cached_content=name)
        response = await self._client().aio.models.generate_content(
            model=self.model, contents=prompt, config=request_config
        )
        return self._to_response(response, schema_requested=_schema_requested(config))

    async def _find_live(self, *, exclude: str | None = None) -> types.CachedContent | None:
        """The live cache whose display name and model match ours (latest expiry wins), if any."""
        wanted_model = bare_model_name(self.model)
        now = datetime.now(UTC)
        best: types.CachedContent | None = None
        pager = await self._client().aio.caches.list(config=types.ListCachedContentsConfig(page_size=100))
        async for cache in pager:
            if cache.display_name != self.display_name or not cache.name or cache.name == exclude:
                continue
            if cache.model and bare_model_name(cache.model) != wanted_model:
                continue
            if cache.expire_time is not None and cache.expire_time <= now:
                continue
            if best is None or (cache.expire_time or now) > (best.expire_time or now):
                best = cache
        return best

    async def _find_or_create(self, *, exclude: str | None = None) -> None:
        """Adopt a live matching cache (another process may have made one) or create it (lock held)."""
        found = await self._find_live(exclude=exclude)
        if found is not None:
            self._adopt(found)
            return
        await self._create()

    async def _create(self) -> None:
        config = types.CreateCachedContentConfig(
            contents=self.cached_content,
            system_instruction=self.system_instruction,
            display_name=self.display_name,
            ttl=_duration(self.cache_ttl_seconds),
        )
        created = await self._client().aio.caches.create(model=self.model, config=config)
        self.creates += 1
        self._adopt(created)
        if getattr(self, "_shipped", False):
            await self._converge(created)

    async def _converge(self, created: types.CachedContent) -> None:
        """Copies in several worker processes that each replaced a vanished cache end on ONE cache.

        Every copy lists the live caches of this display name after creating and adopts the earliest
        created (then the smallest name): whichever copy lists last sees both, and one created before
        another's listing is always the earlier one, so all copies pick the same cache. A copy whose
        own cache lost deletes it again.
        """
        wanted_model = bare_model_name(self.model)
        now = datetime.now(UTC)
        live: list[types.CachedContent] = []
        pager = await self._client().aio.caches.list(config=types.ListCachedContentsConfig(page_size=100))
        async for cache in pager:
            if cache.display_name != self.display_name or not cache.name:
                continue
            if cache.model and bare_model_name(cache.model) != wanted_model:
                continue
            if cache.expire_time is not None and cache.expire_time <= now:
                continue
            live.append(cache)
        if not live:
            return
        far = datetime.max.replace(tzinfo=UTC)
        winner = min(live, key=lambda c: (c.create_time or far, c.name or ""))
        if winner.name == created.name:
            return
        self._adopt(winner)
        try:
            await self._client().aio.caches.delete(name=created.name or "")
        except Exception as exc:
            if not is_missing_cache_error(exc):
                raise

    def _adopt(self, cache: types.CachedContent) -> None:
        if not cache.name:
            raise RuntimeError("Gemini returned a cachedContent without a name")
        self._cache_name = cache.name
        self._expire_time = cache.expire_time
        self._deleted = False

    def _needs_renewal(self) -> bool:
        if self._expire_time is None:
            return False
        remaining = self._expire_time - datetime.now(UTC)
        return remaining <= timedelta(seconds=self.cache_renewal_buffer_seconds)

    async def _renew(self) -> None:
        """Extend the TTL in place (once for all concurrent callers); recreate if the cache is gone."""
        async with self._lock:
            if self._cache_name is None:
                await self._find_or_create()
                return
            if not self._needs_renewal():
                return
            try:
                updated = await self._client().aio.caches.update(
                    name=self._cache_name,
                    config=types.UpdateCachedContentConfig(ttl=_duration(self.cache_ttl_seconds)),
                )
            except Exception as exc:
                if not is_missing_cache_error(exc):
                    raise
                # Keep the stale name until _adopt replaces it: a concurrent generate() must never read None.
                await self._find_or_create(exclude=self._cache_name)
                return
            self.renewals += 1
            self._expire_time = updated.expire_time or (
                datetime.now(UTC) + timedelta(seconds=self.cache_ttl_seconds)
            )

    async def _recreate(self, *, stale: str) -> None:
        """Replace a cache the API no longer knows; concurrent callers share one recreation."""
        async with self._lock:
            if self._deleted:
                raise RuntimeError("cache was deleted via delete_cache()")
            if self._cache_name is not None and self._cache_name != stale:
                return  # another caller already replaced it
            # Adopt a replacement another process (a pickled copy of this model) may already have made;
            # the stale name stays readable until _adopt swaps in the new one.
            await self._find_or_create(exclude=stale)


def _duration(seconds: float) -> str:
    """Protobuf Duration text: ``3600`` -> ``"3600s"``, ``90.5`` -> ``"90.5s"`` (no silent truncation)."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{float(seconds):.9f}".rstrip("0").rstrip(".") + "s"
