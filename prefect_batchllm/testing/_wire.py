"""Wire-format helpers for the Gemini emulator: error envelopes, durations, timestamps, token counts.

Everything here mirrors what the real Generative Language API sends (see the project's gemini-wire
notes): google.rpc.Status envelopes, protobuf Duration strings ("2s", "1.5s") and RFC3339 "Z" times.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

STATUS_NAMES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
DEFAULT_MESSAGES: dict[int, str] = {
    400: "Request contains an invalid argument.",
    401: "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
    "other valid authentication credential.",
    403: "The caller does not have permission",
    404: "Requested entity was not found.",
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
    504: "The request timed out. Please try again.",
}
UNREGISTERED_CALLER = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API key or other form of API consumer identity to call this API."
)
CACHE_NOT_FOUND = "CachedContent not found (or permission denied)"
CACHE_CONFLICT = (
    "CachedContent can not be used with GenerateContent request setting system_instruction, tools or "
    "tool_config.\n\nProposed fix: move those values to CachedContent from GenerateContent request."
)
QUOTA_HELP = {
    "@type": "type.googleapis.com/google.rpc.Help",
    "links": [
        {
            "description": "Learn more about Gemini API quotas",
            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
        }
    ],
}
BAD_GATEWAY_HTML = (
    b"<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error 502 (Server Error)!!1</title>\n"
    b"  <p><b>502.</b> <ins>That\xe2\x80\x99s an error.</ins>\n"
    b"  <p>The server encountered a temporary error and could not complete your request.<p>Please try "
    b"again in 30 seconds.  <ins>That\xe2\x80\x99s all we know.</ins>\n</html>\n"
)
MALFORMED_BODY = (
    b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
)


JSON_TYPE = "application/json; charset=UTF-8"


@dataclass
class Reply:
    """What the emulator's handler thread writes back for one request."""

    status: int
    body: bytes = b""
    content_type: str = JSON_TYPE
    events: list[bytes] | None = None  # SSE events; body is ignored when set
    drop: bool = False  # close the socket without answering
    usage: dict[str, Any] | None = None
    headers: dict[str, str] | None = None  # extra response headers (X-Goog-Upload-*)


def json_reply(status: int, payload: Any, usage: dict[str, Any] | None = None) -> Reply:
    """A JSON answer."""
    return Reply(status, json.dumps(payload, ensure_ascii=False).encode(), usage=usage)


def error_reply(code: int, message: str | None = None) -> Reply:
    """An error answer in the google.rpc envelope (502 is an HTML page, as a proxy sends it)."""
    if code == 502:
        return Reply(502, BAD_GATEWAY_HTML, content_type="text/html; charset=UTF-8")
    return json_reply(code, error_body(code, message))


def error_body(
    code: int, message: str | None = None, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """google.rpc.Status envelope: ``{"error": {"code", "message", "status", "details"?}}``."""
    error: dict[str, Any] = {
        "code": code,
        "message": message if message is not None else DEFAULT_MESSAGES.get(code, "Unknown error."),
        "status": STATUS_NAMES.get(code, "UNKNOWN"),
    }
    if details:
        error["details"] = details
    return {"error": error}


def invalid_api_key_body() -> dict[str, Any]:
    """What the real API answers for a wrong key: 400 INVALID_ARGUMENT with ErrorInfo API_KEY_INVALID."""
    return error_body(
        400,
        "API key not valid. Please pass a valid API key.",
        [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ],
    )


def format_duration(seconds: float) -> str:
    """Protobuf Duration JSON: "2s", "1.5s", "45.837906927s"."""
    seconds = max(0.0, float(seconds))
    if seconds.is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def rate_limit_body(
    retry_delay_s: float,
    *,
    model: str | None,
    per_day: bool = False,
    tokens: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """429 RESOURCE_EXHAUSTED body with QuotaFailure, Help and RetryInfo, like the real API sends."""
    if per_day:
        quota_id, metric = (
            "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
            "generativelanguage.googleapis.com/generate_content_free_tier_requests",
        )
    elif tokens:
        quota_id, metric = (
            "GenerateContentInputTokensPerModelPerMinute",
            "generativelanguage.googleapis.com/generate_content_paid_tier_input_token_count",
        )
    else:
        quota_id, metric = (
            "GenerateRequestsPerMinutePerProjectPerModel",
            "generativelanguage.googleapis.com/generate_content_paid_tier_requests",
        )
    delay = format_duration(retry_delay_s)
    violation: dict[str, Any] = {
        "quotaMetric": metric,
        "quotaId": quota_id,
        "quotaDimensions": {"location": "global", "model": model or "unknown"},
    }
    if limit is not None:
        violation["quotaValue"] = str(limit)
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more information "
        "on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current "
        f"usage, head to: https://ai.dev/usage?tab=rate-limit. \n* Quota exceeded for metric: {metric}, "
        f"limit: {limit if limit is not None else 'n/a'}, model: {model or 'unknown'}\n"
        f"Please retry in {delay}."
    )
    return error_body(
        429,
        message,
        [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [violation]},
            QUOTA_HELP,
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay},
        ],
    )


def rfc3339(ts: float) -> str:
    """Epoch seconds -> "2025-01-01T00:00:00.123456Z"."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(value: Any) -> float | None:
    """RFC3339 ("...Z" or "+00:00", optional fraction) -> epoch seconds; None if unparseable."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    if "." in text:  # fromisoformat accepts at most 6 fractional digits
        head, _, tail = text.partition(".")
        digits = "".join(c for c in tail if c.isdigit())
        text = f"{head}.{digits[:6].ljust(6, '0')}{tail[len(digits) :]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def tokens_for_chars(chars: int) -> int:
    """The emulator's tokenizer: ceil(chars / 4), at least 1.

    Deliberately the same rule as :func:`prefect_batchllm.core.tokens.estimate_tokens` (which counts a
    string), so the limiter's pre-call estimates match what the emulator bills; a test pins the two together.
    """
    return max(1, math.ceil(chars / 4))


def content_chars(contents: Any) -> int:
    """Characters of text (and function call/response payloads) in a Content, list of Contents or string."""
    if contents is None:
        return 0
    if isinstance(contents, str):
        return len(contents)
    if isinstance(contents, dict):
        contents = [contents]
    total = 0
    for content in contents if isinstance(contents, list) else []:
        if isinstance(content, str):
            total += len(content)
            continue
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts or []:
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str):
                total += len(text)
            for key in ("functionCall", "functionResponse"):
                if key in part:
                    total += len(json.dumps(part[key], separators=(",", ":")))
    return total


def user_text(contents: Any) -> str:
    """All text parts of user (or role-less) contents joined with newlines."""
    if isinstance(contents, dict):
        contents = [contents]
    if not isinstance(contents, list):
        return ""
    texts: list[str] = []
    for content in contents:
        if not isinstance(content, dict) or content.get("role", "user") not in ("user", None, ""):
            continue
        for part in content.get("parts") or []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return "\n".join(texts)
