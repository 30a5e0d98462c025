"""Token accounting shared by every layer."""

from __future__ import annotations

from typing import Any, TypedDict, cast


class TokenUsage(TypedDict, total=False):
    """Token counts of one call or one item (seed contract: every key optional)."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    cached_input_tokens: int


TOKEN_KEYS: tuple[str, ...] = ("input_tokens", "output_tokens", "total_tokens", "cached_input_tokens")


def normalize_usage(usage: TokenUsage | dict[str, int] | None) -> TokenUsage:
    """A complete TokenUsage (all keys, ints >= 0); ``total_tokens`` derived when missing."""
    raw = dict(usage or {})
    # Accept the common OpenAI-style aliases so user strategies can return provider usage as-is.
    raw.setdefault("input_tokens", raw.pop("prompt_tokens", 0))
    raw.setdefault("output_tokens", raw.pop("completion_tokens", 0))
    counts = {key: max(0, int(cast(Any, raw.get(key)) or 0)) for key in TOKEN_KEYS}
    if not counts["total_tokens"]:
        counts["total_tokens"] = counts["input_tokens"] + counts["output_tokens"]
    return cast(TokenUsage, counts)


def add_usage(a: TokenUsage | None, b: TokenUsage | None) -> TokenUsage:
    """Sum of two usages (used to count every attempt of an item, failed ones included)."""
    na, nb = cast(dict[str, int], normalize_usage(a)), cast(dict[str, int], normalize_usage(b))
    return cast(TokenUsage, {key: na[key] + nb[key] for key in TOKEN_KEYS})


def estimate_tokens(text: str) -> int:
    """Cheap, provider-neutral input-token estimate (~4 characters per token) used before a call."""
    return max(1, (len(text) + 3) // 4)
