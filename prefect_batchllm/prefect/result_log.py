"""Per-chunk persistence of successful item results, replayed per item.

One storage object per flush holds many ``(key, WorkItemResult, expiration)`` entries, so a 1M-item run
writes ~5,000 objects instead of 1M Prefect result files, while a rerun still replays item by item (key =
``prefect.tasks.item_cache_key``). Objects live under ``<location>/v1/records/`` with unique names (time,
writer id, sequence): any number of processes write concurrently without locks or overwrites.

Object layout (little endian): a 24-byte prefix (magic, entry count, total length, CRC32 of the header),
then one 28-byte header entry per result (key hash, expiration, body offset, body length, body CRC32),
then the pickled ``(key, result)`` bodies. A process loads the index once from the headers only (one
small ranged read per object) into numpy arrays (~32 bytes per key); a lookup then reads just the bodies
it needs and verifies their CRC and full key. A torn object (a killed writer on a non-atomic store)
fails its length or CRC check and is skipped; local files are written to a temp name and renamed.

A first load that had to read many headers writes an index snapshot (``v1/index/*.idx``: the record
names and the arrays, CRC-checked); later processes read the newest snapshot plus the headers of records
it does not cover. Measured (``python -m benchmarks.result_log``, 1M keys, 4.8k objects, local disk, 2
cores): headers 0.6 s, snapshot 0.3 s; +36 MB RSS kept. Records are never deleted (expired entries are
only skipped).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import struct
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cloudpickle
import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem as _LocalFS

from prefect_batchllm.core.config import ProcessorConfig
from prefect_batchllm.core.items import WorkItemResult

logger = logging.getLogger("prefect_batchllm")

__all__ = ["ResultLog", "location_for", "prefect_result_storage", "resolve_location"]

FORMAT_DIR = "v1"
SUBFOLDER = "batchllm-results"
_MAGIC = b"BLRLOG1\n"
_PREFIX = struct.Struct("<8sIQI")  # magic, entries, total length, CRC32(prefix[8:20] + header)
_DISK = np.dtype([("hash", "<u8"), ("exp", "<f8"), ("off", "<u4"), ("len", "<u4"), ("crc", "<u4")])
_ROW = np.dtype([("exp", "<f8"), ("rec", "<u4"), ("off", "<u4"), ("len", "<u4"), ("crc", "<u4")])
_MAX_OBJECT = 1 << 30  # bodies per object stay well inside the u4 offsets
_HEADER_GUESS = 8_192  # first ranged read per object (fits 291 entries); larger headers: a second read
_READ_BATCH = 512  # objects per cat_ranges call while loading the index
#: Entries kept in the small dict before merging into the sorted arrays. A fixed bound, not a fraction of
#: the index: a dict entry costs ~270 bytes (the arrays ~32), so at 1M keys a quarter-size delta held ~65 MB.
_DELTA_MAX = 50_000
_COALESCE_GAP = 65_536  # bodies closer than this in one object are read with one ranged read
#: A listing this long after a log was created (its creator's clock) surely shows every record written
#: before: pickled copies of it (one per Dask chunk) then reuse their process's index without listing again.
_CLOCK_SKEW_S = 30.0
#: A process that read this many record headers at its first load writes an index snapshot, so later
#: processes read one object plus the records written since instead of every header.
_SNAPSHOT_RECORDS = 256
_SNAP_MAGIC = b"BLRIDX1\n"
_SNAP_PREFIX = struct.Struct("<8sQQI")  # magic, names length, entries, CRC32 of everything after

#: Wall clock of expirations (epoch seconds); a module attribute so tests can move time forward.
_now = time.time

_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="batchllm-result-log")


def key_hash(key: str) -> int:
    """64-bit hash of a key: what the in-memory index stores (the full key is verified on read)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


# --------------------------------------------------------------------------------------------------
# Encoding


def encode_record(entries: Sequence[tuple[str, WorkItemResult[Any, Any], float]]) -> bytes:
    """One storage object holding ``entries`` (key, result, expiration epoch seconds or 0 = never)."""
    return _encode([(key, cloudpickle.dumps((key, result), protocol=5), exp) for key, result, exp in entries])


