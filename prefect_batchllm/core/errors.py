"""Provider-agnostic error classification.

Every failed attempt is turned into an :class:`ErrorInfo` (category, retryable, retry_after). The
orchestration layer only ever asks the classifier; it never inspects provider exceptions itself.

Order of evidence (most reliable first): our own exception types, the exception's type, the HTTP status
code it carries, structured error details (Gemini ``RetryInfo`` / ``QuotaFailure``), and only then the
message text.
"""

from __future__ import annotations

import asyncio
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

from prefect_batchllm.core.tokens import TokenUsage


class ErrorCategory(StrEnum):
    """Why an attempt failed. Drives retry decisions, stats and the failed-items table."""

    RATE_LIMITED = "rate_limited"  # 429: wait (at least retry_after) and retry; not an attempt
    QUOTA_EXHAUSTED = "quota_exhausted"  # daily quota: waiting minutes will not help
    TRANSIENT = "transient"  # 5xx, connection reset, transport errors
    TIMEOUT = "timeout"  # per-attempt timeout or transport timeout
    INVALID_OUTPUT = "invalid_output"  # parse / schema validation failure: retry, maybe with a correction
    BLOCKED = "blocked"  # safety block / prompt feedback: never retried
    FATAL = "fatal"  # other 4xx requests the API rejects, programming errors
    AUTH = "auth"  # invalid / revoked key (400 API_KEY_INVALID), 401, 403 PERMISSION_DENIED: fails every item
    NOT_FOUND = "not_found"  # 404: unknown model (or method); fails every item
    INVALID_INPUT = "invalid_input"  # the prompt itself is unusable (malformed parts, too long): never sent
    BUDGET_EXCEEDED = "budget_exceeded"  # not attempted: ProcessorConfig.max_cost_usd would be exceeded
    CANCELLED = "cancelled"  # the run was cancelled before the item finished
    UNKNOWN = "unknown"  # nothing matched: retried, conservatively


RETRYABLE_CATEGORIES = frozenset(
    {
        ErrorCategory.RATE_LIMITED,
        ErrorCategory.TRANSIENT,
        ErrorCategory.TIMEOUT,
        ErrorCategory.INVALID_OUTPUT,
        ErrorCategory.UNKNOWN,
    }
)


#: Categories that will fail every later item of the batch too (the key, the model or the day's quota is
#: wrong, not the item): enough consecutive ones stop the batch early
#: (``ProcessorConfig.stop_after_systematic_errors``).
SYSTEMATIC_CATEGORIES = frozenset(
    {ErrorCategory.AUTH, ErrorCategory.NOT_FOUND, ErrorCategory.QUOTA_EXHAUSTED}
)


@dataclass(frozen=True)
class ErrorInfo:
    """The classifier's verdict on one exception."""

    category: ErrorCategory
    is_retryable: bool
    retry_after: float | None = None  # seconds the provider asked us to wait
    reason: str = ""  # short human-readable reason (no secrets, no bodies)

    @property
    def is_rate_limit(self) -> bool:
        return self.category is ErrorCategory.RATE_LIMITED

    @property
    def is_timeout(self) -> bool:
        return self.category is ErrorCategory.TIMEOUT

    @property
    def error_category(self) -> str:
        """Seed-compatible alias of :attr:`category`."""
        return self.category.value

    @property
    def suggested_wait(self) -> float | None:
        """Seed-compatible alias of :attr:`retry_after`."""
        return self.retry_after


# ---------------------------------------------------------------------------------------------------------
# Exceptions raised by the provider layer itself.


class BatchLLMError(Exception):
    """Base of prefect-batchllm's own exceptions. May carry the tokens the failed attempt was billed."""

    def __init__(self, message: str, *, token_usage: TokenUsage | None = None) -> None:
        super().__init__(message)
        self.token_usage: TokenUsage | None = token_usage


class InvalidOutputError(BatchLLMError):
    """The model answered, but the answer failed parsing or schema validation (retryable)."""

    def __init__(
        self,
        message: str,
        *,
        raw_text: str | None = None,
        validation_error: Exception | None = None,
        token_usage: TokenUsage | None = None,
    ) -> None:
        super().__init__(message, token_usage=token_usage)
        self.raw_text = raw_text
        self.validation_error = validation_error


