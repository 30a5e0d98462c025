"""Identity of values and callables for fingerprints and result cache keys, with ONE canonical form.

Every hash the package computes over user values (item prompts for the rerun cache key, a seed
``direct_call``'s ``input_data``, a strategy's public settings, a Gemini model's system instruction,
safety settings and cached contents) goes through :func:`canonical`, which turns a value into JSON-able
data that is the same in every process for equal values. The policy (see ``docs/fingerprints.md``):

* plain data is hashed by value: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes`` (by sha256),
  enums (their value), dicts / lists / tuples / sets of data, dataclasses, pydantic models (their JSON, so
  ``google.genai`` types such as ``Content`` and ``Part`` count), classes (by qualified name),
  ``datetime`` / ``date`` / ``time`` / ``Decimal`` / ``UUID`` / paths, callables (:func:`callable_identity`);
* an object that defines ``__batchllm_fingerprint__()`` is hashed by what that returns (the opt-out for your
  own types), and one with a ``fingerprint()`` method (models, strategies) by its fingerprint;
* anything else is an explicit :class:`FingerprintError` naming the type and the fix, never ``repr``
  (which can hold a memory address, so the key would differ every run and the cache would never hit).

One deliberate exception: a strategy's public attributes and a callable's closure cells and defaults may
hold *resources* (clients, locks, agents), not data. Those contribute their type name only (see
:func:`callable_identity` and :meth:`LLMCallStrategy.fingerprint`); override ``fingerprint()`` or give an
explicit ``identity=`` when such an object changes what is computed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
import hashlib
import json
import types
import uuid
from collections.abc import Mapping
from decimal import Decimal
from pathlib import PurePath
from typing import Any

__all__ = [
    "FINGERPRINT_HOOK",
    "FingerprintError",
    "callable_identity",
    "canonical",
    "canonical_json",
    "public_state",
    "schema_identity",
    "sha256_of",
    "value_identity",
]

#: Name of the method a user type defines to give its instances a stable identity (returns str or data).
FINGERPRINT_HOOK = "__batchllm_fingerprint__"
_MAX_DEPTH = 32

#: JSON-able canonical data.
Canonical = None | bool | int | float | str | list["Canonical"] | dict[str, "Canonical"]


class FingerprintError(TypeError):
    """A value has no stable identity, so it cannot be part of a fingerprint or cache key."""


def _type_name(value: Any) -> str:
    cls = value if isinstance(value, type) else type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def canonical(value: Any, _depth: int = 0) -> Canonical:
    """JSON-able, order-stable, process-independent form of ``value``; raise :class:`FingerprintError`."""
    if _depth > _MAX_DEPTH:
        raise FingerprintError(f"cannot fingerprint a value nested deeper than {_MAX_DEPTH} levels")
    hook = getattr(type(value), FINGERPRINT_HOOK, None)
    if hook is not None and not isinstance(value, type):
        return {"__type__": _type_name(value), "fingerprint": canonical(hook(value), _depth + 1)}
    if isinstance(value, enum.Enum):
        return canonical(value.value, _depth + 1)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"sha256": hashlib.sha256(bytes(value)).hexdigest()}
    if isinstance(value, type):
        return {"__type__": _type_name(value)}
    dump = getattr(value, "model_dump", None)  # pydantic models, google.genai types
    if callable(dump):
        return canonical(dump(mode="json", exclude_none=True), _depth + 1)
    if isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        return {str(k): canonical(v, _depth + 1) for k, v in items}
    if isinstance(value, list | tuple):
        return [canonical(v, _depth + 1) for v in value]
    if isinstance(value, set | frozenset):
        parts = [canonical(v, _depth + 1) for v in value]
        return sorted(parts, key=lambda p: json.dumps(p, sort_keys=True))
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    if dataclasses.is_dataclass(value):
        fields = {f.name: canonical(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value)}
        return {"__type__": _type_name(value), **fields}
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return {"__type__": _type_name(value), "value": value.isoformat()}
    if isinstance(value, Decimal | uuid.UUID | PurePath):
        return {"__type__": _type_name(value), "value": str(value)}
    fingerprint = getattr(value, "fingerprint", None)
    if callable(fingerprint):
        return {"__type__": _type_name(value), "fingerprint": canonical(fingerprint(), _depth + 1)}
    if callable(value):
        return {"callable": callable_identity(value, _depth + 1)}
    raise FingerprintError(
        f"cannot fingerprint a {_type_name(value)}: it is not plain data (str, numbers, bytes, dicts, lists, "
        f"dataclasses, pydantic or google.genai models) and defines no {FINGERPRINT_HOOK}() method; define "
        f"{type(value).__qualname__}.{FINGERPRINT_HOOK}() returning a stable str, or pass plain data instead"
    )


def canonical_json(value: Any) -> str:
    """The canonical form of ``value`` as compact, key-sorted JSON text (what every hash is taken over)."""
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_of(value: Any) -> str:
    """sha256 (hex) of ``value``'s canonical JSON; raises :class:`FingerprintError` for unknown types."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def value_identity(value: Any) -> str:
    """Short (16 hex) identity of a data value, e.g. a seed item's ``input_data``."""
    return sha256_of(value)[:16]


