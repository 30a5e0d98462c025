"""Schema-driven fake JSON: build a deterministic value that validates against a Gemini schema.

The SDK sends two schema dialects and both are handled here:

* ``responseSchema`` / function ``parameters``: the OpenAPI-ish ``Schema`` proto (UPPERCASE ``type``,
  ``nullable``, ``propertyOrdering``, ``anyOf``, ``enum``, ``items``, ``minItems``...), keys in camelCase or
  snake_case depending on how the caller built it;
* ``responseJsonSchema`` / ``parametersJsonSchema``: plain JSON Schema as produced by pydantic
  (``$defs``/``$ref``, ``anyOf``/``oneOf``/``allOf``, ``const``, type lists, ``prefixItems``,
  ``additionalProperties``, numeric bounds, ``format``).

The aim is "valid, boring and reproducible": optional fields are filled in, nullable unions pick the
non-null branch until the recursion budget runs out, and every choice comes from the given ``Random``.

Standard library only: the emulator (``prefect_batchllm.testing``) and the strategies' dry-run mocks
(``mock_output``) share it.
"""

from __future__ import annotations

import json
import math
import random
import re
import uuid
from typing import Any

__all__ = ["SchemaFaker", "fake_for_schema", "key_of"]

_FORMAT_SAMPLES: dict[str, str] = {
    "date-time": "2024-05-01T12:00:00Z",
    "date": "2024-05-01",
    "time": "12:00:00",
    "duration": "PT1H",
    "email": "user@example.com",
    "idn-email": "user@example.com",
    "uri": "https://example.com/resource",
    "url": "https://example.com/resource",
    "iri": "https://example.com/resource",
    "uri-reference": "https://example.com/resource",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "json-string": "{}",
    "binary": "ZmFrZQ",
    "base64": "ZmFrZQ==",
    "base64url": "ZmFrZQ==",
    "path": "/tmp/example",
}
_PROPER_NAME_KEYS = {"name", "title", "label"}
_FORMAT_HINT = re.compile(r"\bformat:\s*([A-Za-z0-9_-]+)", re.IGNORECASE)


def key_of(schema: dict[str, Any], camel: str) -> Any:
    """Read ``camel`` or its snake_case spelling from ``schema`` (the SDK may send either)."""
    if camel in schema:
        return schema[camel]
    snake = "".join("_" + c.lower() if c.isupper() else c for c in camel)
    return schema.get(snake)


