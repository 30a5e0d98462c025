"""``GeminiStrategy``: call an :class:`LLMModel`, parse the answer, and correct invalid structured output.

Also home of :func:`pydantic_json_parser` (parse an ``LLMResponse`` into a pydantic type, raising
``InvalidOutputError``), shared by every strategy; dry-run mocks live in :mod:`.dry_run`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar, cast

from pydantic import BaseModel, TypeAdapter, ValidationError

from prefect_batchllm.core.errors import InvalidOutputError, attach_token_usage
from prefect_batchllm.core.identity import callable_identity, schema_identity
from prefect_batchllm.core.strategy import DRY_RUN_TEXT, MOCK_USAGE, LLMCallStrategy, RetryState, TOutput
from prefect_batchllm.core.tokens import TokenUsage
from prefect_batchllm.models.base import LLMModel, LLMResponse
from prefect_batchllm.strategies.dry_run import mock_output

__all__ = [
    "CORRECTION_STATE_KEY",
    "GeminiStrategy",
    "pydantic_json_parser",
]

T = TypeVar("T")

#: ``RetryState`` key holding the last validation error, used for the correction note of the next attempt.
CORRECTION_STATE_KEY = "last_validation_error"
_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
_MAX_ERROR_CHARS = 600


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
            return cast(T, adapter.validate_json(_strip_fences(response.text or "")))
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


def _default_parser(response_schema: Any) -> Callable[[LLMResponse], Any]:
    """The parser :class:`GeminiStrategy` uses when none is given: validate into the schema, or the text."""
    return pydantic_json_parser(response_schema) if response_schema is not None else _text_parser


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
        #: The parser was built here from ``response_schema`` (so a pickled copy rebuilds it, see below).
        self._default_parser = response_parser is None
        if response_parser is None:
            response_parser = _default_parser(response_schema)
        self.response_parser: Callable[[LLMResponse], TOutput] = response_parser

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the default schema parser (a closure plain ``pickle`` cannot carry); the copy
        rebuilds the very same parser from ``response_schema``, so its fingerprint is unchanged."""
        state = self.__dict__.copy()
        if state.get("_default_parser"):
            state["response_parser"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.__dict__.get("_default_parser"):
            self.response_parser = _default_parser(self.response_schema)

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
        parser = self.response_parser
        parts = [
            super().fingerprint(),
            callable_identity(parser),
            repr(self.temperature),
            schema_identity(self.response_schema),
            json.dumps(self.generation_config, sort_keys=True, default=schema_identity),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
