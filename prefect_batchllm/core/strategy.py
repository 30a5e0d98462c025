"""The strategy contract: how one LLM call is prepared, made, corrected and cleaned up.

The framework calls ``prepare()`` once per strategy instance per run (before any attempt),
``execute()`` once per attempt, ``on_error()`` after each failed attempt (before the retry decision) and
``cleanup()`` once after every item has finished, success or failure.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import pickle
import types
from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

from prefect_batchllm.core.tokens import TokenUsage, estimate_tokens

TOutput = TypeVar("TOutput")

#: The text every dry run returns when no output schema is known.
DRY_RUN_TEXT = "[DRY-RUN] Mock output"
#: Token usage reported by every dry run (no call is made; fixed so dry runs are comparable).
MOCK_USAGE: TokenUsage = {
    "input_tokens": 100,
    "output_tokens": 50,
    "total_tokens": 150,
    "cached_input_tokens": 0,
}


def schema_identity(value: Any) -> str:
    """Stable text identity of an output type / schema for fingerprints (its JSON schema when it has one)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    schema = getattr(value, "model_json_schema", None)
    if isinstance(value, type) and callable(schema):
        return json.dumps(schema(), sort_keys=True)
    try:
        from pydantic import TypeAdapter

        return json.dumps(TypeAdapter(value).json_schema(), sort_keys=True)
    except Exception:
        if isinstance(value, type):
            return f"{value.__module__}.{value.__qualname__}"
        return repr(value)


def _stable_repr(value: Any, depth: int = 0) -> str | None:
    """A repr that is the same in every process for equal values, or ``None`` when there is none.

    Primitives, containers of them, enums, types, pydantic models (their JSON), callables (their
    :func:`callable_identity`) and objects with a ``fingerprint()`` method are representable; other
    objects (clients, locks, agents...) are not, because their default repr holds a memory address.
    """
    if depth > 6:
        return None
    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, list | tuple | set | frozenset):
        parts = [_stable_repr(v, depth + 1) for v in value]
        if any(p is None for p in parts):
            return None
        if isinstance(value, set | frozenset):
            parts = sorted(parts)  # type: ignore[arg-type]
        return f"{type(value).__name__}({', '.join(parts)})"  # type: ignore[arg-type]
    if isinstance(value, dict):
        pairs = []
        for k, v in value.items():
            rk, rv = _stable_repr(k, depth + 1), _stable_repr(v, depth + 1)
            if rk is None or rv is None:
                return None
            pairs.append(f"{rk}: {rv}")
        return "{" + ", ".join(sorted(pairs)) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value)]
        reprs = [_stable_repr(getattr(value, name), depth + 1) for name in names]
        if any(r is None for r in reprs):
            return None
        return (
            f"{type(value).__qualname__}({', '.join(f'{n}={r}' for n, r in zip(names, reprs, strict=True))})"
        )
    dump_json = getattr(value, "model_dump_json", None)
    if callable(dump_json) and not isinstance(value, type):
        try:
            return f"{type(value).__qualname__}({dump_json()})"
        except Exception:
            return None
    fingerprint = getattr(value, "fingerprint", None)
    if callable(fingerprint) and not isinstance(value, type):
        try:
            return f"{type(value).__qualname__}<{fingerprint()}>"
        except Exception:
            return None
    if callable(value):
        return callable_identity(value, depth + 1)
    return None


def value_identity(value: Any) -> str:
    """sha256 (16 hex) of a data value for fingerprints, e.g. a legacy item's ``input_data``.

    Uses the stable repr when there is one, else the pickle bytes, else ``repr`` (which may hold a memory
    address: then every run differs and the item is re-executed, never replayed stale).
    """
    text = _stable_repr(value)
    if text is not None:
        data = text.encode()
    else:
        try:
            data = pickle.dumps(value, protocol=4)
        except Exception:
            data = repr(value).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _code_digest(code: types.CodeType, depth: int) -> str:
    """Hash of a code object's bytecode, constants (nested code objects recursively) and names."""
    h = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            h.update(_code_digest(const, depth + 1).encode())
        else:
            h.update((_stable_repr(const, depth + 1) or type(const).__name__).encode())
        h.update(b"\0")
    h.update("|".join(code.co_names).encode())
    return h.hexdigest()[:16]