def _num(value: Any) -> float | None:
    """Coerce a bound that may arrive as a string (proto int64/double) to float."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class SchemaFaker:
    """Generate values for one root schema; resolves local ``$ref`` pointers against that root."""

    def __init__(self, root: Any, rng: random.Random, *, max_depth: int = 5) -> None:
        self._root = root
        self._rng = rng
        self._max_depth = max_depth

    def generate(self) -> Any:
        """Return a JSON-compatible value that validates against the root schema."""
        return self._value(self._root, 0, None)

    # -- helpers -------------------------------------------------------------------------------

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}
        node: Any = self._root
        for raw in ref.lstrip("#").strip("/").split("/"):
            if not raw:
                continue
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict):
                node = node.get(part, {})
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return {}
        return node

    def _type_of(self, schema: dict[str, Any], deep: bool) -> str | None:
        raw = schema.get("type")
        if isinstance(raw, list):
            names = [str(t).lower() for t in raw]
            non_null = [t for t in names if t != "null"]
            if "null" in names and (deep or not non_null):
                return "null"
            return non_null[0] if non_null else None
        if isinstance(raw, str) and raw:
            name = raw.lower()
            return None if name == "type_unspecified" else name
        if "properties" in schema or "additionalProperties" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema or "prefix_items" in schema:
            return "array"
        return None

    def _value(self, schema: Any, depth: int, name: str | None) -> Any:
        if schema is True or not isinstance(schema, dict) or not schema:
            return self._string({}, name)
        deep = depth >= self._max_depth
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = self._resolve(ref)
            merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}} if target else {}
            return self._value(merged, depth + 1, name)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[self._rng.randrange(len(enum))]
        all_of = key_of(schema, "allOf")
        if isinstance(all_of, list) and all_of:
            return self._value(self._merge_all_of(schema, all_of), depth, name)
        for union_key in ("anyOf", "oneOf"):
            options = key_of(schema, union_key)
            if isinstance(options, list) and options:
                return self._union(schema, options, depth, name, union_key)
        if key_of(schema, "nullable") and deep:
            return None
        kind = self._type_of(schema, deep)
        if kind == "null":
            return None
        if kind == "object":
            return self._object(schema, depth, name)
        if kind == "array":
            return self._array(schema, depth, name)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self._rng.random() < 0.5
        return self._string(schema, name)

    def _merge_all_of(self, schema: dict[str, Any], parts: list[Any]) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k not in ("allOf", "all_of")}
        for part in parts:
            if isinstance(part, dict) and isinstance(part.get("$ref"), str):
                part = self._resolve(part["$ref"])
            if not isinstance(part, dict):
                continue
            for key, value in part.items():
                if key == "properties" and isinstance(value, dict):
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required" and isinstance(value, list):
                    merged["required"] = [*merged.get("required", []), *value]
                else:
                    merged.setdefault(key, value)
        return merged

    def _union(
        self, schema: dict[str, Any], options: list[Any], depth: int, name: str | None, key: str
    ) -> Any:
        def is_null(option: Any) -> bool:
            return isinstance(option, dict) and str(option.get("type", "")).lower() == "null"

        non_null = [o for o in options if not is_null(o)]
        if depth >= self._max_depth and len(non_null) < len(options):
            return None
        chosen = non_null[0] if non_null else options[0]
        siblings = {
            k: v for k, v in schema.items() if k not in (key, "any_of" if key == "anyOf" else "one_of")
        }
        if isinstance(chosen, dict) and siblings:
            # Sibling keywords (e.g. ``nullable``/``description``) still apply to the chosen branch.
            chosen = {**{k: v for k, v in siblings.items() if k in ("description", "title")}, **chosen}
        return self._value(chosen, depth, name)

    def _object(self, schema: dict[str, Any], depth: int, name: str | None) -> dict[str, Any]:
        properties = schema.get("properties") or {}
        required = [str(r) for r in (schema.get("required") or [])]
        ordering = key_of(schema, "propertyOrdering") or list(properties)
        keys = [k for k in ordering if k in properties] + [k for k in properties if k not in (ordering or [])]
        if depth >= self._max_depth:
            keys = [k for k in keys if k in required]
        out: dict[str, Any] = {}
        for key in keys:
            out[key] = self._value(properties[key], depth + 1, key)
        for key in required:
            if key not in out:
                out[key] = self._string({}, key)
        extra = key_of(schema, "additionalProperties")
        min_props = int(_num(key_of(schema, "minProperties")) or 0)
        if isinstance(extra, dict) and not properties:
            count = max(min_props, 0 if depth >= self._max_depth else 1)
            for i in range(count):
                out[f"key{i + 1}"] = self._value(extra, depth + 1, None)
        elif len(out) < min_props and extra is not False:
            for i in range(min_props - len(out)):
                out[f"extra{i + 1}"] = "value"
        return out

    def _array(self, schema: dict[str, Any], depth: int, name: str | None) -> list[Any]:
        prefix = key_of(schema, "prefixItems") or []
        items = schema.get("items")
        lo = int(_num(key_of(schema, "minItems")) or 0)
        hi_raw = _num(key_of(schema, "maxItems"))
        hi = int(hi_raw) if hi_raw is not None else None
        want = lo if depth >= self._max_depth else max(lo, 2)
        if hi is not None:
            want = min(want, hi)
        if prefix:
            # Tuples: exactly the prefix when no further items are allowed, else at least the prefix.
            want = len(prefix) if items is None or items is False else max(want, len(prefix))
        elif items is False:
            want = 0
        unique = bool(key_of(schema, "uniqueItems"))
        out: list[Any] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < want and attempts < want * 10 + 10:
            attempts += 1
            idx = len(out)
            item_schema = prefix[idx] if idx < len(prefix) else items
            value = self._value(item_schema if item_schema is not None else {}, depth + 1, name)
            marker = json.dumps(value, sort_keys=True, default=str)
            if unique and marker in seen:
                if len(out) >= lo:
                    break
                continue
            seen.add(marker)
            out.append(value)
        return out

    def _bounds(self, schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
        lo, hi = _num(schema.get("minimum")), _num(schema.get("maximum"))
        lo_ex = hi_ex = False
        ex_lo, ex_hi = key_of(schema, "exclusiveMinimum"), key_of(schema, "exclusiveMaximum")
        if isinstance(ex_lo, bool):
            lo_ex = ex_lo
        elif _num(ex_lo) is not None:
            lo, lo_ex = _num(ex_lo), True
        if isinstance(ex_hi, bool):
            hi_ex = ex_hi
        elif _num(ex_hi) is not None:
            hi, hi_ex = _num(ex_hi), True
        return lo, lo_ex, hi, hi_ex

    def _integer(self, schema: dict[str, Any]) -> int:
        lo_f, lo_ex, hi_f, hi_ex = self._bounds(schema)
        lo = None if lo_f is None else (math.floor(lo_f) + 1 if lo_ex else math.ceil(lo_f))
        hi = None if hi_f is None else (math.ceil(hi_f) - 1 if hi_ex else math.floor(hi_f))
        # Small spans: pydantic-ai strips exclusiveMinimum/Maximum before sending, so stay near the
        # bound that survived (and in 1..9 when none did) to keep common constraints satisfied.
        if lo is None and hi is None:
            lo, hi = 1, 9
        elif lo is None:
            lo = hi - 4 if hi is not None else 0
        elif hi is None:
            hi = lo + 4
        assert lo is not None and hi is not None  # every branch above set both
        if hi < lo:
            hi = lo
        step = _num(key_of(schema, "multipleOf"))
        if step and step >= 1 and float(step).is_integer():
            m = int(step)
            first, last = math.ceil(lo / m), math.floor(hi / m)
            if first <= last:
                return self._rng.randint(first, last) * m
        return self._rng.randint(lo, hi)

    def _number(self, schema: dict[str, Any]) -> float:
        lo, lo_ex, hi, hi_ex = self._bounds(schema)
        if lo is None and hi is None:  # (0, 1) keeps stripped gt/lt bounds like probabilities valid
            lo, hi = 0.0, 1.0
        elif lo is None:
            lo = (hi or 0.0) - 1.0
        elif hi is None:
            hi = lo + 1.0
        assert lo is not None and hi is not None
        step = _num(key_of(schema, "multipleOf"))
        if step and step > 0:
            first = math.floor(lo / step) + 1 if lo_ex else math.ceil(lo / step)
            last = math.ceil(hi / step) - 1 if hi_ex else math.floor(hi / step)
            if first <= last:
                return self._rng.randint(first, last) * step
        span = hi - lo
        value = round(lo + span * (0.1 + 0.8 * self._rng.random()), 2) if span > 0 else lo
        if (lo_ex and value <= lo) or (hi_ex and value >= hi) or not lo <= value <= hi:
            value = lo + span / 2
        return float(value)

    def _string(self, schema: dict[str, Any], name: str | None) -> str:
        fmt = str(schema.get("format") or "").lower()
        if not fmt:  # pydantic-ai moves string formats into the description ("Format: date-time")
            hint = _FORMAT_HINT.search(str(schema.get("description") or ""))
            fmt = hint.group(1).lower() if hint else ""
        if fmt == "uuid":
            value = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        elif fmt in _FORMAT_SAMPLES:
            value = _FORMAT_SAMPLES[fmt]
        else:
            stem = (name or "text").replace("_", "-")
            if name in _PROPER_NAME_KEYS:
                stem = stem.capitalize()
            value = f"{stem}-{self._rng.randrange(16**6):06x}"
        min_len = int(_num(key_of(schema, "minLength")) or 0)
        max_raw = _num(key_of(schema, "maxLength"))
        if len(value) < min_len:
            value = value + "x" * (min_len - len(value))
        if max_raw is not None and len(value) > int(max_raw):
            value = value[: int(max_raw)]
        return value


def fake_for_schema(schema: Any, rng: random.Random, *, max_depth: int = 5) -> Any:
    """Shorthand for ``SchemaFaker(schema, rng).generate()``."""
    return SchemaFaker(schema, rng, max_depth=max_depth).generate()
