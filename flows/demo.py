"""The demo flow as a deployment entrypoint (``prefect.yaml``: ``flows/demo.py:demo_flow``).

The demo itself ships in the package (:mod:`prefect_batchllm.demo`), so the installed
``prefect-batchllm demo`` (what ``make demo`` runs) works without this checkout.
"""

from __future__ import annotations

from prefect_batchllm.demo import demo_flow

__all__ = ["demo_flow"]
