"""Writing a memory store: shards, index, errors and the manifest, with a resumable commit protocol.

Protocol (see storage/README.md):
1. ``prepare_store`` refuses a store made with other settings (unless overwriting), records this run's settings in
   ``_settings.json`` and returns the doc ids already committed in ``shards/`` with their text hashes (a resume
   skips them and reports those whose text has changed since).
2. Shards are written whole and atomically (local: temp file + rename; object stores: one PUT) under a name derived
   from their doc ids, so a retried task rewrites the same file instead of adding a duplicate.
3. ``finalize_store`` lists every shard, drops rows whose doc id an earlier shard already holds (exactly once),
   writes the index and then ``manifest.json`` last. Without a manifest, readers refuse the store.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import kalm_batch
from kalm_batch import fsio
from kalm_batch.codec import encode_memory
from kalm_batch.store.manifest import (
    MANIFEST_NAME, SETTINGS_NAME, Manifest, ShardInfo, StoreMismatchError, StoreSettings, load_manifest, now,
)

SHARDS_DIR = "shards"
ERRORS_FILE = "errors/rejected.jsonl"
CHANGED_FILE = "errors/changed.jsonl"
ROW_GROUP_ROWS = 64
SHARD_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("n_tokens", pa.int32()), ("n_vectors", pa.int32()), ("memory", pa.binary()),
    ("scales", pa.binary()), ("checksum", pa.int64()), ("nbytes", pa.int32()), ("text_sha256", pa.string()),
    ("source", pa.string()), ("line", pa.int64()),
])
_COLUMN_COMPRESSION = {name: ("NONE" if name in ("memory", "scales") else "ZSTD") for name in SHARD_SCHEMA.names}


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def memory_table(doc_ids: Sequence[str], memories, text_hashes: Sequence[str], sources: Sequence[str],
                 lines: Sequence[int], dtype: str, level: int) -> pa.Table:
    """One shard's rows: memories encoded with the codec (checksummed), plus provenance."""
    encoded = [encode_memory(m.to_numpy(), dtype=dtype, level=level, record=f"doc {d!r}")
               for d, m in zip(doc_ids, memories)]
    return pa.table({
        "doc_id": list(doc_ids),
        "n_tokens": [m.n_tokens for m in memories],
        "n_vectors": [e.n_vectors for e in encoded],
        "memory": [e.payload for e in encoded],
        "scales": [e.scales for e in encoded],
        "checksum": [e.checksum for e in encoded],
        "nbytes": [len(e.payload) + len(e.scales or b"") for e in encoded],
        "text_sha256": list(text_hashes), "source": list(sources), "line": list(lines),
    }, schema=SHARD_SCHEMA)


def shard_name(doc_ids: Iterable[str]) -> str:
    h = hashlib.sha1()
    for d in doc_ids:
        h.update(d.encode("utf-8", "surrogatepass") + b"\0")
    return f"part-{h.hexdigest()[:20]}.parquet"


def _table_bytes(table: pa.Table, row_group_rows: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_rows, compression=_COLUMN_COMPRESSION)
    return buf.getvalue()


