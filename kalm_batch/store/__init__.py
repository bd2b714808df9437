"""The memory store: Parquet shards of encoded passage memories, an index and a manifest (see storage/README.md)."""

from __future__ import annotations

from kalm_batch.store.manifest import (
    IncompleteStoreError, Manifest, StoreError, StoreMismatchError, StoreSettings, load_manifest,
)
from kalm_batch.store.reader import FetchResult, StoreReader, open_store
from kalm_batch.store.writer import build_store

__all__ = [
    "FetchResult", "IncompleteStoreError", "Manifest", "StoreError", "StoreMismatchError", "StoreReader",
    "StoreSettings", "build_store", "load_manifest", "open_store",
]
