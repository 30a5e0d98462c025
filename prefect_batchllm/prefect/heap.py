"""Keep the garbage collector's full passes short while a batch runs in this process.

A process running a batch holds a large, long-lived heap before the first request: Prefect, pydantic,
google-genai, pandas and their types, and the batch's input items, ~390k GC-tracked objects in the
benchmark's flow process. Every in-flight request's objects live ~200 ms, long enough to be promoted to
the oldest generation, so CPython runs a full collection every ~2 s, and each one walks that whole heap:
measured ~240 ms per pass with the event loop stopped, 5.6 s of a 38 s run of 10,000 items (100 in
flight), which is the throughput the flow lost against the bare SDK.

:func:`steady_heap` moves what is alive when the run starts into CPython's permanent generation
(``gc.freeze()``) for the run's duration, so a full pass walks only what the run itself created, and hands
it back (``gc.unfreeze()``) when the last run in the process ends. Nothing is leaked: a cycle that dies while
frozen is collected by the first full pass after the run. A process that manages freezing itself (a
pre-fork server that called ``gc.freeze()``) is left alone.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["steady_heap"]

_lock = threading.Lock()
_runs = 0  # runs inside steady_heap() in this process
_froze = False  # whether the first of them froze the heap (and the last must unfreeze it)


@contextlib.contextmanager
def steady_heap() -> Iterator[None]:
    """For a batch run's duration: the heap alive at its start is not walked by garbage collections."""
    global _runs, _froze
    with _lock:
        if _runs == 0:
            _froze = gc.get_freeze_count() == 0
            if _froze:
                gc.freeze()
        _runs += 1
    try:
        yield
    finally:
        with _lock:
            _runs -= 1
            if _runs == 0 and _froze:
                gc.unfreeze()
                _froze = False