def write_shard(store_url: str, table: pa.Table, storage_options: dict | None = None,
                row_group_rows: int = ROW_GROUP_ROWS) -> ShardInfo:
    """Write one shard atomically; its name depends only on its doc ids (idempotent under retries)."""
    name = shard_name(table.column("doc_id").to_pylist())
    data = _table_bytes(table, row_group_rows)
    fsio.write_bytes_atomic(fsio.join_url(store_url, SHARDS_DIR, name), data, storage_options)
    return ShardInfo(name=name, rows=table.num_rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _stored_settings(store_url: str, storage_options) -> StoreSettings | None:
    if fsio.exists(fsio.join_url(store_url, MANIFEST_NAME), storage_options):
        return load_manifest(store_url, storage_options).settings
    settings_url = fsio.join_url(store_url, SETTINGS_NAME)
    if fsio.exists(settings_url, storage_options):
        return StoreSettings.model_validate(fsio.read_json(settings_url, storage_options))
    return None


def clear_store(store_url: str, storage_options: dict | None = None) -> None:
    """Remove a store's files, manifest first (so no reader sees a half-deleted store as complete)."""
    fsio.delete(fsio.join_url(store_url, MANIFEST_NAME), storage_options)
    for url in (fsio.list_files(fsio.join_url(store_url, SHARDS_DIR), "", storage_options)
                + fsio.list_files(store_url, ".parquet", storage_options)
                + fsio.list_files(fsio.join_url(store_url, "errors"), "", storage_options)):
        fsio.delete(url, storage_options)
    fsio.delete(fsio.join_url(store_url, SETTINGS_NAME), storage_options)


def prepare_store(store_url: str, settings: StoreSettings, *, overwrite: bool = False,
                  storage_options: dict | None = None) -> dict[str, str]:
    """Check settings against what the store holds; return the doc ids already committed -> their text's hash."""
    existing = _stored_settings(store_url, storage_options)
    if existing is not None and existing.differences(settings):
        if not overwrite:
            diffs = "; ".join(existing.differences(settings))
            raise StoreMismatchError(
                f"{store_url} holds memories made with other settings ({diffs}). Use another store URL, or pass "
                "--overwrite to delete it and re-encode.")
        clear_store(store_url, storage_options)
    fsio.write_json_atomic(fsio.join_url(store_url, SETTINGS_NAME), settings.model_dump(), storage_options)
    ids: dict[str, str] = {}
    for _, table in _read_shard_columns(store_url, ["doc_id", "text_sha256"], storage_options):
        ids.update(zip(table.column("doc_id").to_pylist(), table.column("text_sha256").to_pylist()))
    return ids


def _shard_urls(store_url: str, storage_options) -> list[str]:
    return fsio.list_files(fsio.join_url(store_url, SHARDS_DIR), ".parquet", storage_options)


def _read_columns(url: str, columns: list[str], storage_options) -> pa.Table:
    with fsio.open_input(url, storage_options) as f:
        return pq.read_table(f, columns=columns)


def _read_shard_columns(store_url: str, columns: list[str], storage_options) -> list[tuple[str, pa.Table]]:
    urls = _shard_urls(store_url, storage_options)
    with ThreadPoolExecutor(max_workers=8) as pool:
        tables = list(pool.map(lambda u: _read_columns(u, columns, storage_options), urls))
    return [(u.rsplit("/", 1)[-1], t) for u, t in zip(urls, tables)]


def _shard_info(store_url: str, name: str, storage_options) -> ShardInfo:
    data = fsio.read_bytes(fsio.join_url(store_url, SHARDS_DIR, name), storage_options)
    rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    return ShardInfo(name=name, rows=rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _drop_rows(store_url: str, name: str, drop: set[str], storage_options) -> ShardInfo | None:
    """Rewrite a shard without the rows whose doc ids another shard already holds (and repeats within it)."""
    url = fsio.join_url(store_url, SHARDS_DIR, name)
    table = _read_columns(url, SHARD_SCHEMA.names, storage_options)
    keep, kept = [], set()
    for i, d in enumerate(table.column("doc_id").to_pylist()):
        if d not in drop and d not in kept:
            kept.add(d)
            keep.append(i)
    info = write_shard(store_url, table.take(keep), storage_options) if keep else None
    if info is None or info.name != name:
        fsio.delete(url, storage_options)
    return info


def _dedupe_shards(store_url: str, storage_options) -> list[tuple[str, pa.Table]]:
    """Exactly once: the first shard (by name) holding a doc id keeps it; later copies are removed."""
    cols = ["doc_id", "n_tokens", "n_vectors", "nbytes"]
    shards = _read_shard_columns(store_url, cols, storage_options)
    seen: set[str] = set()
    changed = False
    for name, table in shards:
        ids = table.column("doc_id").to_pylist()
        dup = {d for d in ids if d in seen}
        seen.update(ids)
        if dup or len(set(ids)) != len(ids):
            _drop_rows(store_url, name, dup, storage_options)
            changed = True
    return _read_shard_columns(store_url, cols, storage_options) if changed else shards


def _write_index(store_url: str, shards: list[tuple[str, pa.Table]], storage_options) -> ShardInfo:
    ids, shard_idx, rows = [], [], []
    for i, (_, table) in enumerate(shards):
        col = table.column("doc_id").to_pylist()
        ids += col
        shard_idx += [i] * len(col)
        rows += range(len(col))
    index = pa.table({"doc_id": ids, "shard": pa.array(shard_idx, pa.int32()), "row": pa.array(rows, pa.int32())})
    index = index.sort_by("doc_id")
    data = _table_bytes(index, 1 << 16)
    name = f"index-{hashlib.sha256(data).hexdigest()[:16]}.parquet"
    fsio.write_bytes_atomic(fsio.join_url(store_url, name), data, storage_options)
    return ShardInfo(name=name, rows=index.num_rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def finalize_store(store_url: str, settings: StoreSettings, *, level: int, new_shards: Sequence[ShardInfo] = (),
                   input_stats: dict | None = None, storage_options: dict | None = None) -> Manifest:
    """Build the index and commit the manifest (last). Safe to call again after a crash."""
    previous = None
    if fsio.exists(fsio.join_url(store_url, MANIFEST_NAME), storage_options):
        previous = load_manifest(store_url, storage_options)
    shards = _dedupe_shards(store_url, storage_options)
    known = {s.name: s for s in (previous.shards if previous else [])}
    known.update({s.name: s for s in new_shards})
    infos = [known[n] if n in known and known[n].rows == t.num_rows else _shard_info(store_url, n, storage_options)
             for n, t in shards]
    index = _write_index(store_url, shards, storage_options)
    created = previous.created_at if previous else now()
    manifest = Manifest(
        package_version=kalm_batch.__version__, created_at=created, updated_at=now(), settings=settings,
        codec={"name": "int8-absmax+zstd" if settings.dtype == "int8" else "byteplane+zstd", "level": level},
        rows=sum(t.num_rows for _, t in shards),
        tokens=sum(pc.sum(t.column("n_tokens")).as_py() or 0 for _, t in shards),
        vectors=sum(pc.sum(t.column("n_vectors")).as_py() or 0 for _, t in shards),
        memory_bytes=sum(pc.sum(t.column("nbytes")).as_py() or 0 for _, t in shards),
        shard_bytes=sum(s.bytes for s in infos), shards=infos, index=index, input=input_stats or {},
    )
    fsio.write_json_atomic(fsio.join_url(store_url, MANIFEST_NAME), manifest.model_dump(), storage_options)
    for url in fsio.list_files(store_url, ".parquet", storage_options):
        if url.rsplit("/", 1)[-1].startswith("index-") and not url.endswith(index.name):
            fsio.delete(url, storage_options)
    return manifest


def write_errors(store_url: str, rejected: Sequence[dict], storage_options: dict | None = None, *,
                 name: str = ERRORS_FILE) -> str:
    """The run's rejected (or, with ``name=CHANGED_FILE``, changed) input rows as JSON lines, replaced as a whole."""
    url = fsio.join_url(store_url, name)
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rejected)
    fsio.write_bytes_atomic(url, data.encode("utf-8", "surrogatepass"), storage_options)
    return url


def settings_for(reranker, *, dtype: str, text_join: str) -> StoreSettings:
    from kalm_batch.prompts import DOCUMENT_PREFIX

    if reranker.chunk_size is None:
        raise ValueError("a store needs a pooling ratio (chunk_size/ratio); None (no pooling) cannot be stored")
    return StoreSettings(
        fingerprint=reranker.fingerprint.to_dict(), document_template=DOCUMENT_PREFIX + "{text}",
        text_join=text_join, max_length=reranker.max_length, ratio=reranker.chunk_size, dtype=dtype,
        hidden_size=reranker.hidden_size,
    )


def build_store(store_url: str, reranker, docs, *, dtype: str = "bfloat16", level: int = 3, shard_rows: int = 1024,
                text_join: str = "as_given", overwrite: bool = False,
                storage_options: dict | None = None) -> Manifest:
    """Encode ``docs`` ({id: text} or [(id, text)]) in this process and write a complete store (no Ray).

    The pooling ratio is the reranker's ``chunk_size``. Same protocol as the Ray encode job, for tests and small stores.
    """
    items = list(docs.items()) if isinstance(docs, dict) else list(docs)
    settings = settings_for(reranker, dtype=dtype, text_join=text_join)
    done = prepare_store(store_url, settings, overwrite=overwrite, storage_options=storage_options)
    todo, seen = [], set(done)
    for line, (doc_id, text) in enumerate(items):
        if doc_id not in seen:
            seen.add(doc_id)
            todo.append((doc_id, text, line))
    new = []
    for start in range(0, len(todo), shard_rows):
        chunk = todo[start:start + shard_rows]
        memories = reranker.encode([t for _, t, _ in chunk])
        table = memory_table([d for d, _, _ in chunk], memories, [text_hash(t) for _, t, _ in chunk],
                             ["<in-process>"] * len(chunk), [ln for _, _, ln in chunk], dtype, level)
        new.append(write_shard(store_url, table, storage_options))
    stats = {"description": "build_store (in-process)", "input_rows": len(items), "stored_new": len(todo),
             "skipped_existing": len(items) - len(todo)}
    return finalize_store(store_url, settings, level=level, new_shards=new, input_stats=stats,
                          storage_options=storage_options)
