"""Writing a memory store: one writer object owns the commit protocol (see storage/README.md).

    writer = StoreWriter(url, settings, level=3)
    committed = writer.prepare()            # create the table or check its settings; {doc_id: text_sha256}
    info = write_data_file(url, table)      # anywhere (Ray tasks too): data file + its index, not yet visible
    writer.record_errors(rejected, changed) # this run's error report, referenced by the next commit
    writer.commit([info, ...], delete_ids=...)  # ONE table version: adds, replaced ids removed, deletes

A commit never leaves a doc id twice in a version: ids it adds that the table already holds (a refresh) and ids it
deletes are removed by rewriting the files that hold them (the memory bytes are copied, never re-encoded). Commits are
optimistic: a commit is made against the version this writer last saw, and if another writer committed meanwhile it
fails with ``ConcurrentWriterError`` (S3: conditional put; local: atomic create), leaving no partial version.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa

import kalm_batch
from kalm_batch import fsio
from kalm_batch.codec import encode_memory
from kalm_batch.store.errors import ConcurrentWriterError, StoreError, StoreMismatchError
from kalm_batch.store.layout import DATA_SCHEMA, as_data_table, read_data_file, read_indexes, write_data_file
from kalm_batch.store.settings import (
    ERRORS_DIR,
    OLD_MANIFEST,
    TABLE_NAME,
    StoreSettings,
    TableInfo,
    codec_info,
    delta_options,
    now,
    parse_description,
    refuse_missing_table,
    table_uri,
    text_hash,
)

__all__ = ["CommitResult", "StoreWriter", "build_store", "memory_table", "settings_for", "text_hash",
           "write_data_file"]


def memory_table(doc_ids: Sequence[str], memories, text_hashes: Sequence[str], sources: Sequence[str],
                 lines: Sequence[int], dtype: str, level: int) -> pa.Table:
    """One data file's rows: memories encoded with the codec (checksummed), plus provenance."""
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
    }, schema=DATA_SCHEMA)


@dataclass
class CommitResult:
    version: int
    new: int          # ids the table did not hold
    refreshed: int    # ids it held, replaced by a new memory
    deleted: int      # ids removed
    files_added: int
    files_removed: int


def _deltalake():
    import deltalake

    return deltalake


