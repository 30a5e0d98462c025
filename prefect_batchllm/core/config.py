"""Configuration objects. Each validates itself at construction, so bad settings fail before any work."""

from __future__ import annotations

import difflib
import functools
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

_T = TypeVar("_T")


def _strict_fields(cls: type[_T]) -> type[_T]:
    """Make an unknown keyword argument a TypeError that names the field and suggests the right one."""
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid fields: {', '.join(sorted(known))}"
            raise TypeError(f"{cls.__name__}: unknown config field {name!r}{hint}")
        original(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _require(condition: bool, owner: str, name: str, fix: str) -> None:
    if not condition:
        raise ValueError(f"{owner}.{name}: {fix}")


def _check_number(
    owner: str, name: str, value: Any, *, integer: bool = False, optional: bool = False
) -> None:
    """Type check of a numeric field: a real number (an int for counts), never a bool; names the field."""
    if value is None and optional:
        return
    if integer:
        ok, kind = isinstance(value, int), "an int"
    else:
        ok, kind = isinstance(value, numbers.Real), "a number"
    if isinstance(value, bool) or not ok:
        suffix = " or None" if optional else ""
        raise TypeError(f"{owner}.{name}: must be {kind}{suffix}, got {type(value).__name__} {value!r}")


def _check_numbers(obj: Any, owner: str, spec: dict[str, tuple[bool, bool]]) -> None:
    """``spec`` maps field name -> ``(integer, optional)``."""
    for name, (integer, optional) in spec.items():
        _check_number(owner, name, getattr(obj, name), integer=integer, optional=optional)


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


@_strict_fields
@dataclass
class RetryConfig:
    """How often and how patiently an item is retried (Prefect task retries are built from this).

    Rate-limit retries do not consume ``max_attempts``; they have their own budget,
    ``max_rate_limit_retries``.
    """

    max_attempts: int = 3
    initial_wait: float = 1.0
    max_wait: float = 60.0
    exponential_base: float = 2.0
    jitter: bool = True
    max_rate_limit_retries: int = 20

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        own = "RetryConfig"
        _check_numbers(
            self,
            own,
            {
                "max_attempts": (True, False),
                "initial_wait": (False, False),
                "max_wait": (False, False),
                "exponential_base": (False, False),
                "max_rate_limit_retries": (True, False),
            },
        )
        _require(
            isinstance(self.max_attempts, int) and self.max_attempts >= 1,
            own,
            "max_attempts",
            f"must be an int >= 1 (1 = no retries), got {self.max_attempts!r}",
        )
        _require(self.initial_wait >= 0, own, "initial_wait", f"must be >= 0 s, got {self.initial_wait}")
        _require(
            self.max_wait >= self.initial_wait,
            own,
            "max_wait",
            f"must be >= initial_wait ({self.initial_wait}), got {self.max_wait}",
        )
        _require(self.exponential_base >= 1, own, "exponential_base", "must be >= 1")
        _require(self.max_rate_limit_retries >= 0, own, "max_rate_limit_retries", "must be >= 0")

    def delays(self) -> list[float]:
        """Back-off before retry 1..max_attempts-1 (exponential, capped; jitter is applied by the runner)."""
        return [
            min(self.initial_wait * self.exponential_base**i, self.max_wait)
            for i in range(self.max_attempts - 1)
        ]


#: ``ProcessorConfig.execution`` values.
EXECUTION_MODES = ("online", "batch_api")
#: ``ProcessorConfig.batch_followup`` values.
BATCH_FOLLOWUPS = (None, "online", "batch")
#: Gemini's documented limit of one inline batch request (larger jobs go through an uploaded JSONL file).
BATCH_INLINE_LIMIT_BYTES = 20_000_000

_LIMIT_PREFIX = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@_strict_fields
@dataclass
class RateLimitConfig:
    """Provider quota the batch must stay within, enforced by Prefect global concurrency limits.

    ``requests_per_minute`` / ``tokens_per_minute`` / ``max_in_flight`` of ``None`` mean "no limit of that
    kind". ``limit_prefix`` names the limits (``<prefix>-rpm``, ``<prefix>-tpm``, ``<prefix>-inflight``):
    jobs that share a prefix share one quota across processes and machines.
    ``cooldown_seconds`` is the minimum shared pause after a provider 429 without a server-given delay;
    consecutive 429s grow it by ``backoff_multiplier`` up to ``max_cooldown_seconds``; after a pause,
    ``slow_start_items`` admissions ramp back up. ``quota_window_seconds`` is the window the provider
    counts its quota over; the limiter keeps every such window within quota.

    ``manage_limits=True`` creates or updates the limits from this config when a batch starts (jobs sharing
    a prefix then set it to whichever config started last). ``manage_limits=False`` leaves them to an
    operator (``prefect-batchllm limits apply``): they must exist, enabled and of the right kind, or the
    batch fails before any item runs. The request/token/in-flight fields then only say which limits the
    job needs; their sizes come from the server.
    """

    requests_per_minute: float | None = None
    tokens_per_minute: int | None = None
    max_in_flight: int | None = None
    limit_prefix: str = "batchllm"
    cooldown_seconds: float = 5.0
    backoff_multiplier: float = 1.5
    max_cooldown_seconds: float = 300.0
    slow_start_items: int = 10
    slow_start_initial_delay: float = 0.5
    slow_start_final_delay: float = 0.0
    quota_window_seconds: float = 60.0  # the provider's quota window (Gemini: per minute)
    manage_limits: bool = True  # create/update the limits at flow start; False: an operator manages them

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        own = "RateLimitConfig"
        _check_numbers(
            self,
            own,
            {
                "requests_per_minute": (False, True),
                "tokens_per_minute": (False, True),
                "max_in_flight": (True, True),
                "cooldown_seconds": (False, False),
                "backoff_multiplier": (False, False),
                "max_cooldown_seconds": (False, False),
                "slow_start_items": (True, False),
                "slow_start_initial_delay": (False, False),
                "slow_start_final_delay": (False, False),
                "quota_window_seconds": (False, False),
            },
        )
        _require(_positive(self.quota_window_seconds), own, "quota_window_seconds", "must be > 0 seconds")
        for name in ("requests_per_minute", "tokens_per_minute", "max_in_flight"):
            value = getattr(self, name)
            _require(
                value is None or _positive(value),
                own,
                name,
                f"must be > 0 or None (no limit), got {value!r}; a limit of 0 would never admit a request",
            )
        _require(
            self.max_in_flight is None or isinstance(self.max_in_flight, int),
            own,
            "max_in_flight",
            "must be an int",
        )
        _require(
            bool(_LIMIT_PREFIX.match(self.limit_prefix or "")),
            own,
            "limit_prefix",
            f"must be lowercase letters, digits, '.', '_' or '-', got {self.limit_prefix!r}",
        )
        _require(self.cooldown_seconds >= 0, own, "cooldown_seconds", "must be >= 0")
        _require(self.backoff_multiplier >= 1, own, "backoff_multiplier", "must be >= 1")
        _require(
            self.max_cooldown_seconds >= self.cooldown_seconds,
            own,
            "max_cooldown_seconds",
            "must be >= cooldown_seconds",
        )
        _require(self.slow_start_items >= 0, own, "slow_start_items", "must be >= 0")
        _require(
            self.slow_start_initial_delay >= 0 and self.slow_start_final_delay >= 0,
            own,
            "slow_start_initial_delay",
            "slow-start delays must be >= 0",
        )

    @property
    def enabled(self) -> bool:
        """True when any limit is set (otherwise no global concurrency limit is used)."""
        return any(
            v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.max_in_flight)
        )


