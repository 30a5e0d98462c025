"""``prefect-batchllm``: operator commands (rate limits), the local Gemini emulator and the demo.

    prefect-batchllm limits apply --prefix gemini-flash --rpm 1000 --tpm 2000000 --in-flight 64
    prefect-batchllm limits show [--prefix gemini-flash]
    prefect-batchllm limits delete --prefix gemini-flash
    prefect-batchllm emulator --port 8089 --rpm 600 --latency 0.2
    prefect-batchllm demo
    prefect-batchllm batches list|show NAME|cancel NAME [--base-url URL]

``batches`` talks to the Gemini API with ``GEMINI_API_KEY`` (``--base-url`` or ``GOOGLE_GEMINI_BASE_URL``
for a compatible server such as the bundled emulator).

``limits`` talks to the Prefect API of the active profile (``PREFECT_API_URL``), so the same limits hold
for every flow run and worker that uses the prefix. Heavy imports happen inside each command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {number}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="prefect-batchllm", description="Batch LLM work on Prefect: limits, emulator, demo."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    limits = commands.add_parser("limits", help="manage the global concurrency limits of a quota")
    actions = limits.add_subparsers(dest="action", required=True, metavar="ACTION")
    apply = actions.add_parser("apply", help="create or update the limits of a prefix (idempotent)")
    apply.add_argument("--prefix", required=True, help="limit-name prefix (RateLimitConfig.limit_prefix)")
    apply.add_argument("--rpm", type=_positive_float, default=None, help="provider requests per minute")
    apply.add_argument("--tpm", type=_positive_int, default=None, help="provider input tokens per minute")
    apply.add_argument("--in-flight", type=_positive_int, default=None, help="concurrent requests")
    apply.add_argument(
        "--window",
        type=_positive_float,
        default=60.0,
        help="seconds the provider counts its quota over (default 60)",
    )
    show = actions.add_parser("show", help="list limits (all, or those of one prefix)")
    show.add_argument("--prefix", default=None)
    delete = actions.add_parser("delete", help="delete the limits of a prefix")
    delete.add_argument("--prefix", required=True)

    emulator = commands.add_parser(
        "emulator",
        help="serve the local Gemini API emulator (same arguments as python -m prefect_batchllm.testing)",
    )
    emulator.add_argument("args", nargs=argparse.REMAINDER, help="forwarded to the emulator")

    batches = commands.add_parser("batches", help="list, show or cancel Gemini batch jobs")
    batch_actions = batches.add_subparsers(dest="action", required=True, metavar="ACTION")
    batch_list = batch_actions.add_parser("list", help="recent batch jobs: name, state, model, display name")
    batch_list.add_argument("--limit", type=_positive_int, default=50, help="at most this many (default 50)")
    batch_show = batch_actions.add_parser("show", help="one job: state, times, answer counts when done")
    batch_show.add_argument("name", help="batches/ID")
    batch_cancel = batch_actions.add_parser("cancel", help="cancel a pending or running job")
    batch_cancel.add_argument("name", help="batches/ID")
    for sub in (batch_list, batch_show, batch_cancel):
        sub.add_argument(
            "--base-url",
            default=None,
            help="API base URL (default: GOOGLE_GEMINI_BASE_URL, else the Gemini API)",
        )
        sub.add_argument("--api-version", default="v1beta", help="API version path (default v1beta)")

    demo = commands.add_parser("demo", help="run the demo flow (prefect_batchllm/demo.py)")
    demo.add_argument("args", nargs=argparse.REMAINDER, help="forwarded to the demo")
    return parser


def _describe(lim: Any) -> str:
    decay = float(lim.slot_decay_per_second or 0.0)
    kind = f"decay {decay:.4g}/s (~{decay * 60:.0f}/min)" if decay > 0 else "no decay"
    state = "active" if lim.active else "DISABLED (acquisitions run unlimited)"
    return f"{lim.name:40s} limit {lim.limit:>8d}  in use {lim.active_slots:>8d}  {kind}  {state}"


async def _limits(args: argparse.Namespace) -> int:
    from prefect_batchllm.core.config import RateLimitConfig
    from prefect_batchllm.prefect.limit_admin import (
        aensure_rate_limits,
        delete_rate_limits,
        limit_specs,
        read_rate_limits,
    )

    if args.action == "apply":
        if args.rpm is None and args.tpm is None and args.in_flight is None:
            print("limits apply: give at least one of --rpm, --tpm, --in-flight", file=sys.stderr)
            return 2
        config = RateLimitConfig(
            requests_per_minute=args.rpm,
            tokens_per_minute=args.tpm,
            max_in_flight=args.in_flight,
            limit_prefix=args.prefix,
            quota_window_seconds=args.window,
        )
        await aensure_rate_limits(config)
        for spec in limit_specs(config):
            print(f"applied {spec.name}: limit {spec.limit}, slot decay {spec.slot_decay_per_second:.4g}/s")
        return 0
    if args.action == "show":
        found = await read_rate_limits(args.prefix)
        if not found:
            print("no limits" + (f" for prefix {args.prefix!r}" if args.prefix else ""))
        for lim in found:
            print(_describe(lim))
        return 0
    deleted = await delete_rate_limits(args.prefix)
    print(f"deleted {', '.join(deleted)}" if deleted else f"no limits for prefix {args.prefix!r}")
    return 0


def _batch_client(args: argparse.Namespace) -> Any:
    """A ``genai.Client`` from ``GEMINI_API_KEY`` (SDK retries off, like the rest of the package)."""
    import os

    from google import genai
    from google.genai import types

    from prefect_batchllm.core.errors import register_secret

    key = os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
    if not key:
        raise ValueError("set GEMINI_API_KEY to the API key of the project that owns the batch jobs")
    register_secret(key)
    base_url = args.base_url or os.environ.get("GOOGLE_GEMINI_BASE_URL") or None
    options = types.HttpOptions(base_url=base_url, api_version=args.api_version, retry_options=None)
    return genai.Client(vertexai=False, api_key=key, http_options=options)


def _job_line(job: Any) -> str:
    from prefect_batchllm.models.gemini_batch import state_name

    created = job.create_time.isoformat(timespec="seconds") if job.create_time else "-"
    model = (job.model or "-").removeprefix("models/")
    return f"{job.name or '-':32s} {state_name(job):22s} {model:24s} {created:25s} {job.display_name or ''}"


async def _batches(args: argparse.Namespace) -> int:
    from google.genai import types

    from prefect_batchllm.models.gemini_batch import read_answers, state_name

    client = _batch_client(args)
    if args.action == "list":
        pager = await client.aio.batches.list(
            config=types.ListBatchJobsConfig(page_size=min(args.limit, 100))
        )
        shown = 0
        async for job in pager:
            if shown >= args.limit:
                break
            print(_job_line(job))
            shown += 1
        if not shown:
            print("no batch jobs")
        return 0
    if args.action == "cancel":
        await client.aio.batches.cancel(name=args.name)
        job = await client.aio.batches.get(name=args.name)
        print(f"cancel requested: {job.name} is {state_name(job)}")
        return 0
    job = await client.aio.batches.get(name=args.name)
    print(_job_line(job))
    for label, value in (("started", job.start_time), ("updated", job.update_time), ("ended", job.end_time)):
        if value is not None:
            print(f"  {label}: {value.isoformat(timespec='seconds')}")
    if job.error is not None and job.error.message:
        print(f"  error: {job.error.message}")
    if job.dest is not None:
        answers = await read_answers(client, job)
        failed = sum(1 for a in answers.values() if a.error is not None or a.response is None)
        where = job.dest.file_name or "inline"
        print(f"  answers: {len(answers)} ({len(answers) - failed} ok, {failed} failed) in {where}")
    return 0


def quiet_environment(verbose: bool) -> None:
    """Quiet demo runs (call before Prefect is imported): no telemetry, no per-task INFO lines."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Prefect's default (20 s) is too short for the ephemeral API to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        # The ephemeral API (a subprocess) logs harmless CancelledError / connection-pool tracebacks when it
        # stops with the process; its loggers and the root logger (sqlalchemy) are silenced for the demo.
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_ROOT_LEVEL", "CRITICAL")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    # ``emulator`` and ``demo`` forward everything after their name (argparse's REMAINDER would refuse
    # ``emulator --port 8089``); the parser still lists them in --help.
    if argv and argv[0] == "emulator":
        from prefect_batchllm.testing.__main__ import main as emulator_main

        return int(emulator_main(argv[1:]) or 0)
    if argv and argv[0] == "demo" and not {"-h", "--help"} & set(argv[1:]):
        quiet_environment(verbose="-v" in argv[1:])
        from prefect_batchllm import demo

        return int(demo.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    if args.command == "batches":
        from prefect_batchllm.core.errors import describe_error

        try:
            return asyncio.run(_batches(args))
        except ValueError as exc:
            print(f"batches {args.action}: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # an API error: one readable line, never the key
            print(f"batches {args.action}: {describe_error(exc)}", file=sys.stderr)
            return 1
    try:
        return asyncio.run(_limits(args))
    except ValueError as exc:  # invalid prefix / values (RateLimitConfig validates)
        print(f"limits {args.action}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