class BlockedResponseError(BatchLLMError):
    """The provider refused the prompt or the answer on safety grounds (never retried)."""

    def __init__(
        self,
        message: str,
        *,
        block_reason: str | None = None,
        safety_ratings: dict[str, str] | None = None,
        token_usage: TokenUsage | None = None,
    ) -> None:
        super().__init__(message, token_usage=token_usage)
        self.block_reason = block_reason
        self.safety_ratings = safety_ratings


class ItemTimeoutError(BatchLLMError, TimeoutError):
    """One attempt exceeded ``timeout_per_item``."""


class InvalidInputError(BatchLLMError):
    """The prompt cannot be sent as it is (malformed content parts, longer than the model accepts)."""


class RateLimitRetriesExceeded(BatchLLMError):
    """An item was rate limited more often than ``RetryConfig.max_rate_limit_retries`` allows."""


def attach_token_usage(exc: BaseException, usage: TokenUsage | None) -> BaseException:
    """Record the tokens a failed attempt was billed on the exception, so totals stay exact."""
    if usage:
        exc.token_usage = usage  # type: ignore[attr-defined]
    return exc


def token_usage_of(exc: BaseException) -> TokenUsage | None:
    """Tokens billed for the attempt that raised ``exc`` (ours, or pydantic-ai's usage), if known."""
    usage: TokenUsage | None = getattr(exc, "token_usage", None)
    if usage:
        return usage
    cause = exc.__cause__
    return token_usage_of(cause) if cause is not None and cause is not exc else None


# ---------------------------------------------------------------------------------------------------------
# Classifiers.


class ErrorClassifier(ABC):
    """Maps any exception raised by an attempt to an :class:`ErrorInfo`."""

    @abstractmethod
    def classify(self, exc: BaseException) -> ErrorInfo: ...


_TRANSIENT_STATUS = frozenset({408, 500, 502, 503, 504})
_FATAL_STATUS = frozenset({400, 401, 402, 403, 404, 405, 409, 413, 422})
_LOGIC_ERRORS = (TypeError, KeyError, AttributeError, IndexError, NotImplementedError, AssertionError)


