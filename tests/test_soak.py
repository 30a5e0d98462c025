"""A small chaos soak (the ``make soak`` benchmark at 300 rows and 3 SIGKILLs) as a regression test.

The deployable ``enrich_table`` flow runs in its own process against a real Prefect server and the bundled
Gemini server injecting random faults (5xx, 429 with RetryInfo, hangs past the item timeout, invalid JSON,
safety blocks, outages of the whole server); the flow process is SIGKILLed three times at random points.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/
from benchmarks.soak import run_soak

pytestmark = pytest.mark.prefect


def test_small_chaos_soak_loses_nothing(tmp_path) -> None:
    report = run_soak(
        rows=300,
        kills=3,
        seed=3,
        workdir=str(tmp_path),
        max_workers=8,
        chunk_size=50,
        outage_every=(2.0, 5.0),
        outage_down=(0.5, 1.5),
        log=lambda line: None,
    )
    summary = asdict(report)
    assert report.kills == 3, summary
    assert report.lost == 0 and report.duplicated == 0, summary
    assert report.failed_at_end == 0, summary
    # Rows the server finished in a killed run are requested again only if they were still in flight or in
    # the result log's unflushed buffer when the process died: at most max_workers plus the rows finished
    # in the last flush window, per kill (counted from the server's log).
    assert report.re_requested_after_kill <= report.re_request_bound, summary
    # The last run's table accounts for the tokens the server billed for that run's requests (measured
    # equal; an answer that arrives just after the client's timeout is billed but not seen, hence the bound).
    for kind, billed in report.last_run_server_tokens.items():
        assert 0.95 * billed <= report.last_run_table_tokens[kind] <= billed, summary
    assert report.outages >= 1, summary
    faults = report.requests_by_fault
    assert faults.get("ok", 0) >= 300 and sum(v for k, v in faults.items() if k != "ok") > 0, summary
