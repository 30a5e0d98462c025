"""Prefect Blocks: Gemini credentials and a shared, context-cached Gemini model.

Blocks hold configuration only. Live objects (``genai.Client``, the ``GeminiCachedModel`` with its cache
name and lock) are built lazily, kept in private attributes and dropped when the block is pickled (Dask,
Ray, process pools, result persistence), so a block is always safe to ship and every item of a flow run
that calls :meth:`GeminiCachedModelBlock.get_model` on the same block instance shares one model: the
flow prepares it once, every request uses the same cache.

``prefect block register -m prefect_batchllm`` registers both block types (the package exports them).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import TYPE_CHECKING, Any, ClassVar, cast

from prefect.blocks.core import Block
from pydantic import Field, PrivateAttr, SecretStr, field_validator

from prefect_batchllm.core.errors import register_secret

if TYPE_CHECKING:
    from google import genai

    from prefect_batchllm.models.gemini import GeminiCachedModel

__all__ = ["GeminiCachedModelBlock", "GeminiCredentials"]

_LOGO = "https://www.gstatic.com/lamda/images/gemini_sparkle_v002_d4735304ff6292a690345.svg"

# Private attributes that hold live objects; never pickled, never saved.
_LIVE_ATTRS = ("_clients", "_sync_client", "_model", "_lock")


class _DropsLiveState:
    """Mixin for blocks with private caches: pickle without them (clients and locks do not travel)."""

    def __getstate__(self) -> dict[str, Any]:
        state = cast("dict[str, Any]", super().__getstate__())
        private = dict(state.get("__pydantic_private__") or {})
        for name in _LIVE_ATTRS:
            if name in private:
                private[name] = None
        state["__pydantic_private__"] = private
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self._register_secrets()

    def _register_secrets(self) -> None:
        """Register this block's secrets for masking in the process that unpickles it (no validator runs)."""


class GeminiCredentials(_DropsLiveState, Block):
    """Gemini Developer API key (stored encrypted) and an optional endpoint override.

    ``get_client()`` builds a real ``google.genai.Client`` with the SDK's own retries off (retries belong
    to the flow). Clients are cached per event loop, because an async client's connection pool is bound
    to the loop that first used it.
    """

    _block_type_name: ClassVar[str] = "Gemini Credentials"
    _block_type_slug: ClassVar[str] = "gemini-credentials"
    _logo_url: ClassVar[str] = _LOGO  # type: ignore[assignment]
    _description: ClassVar[str] = "API key (and optional base URL / API version) for the Gemini API."
    _code_example: ClassVar[str] = """
```python
from prefect_batchllm import GeminiCredentials

client = GeminiCredentials.load("BLOCK_NAME").get_client()
```
"""

    api_key: SecretStr = Field(description="Gemini API key.")
    base_url: str | None = Field(
        default=None, description="Endpoint override, e.g. a proxy or a local emulator."
    )
    api_version: str | None = Field(
        default=None, description="API version path, e.g. 'v1beta' (default: the SDK's)."
    )

    _clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, genai.Client] | None = PrivateAttr(
        default=None
    )
    _sync_client: genai.Client | None = PrivateAttr(default=None)
    _lock: threading.Lock | None = PrivateAttr(default=None)

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("api_key must not be empty")
        register_secret(value.get_secret_value())
        return value

    def _register_secrets(self) -> None:
        register_secret(self.api_key.get_secret_value())

    def _client_lock(self) -> threading.Lock:
        if self._lock is None:
            self._lock = threading.Lock()
        return self._lock

    def get_client(self) -> genai.Client:
        """A ``genai.Client`` for the running event loop (or for sync use when no loop is running)."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._client_lock():
            if loop is None:
                if self._sync_client is None:
                    self._sync_client = self._new_client()
                return self._sync_client
            if self._clients is None:
                self._clients = weakref.WeakKeyDictionary()
            client = self._clients.get(loop)
            if client is None:
                client = self._clients[loop] = self._new_client()
            return client

    def _new_client(self) -> genai.Client:
        from google import genai
        from google.genai import types

        key = self.api_key.get_secret_value()
        register_secret(key)
        options = types.HttpOptions(base_url=self.base_url, api_version=self.api_version, retry_options=None)
        return genai.Client(vertexai=False, api_key=key, http_options=options)


class GeminiCachedModelBlock(_DropsLiveState, Block):
    """A Gemini model whose requests share one context cache (documents and/or a system instruction).

    ``get_model()`` returns the same ``GeminiCachedModel`` for this block instance every time, so all
    items of a run share one cache: the flow's prepare step finds or creates it once (matched by content
    fingerprint and tags), ``cleanup`` keeps it for the next run, ``delete_cache()`` removes it.
    """

    _block_type_name: ClassVar[str] = "Gemini Cached Model"
    _block_type_slug: ClassVar[str] = "gemini-cached-model"
    _logo_url: ClassVar[str] = _LOGO  # type: ignore[assignment]
    _description: ClassVar[str] = (
        "A Gemini model with a shared context cache (cached documents / system instruction, TTL, tags)."
    )
    _code_example: ClassVar[str] = """