class DefaultErrorClassifier(ErrorClassifier):
    """Classifies google-genai, pydantic-ai, httpx/httpx2 and generic errors.

    Type and status code decide first; the message text is consulted only when nothing structured matched.
    """

    def classify(self, exc: BaseException) -> ErrorInfo:
        return (
            self._ours(exc)
            or self._by_type(exc)
            or self._by_status(exc)
            or self._by_transport(exc)
            or self._by_message(exc)
            or ErrorInfo(ErrorCategory.UNKNOWN, True, reason=_short(exc))
        )

    # -- ordered checks --------------------------------------------------------------------------------

    def _ours(self, exc: BaseException) -> ErrorInfo | None:
        if isinstance(exc, BlockedResponseError):
            return ErrorInfo(ErrorCategory.BLOCKED, False, reason=_short(exc))
        if isinstance(exc, InvalidOutputError):
            return ErrorInfo(ErrorCategory.INVALID_OUTPUT, True, reason=_short(exc))
        if isinstance(exc, InvalidInputError):
            return ErrorInfo(ErrorCategory.INVALID_INPUT, False, reason=_short(exc))
        if isinstance(exc, RateLimitRetriesExceeded):
            return ErrorInfo(ErrorCategory.RATE_LIMITED, False, reason=_short(exc))
        if isinstance(exc, asyncio.CancelledError):
            return ErrorInfo(ErrorCategory.CANCELLED, False, reason="cancelled")
        return None

    def _by_type(self, exc: BaseException) -> ErrorInfo | None:
        pai = _pydantic_ai_errors()
        if pai is not None:
            if isinstance(exc, pai.UsageLimitExceeded):
                return ErrorInfo(ErrorCategory.FATAL, False, reason=_short(exc))
            # Measured: a Gemini safety block reaches pydantic-ai users as ContentFilterError.
            if isinstance(exc, getattr(pai, "ContentFilterError", ())):
                return ErrorInfo(ErrorCategory.BLOCKED, False, reason=_short(exc))
            if isinstance(exc, getattr(pai, "ModelTimeoutError", ())):
                return ErrorInfo(ErrorCategory.TIMEOUT, True, reason=_short(exc))
            if isinstance(exc, pai.UnexpectedModelBehavior) and not isinstance(exc, pai.ModelHTTPError):
                return ErrorInfo(ErrorCategory.INVALID_OUTPUT, True, reason=_short(exc))
        if _is_validation_error(exc):
            return ErrorInfo(ErrorCategory.INVALID_OUTPUT, True, reason=_short(exc))
        if isinstance(exc, json.JSONDecodeError):
            # Our parsers wrap bad model output in InvalidOutputError; a raw JSONDecodeError comes from the
            # SDK failing to decode a malformed HTTP body, which is the server's fault: transient.
            return ErrorInfo(ErrorCategory.TRANSIENT, True, reason=_short(exc))
        if isinstance(exc, TimeoutError) or _is_transport_timeout(exc):
            return ErrorInfo(ErrorCategory.TIMEOUT, True, reason=_short(exc) or "timed out")
        return None

    def _by_status(self, exc: BaseException) -> ErrorInfo | None:
        status = status_code_of(exc)
        if status is None:
            return None
        reason = f"HTTP {status}: {_short(exc, 160)}"
        if is_missing_cache_error(exc):
            # 403 or 404 "CachedContent not found": the cached model recreates the cache itself; if that
            # still surfaced, a retry may succeed.
            return ErrorInfo(ErrorCategory.TRANSIENT, True, reason=reason)
        if status == 429:
            if _is_daily_quota(exc):
                return ErrorInfo(ErrorCategory.QUOTA_EXHAUSTED, False, reason=reason)
            return ErrorInfo(ErrorCategory.RATE_LIMITED, True, retry_after_of(exc), reason)
        if status in _TRANSIENT_STATUS or status >= 500:
            return ErrorInfo(ErrorCategory.TRANSIENT, True, retry_after_of(exc), reason)
        if status in (401, 403) or _is_invalid_key(exc):
            return ErrorInfo(ErrorCategory.AUTH, False, reason=reason)
        if status == 404:
            return ErrorInfo(ErrorCategory.NOT_FOUND, False, reason=reason)
        if status in _FATAL_STATUS or 400 <= status < 500:
            return ErrorInfo(ErrorCategory.FATAL, False, reason=reason)
        return None

    def _by_transport(self, exc: BaseException) -> ErrorInfo | None:
        if _is_transport_error(exc) or isinstance(exc, ConnectionError):
            return ErrorInfo(ErrorCategory.TRANSIENT, True, reason=_short(exc) or type(exc).__name__)
        pai = _pydantic_ai_errors()
        if pai is not None and isinstance(exc, pai.ModelAPIError):
            # No HTTP status (checked before): connection trouble or an undecodable 200 body.
            return ErrorInfo(ErrorCategory.TRANSIENT, True, reason=_short(exc))
        if isinstance(exc, _LOGIC_ERRORS) or type(exc) is ValueError:
            return ErrorInfo(ErrorCategory.FATAL, False, reason=_short(exc))
        return None

    def _by_message(self, exc: BaseException) -> ErrorInfo | None:
        text = str(exc).lower()
        if re.search(r"\b429\b|rate.?limit|resource.?exhausted|too many requests", text):
            return ErrorInfo(ErrorCategory.RATE_LIMITED, True, retry_after_of(exc), _short(exc))
        if re.search(r"timed? ?out|deadline", text):
            return ErrorInfo(ErrorCategory.TIMEOUT, True, reason=_short(exc))
        if re.search(r"\b50[0234]\b|overloaded|unavailable|connection (reset|aborted|refused)", text):
            return ErrorInfo(ErrorCategory.TRANSIENT, True, reason=_short(exc))
        return None


# ---------------------------------------------------------------------------------------------------------
# Evidence extraction helpers (public: strategies and the limiter reuse them).


