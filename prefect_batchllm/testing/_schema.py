"""Schema-driven fake JSON for the emulator; implemented in :mod:`prefect_batchllm.core.schema_fake`.

Re-exported here so the emulator (and anyone importing ``prefect_batchllm.testing._schema``) keeps working;
the strategies' dry-run mocks use the same faker.
"""

from __future__ import annotations

from prefect_batchllm.core.schema_fake import SchemaFaker, fake_for_schema, key_of

__all__ = ["SchemaFaker", "fake_for_schema", "key_of"]
