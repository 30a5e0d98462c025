"""Loopback Gemini API emulator for tests, demos and load tests (no Prefect imports here)."""

from .emulator import GeminiEmulator, RecordedRequest
from .faults import Fault, FaultRule, FaultScript

__all__ = ["Fault", "FaultRule", "FaultScript", "GeminiEmulator", "RecordedRequest"]
