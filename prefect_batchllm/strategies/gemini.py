"""``GeminiStrategy``: call an :class:`LLMModel`, parse the answer, and correct invalid structured output.

Also home of the structured-output helpers shared by every strategy: :func:`pydantic_json_parser` (parse
an ``LLMResponse`` into a pydantic type, raising ``InvalidOutputError``) and :func:`mock_output` (a
schema-shaped placeholder for dry runs).
"""

from __future__ import annotations

import datetime as _dt
import enum
import inspect
import json
import random
import re
import types as _pytypes
import typing
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError

from prefect_batchllm.core.errors import InvalidOutputError, attach_token_usage
from prefect_batchllm.core.schema_fake import fake_for_schema
from prefect_batchllm.core.tokens import TokenUsage
from prefect_batchllm.models.base import LLMModel, LLMResponse
from prefect_batchllm.strategies.base import (
    DRY_RUN_TEXT,
    MOCK_USAGE,
    LLMCallStrategy,
    RetryState,
    TOutput,
    callable_identity,
    schema_identity,
)

__all__ = [
    "CORRECTION_STATE_KEY",
    "GeminiStrategy",
    "mock_output",
    "pydantic_json_parser",
    "usage_of_response",
]

T = TypeVar("T")

#: ``RetryState`` key holding the last validation error, used for the correction note of the next attempt.
CORRECTION_STATE_KEY = "last_validation_error"
_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
_MAX_ERROR_CHARS = 600


def usage_of_response(response: LLMResponse) -> TokenUsage:
    """The billed tokens of an :class:`LLMResponse` (kept for compatibility: ``response.token_usage()``)."""
    return response.token_usage()


def _strip_fences(text: str) -> str:
    match = _FENCE.match(text)
    return match.group(1) if match else text


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        text = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5]
        )
    else:
        text = " ".join(str(exc).split())
    return text[:_MAX_ERROR_CHARS]


def pydantic_json_parser(output_type: type[T] | Any) -> Callable[[LLMResponse], T]:
    """A response parser that validates the answer into ``output_type`` (a pydantic model, ``list[M]``...).

    Uses the SDK's ``parsed`` object when it already has the right type, otherwise validates the JSON text
    (code fences stripped). Failures raise :class:`InvalidOutputError` carrying the raw text, the
    validation error and the billed tokens, so the attempt is retried (with a correction) and counted.
    """
    adapter: TypeAdapter[Any] = TypeAdapter(output_type)

    def parse(response: LLMResponse) -> T:
        parsed = (response.metadata or {}).get("parsed")
        if parsed is not None and isinstance(output_type, type) and isinstance(parsed, output_type):
            return parsed  # type: ignore[return-value]
        try:
            return adapter.validate_json(_strip_fences(response.text or ""))
        except ValidationError as exc:
            raise InvalidOutputError(
                f"answer does not match {getattr(output_type, '__name__', output_type)}: {_short_error(exc)}",
                raw_text=response.text,
                validation_error=exc,
                token_usage=response.token_usage(),
            ) from exc

    parse.__qualname__ = f"pydantic_json_parser({getattr(output_type, '__name__', output_type)})"
    return parse


def _text_parser(response: LLMResponse) -> str:
    return response.text


# ---------------------------------------------------------------------------------------------------------
# Schema-shaped mocks for dry runs.


class _FirstChoice(random.Random):
    """A ``Random`` that always makes the first / lowest choice: boring, reproducible mock values
    (first enum member, lower numeric bound, ``name-000000`` strings)."""

    def random(self) -> float:
        return 0.0

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:  # type: ignore[override]
        return 0 if stop is None else start

    def getrandbits(self, k: int) -> int:
        return 0


def _unwrap_output_spec(spec: Any) -> Any:
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
    output_type = _unwrap_output_spec(output_type)
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
        values = [item] if args else []
        return (origin or output_type)(values) if (origin or output_type) is not list else values
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


