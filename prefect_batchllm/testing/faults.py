"""Scripted faults for the Gemini emulator.

A :class:`Fault` says *what* goes wrong (a 429, a 503, a hang, a blocked prompt...); a :class:`FaultRule`
says *which* requests it hits (substring of the prompt, endpoint, first N / every Nth / seeded
probability). :class:`FaultScript` is the ordered, thread-safe list of rules the emulator consults for
every request.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

__all__ = ["Fault", "FaultRule", "FaultScript"]

ANY_ENDPOINT = "*"


@dataclass(frozen=True)
class Fault:
    """Immutable description of one fault; build it with the static constructors."""

    kind: str
    code: int | None = None
    message: str | None = None
    seconds: float = 0.0
    per_day: bool = False
    reason: str = "SAFETY"

    @staticmethod
    def rate_limit(retry_delay_s: float = 1.0, *, per_day: bool = False) -> Fault:
        """429 RESOURCE_EXHAUSTED with QuotaFailure, Help and ``RetryInfo.retryDelay`` details."""
        if retry_delay_s < 0:
            raise ValueError("retry_delay_s must be >= 0")
        return Fault("rate_limit", code=429, seconds=float(retry_delay_s), per_day=per_day)

    @staticmethod
    def status(code: int, message: str | None = None) -> Fault:
        """An error status with the google.rpc envelope (502 answers an HTML page, like a proxy does)."""
        if not 400 <= code <= 599:
            raise ValueError(f"status fault needs a 4xx/5xx code, got {code}")
        return Fault("status", code=code, message=message)

    @staticmethod
    def echo_api_key(code: int = 400, message: str = "Request rejected by gateway") -> Fault:
        """An error status whose message echoes the request's API key (``x-goog-api-key`` header or ``key``
        query parameter), as a misconfigured proxy or gateway may: for secret-masking tests."""
        if not 400 <= code <= 599:
            raise ValueError(f"echo_api_key fault needs a 4xx/5xx code, got {code}")
        return Fault("echo_api_key", code=code, message=message)

    @staticmethod
    def hang(seconds: float = 3600.0) -> Fault:
        """Hold the request for ``seconds`` (client timeouts fire), then answer normally."""
        return Fault("hang", seconds=float(seconds))

    @staticmethod
    def delay(seconds: float) -> Fault:
        """Add ``seconds`` of latency, then answer normally."""
        return Fault("delay", seconds=float(seconds))

    @staticmethod
    def invalid_json() -> Fault:
        """200 whose JSON output is truncated (or whose tool-call args do not match the schema)."""
        return Fault("invalid_json")

    @staticmethod
    def malformed_body() -> Fault:
        """200 with a body that is not JSON at all."""
        return Fault("malformed_body")

    @staticmethod
    def safety_block(reason: str = "SAFETY") -> Fault:
        """200 without candidates: ``promptFeedback.blockReason`` plus HIGH safety ratings."""
        return Fault("safety_block", reason=reason)

    @staticmethod
    def finish_safety() -> Fault:
        """200 with one candidate stopped for SAFETY and no content."""
        return Fault("finish_safety")

    @staticmethod
    def connection_reset() -> Fault:
        """Drop the connection without answering (the client sees a transport error)."""
        return Fault("connection_reset")


@dataclass(eq=False)
class FaultRule:
    """One entry of a :class:`FaultScript`; ``hits`` counts how often it fired."""

    fault: Fault
    contains: str | None = None
    endpoint: str = "generateContent"
    times: int | None = 1
    rate: float | None = None
    every: int | None = None
    after: int = 0
    hits: int = 0
    matches: int = 0
    uid: int = 0
    _seen: dict[bytes, int] = field(default_factory=dict, repr=False)

    @property
    def exhausted(self) -> bool:
        """True once ``times`` faults have been applied."""
        return self.times is not None and self.hits >= self.times

    def _matches(self, endpoints: tuple[str, ...], prompt_text: str) -> bool:
        if self.endpoint != ANY_ENDPOINT and self.endpoint not in endpoints:
            return False
        return self.contains is None or self.contains in prompt_text

    def _fires(self, prompt_text: str, seed: int) -> bool:
        """Count a match and decide whether this rule applies to it (caller holds the script lock)."""
        self.matches += 1
        ordinal = self.matches - self.after
        if ordinal <= 0 or self.exhausted:
            return False
        if self.every is not None and ordinal % self.every != 0:
            return False
        if self.rate is not None:
            # Draw from (seed, rule, prompt, n-th time this prompt matched): the same item's retries get
            # fresh draws, yet the outcome does not depend on how concurrent requests interleave.
            key = hashlib.blake2b(prompt_text.encode(), digest_size=16).digest()
            nth = self._seen.get(key, 0) + 1
            self._seen[key] = nth
            digest = hashlib.blake2b(f"{seed}:{self.uid}:{nth}:".encode() + key, digest_size=8).digest()
            if int.from_bytes(digest, "big") / 2**64 >= self.rate:
                return False
        self.hits += 1
        return True


class FaultScript:
    """Ordered, thread-safe list of fault rules; the first rule that fires wins."""

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._seed = seed
        self._next_uid = 0

    def add(
        self,
        fault: Fault,
        *,
        contains: str | None = None,
        endpoint: str = "generateContent",
        times: int | None = 1,
        rate: float | None = None,
        every: int | None = None,
        after: int = 0,
    ) -> FaultRule:
        """Append a rule.

        ``contains`` is an exact substring of the request's prompt text; ``endpoint`` is an emulator
        endpoint name ("generateContent", "streamGenerateContent", "countTokens", "cachedContents.create",
        "batches.create", "files.create", ...; "generateContent" also hits requests inside batch jobs,
        "batch.generateContent" only those) or "*" for all; ``times`` caps the faults applied
        (None = forever); ``rate`` is a seeded probability per match; ``every`` faults every Nth match;
        ``after`` skips the first N matches.
        """
        if times is not None and times < 0:
            raise ValueError("times must be >= 0 or None")
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be within [0, 1]")
        if every is not None and every < 1:
            raise ValueError("every must be >= 1")
        if after < 0:
            raise ValueError("after must be >= 0")
        with self._lock:
            rule = FaultRule(fault, contains, endpoint, times, rate, every, after, uid=self._next_uid)
            self._next_uid += 1
            self._rules.append(rule)
            return rule

    def remove(self, rule: FaultRule) -> None:
        """Drop one rule (no error if it is already gone)."""
        with self._lock:
            self._rules = [r for r in self._rules if r is not rule]

    def clear(self) -> None:
        """Drop every rule."""
        with self._lock:
            self._rules.clear()
            self._next_uid = 0

    @property
    def rules(self) -> list[FaultRule]:
        """A copy of the rule list (the rule objects are live: ``hits`` keeps counting)."""
        with self._lock:
            return list(self._rules)

    def pick(self, endpoint: str | tuple[str, ...], prompt_text: str) -> Fault | None:
        """Return the fault to apply to this request, if any (used by the emulator).

        ``endpoint`` may be several names: a request inside a batch job is matched by rules for
        "batch.generateContent" and for "generateContent", so online prompt markers hit it too.
        """
        endpoints = (endpoint,) if isinstance(endpoint, str) else tuple(endpoint)
        with self._lock:
            for rule in self._rules:
                if rule._matches(endpoints, prompt_text) and rule._fires(prompt_text, self._seed):
                    return rule.fault
        return None
