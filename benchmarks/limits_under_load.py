"""The quota guarantee on a busy machine: the limiter tests, repeated beside CPU hogs.

``python -m benchmarks.limits_under_load [--runs 20] [--hogs 2]`` runs the two-process shared-quota test
and the run-at-quota tests (per item and chunked) ``--runs`` times each while ``--hogs`` processes spin
on the CPU, and prints how many runs passed. Every run must pass: each asserts zero provider 429s and
every provider window within its quota. Not part of ``make test`` (about a minute per run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = (
    "tests/test_limits.py::test_two_processes_share_one_quota",
    "tests/test_limits.py::test_run_batch_at_the_quota_has_zero_429s",
)


def _hog() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--hogs", type=int, default=2, help="CPU-spinning processes beside the tests")
    args = parser.parse_args(argv)
    hogs = [_hog() for _ in range(args.hogs)]
    failed = 0
    try:
        for run in range(1, args.runs + 1):
            started = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            print(f"run {run}/{args.runs}: {tail} ({time.monotonic() - started:.0f} s)", flush=True)
            if proc.returncode != 0:
                failed += 1
                print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
    finally:
        for hog in hogs:
            hog.kill()
    print(f"{args.runs - failed} of {args.runs} runs passed with {args.hogs} CPU hogs beside them")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