def status_code_of(exc: BaseException) -> int | None:
    """HTTP status carried by an exception (google-genai ``code``, pydantic-ai ``status_code``, httpx)."""
    for attr in ("status_code", "code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) else None


def _error_details(exc: BaseException) -> list[dict[str, Any]]:
    """The google.rpc ``details`` list of a Gemini error (genai puts the whole body in ``details``)."""
    for candidate in (exc, exc.__cause__):
        if candidate is None:
            continue
        body = getattr(candidate, "details", None) or getattr(candidate, "body", None)
        if isinstance(body, dict):
            err = body.get("error", body)
            details = err.get("details") if isinstance(err, dict) else None
            if isinstance(details, list):
                return [d for d in details if isinstance(d, dict)]
    return []


def parse_duration(value: Any) -> float | None:
    """Seconds of a protobuf Duration (``"2s"``, ``"1.5s"``), a bare number string or a number; else None.

    Booleans and negative or non-numeric strings are rejected (``None``). Shared with the emulator.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*s?\s*", value)
        if match:
            return float(match.group(1))
    return None


_parse_duration = parse_duration  # backwards-compatible private alias


def retry_after_of(exc: BaseException) -> float | None:
    """Seconds the provider asked us to wait: Gemini ``RetryInfo``, pydantic-ai, or ``Retry-After``."""
    for detail in _error_details(exc):
        if str(detail.get("@type", "")).endswith("RetryInfo"):
            delay = parse_duration(detail.get("retryDelay"))
            if delay is not None:
                return delay
    for candidate in (exc, exc.__cause__):
        value = getattr(candidate, "retry_after", None)
        if isinstance(value, int | float):
            return float(value)
        if value is not None and hasattr(value, "total_seconds"):
            return float(value.total_seconds())
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        if (ms := headers.get("retry-after-ms")) is not None:
            parsed = parse_duration(ms)
            if parsed is not None:
                return parsed / 1000.0
        raw = headers.get("retry-after")
        if raw is not None:
            parsed = parse_duration(raw)
            if parsed is not None:
                return parsed
            try:
                when = parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                return None
            if when.tzinfo is None:  # "-0000" zone: RFC 7231 HTTP-dates are always GMT
                when = when.replace(tzinfo=UTC)
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
    return None


def _is_daily_quota(exc: BaseException) -> bool:
    pai = _pydantic_ai_errors()
    if pai is not None and hasattr(pai, "ModelQuotaExceededError"):
        if isinstance(exc, pai.ModelQuotaExceededError):
            return True
    for detail in _error_details(exc):
        for violation in detail.get("violations", []) or []:
            if isinstance(violation, dict) and "perday" in str(violation.get("quotaId", "")).lower():
                return True
    return False


def _is_invalid_key(exc: BaseException) -> bool:
    """A 400 that means the API key is wrong: ErrorInfo reason ``API_KEY_INVALID`` (or its message)."""
    if status_code_of(exc) != 400:
        return False
    for detail in _error_details(exc):
        if str(detail.get("reason", "")).upper() in ("API_KEY_INVALID", "API_KEY_EXPIRED"):
            return True
    return "api key not valid" in str(exc).lower() or "api key expired" in str(exc).lower()


def _is_missing_cache(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "cachedcontent" in text.replace(" ", "") and ("not found" in text or "permission" in text)


def is_missing_cache_error(exc: BaseException) -> bool:
    """True for the API's answer to a missing/expired/deleted context cache (403 or 404 'not found')."""
    return status_code_of(exc) in (403, 404) and _is_missing_cache(exc)


def _pydantic_ai_errors() -> Any:
    try:
        import pydantic_ai.exceptions as pai_exc
    except ImportError:  # pragma: no cover - pydantic-ai is a hard dependency, kept defensive
        return None
    return pai_exc


def _is_validation_error(exc: BaseException) -> bool:
    from pydantic import ValidationError

    return isinstance(exc, ValidationError)


def _transport_modules() -> list[Any]:
    mods = []
    for name in ("httpx2", "httpx"):
        try:
            mods.append(__import__(name))
        except ImportError:
            continue
    return mods


def _is_transport_timeout(exc: BaseException) -> bool:
    return any(isinstance(exc, mod.TimeoutException) for mod in _transport_modules())


def _is_transport_error(exc: BaseException) -> bool:
    return any(isinstance(exc, mod.TransportError) for mod in _transport_modules())


_SECRETS: set[str] = set()
_KEY_PATTERN = re.compile(r"AIza[0-9A-Za-z_\-]{20,}")


def register_secret(value: str | None) -> None:
    """Remember a secret (API key) so :func:`redact` removes it from every message we store or log."""
    if value and len(value) >= 6:
        _SECRETS.add(value)


def redact(text: str) -> str:
    """Remove registered secrets and anything shaped like a Google API key."""
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return _KEY_PATTERN.sub("***", text)


def _short(exc: BaseException, limit: int = 300) -> str:
    """One-line exception summary for results and UI (bounded, no tracebacks, no secrets)."""
    code, status, message = (getattr(exc, a, None) for a in ("code", "status", "message"))
    if isinstance(code, int) and isinstance(message, str) and message:
        # google-genai's str() dumps the whole error body; its parts read better.
        raw = f"{code} {status}: {message}" if isinstance(status, str) and status else f"{code}: {message}"
    else:
        raw = str(exc)
    text = redact(" ".join(raw.split())) or type(exc).__name__
    if not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_error(exc: BaseException) -> str:
    """The message stored in ``WorkItemResult.error``."""
    return _short(exc)