def _storage_location_ok(value: object) -> bool:
    """A block slug ``type/name`` or an fsspec URL whose protocol fsspec knows (not imported here)."""
    if not isinstance(value, str):
        return False
    url = re.fullmatch(r"([a-zA-Z][a-zA-Z0-9+.-]*)://\S+", value)
    if url is not None:
        import fsspec

        return url.group(1).lower() in fsspec.available_protocols()
    return bool(re.fullmatch(r"[^/\s:]+/[^/\s]+", value))


@_strict_fields
@dataclass
class ProcessorConfig:
    """Everything about how a batch runs. Seed-compatible fields first, Prefect-specific ones after.

    ``max_requests_per_minute`` is the seed's shorthand for ``rate_limit.requests_per_minute``; giving both
    with different values is an error.

    Reruns: with ``persist_results`` each successful item's result is stored under a key of (item_id,
    prompt, strategy fingerprint), and any later run with the same key loads it instead of calling the
    model. ``refresh_cache=True`` re-executes every item and overwrites the stored results;
    ``cache_expiration_s`` makes stored results expire. By default results go to Prefect's *local* result
    storage (``PREFECT_LOCAL_STORAGE_PATH``), which only serves reruns on the same machine; for reruns on
    other workers set ``result_storage`` to a saved ``local-file-system`` / ``remote-file-system`` block slug
    such as ``"remote-file-system/results"`` or an fsspec URL such as ``"s3://bucket/prefix"``. Results are
    appended there one storage object per flush (see ``prefect_batchllm.prefect.result_log``), not per item.

    Execution: by default every item is its own Prefect task run (most observable: one row per item in the
    UI). ``chunk_size=N`` runs one task run per N consecutive items instead; the items inside it run
    concurrently (still at most ``max_workers`` in flight) with the same lifecycle, classifier-driven
    retries, rate limiter and per-item result persistence, and the same ``BatchResult``. Prefect's cost is
    per task run (tens of ms of client CPU, plus event writes that compete with rate-limit writes on a
    SQLite server), so chunks suit batches of many thousands of items.

    ``execution="batch_api"`` sends the items as Gemini Batch API jobs at batch prices instead (same
    ``BatchResult``): job names are persisted under a key of the jobs' content so later runs re-attach
    instead of paying twice; ``batch_poll_interval_s`` / ``batch_poll_max_interval_s`` shape the polling
    back-off, ``batch_wait_timeout_s`` stops waiting (items still in a job fail ``batch_pending``: re-run to
    collect), ``batch_inline_max_bytes`` / ``batch_max_requests_per_job`` choose inline vs uploaded-file jobs
    and split them, and ``batch_followup`` re-runs failed items ``"online"`` or as a new ``"batch"`` job.

    ``artifact_key`` is the prefix of the summary / failures / progress artifact keys. By default it is
    derived from the calling flow (and deployment), so two ``run_batch`` sub-flows in one parent flow share
    (and overwrite) the same artifacts: give each its own ``artifact_key`` to keep them apart.
    """

    max_workers: int = 5
    timeout_per_item: float = 120.0
    post_processor_timeout: float = 90.0
    retry: RetryConfig = field(default_factory=RetryConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    max_requests_per_minute: float | None = None
    progress_interval: int = 10
    progress_callback_timeout: float | None = 5.0
    enable_detailed_logging: bool = False  # seed compatibility: accepted, no effect, warns
    max_queue_size: int = 0
    dry_run: bool = False
    # -- prefect-batchllm additions -------------------------------------------------------------------
    fail_on_item_failure: bool = False  # end the flow run Failed when any item failed (enables UI Retry)
    persist_results: bool = True  # persist item results so reruns skip completed items
    refresh_cache: bool = (
        False  # re-execute every item even when a persisted result exists (and overwrite it)
    )
    cache_expiration_s: float | None = None  # persisted item results expire after this many seconds
    result_storage: str | None = (
        None  # block slug ("remote-file-system/results") or fsspec URL ("s3://bucket/prefix") for results
    )
    artifact_key: str | None = None  # artifact key prefix; default derived from the flow / deployment
    chunk_size: int | None = None  # None: one task run per item; N: one task run per N consecutive items
    #: Stop admitting work after this many consecutive errors of one systematic category (auth, not_found,
    #: quota_exhausted); the rest fail with that category and attempts 0. None or 0: never stop early.
    stop_after_systematic_errors: int | None = 3
    #: Stop admitting items once spent plus in-flight estimated cost would exceed this (USD); the rest
    #: fail with ``budget_exceeded`` and attempts 0. None: no budget.
    max_cost_usd: float | None = None
    # -- Gemini Batch API mode (``execution="batch_api"``; see prefect_batchllm.prefect.batch_api) -----
    execution: str = "online"  # "online": one call per item; "batch_api": Gemini batch jobs at batch prices
    batch_poll_interval_s: float = 10.0  # first wait between job polls; grows x1.5 per poll
    batch_poll_max_interval_s: float = 300.0  # cap of the poll back-off
    batch_wait_timeout_s: float | None = None  # stop waiting after this long (re-run to collect); None: wait
    batch_inline_max_bytes: int = 10_000_000  # jobs up to this request size go inline; larger: a JSONL file
    batch_max_requests_per_job: int = 50_000  # more requests are split into several jobs
    batch_followup: str | None = None  # re-run failed items "online", as a new "batch" job, or not (None)

    def __post_init__(self) -> None:
        if self.enable_detailed_logging:
            # As in async-batch-llm 0.28, where this flag is a deprecated no-op: accept it, say so.
            warnings.warn(
                "ProcessorConfig.enable_detailed_logging has no effect: every attempt is already in the "
                "Prefect run logs, task runs and artifacts; drop the argument",
                DeprecationWarning,
                stacklevel=4,  # the caller of ProcessorConfig(...): past __init__ and its positional wrapper
            )
        _check_number(
            "ProcessorConfig", "max_requests_per_minute", self.max_requests_per_minute, optional=True
        )
        if self.max_requests_per_minute is not None:
            rl_rpm = self.rate_limit.requests_per_minute
            if rl_rpm is not None and rl_rpm != self.max_requests_per_minute:
                raise ValueError(
                    "ProcessorConfig: max_requests_per_minute="
                    f"{self.max_requests_per_minute} conflicts with rate_limit.requests_per_minute={rl_rpm}; "
                    "set only one"
                )
            _require(
                _positive(self.max_requests_per_minute),
                "ProcessorConfig",
                "max_requests_per_minute",
                f"must be > 0 or None, got {self.max_requests_per_minute!r}",
            )
            self.rate_limit = RateLimitConfig(
                **{
                    **{f.name: getattr(self.rate_limit, f.name) for f in fields(RateLimitConfig)},
                    "requests_per_minute": self.max_requests_per_minute,
                }
            )
        self.validate()

    def validate(self) -> None:
        own = "ProcessorConfig"
        _check_numbers(
            self,
            own,
            {
                "max_workers": (True, False),
                "timeout_per_item": (False, False),
                "post_processor_timeout": (False, False),
                "max_requests_per_minute": (False, True),
                "progress_interval": (True, False),
                "progress_callback_timeout": (False, True),
                "max_queue_size": (True, False),
                "cache_expiration_s": (False, True),
                "chunk_size": (True, True),
                "stop_after_systematic_errors": (True, True),
                "max_cost_usd": (False, True),
                "batch_poll_interval_s": (False, False),
                "batch_poll_max_interval_s": (False, False),
                "batch_wait_timeout_s": (False, True),
                "batch_inline_max_bytes": (True, False),
                "batch_max_requests_per_job": (True, False),
            },
        )
        self._validate_batch_api()
        _require(
            self.stop_after_systematic_errors is None or self.stop_after_systematic_errors >= 0,
            own,
            "stop_after_systematic_errors",
            "must be an int >= 1 (consecutive errors), or None / 0 to never stop early, "
            f"got {self.stop_after_systematic_errors!r}",
        )
        _require(
            self.max_cost_usd is None or _positive(self.max_cost_usd),
            own,
            "max_cost_usd",
            f"must be > 0 (USD) or None (no budget), got {self.max_cost_usd!r}",
        )
        _require(
            isinstance(self.max_workers, int) and self.max_workers >= 1,
            own,
            "max_workers",
            f"must be an int >= 1, got {self.max_workers!r}",
        )
        _require(
            _positive(self.timeout_per_item),
            own,
            "timeout_per_item",
            f"must be > 0 seconds, got {self.timeout_per_item!r}",
        )
        _require(
            _positive(self.post_processor_timeout),
            own,
            "post_processor_timeout",
            f"must be > 0 seconds, got {self.post_processor_timeout!r}",
        )
        _require(
            self.progress_callback_timeout is None or _positive(self.progress_callback_timeout),
            own,
            "progress_callback_timeout",
            f"must be > 0 seconds or None, got {self.progress_callback_timeout!r}",
        )
        _require(self.progress_interval >= 1, own, "progress_interval", "must be >= 1")
        _require(
            self.chunk_size is None or self.chunk_size >= 1,
            own,
            "chunk_size",
            f"must be an int >= 1 (items per task run) or None (per item), got {self.chunk_size!r}",
        )
        _require(self.max_queue_size >= 0, own, "max_queue_size", "must be >= 0 (0 = unbounded)")
        _require(
            self.cache_expiration_s is None or _positive(self.cache_expiration_s),
            own,
            "cache_expiration_s",
            f"must be > 0 seconds or None (never expire), got {self.cache_expiration_s!r}",
        )
        _require(
            self.result_storage is None or _storage_location_ok(self.result_storage),
            own,
            "result_storage",
            "must be a saved storage block slug '<block-type>/<block-name>' of a local-file-system or "
            "remote-file-system block (e.g. 'remote-file-system/results'), or an fsspec URL "
            "'<protocol>://<path>' with a protocol fsspec knows (e.g. 's3://bucket/prefix', "
            f"'file:///data/results'), or None, got {self.result_storage!r}",
        )
        _require(
            self.artifact_key is None or bool(re.fullmatch(r"[a-z0-9-]+", self.artifact_key)),
            own,
            "artifact_key",
            f"must match ^[a-z0-9-]+$ (Prefect artifact keys), got {self.artifact_key!r}",
        )
        if not isinstance(self.retry, RetryConfig):
            raise TypeError(f"{own}.retry must be a RetryConfig, got {type(self.retry).__name__}")
        if not isinstance(self.rate_limit, RateLimitConfig):
            raise TypeError(
                f"{own}.rate_limit must be a RateLimitConfig, got {type(self.rate_limit).__name__}"
            )
        self.retry.validate()
        self.rate_limit.validate()

    def _validate_batch_api(self) -> None:
        own = "ProcessorConfig"
        _require(
            self.execution in EXECUTION_MODES,
            own,
            "execution",
            f"must be one of {', '.join(repr(m) for m in EXECUTION_MODES)}, got {self.execution!r}"
            + ("; chunked execution is chunk_size=N" if self.execution == "chunked" else ""),
        )
        _require(
            _positive(self.batch_poll_interval_s),
            own,
            "batch_poll_interval_s",
            f"must be > 0 seconds, got {self.batch_poll_interval_s!r}",
        )
        _require(
            _positive(self.batch_poll_max_interval_s)
            and self.batch_poll_max_interval_s >= self.batch_poll_interval_s,
            own,
            "batch_poll_max_interval_s",
            f"must be >= batch_poll_interval_s ({self.batch_poll_interval_s}), "
            f"got {self.batch_poll_max_interval_s!r}",
        )
        _require(
            self.batch_wait_timeout_s is None
            or (math.isfinite(self.batch_wait_timeout_s) and self.batch_wait_timeout_s >= 0),
            own,
            "batch_wait_timeout_s",
            "must be >= 0 seconds (0: submit or check once, then return) or None (wait until the jobs end), "
            f"got {self.batch_wait_timeout_s!r}",
        )
        _require(
            0 < self.batch_inline_max_bytes <= BATCH_INLINE_LIMIT_BYTES,
            own,
            "batch_inline_max_bytes",
            f"must be > 0 and <= {BATCH_INLINE_LIMIT_BYTES:,} (Gemini's inline request limit), "
            f"got {self.batch_inline_max_bytes!r}",
        )
        _require(
            self.batch_max_requests_per_job >= 1,
            own,
            "batch_max_requests_per_job",
            f"must be an int >= 1, got {self.batch_max_requests_per_job!r}",
        )
        _require(
            self.batch_followup in BATCH_FOLLOWUPS,
            own,
            "batch_followup",
            f"must be 'online', 'batch' or None, got {self.batch_followup!r}",
        )
        if self.execution == "batch_api":
            _require(
                self.chunk_size is None,
                own,
                "chunk_size",
                "cannot be combined with execution='batch_api' (batch jobs are their own chunks); drop it",
            )
            _require(
                self.max_cost_usd is None,
                own,
                "max_cost_usd",
                "cannot be combined with execution='batch_api' yet (a submitted job is billed whole, so "
                "the budget cannot stop it part-way); check the cost first with estimate_batch(items), "
                "or drop it",
            )
