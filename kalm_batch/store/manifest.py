"""The store manifest: what made the memories, what the store holds, and the settings a resume must match.

A store is complete once ``manifest.json`` exists; it is written last, atomically. ``_settings.json`` is written
before the first shard so that a crashed run can only be resumed with the same model and settings.
"""

from __future__ import annotations

import datetime as _dt

from pydantic import BaseModel, Field

from kalm_batch import fsio

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SETTINGS_NAME = "_settings.json"


class StoreError(Exception):
    """A memory store cannot be used as asked."""


class IncompleteStoreError(StoreError):
    """The store has no manifest (never finished, or still being written)."""


class StoreMismatchError(StoreError):
    """The store was made with another model or other settings."""


class StoreSettings(BaseModel):
    """Everything that changes the stored values; a store only ever holds memories made with one of these."""

    fingerprint: dict = Field(description="model id, revision, config and tokenizer hashes")
    document_template: str = Field(description="how a passage becomes encoder text")
    text_join: str = Field(description="how title and text were joined into the passage")
    max_length: int = Field(description="encoder truncation length in tokens (prefix included)")
    ratio: int = Field(description="MEP chunk size r0 the memories were pooled at")
    dtype: str = Field(description="codec dtype: bfloat16, float16, float32 or int8")
    hidden_size: int = Field(description="width of each memory vector")

    def differences(self, other: "StoreSettings") -> list[str]:
        """What differs between the store's settings and this run's. The model is compared by its config,
        tokenizer and weights hashes (not by the path or id it was loaded from)."""
        from kalm_batch.model import IDENTITY_FIELDS

        a, b = self.model_dump(), other.model_dump()
        diffs = [f"fingerprint.{k}: {a['fingerprint'].get(k)!r} (store) != {b['fingerprint'].get(k)!r} (this run)"
                 for k in IDENTITY_FIELDS if a["fingerprint"].get(k) != b["fingerprint"].get(k)]
        if diffs:
            diffs.insert(0, f"model: {a['fingerprint'].get('model_id')!r} (store) vs "
                            f"{b['fingerprint'].get('model_id')!r} (this run)")
        return diffs + [f"{k}: {a[k]!r} (store) != {b[k]!r} (this run)" for k in a
                        if k != "fingerprint" and a[k] != b[k]]


class ShardInfo(BaseModel):
    name: str
    rows: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    package_version: str
    created_at: str
    updated_at: str
    settings: StoreSettings
    codec: dict = Field(description="codec name and zstd level")
    rows: int
    tokens: int
    vectors: int
    memory_bytes: int = Field(description="encoded memory payload bytes (+ int8 scales)")
    shard_bytes: int
    shards: list[ShardInfo]
    index: ShardInfo
    input: dict = Field(default_factory=dict, description="what the last run read, stored and rejected")

    @property
    def ratio(self) -> int:
        return self.settings.ratio

    @property
    def dtype(self) -> str:
        return self.settings.dtype

    @property
    def fingerprint(self) -> dict:
        return self.settings.fingerprint

    @property
    def hidden_size(self) -> int:
        return self.settings.hidden_size

    @property
    def max_length(self) -> int:
        return self.settings.max_length

    def summary(self) -> dict:
        return {
            "rows": self.rows, "shards": len(self.shards), "ratio": self.ratio, "dtype": self.dtype,
            "model_id": self.fingerprint.get("model_id"), "max_length": self.max_length,
            "tokens": self.tokens, "vectors": self.vectors, "memory_bytes": self.memory_bytes,
            "bytes_per_doc": round(self.memory_bytes / self.rows, 1) if self.rows else 0.0,
            "bytes_per_vector": round(self.memory_bytes / self.vectors, 2) if self.vectors else 0.0,
            "shard_bytes": self.shard_bytes, "created_at": self.created_at, "updated_at": self.updated_at,
            "schema_version": self.schema_version, "package_version": self.package_version,
        }


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def load_manifest(store_url: str, storage_options: dict | None = None) -> Manifest:
    url = fsio.join_url(store_url, MANIFEST_NAME)
    try:
        raw = fsio.read_json(url, storage_options)
    except FileNotFoundError:
        raise IncompleteStoreError(
            f"{store_url} has no {MANIFEST_NAME}: it is not a finished memory store (a run may still be writing or "
            "have crashed; re-run the same encode command to resume it)") from None
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{store_url} has store schema version {version!r}; this kalm-batch reads version "
                         f"{SCHEMA_VERSION} (upgrade kalm-batch or re-encode the store)")
    return Manifest.model_validate(raw)