def _pickled(
    entries: Iterable[tuple[str, WorkItemResult[Any, Any], float]],
) -> list[tuple[str, bytes, float]]:
    """``(key, body, expiration)`` per entry; a result that cannot be pickled is left out (its item simply
    runs again next time) instead of failing the whole flush."""
    out = []
    for key, result, exp in entries:
        try:
            out.append((key, cloudpickle.dumps((key, result), protocol=5), exp))
        except Exception as exc:
            logger.warning(
                "result log: the result of %s cannot be pickled (%s), so it is not persisted",
                result.item_id,
                type(exc).__name__,
            )
    return out


def _encode(entries: Sequence[tuple[str, bytes, float]]) -> bytes:
    """One storage object from ``(key, pickled body, expiration)`` entries."""
    bodies = [body for _, body, _ in entries]
    n = len(entries)
    header = np.zeros(n, _DISK)
    header["hash"] = [key_hash(key) for key, _, _ in entries]
    header["exp"] = [exp for _, _, exp in entries]
    lengths = np.fromiter((len(b) for b in bodies), dtype=np.int64, count=n)
    start = _PREFIX.size + n * _DISK.itemsize
    offsets = start + np.concatenate(([0], np.cumsum(lengths)[:-1])) if n else lengths
    header["off"] = offsets
    header["len"] = lengths
    header["crc"] = [zlib.crc32(b) for b in bodies]
    total = start + int(lengths.sum())
    head = header.tobytes()
    crc = zlib.crc32(struct.pack("<IQ", n, total) + head)
    return b"".join([_PREFIX.pack(_MAGIC, n, total, crc), head, *bodies])


def _parse_prefix(data: bytes) -> tuple[int, int, int] | None:
    """``(entries, total length, header crc)`` of an object's first bytes, or None when not ours."""
    if len(data) < _PREFIX.size:
        return None
    magic, n, total, crc = _PREFIX.unpack_from(data)
    return (n, total, crc) if magic == _MAGIC else None


def _parse_header(data: bytes, size: int | None) -> bytes | None:
    """The header entries of an object from its first bytes; None when torn, truncated or corrupt."""
    parsed = _parse_prefix(data)
    if parsed is None:
        return None
    n, total, crc = parsed
    end = _PREFIX.size + n * _DISK.itemsize
    if len(data) < end or (size is not None and size != total):
        return None
    head = data[_PREFIX.size : end]
    if zlib.crc32(struct.pack("<IQ", n, total) + head) != crc:
        return None
    return head


# --------------------------------------------------------------------------------------------------
# The per-process index of one location


