"""The one place that knows the cache store's paths, dtypes and chunking."""

from cache_schema.store import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    STORAGE_DTYPES,
    CacheStore,
    RowBatch,
    RowPlan,
    ShardResult,
    StoreError,
    StoreLayout,
    decode_storage,
    encode_storage,
    now_iso,
    round_to_storage,
)

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "STORAGE_DTYPES",
    "CacheStore",
    "RowBatch",
    "RowPlan",
    "ShardResult",
    "StoreError",
    "StoreLayout",
    "decode_storage",
    "encode_storage",
    "now_iso",
    "round_to_storage",
]
