"""The memory store: a Delta Lake table of encoded passage memories, with point-lookup indexes (storage/README.md).

Names are resolved lazily so the writer (used by CPU-only Ray tasks) does not pull in the torch-based reader.
"""

from __future__ import annotations

from kalm_batch._lazy import lazy_exports

_EXPORTS = {
    "ConcurrentWriterError": "kalm_batch.store.errors",
    "IncompleteStoreError": "kalm_batch.store.errors",
    "OldLayoutError": "kalm_batch.store.errors",
    "StoreError": "kalm_batch.store.errors",
    "StoreMismatchError": "kalm_batch.store.errors",
    "StoreVersionError": "kalm_batch.store.errors",
    "StoreSettings": "kalm_batch.store.settings",
    "FetchResult": "kalm_batch.store.reader",
    "StoreReader": "kalm_batch.store.reader",
    "open_store": "kalm_batch.store.reader",
    "check_compatible": "kalm_batch.store.compat",
    "StoreWriter": "kalm_batch.store.writer",
    "build_store": "kalm_batch.store.writer",
    "write_data_file": "kalm_batch.store.layout",
    "history": "kalm_batch.store.maintenance",
    "compact": "kalm_batch.store.maintenance",
    "vacuum": "kalm_batch.store.maintenance",
}

__all__ = [
    "ConcurrentWriterError", "FetchResult", "IncompleteStoreError", "OldLayoutError", "StoreError", "StoreMismatchError", "StoreReader", "StoreSettings", "StoreVersionError", "StoreWriter", "build_store", "check_compatible", "compact", "history", "open_store", "vacuum", "write_data_file",
]


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
