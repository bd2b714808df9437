"""The memory store: Parquet shards of encoded passage memories, an index and a manifest (see storage/README.md).

Names are resolved lazily so the writer (used by CPU-only Ray tasks) does not pull in the torch-based reader.
"""

from __future__ import annotations

from kalm_batch._lazy import lazy_exports

_EXPORTS = {
    "IncompleteStoreError": "kalm_batch.store.manifest",
    "Manifest": "kalm_batch.store.manifest",
    "StoreError": "kalm_batch.store.manifest",
    "StoreMismatchError": "kalm_batch.store.manifest",
    "StoreSettings": "kalm_batch.store.manifest",
    "load_manifest": "kalm_batch.store.manifest",
    "FetchResult": "kalm_batch.store.reader",
    "StoreReader": "kalm_batch.store.reader",
    "open_store": "kalm_batch.store.reader",
    "build_store": "kalm_batch.store.writer",
    "check_compatible": "kalm_batch.store.compat",
}

__all__ = [
    "FetchResult", "IncompleteStoreError", "Manifest", "StoreError", "StoreMismatchError", "StoreReader",
    "StoreSettings", "build_store", "check_compatible", "load_manifest", "open_store",
]


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