class StoreWriter:
    """The single writer of one store for one run."""

    def __init__(self, url: str, settings: StoreSettings, *, level: int = 3, storage_options: dict | None = None):
        self.url, self.settings, self.level, self.storage_options = url, settings, level, storage_options
        self._uri, self._opts = table_uri(url), delta_options(url, storage_options)
        self._dt = None
        self._ids: dict[str, tuple[str, str]] = {}  # doc_id -> (data file, text_sha256) at self.version
        self.errors_url: str | None = None

    @classmethod
    def open_existing(cls, url: str, *, storage_options: dict | None = None) -> StoreWriter:
        """A writer for maintenance (compaction) of an existing store, with the store's own settings."""
        from kalm_batch.store.reader import _open_table

        dt, info = _open_table(url, None, storage_options)
        writer = cls(url, info.settings, level=info.codec.get("level", 3), storage_options=storage_options)
        writer._dt = dt
        writer._ids = writer._load_ids(writer._files())
        return writer

    @property
    def version(self) -> int:
        """The table version this writer last saw or committed (-1: no table yet)."""
        return -1 if self._dt is None else self._dt.version()

    @property
    def rows(self) -> int:
        """Doc ids in the version this writer last saw (or committed)."""
        return len(self._ids)

    # ----- prepare ---------------------------------------------------------------------------------------------
    def prepare(self, *, overwrite: bool = False) -> dict[str, str]:
        """Check the store's settings against this run's; return the committed {doc_id: text_sha256}.

        A store that does not exist yet is created by the first commit (its version 0 holds the first rows), so a
        run that dies before committing leaves no table at all."""
        dl = _deltalake()
        try:
            dt = dl.DeltaTable(self._uri, storage_options=self._opts)
        except dl.exceptions.TableNotFoundError:
            if fsio.exists(fsio.join_url(self.url, OLD_MANIFEST), self.storage_options):
                if not overwrite:
                    refuse_missing_table(self.url, self.storage_options)  # raises OldLayoutError
                _clear_old_layout(self.url, self.storage_options)
            self._dt, self._ids = None, {}
            return {}
        stored = parse_description(self.url, dt.metadata().description)
        diffs = stored.settings.differences(self.settings)
        if diffs and not overwrite:
            raise StoreMismatchError(
                f"{self.url} holds memories made with other settings ({'; '.join(diffs)}). Use another store "
                "URL, or pass --overwrite to commit a new version that replaces them (older versions stay "
                "readable until vacuumed).")
        if diffs:
            dl.DeltaTable.create(self._uri, DATA_SCHEMA, mode="overwrite", name=TABLE_NAME,
                                 description=self._table_info().to_description(), storage_options=self._opts)
            dt = dl.DeltaTable(self._uri, storage_options=self._opts)
        self._dt = dt
        self._ids = self._load_ids(self._files())
        return {d: sha for d, (_, sha) in self._ids.items()}

    def _table_info(self) -> TableInfo:
        return TableInfo(package_version=kalm_batch.__version__, created_at=now(), settings=self.settings,
                         codec=codec_info(self.settings.dtype, self.level))

    def _files(self) -> list[str]:
        return self._dt.get_add_actions(flatten=True).column("path").to_pylist()

    def _load_ids(self, files: list[str]) -> dict[str, tuple[str, str]]:
        ids: dict[str, tuple[str, str]] = {}
        for file, index in read_indexes(self.url, files, self.storage_options).items():
            if isinstance(index, Exception):  # no index: read the small columns of the data file itself
                index = read_data_file(self.url, file, ["doc_id", "text_sha256"], self.storage_options)
            for d, sha in zip(index.column("doc_id").to_pylist(), index.column("text_sha256").to_pylist()):
                ids[d] = (file, sha or "")
        return ids

    # ----- write and report --------------------------------------------------------------------------------------
    def write(self, table: pa.Table) -> dict:
        """Write one data file (+ index) from this process; see ``write_data_file`` for writing from workers."""
        return write_data_file(self.url, table, self.storage_options)

    def record_errors(self, rejected: Sequence[dict], changed: Sequence[dict] = ()) -> str:
        """This run's rejected rows (and stale, not refreshed ones) as JSON lines; the next commit names the folder.
        Returns the URL of ``rejected.jsonl``."""
        folder = fsio.join_url(self.url, ERRORS_DIR, f"run-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}")
        for name, rows in (("rejected.jsonl", rejected), ("changed.jsonl", changed)):
            data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
            fsio.write_bytes_atomic(fsio.join_url(folder, name), data.encode("utf-8", "surrogatepass"),
                                    self.storage_options)
        self.errors_url = folder
        return fsio.join_url(folder, "rejected.jsonl")

    # ----- commit ------------------------------------------------------------------------------------------------
    def commit(self, files: Sequence[dict], *, delete_ids: Iterable[str] = (), operation: str = "encode",
               stats: dict | None = None) -> CommitResult | None:
        """One table version adding ``files`` (from ``write_data_file``), replacing the ids they hold that the table
        already holds, and deleting ``delete_ids``. Returns None (and commits nothing) if there is nothing to do."""
        adds, new_ids = self._new_files(list(files))
        replaced = {d for d in new_ids if d in self._ids}
        deleted = {d for d in delete_ids if d in self._ids and d not in new_ids}
        removes, rewritten = self._rewrite_without(replaced | deleted)
        adds += rewritten
        if not adds and not removes:
            return None
        meta = {"kalm.rows_added": str(len(new_ids)), "kalm.rows_removed": str(len(replaced) + len(deleted)),
                "kalm.new": str(len(new_ids - replaced)), "kalm.refreshed": str(len(replaced)),
                "kalm.deleted": str(len(deleted))}
        if stats:
            meta["kalm.stats"] = json.dumps(stats, sort_keys=True, default=str)
        self.commit_files(adds, removes, operation=operation, meta=meta)
        self._apply(adds, rewritten, replaced | deleted)
        return CommitResult(version=self.version, new=len(new_ids - replaced), refreshed=len(replaced),
                            deleted=len(deleted), files_added=len(adds), files_removed=len(removes))

    def commit_files(self, adds: Sequence[dict], removes: Sequence[str], *, operation: str, meta: dict | None = None,
                     data_change: bool = True) -> int:
        """The low-level commit: one version adding and removing whole files, on top of the version last seen."""
        from deltalake.transaction import AddAction, CommitProperties, RemoveAction

        ts = int(time.time() * 1000)
        actions = [AddAction(a["path"], a["size"], {}, ts, data_change, json.dumps({"numRecords": a["rows"]}))
                   for a in adds] + [RemoveAction(r, data_change, ts) for r in removes]
        meta = {"kalm.operation": operation, **(meta or {})}
        if self.errors_url:
            meta["kalm.errors"] = self.errors_url
        base = self.version
        props = CommitProperties(custom_metadata=meta, max_commit_retries=0)
        try:
            if self._dt is None:  # the first commit creates the table, with the settings in its metadata
                from deltalake.transaction import create_table_with_add_actions

                schema = _deltalake().Schema.from_arrow(DATA_SCHEMA)
                create_table_with_add_actions(self._uri, schema, actions, mode="error", name=TABLE_NAME,
                                              description=self._table_info().to_description(),
                                              storage_options=self._opts, commit_properties=props)
            else:
                self._dt.create_write_transaction(actions, "append", DATA_SCHEMA, commit_properties=props)
        except Exception as e:  # delta-rs: CommitFailedError, or a DeltaError "table exists" on create
            if not isinstance(e, _deltalake().exceptions.CommitFailedError) and "exist" not in str(e).lower():
                raise
            raise ConcurrentWriterError(
                f"another writer committed version {base + 1} of {self.url} while this run was writing (this run's "
                f"commit on top of version {base} was refused; nothing of it is visible). Run one writer per store "
                "at a time; re-running the same command resumes from the latest version.") from e
        self._dt = _deltalake().DeltaTable(self._uri, version=base + 1, storage_options=self._opts)
        if operation == "compact":
            self._ids = self._load_ids(self._files())
        return base + 1

    def _new_files(self, files: list[dict]) -> tuple[list[dict], set[str]]:
        """The files to add and the ids they hold; a doc id in two new files is kept in the first only."""
        indexes = read_indexes(self.url, [f["path"] for f in files], self.storage_options)
        seen: set[str] = set()
        out = []
        for f in files:
            index = indexes[f["path"]]
            if isinstance(index, Exception):
                raise StoreError(f"{self.url}: the index of new data file {f['path']} cannot be read ({index}); "
                                 "nothing was committed - re-run the command") from index
            ids = index.column("doc_id").to_pylist()
            dup = {d for d in ids if d in seen}
            if dup or len(set(ids)) != len(ids):
                f = self._rewrite_file(f["path"], dup)
                ids = [] if f is None else read_indexes(self.url, [f["path"]], self.storage_options)[
                    f["path"]].column("doc_id").to_pylist()
            if f is not None:
                f["ids"] = ids
                out.append(f)
                seen.update(ids)
        return out, seen

    def _rewrite_file(self, file: str, drop: set[str]) -> dict | None:
        """A new data file holding ``file``'s rows minus ``drop`` and minus repeats of an id (None if none is left)."""
        table = read_data_file(self.url, file, None, self.storage_options)
        keep, kept = [], set()
        for i, d in enumerate(table.column("doc_id").to_pylist()):
            if d not in drop and d not in kept:
                kept.add(d)
                keep.append(i)
        if not keep:
            return None
        return write_data_file(self.url, as_data_table(table.take(pa.array(keep, pa.int64()))), self.storage_options)

    def _rewrite_without(self, drop: set[str]) -> tuple[list[str], list[dict]]:
        """Files of the current version holding any of ``drop`` -> (their paths to remove, their rewrites to add)."""
        by_file: dict[str, set[str]] = {}
        for d in drop:
            by_file.setdefault(self._ids[d][0], set()).add(d)
        rewritten = []
        for file, ids in sorted(by_file.items()):
            info = self._rewrite_file(file, ids)
            if info is not None:
                info["ids"] = None  # same ids as before, minus ``ids``
                info["from"] = file
                rewritten.append(info)
        return sorted(by_file), rewritten

    def _apply(self, adds: list[dict], rewritten: list[dict], dropped: set[str]) -> None:
        moved = {r["from"]: r["path"] for r in rewritten}
        for d in dropped:
            self._ids.pop(d, None)
        if moved:
            for d, (file, sha) in list(self._ids.items()):
                if file in moved:
                    self._ids[d] = (moved[file], sha)
        new = [a for a in adds if a.get("ids") is not None]
        for file, index in read_indexes(self.url, [a["path"] for a in new], self.storage_options).items():
            for d, sha in zip(index.column("doc_id").to_pylist(), index.column("text_sha256").to_pylist()):
                self._ids[d] = (file, sha or "")


