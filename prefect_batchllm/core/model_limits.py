"""Known input-token limits of Gemini models, so an over-long prompt fails before any request is sent.

The limits are the models' documented context windows (input tokens). They change; override or add one
with :func:`register_input_limit` (``None`` removes a limit).
"""

from __future__ import annotations

from prefect_batchllm.core.pricing import bare_model_name

__all__ = ["DEFAULT_INPUT_LIMITS", "input_token_limit", "register_input_limit"]

#: Input-token limits (Gemini API model cards, checked 2026-11).
DEFAULT_INPUT_LIMITS: dict[str, int] = {
    "gemini-2.5-pro": 1_048_576,
    "gemini-2.5-flash": 1_048_576,
    "gemini-2.5-flash-lite": 1_048_576,
    "gemini-2.0-flash": 1_048_576,
    "gemini-2.0-flash-lite": 1_048_576,
    "gemini-1.5-pro": 2_097_152,
    "gemini-1.5-flash": 1_048_576,
    "gemini-1.5-flash-8b": 1_048_576,
}

_LIMITS: dict[str, int | None] = dict(DEFAULT_INPUT_LIMITS)


def register_input_limit(model: str, max_input_tokens: int | None) -> None:
    """Set (or with ``None`` remove) the input-token limit of ``model`` for every later check."""
    if not model:
        raise ValueError("register_input_limit: model must be a non-empty model name")
    if max_input_tokens is not None and (
        isinstance(max_input_tokens, bool) or not isinstance(max_input_tokens, int) or max_input_tokens < 1
    ):
        raise ValueError(
            f"register_input_limit: max_input_tokens must be an int >= 1 or None, got {max_input_tokens!r}"
        )
    _LIMITS[bare_model_name(model)] = max_input_tokens


def input_token_limit(model: str | None) -> int | None:
    """The input-token limit of ``model`` (longest known prefix wins), or ``None`` when unknown."""
    if not model:
        return None
    name = bare_model_name(model)
    if name in _LIMITS:
        return _LIMITS[name]
    matches = [known for known in _LIMITS if name.startswith(known)]
    return _LIMITS[max(matches, key=len)] if matches else None