class _Index:
    """Which record holds each key, for one location, shared by every ResultLog of this process.

    Sorted arrays (hash, row) built once from all headers, plus a small dict for records added later
    (this process's flushes, records other writers added since); merged when the dict grows.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded = False
        self.synced_at: float | None = None  # wall time the last listing started
        self.names: list[str] = []
        self.known: dict[str, int] = {}
        self.rec_time: list[int] = []
        self.hashes: np.ndarray[Any, Any] = np.zeros(0, np.uint64)
        self.rows: np.ndarray[Any, Any] = np.zeros(0, _ROW)
        self.delta: dict[int, tuple[float, int, int, int, int]] = {}

    def _register(self, name: str) -> int:
        rec = len(self.names)
        self.names.append(name)
        self.known[name] = rec
        try:
            self.rec_time.append(int(name.split("-", 1)[0]))
        except ValueError:
            self.rec_time.append(0)
        return rec

    def add(self, name: str, header: bytes) -> None:
        """Index one record from its header bytes (caller holds ``lock``); known records are ignored."""
        if name in self.known or not self.loaded:
            return  # before the first sync nothing is indexed: that sync lists every record
        rec = self._register(name)
        rtime = self.rec_time
        for h, exp, off, length, crc in np.frombuffer(header, _DISK).tolist():
            old = self.delta.get(h)
            if old is None or rtime[old[1]] <= rtime[rec]:
                self.delta[h] = (exp, rec, off, length, crc)
        if len(self.delta) > _DELTA_MAX:
            self._merge(bytearray(), np.zeros(0, np.uint32))

    def _merge(self, headers: bytearray, recs: np.ndarray[Any, Any]) -> None:
        """Rebuild the sorted arrays from themselves, the delta and new ``headers`` (entries of records
        ``recs``; the buffer is emptied): the newest record wins per hash, expired entries are dropped.
        Temporaries are freed as soon as possible: the peak stays ~2x the final arrays."""
        entries = np.frombuffer(headers, _DISK)
        new_hashes = entries["hash"].copy()
        new_rows = np.empty(len(entries), _ROW)
        for name in ("exp", "off", "len", "crc"):
            new_rows[name] = entries[name]
        new_rows["rec"] = recs
        del entries
        headers.clear()
        hash_parts = [a for a in (self.hashes, new_hashes) if len(a)]
        row_parts = [a for a in (self.rows, new_rows) if len(a)]
        del new_hashes, new_rows
        if self.delta:
            hash_parts.append(np.fromiter(self.delta.keys(), np.uint64, len(self.delta)))
            row_parts.append(np.array(list(self.delta.values()), _ROW))
            self.delta = {}
        self.hashes, self.rows = np.zeros(0, np.uint64), np.zeros(0, _ROW)
        if not hash_parts:
            return
        hashes = np.concatenate(hash_parts) if len(hash_parts) > 1 else hash_parts[0]
        rows = np.concatenate(row_parts) if len(row_parts) > 1 else row_parts[0]
        del hash_parts, row_parts
        times = np.asarray(self.rec_time, np.int64)[rows["rec"]]
        order = np.lexsort((times, hashes))
        del times
        hashes = hashes[order]
        rows = rows[order]
        del order
        keep = np.ones(len(hashes), bool)
        keep[:-1] = hashes[1:] != hashes[:-1]  # the last of each hash group is the newest
        exp = rows["exp"]
        keep &= (exp == 0) | (exp > _now())
        del exp
        self.hashes = hashes[keep]
        del hashes
        self.rows = rows[keep]

    def sync(self, fs: Any, base: str, since: float) -> None:
        """Index every record under ``base`` not yet known (the first time: the newest index snapshot plus
        the records it does not cover), unless the last listing started after ``since`` (+ clock skew):
        it already showed what existed then."""
        records_dir = f"{base}/records"
        with self.lock:
            if self.synced_at is not None and self.synced_at > since + _CLOCK_SKEW_S:
                return
            started = time.time()
            if not self.loaded and (snapshot := _load_snapshot(fs, f"{base}/index")) is not None:
                names, self.hashes, self.rows = snapshot
                for name in names:
                    self._register(name)
            try:
                fs.invalidate_cache(records_dir)
                listing = fs.ls(records_dir, detail=True)
            except FileNotFoundError:
                listing = []
            new: list[tuple[str, int | None]] = []
            for entry in listing:
                name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
                if name.endswith(".blr") and not name.startswith(".") and name not in self.known:
                    size = entry.get("size")
                    new.append((name, int(size) if size is not None else None))
            new.sort()
            # Headers go into one growing buffer: no per-record arrays to fragment the heap.
            buf = bytearray()
            counts: list[int] = []
            first: list[int] = []
            for name, header in _read_headers(fs, records_dir, new):
                if not self.loaded or len(header) > _DELTA_MAX:
                    first.append(self._register(name))
                    counts.append(len(header) // _DISK.itemsize)
                    buf += header
                else:
                    self.add(name, header)
            if first:
                recs = np.repeat(np.asarray(first, np.uint32), counts)
                self._merge(buf, recs)
                del buf, recs
                if not self.loaded:
                    _trim_heap()
            if not self.loaded and len(first) >= _SNAPSHOT_RECORDS:
                try:
                    self._write_snapshot(fs, f"{base}/index")
                except Exception as exc:  # an optimisation only: the records stay the truth
                    logger.warning("result log: could not write an index snapshot under %s: %s", base, exc)
            self.loaded = True
            self.synced_at = started

    def _write_snapshot(self, fs: Any, index_dir: str) -> None:
        """Store the whole index (caller holds ``lock``, delta empty) as one object."""
        names = json.dumps(self.names).encode()
        hashes = np.ascontiguousarray(self.hashes).view(np.uint8).data
        rows = np.ascontiguousarray(self.rows).view(np.uint8).data
        crc = zlib.crc32(rows, zlib.crc32(hashes, zlib.crc32(names)))
        prefix = _SNAP_PREFIX.pack(_SNAP_MAGIC, len(names), len(self.hashes), crc)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:16]}.idx"
        _write_object(fs, index_dir, name, [prefix, names, hashes, rows])

    def find(self, hashes: Sequence[int]) -> list[tuple[float, int, int, int, int] | None]:
        """Location ``(exp, rec, off, len, crc)`` per hash (None if absent); caller holds ``lock``."""
        out: list[tuple[float, int, int, int, int] | None] = [None] * len(hashes)
        if len(self.hashes):
            query = np.asarray(hashes, np.uint64)
            pos = np.searchsorted(self.hashes, query)
            pos[pos >= len(self.hashes)] = 0
            hit = self.hashes[pos] == query
            for i in np.flatnonzero(hit).tolist():
                exp, rec, off, length, crc = self.rows[pos[i]].tolist()
                out[i] = (exp, rec, off, length, crc)
        if self.delta:
            rtime = self.rec_time
            for i, h in enumerate(hashes):
                loc = self.delta.get(h)
                if loc is not None and ((old := out[i]) is None or rtime[loc[1]] >= rtime[old[1]]):
                    out[i] = loc
        return out

    def nbytes(self) -> int:
        """Bytes held by the sorted arrays (the bulk of the index)."""
        return int(self.hashes.nbytes + self.rows.nbytes)


def _load_snapshot(
    fs: Any, index_dir: str
) -> tuple[list[str], np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
    """``(record names, hashes, rows)`` of the newest valid index snapshot, if any."""
    try:
        fs.invalidate_cache(index_dir)
        listing = fs.ls(index_dir, detail=False)
    except FileNotFoundError:
        return None
    names = sorted(
        (n for n in (str(e).rstrip("/").rsplit("/", 1)[-1] for e in listing) if n.endswith(".idx")),
        reverse=True,
    )
    for name in [n for n in names if not n.startswith(".")][:3]:
        try:
            data = fs.cat_file(f"{index_dir}/{name}")
        except Exception as exc:
            logger.warning("result log: cannot read index snapshot %s: %s", name, exc)
            continue
        if len(data) >= _SNAP_PREFIX.size:
            magic, names_len, count, crc = _SNAP_PREFIX.unpack_from(data)
            body = memoryview(data)[_SNAP_PREFIX.size :]
            hashes_at = names_len
            rows_at = hashes_at + 8 * count
            if (
                magic == _SNAP_MAGIC
                and len(body) == rows_at + _ROW.itemsize * count
                and zlib.crc32(body) == crc
            ):
                records = json.loads(bytes(body[:names_len]))
                hashes = np.frombuffer(body, np.uint64, count, hashes_at)
                rows = np.frombuffer(body, _ROW, count, rows_at)
                return records, hashes, rows
        logger.warning("result log: skipping torn or corrupt index snapshot %s", name)
    return None


def _write_object(fs: Any, directory: str, name: str, parts: Sequence[Any]) -> None:
    """Store ``parts`` (bytes-like) as one object, never visible half-written: a local file is written
    under a temp name and renamed; object stores publish an upload only once it is complete."""
    if isinstance(fs, _LocalFS):
        fs.makedirs(directory, exist_ok=True)
        tmp = f"{directory}/.{name}.tmp"
        with open(tmp, "wb") as handle:
            for part in parts:
                handle.write(part)
        os.replace(tmp, f"{directory}/{name}")
    elif len(parts) == 1:
        fs.pipe_file(f"{directory}/{name}", parts[0])  # one PUT
    else:
        with fs.open(f"{directory}/{name}", "wb") as handle:  # multipart upload, completed on close
            for part in parts:
                handle.write(part)


def _trim_heap() -> None:
    """Give the load's freed temporaries back to the OS (glibc keeps them otherwise: ~25 MB at 1M keys)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _read_headers(
    fs: Any, records_dir: str, records: Sequence[tuple[str, int | None]]
) -> Iterable[tuple[str, bytes]]:
    """``(name, header bytes)`` of each readable record, by batched ranged reads of its first bytes."""
    for start in range(0, len(records), _READ_BATCH):
        batch = records[start : start + _READ_BATCH]
        paths = [f"{records_dir}/{name}" for name, _ in batch]
        ends = [min(size, _HEADER_GUESS) if size is not None else _HEADER_GUESS for _, size in batch]
        blobs = fs.cat_ranges(paths, [0] * len(paths), ends, on_error="return")
        again: list[int] = []
        for i, blob in enumerate(blobs):
            if isinstance(blob, BaseException):
                logger.debug("result log: cannot read %s: %s", paths[i], blob)
                continue
            parsed = _parse_prefix(blob)
            if parsed is not None and _PREFIX.size + parsed[0] * _DISK.itemsize > len(blob):
                again.append(i)
                continue
            header = _parse_header(blob, batch[i][1])
            if header is None:
                logger.warning("result log: skipping torn or foreign object %s", paths[i])
            else:
                yield batch[i][0], header
        if again:
            sizes = []
            for i in again:
                parsed = _parse_prefix(blobs[i])
                assert parsed is not None
                sizes.append(_PREFIX.size + parsed[0] * _DISK.itemsize)
            more = fs.cat_ranges([paths[i] for i in again], [0] * len(again), sizes, on_error="return")
            for i, blob in zip(again, more, strict=True):
                header = None if isinstance(blob, BaseException) else _parse_header(blob, batch[i][1])
                if header is None:
                    logger.warning("result log: skipping torn or foreign object %s", paths[i])
                else:
                    yield batch[i][0], header


