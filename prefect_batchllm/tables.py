"""Atomic Parquet / CSV table files on a local path or any fsspec URL (``s3://``, ``gs://``, ``memory://``).

Plain pandas + fsspec, no Prefect: reading or writing a table is cheap to import and usable anywhere (the
deployable flows in ``flows/``, scripts, notebooks).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import TYPE_CHECKING, Any

import fsspec
import pandas as pd

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

__all__ = ["read_table", "write_table"]


def _format_of(path: str, format: str | None) -> str:
    if format is not None:
        fmt = format.lower()
    else:
        name = path.split("?", 1)[0].lower()
        for suffix in (".gz", ".bz2", ".zst", ".xz", ".zip"):
            name = name.removesuffix(suffix)
        fmt = name.rsplit(".", 1)[-1] if "." in name.rsplit("/", 1)[-1] else ""
    if fmt in ("parquet", "pq"):
        return "parquet"
    if fmt in ("csv", "tsv"):
        return fmt
    raise ValueError(f"cannot tell the table format of {path!r}: use a .parquet or .csv path or pass format=")


def read_table(path: str | os.PathLike[str], *, format: str | None = None, **kwargs: Any) -> pd.DataFrame:
    """Read a Parquet or CSV table from a local path or any fsspec URL (``s3://``, ``gs://``, ``memory://``).

    The format comes from the extension (``.parquet``/``.pq``, ``.csv``, ``.tsv``, optionally compressed)
    unless ``format`` is given; ``kwargs`` go to ``pandas.read_parquet`` / ``read_csv``.
    """
    import pyarrow as pa

    url = os.fspath(path)
    fmt = _format_of(url, format)
    try:
        if fmt == "parquet":
            with fsspec.open(url, "rb") as handle:
                return pd.read_parquet(handle, **kwargs)
        kwargs.setdefault("sep", "\t" if fmt == "tsv" else ",")
        with fsspec.open(url, "rb", compression="infer") as handle:
            frame: pd.DataFrame = pd.read_csv(handle, **kwargs)
            return frame
    except (pa.ArrowException, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        # pyarrow names an in-memory '<Buffer>', not the file: say which file is unreadable.
        raise ValueError(
            f"cannot read {fmt.upper()} table {url!r}: {type(exc).__name__}: {exc} "
            "(is the file empty, truncated or not really that format?)"
        ) from exc


def write_table(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    index: bool | None = None,
    **kwargs: Any,
) -> None:
    """Write ``df`` as Parquet or CSV, atomically: readers see the old file or the complete new one.

    The table is written to a hidden temp sibling and then renamed over ``path`` (``os.replace`` after an
    fsync locally; the filesystem's ``mv`` for other fsspec URLs, which object stores make atomic per
    object). A crash mid-write leaves at most a stray ``.<name>.tmp-*`` file, never a torn table.
    ``index=None`` keeps a non-default index in Parquet and drops the default ``RangeIndex`` in CSV.
    """
    url = os.fspath(path)
    fmt = _format_of(url, format)
    fs, target = fsspec.core.url_to_fs(url)
    parent, _, name = target.rpartition("/")
    if parent:
        fs.makedirs(parent, exist_ok=True)
    temp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}" if parent else f".{name}.tmp-{uuid.uuid4().hex}"
    local = _is_local(fs)
    try:
        with fs.open(temp, "wb") as handle:
            if fmt == "parquet":
                df.to_parquet(handle, index=index, **kwargs)
            else:
                csv_index = index if index is not None else not isinstance(df.index, pd.RangeIndex)
                kwargs.setdefault("sep", "\t" if fmt == "tsv" else ",")
                df.to_csv(handle, index=csv_index, **kwargs)
            if local:
                handle.flush()
                os.fsync(handle.fileno())
        if local:
            os.replace(temp, target)
            _fsync_dir(parent or ".")
        else:
            fs.mv(temp, target)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(temp):
                fs.rm(temp)
        raise


def _is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _fsync_dir(directory: str) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