def _clear_old_layout(url: str, storage_options) -> None:
    """Remove a schema-version-1 store (manifest first, so no reader sees a half-deleted store as complete)."""
    fsio.delete(fsio.join_url(url, OLD_MANIFEST), storage_options)
    for url_ in (fsio.list_files(fsio.join_url(url, "shards"), "", storage_options)
                 + fsio.list_files(url, ".parquet", storage_options)
                 + fsio.list_files(fsio.join_url(url, "errors"), "", storage_options)):
        fsio.delete(url_, storage_options)
    fsio.delete(fsio.join_url(url, "_settings.json"), storage_options)


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
                text_join: str = "as_given", overwrite: bool = False, refresh: bool = True,
                delete_missing: bool = False, storage_options: dict | None = None) -> CommitResult | None:
    """Encode ``docs`` ({id: text} or [(id, text)]) in this process and commit them as one table version (no Ray).

    Same protocol as the Ray encode job (refresh by default; unchanged ids are not re-encoded), for tests and small
    stores. The pooling ratio is the reranker's ``chunk_size``. Returns the commit (None if nothing changed).
    """
    items = list(docs.items()) if isinstance(docs, dict) else list(docs)
    writer = StoreWriter(store_url, settings_for(reranker, dtype=dtype, text_join=text_join), level=level,
                         storage_options=storage_options)
    committed = writer.prepare(overwrite=overwrite)
    todo, seen = [], set()
    for line, (doc_id, text) in enumerate(items):
        if doc_id in seen:
            continue
        seen.add(doc_id)
        sha = text_hash(text)
        if doc_id not in committed or (refresh and committed[doc_id] != sha):
            todo.append((doc_id, text, sha, line))
    files = []
    for start in range(0, len(todo), shard_rows):
        chunk = todo[start:start + shard_rows]
        memories = reranker.encode([t for _, t, _, _ in chunk])
        table = memory_table([d for d, *_ in chunk], memories, [s for _, _, s, _ in chunk],
                             ["<in-process>"] * len(chunk), [ln for *_, ln in chunk], dtype, level)
        files.append(writer.write(table))
    missing = [d for d in committed if d not in seen] if delete_missing else []
    return writer.commit(files, delete_ids=missing, operation="build_store",
                         stats={"input_rows": len(items), "encoded": len(todo)})