def _resource_or_data(value: Any, depth: int) -> Canonical:
    """Data by value, anything :func:`canonical` refuses (a client, a lock) by its type name only."""
    try:
        return canonical(value, depth)
    except FingerprintError:
        return {"resource": _type_name(value)}


def _digest_text(value: Any, depth: int) -> str:
    return json.dumps(_resource_or_data(value, depth), sort_keys=True, separators=(",", ":"))


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
        return _digest_text(value, 0)


def _code_digest(code: types.CodeType, depth: int) -> str:
    """Hash of a code object's bytecode, constants (nested code objects recursively) and names."""
    h = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            h.update(_code_digest(const, depth + 1).encode())
        else:
            h.update(_digest_text(const, depth + 1).encode())
        h.update(b"\0")
    h.update("|".join(code.co_names).encode())
    return h.hexdigest()[:16]


def callable_identity(fn: Any, _depth: int = 0) -> str:
    """Stable identity of a callable for fingerprints: *what* it computes, not just its name.

    ``module.qualname`` plus a hash of the code object (bytecode and constants), of its default
    arguments and of its closure's cell values (data by :func:`canonical`, resources by type name). So
    ``lambda r: r.text`` and ``lambda r: r.text.upper()`` differ, as do two closures over different data,
    while the same source gives the same identity in every process. ``functools.partial`` objects include
    their function and bound arguments; bound methods include their class (not their instance's state). A
    closure over a *mutable* value (a list that collects results, a counter dict) changes identity whenever
    that value changes, which makes every run re-execute: keep such state out of the closure, or give the
    strategy an explicit ``identity=`` / ``fingerprint()``.
    """
    if _depth > 6:
        return type(fn).__qualname__
    if isinstance(fn, functools.partial):
        args = [_digest_text(a, _depth + 1) for a in fn.args]
        kwargs = [f"{k}={_digest_text(v, _depth + 1)}" for k, v in sorted(fn.keywords.items())]
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
        call_code = getattr(call, "__code__", None)
        if not isinstance(fn, type) and isinstance(call_code, types.CodeType):
            state = public_state(fn, _depth + 1)
            return f"{type(fn).__module__}.{type(fn).__qualname__}#{_code_digest(call_code, _depth)}{state}"
        return name  # builtins, C functions, classes: the name is the identity
    h = hashlib.sha256(_code_digest(code, _depth).encode())
    for default in getattr(fn, "__defaults__", None) or ():
        h.update(_digest_text(default, _depth + 1).encode() + b"\0")
    for key, default in sorted((getattr(fn, "__kwdefaults__", None) or {}).items()):
        h.update(f"{key}={_digest_text(default, _depth + 1)}".encode() + b"\0")
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell (a variable assigned later)
            h.update(b"<empty>\0")
            continue
        h.update(_digest_text(content, _depth + 1).encode() + b"\0")
    return f"{name}#{h.hexdigest()[:16]}"


def public_state(obj: Any, depth: int = 0) -> str:
    """Stable text of an object's public instance attributes (data by value, resources by type name)."""
    attrs = getattr(obj, "__dict__", None)
    if not isinstance(attrs, dict):
        return ""
    parts = [f"{key}={_digest_text(attrs[key], depth)}" for key in sorted(attrs) if not key.startswith("_")]
    return "(" + ", ".join(parts) + ")"
