"""The store's exceptions; every message names the store URL (and the version or file when one is involved)."""

from __future__ import annotations


class StoreError(Exception):
    """A memory store cannot be used as asked."""


class IncompleteStoreError(StoreError):
    """There is no store table at the URL (never written, or its first commit never happened)."""


class StoreMismatchError(StoreError):
    """The store was made with another model or other settings."""


class StoreVersionError(StoreError):
    """The requested table version does not exist (never committed, or vacuumed/cleaned up)."""


class OldLayoutError(StoreError):
    """A store of the schema-version-1 layout (manifest.json + shards/), which this kalm-batch no longer reads."""


class ConcurrentWriterError(StoreError):
    """Another writer committed a version of the same store while this one was writing."""
