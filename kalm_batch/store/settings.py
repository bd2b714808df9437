"""What a store is: its settings and model fingerprint (kept in the Delta table's metadata), and where it lives.

The settings travel in the table's ``description`` as JSON (``{"kalm_store": {...}}``): delta-rs refuses custom
table properties at creation, and the description is committed with the table's first version, atomically.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os

from pydantic import BaseModel, Field

from kalm_batch import fsio
from kalm_batch.store.errors import IncompleteStoreError, OldLayoutError, StoreError

SCHEMA_VERSION = 2
TABLE_NAME = "kalm-memory-store"
DESCRIPTION_KEY = "kalm_store"
KALM_DIR = "_kalm"                 # beside the data; Delta (and vacuum) ignore folders starting with "_"
INDEX_DIR = f"{KALM_DIR}/index"    # one small Parquet per data file: doc_id -> byte ranges
ERRORS_DIR = f"{KALM_DIR}/errors"  # one folder per run: rejected.jsonl, changed.jsonl
OLD_MANIFEST = "manifest.json"


class StoreSettings(BaseModel):
    """Everything that changes the stored values; a store only ever holds memories made with one of these."""

    fingerprint: dict = Field(description="model id, revision, config and tokenizer hashes")
    document_template: str = Field(description="how a passage becomes encoder text")
    text_join: str = Field(description="how title and text were joined into the passage")
    max_length: int = Field(description="encoder truncation length in tokens (prefix included)")
    ratio: int = Field(description="MEP chunk size r0 the memories were pooled at")
    dtype: str = Field(description="codec dtype: bfloat16, float16, float32 or int8")
    hidden_size: int = Field(description="width of each memory vector")

    def differences(self, other: StoreSettings) -> list[str]:
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


class TableInfo(BaseModel):
    """The table-level metadata: written once, with the table's first version."""

    schema_version: int = SCHEMA_VERSION
    package_version: str
    created_at: str
    settings: StoreSettings
    codec: dict = Field(description="codec name and zstd level")

    def to_description(self) -> str:
        return json.dumps({DESCRIPTION_KEY: self.model_dump()}, sort_keys=True)


def codec_info(dtype: str, level: int) -> dict:
    return {"name": "int8-absmax+zstd" if dtype == "int8" else "byteplane+zstd", "level": level}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# --------------------------------------------------------------------------- locations


def table_uri(url: str) -> str:
    """The URI delta-rs opens: local paths and file:// URLs become absolute paths; object-store URLs stay."""
    proto = fsio._protocol(url)
    if proto is None or proto in ("file", "local"):
        return fsio.url_to_fs(url)[1]
    return url.rstrip("/")


def delta_options(url: str, storage_options: dict | None = None) -> dict[str, str]:
    """fsspec-style ``storage_options`` (what the rest of kalm-batch takes) -> delta-rs storage options.

    S3: the endpoint comes from ``endpoint_url`` / ``client_kwargs.endpoint_url``, ``KALM_S3_ENDPOINT_URL`` or
    ``AWS_ENDPOINT_URL`` (as in fsio); plain-http endpoints get ``AWS_ALLOW_HTTP``; commits use conditional puts
    (``conditional_put=etag``: AWS S3, MinIO and most S3-compatible stores support them) unless the caller chose a
    locking provider. Options already in delta-rs form (upper-case ``AWS_*`` / ``GOOGLE_*`` keys, ``conditional_put``)
    pass through unchanged.
    """
    proto = fsio._protocol(url)
    opts = dict(storage_options or {})
    out = {k: str(v) for k, v in opts.items() if isinstance(v, (str, int, float, bool)) and (k.isupper() or k in (
        "conditional_put", "allow_http", "timeout", "aws_conditional_put"))}
    if proto not in ("s3", "s3a"):
        return out
    client = opts.get("client_kwargs") or {}
    endpoint = (opts.get("endpoint_url") or client.get("endpoint_url") or os.environ.get("KALM_S3_ENDPOINT_URL")
                or out.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint:
        out["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            out.setdefault("AWS_ALLOW_HTTP", "true")
    for ours, theirs in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"),
                         ("token", "AWS_SESSION_TOKEN")):
        if opts.get(ours):
            out[theirs] = str(opts[ours])
    region = client.get("region_name") or opts.get("region_name")
    if region:
        out["AWS_REGION"] = region
    out.setdefault("AWS_REGION", os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    if "AWS_S3_LOCKING_PROVIDER" not in out:
        out.setdefault("conditional_put", "etag")
    return out


def parse_description(url: str, description: str | None) -> TableInfo:
    try:
        raw = json.loads(description or "")[DESCRIPTION_KEY]
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"{url} is a Delta table but not a kalm-batch memory store (its description holds no "
                         f"{DESCRIPTION_KEY!r} settings); point at a store written by `kalm-batch encode`") from None
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{url} has store schema version {version!r}; this kalm-batch reads version "
                         f"{SCHEMA_VERSION} (upgrade kalm-batch, or re-encode the corpus into a new store)")
    return TableInfo.model_validate(raw)


def refuse_missing_table(url: str, storage_options: dict | None) -> None:
    """Raise the right error for a URL without a Delta log: an old-layout store, or no store at all."""
    if fsio.exists(fsio.join_url(url, OLD_MANIFEST), storage_options):
        raise OldLayoutError(
            f"{url} is a memory store of the old layout (schema_version 1: manifest.json + shards/), which this "
            f"kalm-batch no longer reads. Re-encode the corpus into a new store URL: `kalm-batch encode --model MODEL "
            f"--corpus CORPUS --store NEW_URL` (same --ratio/--dtype), or pass --overwrite to replace it in place.")
    raise IncompleteStoreError(
        f"{url} holds no memory store (no Delta table: {fsio.join_url(url, '_delta_log')} is missing or empty). "
        "Encode a corpus into it first with `kalm-batch encode`; an encode that was killed before its first commit "
        "left nothing readable - re-run it.")
