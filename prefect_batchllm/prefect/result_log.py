"""Where successful item results are persisted, so reruns replay them (interim: one Prefect result per item).

The per-chunk record format replaces this module; the contract (``for_config``, ``lookup``, ``add``,
``flush``, ``aclose``) stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.results import ResultStore, get_result_store

from prefect_batchllm.core.config import ProcessorConfig
from prefect_batchllm.core.items import WorkItemResult

__all__ = ["ResultLog"]


class ResultLog:
    """Successful item results keyed by ``item_cache_key``; picklable."""

    def __init__(self, storage: str | None, *, expiration_s: float | None = None) -> None:
        self.storage = storage
        self.expiration_s = expiration_s
        self.objects_written = 0
        self._store: ResultStore | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"storage": self.storage, "expiration_s": self.expiration_s, "objects_written": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._store = None

    @classmethod
    async def for_config(cls, config: ProcessorConfig) -> ResultLog | None:
        if not config.persist_results or config.dry_run:
            return None
        return cls(config.result_storage, expiration_s=config.cache_expiration_s)

    async def _result_store(self) -> ResultStore:
        if self._store is None:
            from prefect_batchllm.prefect.tasks import process_item

            options: dict[str, Any] = {"persist_result": True}
            if self.storage is not None:
                options["result_storage"] = self.storage
            self._store = await get_result_store().aupdate_for_task(process_item.with_options(**options))
        return self._store

    async def lookup(self, keys: Sequence[str]) -> dict[str, WorkItemResult[Any, Any]]:
        store = await self._result_store()
        found: dict[str, WorkItemResult[Any, Any]] = {}
        for key in keys:
            try:
                record = await store.aread(key)
            except Exception:
                continue
            expiration = record.metadata.expiration
            if expiration is not None and expiration <= datetime.now(UTC):
                continue
            if isinstance(record.result, WorkItemResult):
                found[key] = record.result
        return found

    async def add(self, key: str, result: WorkItemResult[Any, Any]) -> None:
        store = await self._result_store()
        expiration = None
        if self.expiration_s is not None:
            expiration = datetime.now(UTC) + timedelta(seconds=self.expiration_s)
        await store.awrite(obj=result, key=key, expiration=expiration)
        self.objects_written += 1

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
