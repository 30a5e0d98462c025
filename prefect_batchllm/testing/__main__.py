"""Standalone Gemini emulator: ``python -m prefect_batchllm.testing --port 8089 --latency 0.2``.

Prints the base URL, then serves until Ctrl-C or SIGTERM. Point the SDK at it with
``HttpOptions(base_url=<printed URL>)`` (any API key works) or ``GOOGLE_GEMINI_BASE_URL``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from ._batches import BatchDelay
from .emulator import GeminiEmulator, Latency


def _latency(value: str) -> Latency:
    """ "0.2" -> fixed seconds; "0.1,0.3" -> uniform range."""
    try:
        if "," in value:
            lo, hi = (float(v) for v in value.split(",", 1))
            if lo > hi or lo < 0:
                raise ValueError
            return (lo, hi)
        fixed = float(value)
        if fixed < 0:
            raise ValueError
        return fixed
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SECONDS or LO,HI, got {value!r}") from None


def _batch_delay(value: str) -> BatchDelay:
    """ "2" -> 2 s PENDING then 2 s RUNNING; "1,30" -> 1 s PENDING, 30 s RUNNING; "inf" holds jobs."""
    try:
        parts = [float(v) for v in value.split(",")]
        if len(parts) > 2 or any(not p >= 0 for p in parts):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SECONDS or PENDING,RUNNING, got {value!r}") from None
    return (parts[0], parts[1]) if len(parts) == 2 else parts[0]


def build_parser() -> argparse.ArgumentParser:
    """Argument parser shared with the ``prefect-batchllm emulator`` command."""
    parser = argparse.ArgumentParser(
        prog="python -m prefect_batchllm.testing", description="Serve a local Gemini API emulator."
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8089, help="port, 0 = pick a free one (default 8089)")
    parser.add_argument("--latency", type=_latency, default=0.0, help="seconds per generate call, or LO,HI")
    parser.add_argument("--rpm", type=int, default=None, help="requests per minute quota")
    parser.add_argument("--tpm", type=int, default=None, help="input tokens per minute quota")
    parser.add_argument(
        "--quota-window", type=float, default=60.0, help="quota window in seconds (default 60)"
    )
    parser.add_argument("--min-cache-tokens", type=int, default=0, help="reject smaller caches with 400")
    parser.add_argument("--seed", type=int, default=0, help="seed for deterministic answers and ids")
    parser.add_argument(
        "--batch-delay",
        type=_batch_delay,
        default=0.0,
        help="seconds a batch job stays PENDING then RUNNING, or PENDING,RUNNING (default 0)",
    )
    parser.add_argument(
        "--batch-outcome",
        default="SUCCEEDED",
        choices=["SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"],
        help="state batch jobs end in once their delay has passed (default SUCCEEDED)",
    )
    parser.add_argument("--no-auth", action="store_true", help="accept requests without x-goog-api-key")
    parser.add_argument("--verbose", "-v", action="store_true", help="log one line per request")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the emulator in the foreground; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    emulator = GeminiEmulator(
        host=args.host,
        port=args.port,
        latency=args.latency,
        rpm=args.rpm,
        tpm=args.tpm,
        quota_window_s=args.quota_window,
        require_api_key=not args.no_auth,
        min_cache_tokens=args.min_cache_tokens,
        seed=args.seed,
        log_requests=args.verbose,
        batch_delay=args.batch_delay,
    )
    emulator.set_batch_outcome(args.batch_outcome)
    try:
        emulator.start()
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(emulator.base_url, flush=True)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_signal)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