def callable_identity(fn: Any, _depth: int = 0) -> str:
    """Stable identity of a callable for fingerprints: *what* it computes, not just its name.

    ``module.qualname`` plus a hash of the code object (bytecode and constants), of its default
    arguments and of its closure's cell values where they have a stable repr (see ``_stable_repr``;
    others contribute only their type name). So ``lambda r: r.text`` and ``lambda r: r.text.upper()``
    differ, as do two closures over different data, while the same source gives the same identity in
    every process. ``functools.partial`` objects include their function and bound arguments; bound
    methods include their class (not their instance's state). A closure over a *mutable* value with a
    stable repr (a list that collects results, a counter dict) changes identity whenever that value
    changes, which makes every run re-execute: keep such state out of the closure, or give the strategy
    an explicit ``identity=`` / ``fingerprint()``.
    """
    if _depth > 6:
        return type(fn).__qualname__
    if isinstance(fn, functools.partial):
        args = [_stable_repr(a, _depth + 1) or type(a).__name__ for a in fn.args]
        kwargs = [
            f"{k}={_stable_repr(v, _depth + 1) or type(v).__name__}" for k, v in sorted(fn.keywords.items())
        ]
        return f"partial({callable_identity(fn.func, _depth + 1)}, {', '.join([*args, *kwargs])})"
    if isinstance(fn, types.MethodType):
        # The owner by type only: its fingerprint may include this very method (infinite recursion).
        owner = fn.__self__
        owner_name = owner.__qualname__ if isinstance(owner, type) else type(owner).__qualname__
        return f"{owner_name}.{callable_identity(fn.__func__, _depth + 1)}"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    name = f"{getattr(fn, '__module__', None) or ''}.{qualname}"
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        # A callable instance: its class's __call__ code and its public state.
        call = next((c.__dict__["__call__"] for c in type(fn).__mro__ if "__call__" in c.__dict__), None)
        if not isinstance(fn, type) and isinstance(getattr(call, "__code__", None), types.CodeType):
            state = _public_state(fn, _depth + 1)
            return (
                f"{type(fn).__module__}.{type(fn).__qualname__}#{_code_digest(call.__code__, _depth)}{state}"
            )
        return name  # builtins, C functions, classes: the name is the identity
    h = hashlib.sha256(_code_digest(code, _depth).encode())
    for default in getattr(fn, "__defaults__", None) or ():
        h.update((_stable_repr(default, _depth + 1) or type(default).__name__).encode() + b"\0")
    for key, default in sorted((getattr(fn, "__kwdefaults__", None) or {}).items()):
        h.update(f"{key}={_stable_repr(default, _depth + 1) or type(default).__name__}".encode() + b"\0")
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell (a variable assigned later)
            h.update(b"<empty>\0")
            continue
        h.update((_stable_repr(content, _depth + 1) or type(content).__qualname__).encode() + b"\0")
    return f"{name}#{h.hexdigest()[:16]}"


def _public_state(obj: Any, depth: int = 0) -> str:
    """Stable text of an object's public instance attributes (unrepresentable ones by type name)."""
    attrs = getattr(obj, "__dict__", None)
    if not isinstance(attrs, dict):
        return ""
    parts = []
    for key in sorted(attrs):
        if key.startswith("_"):
            continue
        value = attrs[key]
        parts.append(f"{key}={_stable_repr(value, depth) or '<' + type(value).__qualname__ + '>'}")
    return "(" + ", ".join(parts) + ")"


#: ``execute`` returns ``(output, token_usage)``; it may add a third element, a metadata dict
#: (e.g. ``{"safety_ratings": {...}, "finish_reason": "STOP"}``), which lands in ``WorkItemResult``.
ExecuteResult = tuple[TOutput, TokenUsage] | tuple[TOutput, TokenUsage, dict[str, Any]]


class RetryState:
    """Per-item scratch space that persists across the attempts of one item and never leaks to others."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = dict(data or {})

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def clear(self) -> None:
        self.data.clear()

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __repr__(self) -> str:
        return f"RetryState({sorted(self.data)})"


class LLMCallStrategy(ABC, Generic[TOutput]):
    """How to call an LLM for one item. Subclass and implement :meth:`execute`."""

    async def prepare(self) -> None:
        """Set up shared resources (caches, clients) once, before any attempt. Default: no-op."""

    @abstractmethod
    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> ExecuteResult[TOutput]:
        """Make one attempt. ``attempt`` starts at 1; ``timeout`` is enforced by the framework."""

    async def on_error(self, exception: Exception, attempt: int, state: RetryState | None = None) -> None:
        """Inspect a failed attempt before the retry decision (e.g. store a correction). Default: no-op."""

    async def cleanup(self) -> None:
        """Release resources once after all items finished. Must not destroy reusable caches."""

    async def dry_run(self, prompt: Any) -> tuple[TOutput, TokenUsage]:
        """Mock output for ``dry_run=True`` runs: no network call is made."""
        return DRY_RUN_TEXT, dict(MOCK_USAGE)  # type: ignore[return-value]

    # -- hooks used by the orchestration layer (sensible defaults; override when you know better) ------

    @property
    def model_name(self) -> str | None:
        """Model name for pricing and the UI; ``None`` when unknown."""
        model = getattr(self, "model", None)
        name = getattr(model, "model", None) or getattr(model, "model_name", None)
        return name if isinstance(name, str) else None

    def fingerprint(self) -> str:
        """Stable identity of *what* this strategy computes, used in result cache keys for reruns.

        Two processes constructing the same strategy must produce the same fingerprint; a change of
        model, system instruction or parser should change it. The default covers the class, the model
        (its ``fingerprint()`` or name) and every *public* instance attribute: primitives and containers
        by value, pydantic models by their JSON, callables by :func:`callable_identity` (so a changed
        ``lambda`` counts), objects with a ``fingerprint()`` by it; anything else (clients, locks) by its
        type name only. Keep run-time state (counters, caches) in ``_private`` attributes, or override
        this method (e.g. to add your own version tag).
        """
        parts = [type(self).__module__, type(self).__qualname__]
        model = getattr(self, "model", None)
        model_fp = getattr(model, "fingerprint", None)
        if callable(model_fp):
            parts.append(str(model_fp()))
        elif self.model_name:
            parts.append(self.model_name)
        parts.append(_public_state(self))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def estimate_tokens(self, prompt: Any) -> int:
        """Input tokens this prompt will cost, estimated before the call (for tokens-per-minute limits)."""
        if isinstance(prompt, str):
            return estimate_tokens(prompt)
        if isinstance(prompt, list):
            return sum(estimate_tokens(p) if isinstance(p, str) else 258 for p in prompt) or 1
        return estimate_tokens(str(prompt))