```python
from prefect_batchllm import GeminiCachedModelBlock, GeminiStrategy, run_batch

model = GeminiCachedModelBlock.load("BLOCK_NAME").get_model()
result = run_batch(items)  # items built with GeminiStrategy(model, response_parser=...)
```
"""

    model: str = Field(default="gemini-2.5-flash", description="Gemini model name.")
    credentials: GeminiCredentials = Field(description="Credentials block used to reach the API.")
    system_instruction: str | None = Field(
        default=None, description="System instruction stored in the cache (applies to every request)."
    )
    cached_contents: list[str] = Field(
        default_factory=list, description="Texts / documents to cache (shared prefix of every request)."
    )
    cache_ttl_seconds: int = Field(default=3600, gt=0, description="Cache time-to-live in seconds.")
    cache_renewal_buffer_seconds: int = Field(
        default=300, ge=0, description="Renew the TTL when less than this many seconds remain."
    )
    cache_tags: dict[str, str] = Field(
        default_factory=dict, description="Tags identifying the cache (part of its match key)."
    )
    auto_renew: bool = Field(default=True, description="Renew the cache TTL in place near expiry.")

    _model: GeminiCachedModel | None = PrivateAttr(default=None)
    _lock: threading.Lock | None = PrivateAttr(default=None)

    @field_validator("cached_contents")
    @classmethod
    def _contents_are_text(cls, value: list[str]) -> list[str]:
        if any(not isinstance(text, str) or not text.strip() for text in value):
            raise ValueError("cached_contents must be non-empty strings")
        return value

    def _check(self) -> None:
        if not self.cached_contents and not self.system_instruction:
            raise ValueError(
                f"{type(self).__name__}: give cached_contents and/or system_instruction; "
                "there is nothing to cache"
            )
        if self.cache_renewal_buffer_seconds >= self.cache_ttl_seconds:
            raise ValueError(
                f"{type(self).__name__}: cache_renewal_buffer_seconds ({self.cache_renewal_buffer_seconds}) "
                f"must be smaller than cache_ttl_seconds ({self.cache_ttl_seconds})"
            )

    def get_model(self) -> GeminiCachedModel:
        """The shared ``GeminiCachedModel`` of this block instance (built on first call)."""
        if self._lock is None:
            self._lock = threading.Lock()
        with self._lock:
            if self._model is None:
                self._check()
                from prefect_batchllm.models.gemini import GeminiCachedModel

                contents: list[str] | str = list(self.cached_contents)
                if not contents:
                    # A cache of only a system instruction still needs content; the instruction is it.
                    contents = [self.system_instruction or ""]
                # The factory, not one client: the model keeps a client per event loop, so a model built in
                # plain code still works in each asyncio.run(...) and on Prefect's task loops.
                self._model = GeminiCachedModel(
                    self.model,
                    self.credentials.get_client,
                    contents,
                    cache_ttl_seconds=self.cache_ttl_seconds,
                    cache_renewal_buffer_seconds=self.cache_renewal_buffer_seconds,
                    auto_renew=self.auto_renew,
                    cache_tags=dict(self.cache_tags),
                    system_instruction=self.system_instruction,
                )
            return self._model

    async def delete_cache(self) -> None:
        """Delete the Gemini cache this block's model uses (explicit; cleanup never deletes it)."""
        await self.get_model().delete_cache()