# ---------------------------------------------------------------------------------------------------------


class GeminiStrategy(LLMCallStrategy[TOutput]):
    """Calls a Gemini (or any :class:`LLMModel`) model and parses its answer with ``response_parser``.

    With ``response_schema`` the request asks for ``application/json`` matching that pydantic type and
    the default parser validates into it. After an invalid answer, the next attempt of the same item
    appends a short correction note with the validation error to the prompt (``correction_retry``).
    ``prepare``/``cleanup`` delegate to a managed model (e.g. ``GeminiCachedModel``).
    """

    def __init__(
        self,
        model: LLMModel,
        response_parser: Callable[[LLMResponse], TOutput] | None = None,
        *,
        temperature: float = 0.0,
        response_schema: type[BaseModel] | Any | None = None,
        generation_config: dict[str, Any] | None = None,
        correction_retry: bool = True,
    ) -> None:
        if model is None:
            raise TypeError("model is None; pass an LLMModel such as GeminiModel(...) or GeminiCachedModel")
        if not callable(getattr(model, "generate", None)):
            raise TypeError(f"model must have an async generate() (an LLMModel), got {type(model).__name__}")
        if response_parser is not None and not callable(response_parser):
            raise TypeError(f"response_parser must be callable, got {type(response_parser).__name__}")
        if generation_config is not None and not isinstance(generation_config, dict):
            raise TypeError(f"generation_config must be a dict, got {type(generation_config).__name__}")
        self.model = model
        self.temperature = float(temperature)
        self.response_schema = response_schema
        self.generation_config = dict(generation_config or {})
        self.correction_retry = correction_retry
        if response_parser is None:
            response_parser = (
                pydantic_json_parser(response_schema) if response_schema is not None else _text_parser  # type: ignore[assignment]
            )
        self.response_parser: Callable[[LLMResponse], TOutput] = response_parser  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"GeminiStrategy(model={self.model!r})"

    async def prepare(self) -> None:
        """Prepare the model once (find or create a context cache) when it is a managed model."""
        prepare = getattr(self.model, "prepare", None)
        if callable(prepare):
            await prepare()

    async def cleanup(self) -> None:
        """Let the model release its resources (a cached model keeps its cache)."""
        cleanup = getattr(self.model, "cleanup", None)
        if callable(cleanup):
            await cleanup()

    def _request_config(self) -> dict[str, Any] | None:
        config = dict(self.generation_config)
        if self.response_schema is not None:
            config.setdefault("response_mime_type", "application/json")
            if "response_json_schema" not in config:
                config.setdefault("response_schema", self.response_schema)
        return config or None

    def correction_note(self, error_text: str) -> str:
        """The note appended to the prompt after an invalid answer (override to customise)."""
        schema = self.response_schema is not None
        target = "valid JSON matching the schema" if schema else "the requested format"
        return f"Your previous answer was invalid: {error_text}. Answer again with {target}."

    def _prompt_for_attempt(self, prompt: Any, state: RetryState | None) -> Any:
        if state is None or not self.correction_retry:
            return prompt
        error_text = state.get(CORRECTION_STATE_KEY)
        if not error_text:
            return prompt
        note = self.correction_note(error_text)
        if isinstance(prompt, str):
            return f"{prompt}\n\n{note}"
        if isinstance(prompt, list):
            return [*prompt, note]
        return prompt

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> tuple[TOutput, TokenUsage, dict[str, Any]]:
        """One call plus parsing; returns ``(output, usage, metadata)`` (metadata: safety, finish reason)."""
        response = await self.model.generate(
            self._prompt_for_attempt(prompt, state),
            temperature=self.temperature,
            config=self._request_config(),
        )
        return self.parse_response(response, state)

    # -- the two halves of ``execute`` for Gemini batch jobs (request out, answer back) ----------------

    def check_batch(self) -> None:
        """Raise ``TypeError`` (naming the fix) unless this strategy can run as Gemini batch requests."""
        model = self.model
        if not all(
            callable(getattr(model, name, None))
            for name in ("request_config", "to_llm_response", "client_for_loop")
        ):
            raise TypeError(
                f"GeminiStrategy over {type(model).__name__} cannot run with execution='batch_api': the "
                "model must be a GeminiModel or GeminiCachedModel (or use execution='online')"
            )

    def batch_client(self) -> Any:
        """The ``genai.Client`` that submits this strategy's batch jobs (the model's, on this loop)."""
        self.check_batch()
        return self.model.client_for_loop()  # type: ignore[attr-defined]

    @property
    def batch_model(self) -> str:
        """The model name the batch job is created for."""
        return str(self.model.model)  # type: ignore[attr-defined]

    async def batch_request(self, prompt: Any) -> tuple[Any, Any]:
        """``(contents, GenerateContentConfig)`` of the request :meth:`execute` would send for ``prompt``
        (first attempt): system instruction, safety settings, response schema and the model's context
        cache, built by the model itself. Raises ``TypeError`` when the model cannot build requests."""
        self.check_batch()
        build = self.model.request_config  # type: ignore[attr-defined]
        return prompt, await build(temperature=self.temperature, config=self._request_config())

    def parse_batch_response(self, response: Any) -> tuple[TOutput, TokenUsage, dict[str, Any]]:
        """``(output, usage, metadata)`` of a batch job's ``GenerateContentResponse``: the model's online
        checks (blocked, empty) and this strategy's parser and validation, exactly as in :meth:`execute`."""
        llm_response = self.model.to_llm_response(response, config=self._request_config())  # type: ignore[attr-defined]
        return self.parse_response(llm_response)

    def parse_response(
        self, response: LLMResponse, state: RetryState | None = None
    ) -> tuple[TOutput, TokenUsage, dict[str, Any]]:
        """Parse and validate one model answer; raises :class:`InvalidOutputError` (with billed tokens)."""
        usage = response.token_usage()
        try:
            output = self.response_parser(response)
        except InvalidOutputError as exc:
            if not exc.token_usage:
                exc.token_usage = usage
            raise
        except (ValidationError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise InvalidOutputError(
                f"response_parser rejected the answer: {_short_error(exc)}",
                raw_text=response.text,
                validation_error=exc,
                token_usage=usage,
            ) from exc
        except Exception as exc:
            attach_token_usage(exc, usage)  # keep the user's exception (and its cause) intact
            raise
        meta = response.metadata or {}
        metadata = {
            key: meta.get(key)
            for key in ("finish_reason", "safety_ratings", "model_version", "response_id")
            if meta.get(key) is not None
        }
        if state is not None and CORRECTION_STATE_KEY in state:
            metadata["corrected"] = True
        return output, usage, metadata

    async def on_error(self, exception: Exception, attempt: int, state: RetryState | None = None) -> None:
        """Remember a validation error so the next attempt can ask the model to correct itself."""
        if state is None:
            return
        if isinstance(exception, InvalidOutputError):
            cause = exception.validation_error
            text = _short_error(cause) if cause is not None else _short_error(exception)
            state.set(CORRECTION_STATE_KEY, text)

    async def dry_run(self, prompt: Any) -> tuple[TOutput, TokenUsage]:
        """A schema-shaped mock (with ``response_schema``) or a mock string; no network call."""
        schema = self.response_schema
        if schema is None:
            schema = self.generation_config.get("response_json_schema")
        if schema is not None:
            return mock_output(schema), dict(MOCK_USAGE)  # type: ignore[return-value]
        return DRY_RUN_TEXT, dict(MOCK_USAGE)  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """Model fingerprint plus parser, schema and generation settings (a change re-runs items)."""
        import hashlib

        parser = self.response_parser
        parts = [
            super().fingerprint(),
            callable_identity(parser),
            repr(self.temperature),
            schema_identity(self.response_schema),
            json.dumps(self.generation_config, sort_keys=True, default=schema_identity),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