_INDEXES: dict[tuple[str, str], _Index] = {}
_INDEXES_LOCK = threading.Lock()


def _index_for(fs: Any, root: str) -> _Index:
    key = (f"{type(fs).__module__}.{type(fs).__qualname__}", root)
    with _INDEXES_LOCK:
        index = _INDEXES.get(key)
        if index is None:
            index = _INDEXES[key] = _Index()
        return index


# --------------------------------------------------------------------------------------------------
# The public object


_Entry = tuple[WorkItemResult[Any, Any], float]
_LIVE: weakref.WeakSet[ResultLog] = weakref.WeakSet()


class ResultLog:
    """Append-only log of successful item results at one fsspec location, written one object per flush.

    ``add`` buffers; a background flusher on the running loop writes the buffer when ``flush_items``
    results are buffered or the oldest is ``flush_interval_s`` old, so a SIGKILL loses at most that much.
    Picklable (only location and settings travel); several processes may write the same location at once.
    """

    objects_written: int

    def __init__(
        self,
        url: str,
        *,
        flush_interval_s: float = 1.0,
        flush_items: int = 200,
        expiration_s: float | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if flush_interval_s <= 0:
            raise ValueError(f"ResultLog.flush_interval_s must be > 0 seconds, got {flush_interval_s!r}")
        if flush_items < 1:
            raise ValueError(f"ResultLog.flush_items must be >= 1, got {flush_items!r}")
        if expiration_s is not None and expiration_s <= 0:
            raise ValueError(f"ResultLog.expiration_s must be > 0 seconds or None, got {expiration_s!r}")
        self.url = url
        self.flush_interval_s = float(flush_interval_s)
        self.flush_items = int(flush_items)
        self.expiration_s = expiration_s
        self.storage_options = dict(storage_options or {})
        self.objects_written = 0
        self._fs: Any = None
        self._root = ""
        self._lock = threading.Lock()
        self._buffer: dict[str, _Entry] = {}
        self._oldest: float | None = None
        self._writing: list[dict[str, _Entry]] = []
        self._writes: set[concurrent.futures.Future[None]] = set()
        self._timer: asyncio.Task[None] | None = None
        self._size_flush: asyncio.Task[None] | None = None
        self._writer = uuid.uuid4().hex[:16]
        self._seq = 0
        self._last_ns = 0
        self._synced = False
        self._since = time.time()  # records older than this must be visible to this log's lookups

    # -- pickling: only the location and settings travel -----------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "flush_interval_s": self.flush_interval_s,
            "flush_items": self.flush_items,
            "expiration_s": self.expiration_s,
            "storage_options": self.storage_options,
            "since": self._since,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        url, since = state.pop("url"), state.pop("since")
        self.__init__(url, **state)  # type: ignore[misc]
        self._since = since

    def __repr__(self) -> str:
        return (
            f"ResultLog({self.url!r}, "
            f"flush_interval_s={self.flush_interval_s}, flush_items={self.flush_items})"
        )

    @classmethod
    async def for_config(cls, config: ProcessorConfig) -> ResultLog | None:
        """The log ``config`` persists to: ``result_storage`` (block slug or fsspec URL) or Prefect's local
        storage path, each + ``/batchllm-results``; None when results are not persisted or in a dry run."""
        if not config.persist_results or config.dry_run:
            return None
        url, options = await resolve_location(config.result_storage)
        return cls(url, expiration_s=config.cache_expiration_s, storage_options=options)

    # -- storage ------------------------------------------------------------------------------------

    @property
    def records_dir(self) -> str:
        """Where this log's record objects live (fsspec path, without protocol)."""
        self._filesystem()
        return f"{self._root}/{FORMAT_DIR}/records"

    def _filesystem(self) -> Any:
        if self._fs is None:
            fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
            self._root = str(path).rstrip("/")
            self._fs = fs
        return self._fs

    def _next_name(self) -> str:
        with self._lock:
            now = max(time.time_ns(), self._last_ns + 1)
            self._last_ns = now
            self._seq += 1
            return f"{now:020d}-{self._writer}-{self._seq:06d}.blr"

    def _write(self, batch: dict[str, _Entry]) -> None:
        """Write ``batch`` as one object (more if its bodies pass 1 GiB) and index it (worker thread)."""
        fs = self._filesystem()
        records_dir = self.records_dir
        entries = _pickled((key, result, exp) for key, (result, exp) in batch.items())
        index = _index_for(fs, self._root)
        for data in _split_encode(entries):
            name = self._next_name()
            _write_object(fs, records_dir, name, [data])
            with self._lock:
                self.objects_written += 1
            header = _parse_header(data, len(data))
            assert header is not None
            with index.lock:
                index.add(name, header)

    # -- adding and flushing --------------------------------------------------------------------------

    async def add(self, key: str, result: WorkItemResult[Any, Any]) -> None:
        """Buffer a successful ``result`` under ``key``; written by the next flush (context stripped)."""
        if not result.success:
            raise ValueError(
                f"ResultLog.add: only successful results are persisted ({result.item_id!r} failed)"
            )
        stored = dataclasses.replace(result, context=None, replayed=False)  # a copy: later edits don't leak
        exp = _now() + self.expiration_s if self.expiration_s is not None else 0.0
        with self._lock:
            self._buffer.pop(key, None)
            self._buffer[key] = (stored, exp)
            if self._oldest is None:
                self._oldest = time.monotonic()
            size = len(self._buffer)
        _LIVE.add(self)
        loop = asyncio.get_running_loop()
        if self._timer is None or self._timer.done() or not _alive(self._timer):
            self._timer = loop.create_task(self._run_timer())
        flushing = self._size_flush is not None and not self._size_flush.done() and _alive(self._size_flush)
        if size >= self.flush_items and not flushing:
            self._size_flush = loop.create_task(self._flush_buffer(raise_errors=False))
        if size >= 4 * self.flush_items:  # storage slower than adds: wait for it rather than grow
            await self._flush_buffer(raise_errors=False)

    async def _run_timer(self) -> None:
        """Flush whenever the oldest buffered result is ``flush_interval_s`` old; exit when empty."""
        while True:
            with self._lock:
                oldest = self._oldest
            if oldest is None:
                return
            wait = oldest + self.flush_interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await self._flush_buffer(raise_errors=False)

    async def _flush_buffer(self, *, raise_errors: bool) -> None:
        """Write what is buffered now as one object (in a worker thread)."""
        with self._lock:
            batch = self._buffer
            if not batch:
                return
            self._buffer = {}
            self._oldest = None
            self._writing.append(batch)
        future = _EXECUTOR.submit(self._write, batch)
        self._writes.add(future)
        try:
            await asyncio.wrap_future(future)
        except Exception as exc:
            with self._lock:  # keep them for the next flush; nothing is lost while the process lives
                for key, entry in batch.items():
                    self._buffer.setdefault(key, entry)
                if self._oldest is None and self._buffer:
                    self._oldest = time.monotonic()
            if raise_errors:
                raise
            logger.warning("result log: flush to %s failed (%s); retrying later", self.url, exc)
        finally:
            self._writes.discard(future)
            with self._lock:
                self._writing.remove(batch)

    async def flush(self) -> None:
        """Write everything added so far; returns once it is stored (raises if storage fails)."""
        pending = list(self._writes)
        await self._flush_buffer(raise_errors=True)
        for future in pending:
            await asyncio.wrap_future(future)

    async def aclose(self) -> None:
        """Final flush; stops the background flusher (the log stays usable: a later add restarts it)."""
        await self.flush()
        loop = asyncio.get_running_loop()
        for task in (self._timer, self._size_flush):
            if task is not None and not task.done() and task.get_loop() is loop:
                task.cancel()
        self._timer = self._size_flush = None

    def _flush_at_exit(self) -> None:
        """Interpreter exit: write what is still buffered (a SIGKILL skips this)."""
        with self._lock:
            batch, self._buffer, self._oldest = self._buffer, {}, None
        if batch:
            try:
                self._write(batch)
            except Exception as exc:
                logger.warning("result log: final flush to %s failed: %s", self.url, exc)

    # -- lookup ------------------------------------------------------------------------------------------

    async def lookup(self, keys: Sequence[str]) -> dict[str, WorkItemResult[Any, Any]]:
        """Stored, unexpired results for ``keys`` (missing keys are absent); full keys verified."""
        now = _now()
        found: dict[str, WorkItemResult[Any, Any]] = {}
        decided: set[str] = set()  # in the buffer: newer than anything stored, expired or not
        with self._lock:
            for key in keys:
                for pending in (self._buffer, *reversed(self._writing)):
                    entry = pending.get(key)
                    if entry is not None:
                        decided.add(key)
                        if not entry[1] or entry[1] > now:
                            found[key] = dataclasses.replace(entry[0])
                        break
        rest = [key for key in dict.fromkeys(keys) if key not in decided]
        if rest:
            loop = asyncio.get_running_loop()
            found.update(await loop.run_in_executor(_EXECUTOR, self._lookup_stored, rest))
        return found

    def _lookup_stored(self, keys: list[str]) -> dict[str, WorkItemResult[Any, Any]]:
        """Index lookup + ranged reads of the bodies (worker thread)."""
        fs = self._filesystem()
        index = _index_for(fs, self._root)
        if not self._synced:
            index.sync(fs, f"{self._root}/{FORMAT_DIR}", self._since)
            self._synced = True
        now = _now()
        with index.lock:
            locations = index.find([key_hash(key) for key in keys])
            names = index.names
            wanted = [
                (names[loc[1]], loc[2], loc[3], loc[4], key)
                for key, loc in zip(keys, locations, strict=True)
                if loc is not None and (not loc[0] or loc[0] > now)
            ]
        if not wanted:
            return {}
        wanted.sort()
        # Coalesce bodies that sit close together in one object into one ranged read.
        spans: list[tuple[str, int, int, list[tuple[int, int, int, str]]]] = []
        for name, off, length, crc, key in wanted:
            last = spans[-1] if spans else None
            if last is not None and last[0] == name and off - last[2] <= _COALESCE_GAP:
                spans[-1] = (name, last[1], max(last[2], off + length), [*last[3], (off, length, crc, key)])
            else:
                spans.append((name, off, off + length, [(off, length, crc, key)]))
        records_dir = self.records_dir
        blobs = fs.cat_ranges(
            [f"{records_dir}/{s[0]}" for s in spans],
            [s[1] for s in spans],
            [s[2] for s in spans],
            on_error="return",
        )
        out: dict[str, WorkItemResult[Any, Any]] = {}
        for (name, start, _, members), blob in zip(spans, blobs, strict=True):
            if isinstance(blob, BaseException):
                logger.warning("result log: cannot read %s: %s", name, blob)
                continue
            for off, length, crc, key in members:
                body = blob[off - start : off - start + length]
                if len(body) != length or zlib.crc32(body) != crc:
                    logger.warning("result log: corrupt entry in %s; its item runs again", name)
                    continue
                try:
                    stored_key, result = cloudpickle.loads(body)
                except Exception as exc:
                    logger.warning("result log: unreadable entry in %s (%s); its item runs again", name, exc)
                    continue
                if stored_key == key and isinstance(result, WorkItemResult):
                    out[key] = result
        return out


def _split_encode(entries: list[tuple[str, bytes, float]]) -> Iterable[bytes]:
    """Encode ``entries`` as one object, or several when their bodies would pass ``_MAX_OBJECT``."""
    if not entries:
        return
    data = _encode(entries)
    if len(data) <= _MAX_OBJECT or len(entries) == 1:
        yield data
        return
    half = len(entries) // 2
    yield from _split_encode(entries[:half])
    yield from _split_encode(entries[half:])


def _alive(task: asyncio.Task[Any]) -> bool:
    """Whether ``task``'s loop can still run it (a loop that stopped would strand buffered results)."""
    loop = task.get_loop()
    return loop.is_running() and not loop.is_closed()


@atexit.register
def _flush_all_at_exit() -> None:
    for log in list(_LIVE):
        log._flush_at_exit()


# --------------------------------------------------------------------------------------------------
# Locations


async def resolve_location(storage: Any) -> tuple[str, dict[str, Any]]:
    """``(fsspec URL, storage options)`` of the result log for a ``result_storage`` value.

    ``None``: Prefect's local storage path. An fsspec URL (``s3://bucket/prefix``, ``file:///data``,
    ``memory://x``): as given. A saved block slug (loaded here) or a block: a ``local-file-system`` or
    ``remote-file-system`` block's ``basepath`` (and ``settings``). Each + ``/batchllm-results``.
    """
    if isinstance(storage, str) and "://" not in storage:
        from prefect.blocks.core import Block

        try:
            storage = await Block.aload(storage)
        except Exception as exc:
            raise ValueError(
                f"ProcessorConfig.result_storage: cannot load the storage block {storage!r} "
                f"({type(exc).__name__}: {exc}); save a local-file-system or remote-file-system block under "
                "that name, or give an fsspec URL such as 's3://bucket/prefix'"
            ) from None
    return location_for(storage)


def location_for(storage: Any) -> tuple[str, dict[str, Any]]:
    """:func:`resolve_location` for values that need no Prefect API: None, an fsspec URL, a block object."""
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    options: dict[str, Any] = {}
    if storage is None:
        from prefect.settings import get_current_settings

        base = os.path.expanduser(str(get_current_settings().results.local_storage_path))
    elif isinstance(storage, str):
        if "://" not in storage:
            raise ValueError(
                f"ProcessorConfig.result_storage: {storage!r} is a block slug; load it with resolve_location"
            )
        base = storage
    elif isinstance(storage, LocalFileSystem):
        base = os.path.abspath(os.path.expanduser(storage.basepath or "."))
    elif isinstance(storage, RemoteFileSystem):
        base, options = storage.basepath, dict(storage.settings or {})
    else:
        raise ValueError(
            f"ProcessorConfig.result_storage: a {type(storage).__name__} block has no fsspec basepath the "
            "result log can use; give a 'local-file-system/<name>' or 'remote-file-system/<name>' block "
            "slug, or an fsspec URL such as 's3://bucket/prefix' (credentials from the environment)"
        )
    return f"{base.rstrip('/')}/{SUBFOLDER}", options


async def prefect_result_storage(value: str) -> str | Path:
    """What Prefect's own ``result_storage`` task option accepts for a ``ProcessorConfig.result_storage``
    value (Prefect wants saved blocks): a block slug unchanged, a ``file://`` URL as a ``Path``, another
    fsspec URL as a saved ``remote-file-system`` block named after the URL (saved idempotently)."""
    if "://" not in value:
        return value
    if value.startswith("file://"):
        return Path(value[len("file://") :])
    from prefect.filesystems import RemoteFileSystem

    name = "batchllm-" + hashlib.sha256(value.encode()).hexdigest()[:16]
    await RemoteFileSystem(basepath=value).save(name, overwrite=True)
    return f"remote-file-system/{name}"
