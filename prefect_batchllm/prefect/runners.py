"""Task runners from one string: where a batch's chunk tasks run (in process, Dask, Ray).

A deployment parameter, a CLI flag or an environment variable can only carry text, so the deployable flows
take ``task_runner="dask://scheduler:8786"`` and turn it into Prefect's own runner with
:func:`task_runner_from`; library callers may equally pass a runner to
``run_batch.with_options(task_runner=...)`` themselves. See docs/distributed.md for when to use which.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

from prefect.task_runners import TaskRunner

__all__ = ["task_runner_from"]

_FORMS = (
    "'dask' (a local Dask cluster per flow run; options as a query, e.g. 'dask?n_workers=2'), "
    "'dask://HOST:PORT' (an existing Dask scheduler; also 'tcp://' / 'tls://' addresses), "
    "'ray' (a local Ray instance), 'ray://HOST:PORT' (an existing Ray cluster), "
    "or None / '' / 'default' (Prefect's default, in the flow's process)"
)


def _value(text: str) -> Any:
    """A query value as Python: ints, floats and booleans by their spelling, anything else as text."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def _options(query: str, spec: str) -> dict[str, Any]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(
            f"task_runner {spec!r}: cannot read the options {query!r} (use key=value&...)"
        ) from None
    return {key: _value(value) for key, value in pairs}


def _missing_extra(extra: str, spec: str, exc: ImportError) -> ValueError:
    return ValueError(
        f"task_runner {spec!r} needs the {extra} extra, which is not installed ({exc.name or exc}): "
        f"pip install 'prefect-batchllm[{extra}]'"
    )


def _dask(spec: str, address: str | None, options: dict[str, Any]) -> TaskRunner[Any]:
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise _missing_extra("dask", spec, exc) from None
    if address is not None:
        if options:
            raise ValueError(
                f"task_runner {spec!r}: cluster options {sorted(options)} apply only to a local cluster "
                "('dask?n_workers=2'); an existing scheduler is configured where it runs"
            )
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs=options) if options else DaskTaskRunner()


def _ray(spec: str, address: str | None, options: dict[str, Any]) -> TaskRunner[Any]:
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise _missing_extra("ray", spec, exc) from None
    if address is not None:
        return RayTaskRunner(address=address, init_kwargs=options or None)
    return RayTaskRunner(init_kwargs=options or None)


def task_runner_from(spec: str | None) -> TaskRunner[Any] | None:
    """The Prefect task runner ``spec`` names, or ``None`` for the flow's default (in-process).

    * ``"dask"``: ``DaskTaskRunner()``, a temporary local cluster; a query passes ``cluster_kwargs``
      (``"dask?n_workers=2&threads_per_worker=1"``);
    * ``"dask://host:8786"`` or ``"tcp://host:8786"``: ``DaskTaskRunner(address=...)``, an existing scheduler;
    * ``"ray"``: ``RayTaskRunner()``, a local Ray instance (a query passes ``init_kwargs``);
    * ``"ray://host:10001"``: ``RayTaskRunner(address=...)``, an existing Ray cluster.

    Raises ``ValueError`` for anything else, and one naming ``pip install 'prefect-batchllm[dask]'`` (or
    ``[ray]``) when the runner's package is missing.
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise ValueError(
            f"task_runner must be a string such as 'dask://host:8786', got {type(spec).__name__}"
        )
    text = spec.strip()
    if text.lower() in ("", "default", "local", "thread", "threads"):
        return None
    bare, _, query = text.partition("?")
    if "://" not in bare:
        options = _options(query, spec)
        if bare.lower() == "dask":
            return _dask(spec, None, options)
        if bare.lower() == "ray":
            return _ray(spec, None, options)
        raise ValueError(f"unknown task_runner {spec!r}; expected {_FORMS}")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("dask", "tcp", "tls", "ray"):
        raise ValueError(f"unknown task_runner scheme {parts.scheme!r} in {spec!r}; expected {_FORMS}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"task_runner {spec!r}: the port must be a number") from None
    if not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"task_runner {spec!r}: give a scheduler address such as '{scheme}://HOST:PORT'")
    netloc = parts.netloc
    options = _options(parts.query, spec)
    if scheme == "ray":
        return _ray(spec, f"ray://{netloc}", options)
    if port is None:
        raise ValueError(f"task_runner {spec!r}: give the scheduler's port, e.g. '{scheme}://HOST:8786'")
    return _dask(spec, f"{'tcp' if scheme == 'dask' else scheme}://{netloc}", options)
