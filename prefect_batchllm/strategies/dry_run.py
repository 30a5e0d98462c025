"""Schema-shaped placeholder outputs for ``dry_run=True`` runs: no call is made, the output still validates.

:func:`mock_output` serves every strategy (Gemini ``response_schema``, pydantic-ai ``output_type``); the JSON
schema faking itself is :mod:`prefect_batchllm.core.schema_fake`, which the emulator shares.
"""

from __future__ import annotations

import datetime as _dt
import enum
import inspect
import random
import types as _pytypes
import typing
import uuid
from decimal import Decimal
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter

from prefect_batchllm.core.schema_fake import fake_for_schema
from prefect_batchllm.core.strategy import DRY_RUN_TEXT, MOCK_USAGE

__all__ = ["DRY_RUN_TEXT", "MOCK_USAGE", "mock_output"]


class _FirstChoice(random.Random):
    """A ``Random`` that always makes the first / lowest choice: boring, reproducible mock values
    (first enum member, lower numeric bound, ``name-000000`` strings)."""

    def random(self) -> float:
        return 0.0

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        return 0 if stop is None else start

    def getrandbits(self, k: int) -> int:
        return 0


def unwrap_output_spec(spec: Any) -> Any:
    """The output type behind a pydantic-ai output spec: ``NativeOutput(M)``/``PromptedOutput(M)``
    (``.outputs``), ``ToolOutput(M)`` (``.output``), ``TextOutput`` (text), an output function (its return
    annotation) or a list of those (the first)."""
    for _ in range(8):
        if isinstance(spec, list | tuple):
            if not spec:
                return str
            spec = spec[0]
        elif type(spec).__module__.startswith("pydantic_ai"):
            if hasattr(spec, "outputs"):
                spec = spec.outputs
            elif hasattr(spec, "output"):
                spec = spec.output
            elif hasattr(spec, "output_function"):
                return str
            else:
                return spec
        elif inspect.isfunction(spec) or inspect.ismethod(spec):
            try:
                return typing.get_type_hints(spec).get("return", str)
            except Exception:
                return str
        else:
            return spec
    return spec


def _drop_defaulted(schema: Any) -> Any:
    """The schema without optional properties that have a default, so validation fills the default in."""
    if isinstance(schema, list):
        return [_drop_defaulted(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _drop_defaulted(v) for k, v in schema.items()}
    props = out.get("properties")
    if isinstance(props, dict):
        required = set(out.get("required") or [])
        out["properties"] = {
            k: v for k, v in props.items() if k in required or not (isinstance(v, dict) and "default" in v)
        }
    return out


def mock_output(output_type: Any, _depth: int = 0) -> Any:
    """A placeholder value of ``output_type`` that validates against it (dry runs).

    The type's JSON schema is faked by :func:`~prefect_batchllm.core.schema_fake.fake_for_schema`
    (constraints, nesting, dataclasses, TypedDicts, tuples and unions included; defaults kept) and validated
    into the type. pydantic-ai output specs (``NativeOutput(M)``, ``ToolOutput(M)``, ``[A, B]``) are
    unwrapped first; a JSON schema dict is faked as is. Types without a JSON schema get a best-effort value.
    """
    output_type = unwrap_output_spec(output_type)
    if output_type is Any or output_type is str:
        return DRY_RUN_TEXT if _depth == 0 else "mock"
    if output_type is None or output_type is type(None):
        return None
    if isinstance(output_type, BaseModel):  # a google.genai ``Schema`` object
        return fake_for_schema(output_type.model_dump(mode="json", exclude_none=True), _FirstChoice())
    if isinstance(output_type, dict):
        return fake_for_schema(output_type, _FirstChoice())
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(output_type)
        schema = _drop_defaulted(adapter.json_schema())
        return adapter.validate_python(fake_for_schema(schema, _FirstChoice()))
    except Exception:
        return _fallback_mock(output_type, _depth)


def _fallback_mock(output_type: Any, _depth: int = 0) -> Any:
    """Best-effort placeholder for types without a usable JSON schema (built field by field)."""
    if _depth > 6:
        return None
    if output_type is None or output_type is type(None):
        return None
    if output_type is Any or output_type is str:
        return DRY_RUN_TEXT if _depth == 0 else "mock"
    origin = get_origin(output_type)
    args = get_args(output_type)
    if origin is Literal:
        return args[0] if args else None
    if origin in (Union, _pytypes.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _fallback_mock(non_none[0], _depth + 1) if non_none else None
    if origin is not None and str(origin).endswith("Annotated"):
        return _fallback_mock(args[0], _depth)
    if origin in (list, set, frozenset, tuple) or output_type in (list, set, frozenset, tuple):
        item = _fallback_mock(args[0], _depth + 1) if args and args[0] is not Ellipsis else None
        items = [item] if args else []
        return (origin or output_type)(items) if (origin or output_type) is not list else items
    if origin is dict or output_type is dict:
        return {}
    if isinstance(output_type, type):
        if issubclass(output_type, BaseModel):
            values: dict[str, Any] = {}
            for name, field in output_type.model_fields.items():
                if not field.is_required():
                    values[name] = field.get_default(call_default_factory=True)
                else:
                    values[name] = _fallback_mock(field.annotation, _depth + 1)
            return output_type.model_construct(**values)
        if issubclass(output_type, enum.Enum):
            return next(iter(output_type))
        if issubclass(output_type, bool):
            return False
        if issubclass(output_type, int):
            return 0
        if issubclass(output_type, float):
            return 0.0
        if issubclass(output_type, Decimal):
            return Decimal(0)
        if issubclass(output_type, _dt.datetime):
            return _dt.datetime(2000, 1, 1, tzinfo=_dt.UTC)
        if issubclass(output_type, _dt.date):
            return _dt.date(2000, 1, 1)
        if issubclass(output_type, uuid.UUID):
            return uuid.UUID(int=0)
        if issubclass(output_type, str):
            return "mock"
    return None
