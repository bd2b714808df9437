"""Reading one version of a memory store: point lookups by ranged reads, checksums, coarsening, an LRU cache.

Opening a version reads the Delta log and the small per-data-file indexes (never a memory column). A cold lookup
fetches ``[offset - 4, offset + length)`` of the data file holding the doc (one ranged GET on object stores; int8
stores read the scales with a second one), checks the length prefix and the codec's CRC, and falls back to reading
the file's columns if they do not match. A data file that cannot be read at all is reported once (file, version and
the ids it should hold); its ids come back as ``corrupt`` while every other id is served.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from kalm_batch import fsio
from kalm_batch.codec import CorruptRecordError, decode_memory
from kalm_batch.memory import Memory
from kalm_batch.pooling import ALLOWED_RATIOS
from kalm_batch.store.errors import StoreVersionError
from kalm_batch.store.index import VersionIndex
from kalm_batch.store.layout import INDEX_SCHEMA, index_url, read_data_file, read_indexes
from kalm_batch.store.settings import (
    TableInfo,
    delta_options,
    parse_description,
    refuse_missing_table,
    table_uri,
)

log = logging.getLogger(__name__)
_READ_COLUMNS = ["doc_id", "n_tokens", "n_vectors", "memory", "scales", "checksum"]
_MERGE_GAP = 4096  # ranges in one file closer than this are fetched with one request


@dataclass
class FetchResult:
    memories: dict[str, Memory] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)


class _LRU:
    """Decoded float32 memories by doc id, bounded by total bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._items: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, value: tuple[np.ndarray, int]) -> None:
        size = value[0].nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (arr, _) = self._items.popitem(last=False)
                self.bytes -= arr.nbytes


def _open_table(url: str, version: int | None, storage_options: dict | None):
    """(DeltaTable at ``version`` or the latest, its TableInfo); clear errors for no table / no such version.

    The log is loaded once; the latest version is loaded only to explain a version that cannot be opened."""
    import deltalake as dl

    uri, opts = table_uri(url), delta_options(url, storage_options)
    if version is not None and (not isinstance(version, int) or version < 0):
        raise _no_such_version(url, version, _latest(uri, url, opts, storage_options))
    try:
        table = dl.DeltaTable(uri, version=version, storage_options=opts)
    except dl.exceptions.TableNotFoundError:
        refuse_missing_table(url, storage_options)
    except Exception as e:  # a version past the latest, or one whose log entries were cleaned up
        latest = _latest(uri, url, opts, storage_options)
        if version > latest.version():
            raise _no_such_version(url, version, latest) from None
        raise StoreVersionError(f"{url} version {version} cannot be loaded any more ({e}); it was probably "
                                "removed by log cleanup. See `kalm-batch history STORE` for the versions left."
                                ) from e
    return table, parse_description(url, table.metadata().description)


def _latest(uri: str, url: str, opts: dict, storage_options: dict | None):
    import deltalake as dl

    try:
        return dl.DeltaTable(uri, storage_options=opts)
    except dl.exceptions.TableNotFoundError:
        refuse_missing_table(url, storage_options)


def _no_such_version(url: str, version, latest) -> StoreVersionError:
    return StoreVersionError(f"{url} has no version {version!r}: its versions are 0..{latest.version()} "
                             "(see `kalm-batch history STORE`)")


class StoreReader:
    """One version of a store, opened for point lookups by doc id."""

    def __init__(self, url: str, *, version: int | None = None, storage_options: dict | None = None,
                 cache_bytes: int = 256 * 2**20):
        self.url, self.storage_options = url, storage_options
        dt, info = _open_table(url, version, storage_options)
        self.version: int = dt.version()
        self.info: TableInfo = info
        s = info.settings
        self.ratio, self.dtype, self.hidden_size, self.fingerprint = s.ratio, s.dtype, s.hidden_size, s.fingerprint
        self.codec: str = info.codec.get("name", "")
        self._fs, self._root = fsio.url_to_fs(url, storage_options)
        self._bad_files: dict[str, str] = {}
        self._index = self._load_index(dt.get_add_actions(flatten=True).column("path").to_pylist())
        self._cache = _LRU(cache_bytes)
        self._lock = threading.Lock()

    def _load_index(self, files: list[str]) -> VersionIndex:
        tables, gone = [], []
        for file, index in read_indexes(self.url, files, self.storage_options).items():
            if isinstance(index, FileNotFoundError) and not fsio.exists(fsio.join_url(self.url, file),
                                                                        self.storage_options):
                gone.append(file)
                continue
            if isinstance(index, Exception):
                index = self._index_from_data(file, index)
            if index is not None:
                tables.append(index)
        if gone:
            raise StoreVersionError(
                f"{self.url} version {self.version} can no longer be read: {len(gone)} of its {len(files)} data files "
                f"(with their indexes) are gone, e.g. {gone[0]} - removed by `kalm-batch vacuum`, which keeps only "
                "what the versions of the last --retain-hours need. Read a later version.")
        idx = VersionIndex(files, tables)
        if idx.duplicates:
            log.error("store %s version %d holds %d doc ids twice (e.g. %r); lookups use one copy. Re-run the "
                      "encode to repair.", self.url, self.version, len(idx.duplicates), idx.duplicates[0])
        return idx

    def _index_from_data(self, file: str, why: Exception) -> pa.Table | None:
        """No readable index file: the data file's small columns say which ids it holds (lookups then read rows)."""
        log.warning("store %s version %d: the index of %s is unreadable (%s); reading its ids from the data file",
                    self.url, self.version, file, why)
        try:
            t = read_data_file(self.url, file, ["doc_id", "n_tokens", "n_vectors", "checksum", "text_sha256"],
                               self.storage_options)
        except Exception as e:  # noqa: BLE001 - any failure makes the file unreadable, reported, never fatal
            self._mark_bad(file, e, [])
            return None
        n = t.num_rows
        return pa.table({
            "doc_id": t.column("doc_id"), "file": pa.array([file] * n, pa.string()),
            "offset": pa.array([-1] * n, pa.int64()), "length": pa.array([0] * n, pa.int32()),
            "scales_offset": pa.array([-1] * n, pa.int64()), "scales_length": pa.array([-1] * n, pa.int32()),
            "n_tokens": t.column("n_tokens"), "n_vectors": t.column("n_vectors"), "checksum": t.column("checksum"),
            "text_sha256": t.column("text_sha256"),
        }, schema=INDEX_SCHEMA)

    # ----- identity ----------------------------------------------------------------------------------------------
    @property
    def ratios(self) -> list[int]:
        """The standard ratios (up to 32) this store serves; ``check_ratio`` accepts any multiple of r0."""
        return [r for r in ALLOWED_RATIOS if r % self.ratio == 0]

    def check_ratio(self, r: int | None) -> int:
        """r0 if ``r`` is None; ``r`` if it is a positive multiple of r0; else ValueError."""
        if r is None:
            return self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1 or r % self.ratio:
            raise ValueError(f"ratio {r!r} cannot be served by store {self.url} (stored at r0={self.ratio}); "
                             f"use a positive multiple of {self.ratio}, e.g. {self.ratios}")
        return int(r)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, doc_id: str) -> bool:
        return self._index.find(doc_id) >= 0

    def file_of(self, doc_id: str) -> str | None:
        pos = self._index.find(doc_id)
        return None if pos < 0 else self._index.file_of(pos)

    def index_files(self) -> list[str]:
        return [index_url(self.url, f) for f in self._index.files]

    def index_nbytes(self) -> int:
        """Bytes the in-memory lookup index takes."""
        return self._index.nbytes()

    def cache_info(self) -> dict:
        c = self._cache
        return {"hits": c.hits, "misses": c.misses, "bytes": c.bytes, "entries": len(c._items),
                "max_bytes": c.max_bytes}

    def summary(self) -> dict:
        idx, s = self._index, self.info.settings
        rows = len(idx)
        memory_bytes = int(idx.length.sum()) + (4 * int(idx.n_vectors.sum()) if self.dtype == "int8" else 0)
        return {
            "url": self.url, "version": self.version, "rows": rows, "files": len(idx.files), "ratio": self.ratio,
            "dtype": self.dtype, "codec": self.codec, "model_id": self.fingerprint.get("model_id"),
            "fingerprint": self.fingerprint, "hidden_size": self.hidden_size, "max_length": s.max_length,
            "tokens": int(idx.n_tokens.sum()), "vectors": int(idx.n_vectors.sum()), "memory_bytes": memory_bytes,
            "bytes_per_doc": round(memory_bytes / rows, 1) if rows else 0.0, "settings": s.model_dump(),
            "schema_version": self.info.schema_version, "package_version": self.info.package_version,
            "created_at": self.info.created_at, "bad_files": dict(self._bad_files),
        }

    # ----- lookups -----------------------------------------------------------------------------------------------
    def fetch(self, doc_ids: Sequence[str], ratio: int | None = None) -> FetchResult:
        """Memories for ``doc_ids`` at ``ratio``; unknown ids go to ``missing``, corrupt records to ``corrupt``."""
        r = self.check_ratio(ratio)
        result = FetchResult()
        by_file: dict[int, list[tuple[str, int]]] = {}
        found: dict[str, tuple[np.ndarray, int]] = {}
        for d in dict.fromkeys(doc_ids):
            pos = self._index.find(d)
            if pos < 0:
                result.missing.append(d)
            elif (hit := self._cache.get(d)) is not None:
                found[d] = hit
            else:
                by_file.setdefault(int(self._index.file_code[pos]), []).append((d, pos))
        for code, wanted in by_file.items():
            self._read_file(self._index.files[code], wanted, found, result.corrupt)
        for d, (arr, n_tokens) in found.items():
            mem = Memory(torch.from_numpy(arr), n_tokens, self.ratio)
            result.memories[d] = mem.at_ratio(r) if r != self.ratio else mem
        return result

    def get(self, doc_id: str, ratio: int | None = None) -> Memory:
        res = self.fetch([doc_id], ratio)
        if res.missing:
            raise KeyError(f"doc id {doc_id!r} is not in store {self.url} version {self.version}")
        if res.corrupt:
            raise CorruptRecordError(res.corrupt[doc_id])
        return res.memories[doc_id]

    def _record(self, file: str, doc_id: str) -> str:
        return f"store {self.url} version {self.version} data file {file} doc_id {doc_id!r}"

    def _read_file(self, file: str, wanted: list[tuple[str, int]], found: dict, corrupt: dict) -> None:
        if file in self._bad_files:
            for d, _ in wanted:
                corrupt[d] = f"{self._record(file, d)}: {self._bad_files[file]}"
            return
        idx = self._index
        ranged = [(d, p) for d, p in wanted if idx.offset[p] >= 0]
        fallback = [(d, p) for d, p in wanted if idx.offset[p] < 0]
        if ranged:
            fallback += self._read_ranges(file, ranged, found)
        if fallback:
            self._read_rows(file, fallback, found, corrupt)

    def _read_ranges(self, file: str, wanted: list[tuple[str, int]], found: dict) -> list[tuple[str, int]]:
        """Ranged reads of the wanted values; returns the ones that must be read the slow way."""
        idx = self._index
        spans = [(int(idx.offset[p]) - 4, int(idx.offset[p]) + int(idx.length[p])) for _, p in wanted]
        if idx.scales_offset is not None:
            spans += [(int(idx.scales_offset[p]) - 4, int(idx.scales_offset[p]) + 4 * int(idx.n_vectors[p]))
                      for _, p in wanted if idx.scales_offset[p] >= 0]
        blobs = self._get_spans(file, spans)
        if blobs is None:
            return wanted
        retry = []
        for d, p in wanted:
            try:
                payload = _value_at(blobs, int(idx.offset[p]), int(idx.length[p]))
                scales = None
                if idx.scales_offset is not None and idx.scales_offset[p] >= 0:
                    scales = _value_at(blobs, int(idx.scales_offset[p]), 4 * int(idx.n_vectors[p]))
                arr = self._decode(file, d, int(idx.n_tokens[p]), int(idx.n_vectors[p]), payload, scales,
                                   int(idx.checksum[p]))
            except CorruptRecordError:
                retry.append((d, p))  # the index may be stale or the bytes damaged: the row read decides
                continue
            found[d] = (arr, int(idx.n_tokens[p]))
            self._cache.put(d, found[d])
        return retry

    def _get_spans(self, file: str, spans: list[tuple[int, int]]) -> dict[int, bytes] | None:
        """Fetch the spans (merging close ones) in parallel; {start: bytes}, or None if the file cannot be read."""
        merged: list[list[int]] = []
        for start, end in sorted(spans):
            if merged and start - merged[-1][1] <= _MERGE_GAP:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        path = f"{self._root.rstrip('/')}/{file}"
        try:
            got = self._fs.cat_ranges([path] * len(merged), [s for s, _ in merged], [e for _, e in merged],
                                      on_error="return")
        except Exception as e:  # noqa: BLE001 - the row read reports the file's failure with its name
            log.debug("ranged read of %s failed (%s); reading rows instead", file, e)
            return None
        if any(not isinstance(b, (bytes, bytearray)) or len(b) != e - s for (s, e), b in zip(merged, got)):
            return None  # a failed or short read (a truncated file): the row read decides, and names the file
        return {s: b for (s, _), b in zip(merged, got)}

    def _read_rows(self, file: str, wanted: list[tuple[str, int]], found: dict, corrupt: dict) -> None:
        try:
            table = read_data_file(self.url, file, _READ_COLUMNS, self.storage_options)
        except Exception as e:  # noqa: BLE001 - an unreadable file is reported with its ids, others are served
            self._mark_bad(file, e, [d for d, _ in wanted])
            for d, _ in wanted:
                corrupt[d] = f"{self._record(file, d)}: {self._bad_files[file]}"
            return
        rows = {d: i for i, d in enumerate(table.column("doc_id").to_pylist())}
        cols = {c: table.column(c) for c in _READ_COLUMNS}
        for d, _ in wanted:
            self._decode_row(file, d, rows.get(d), cols, found, corrupt)

    def _mark_bad(self, file: str, error: Exception, some_ids: list[str]) -> None:
        if file in self._bad_files:
            return
        pos = self._index.positions_of_file(file) if hasattr(self, "_index") else []
        ids = [self._index.ids[int(p)].as_py() for p in pos[:5]] if len(pos) else some_ids[:5]
        n = len(pos) if len(pos) else len(some_ids)
        self._bad_files[file] = (f"data file {file} of store {self.url} version {self.version} is unreadable "
                                 f"({type(error).__name__}: {error}); it should hold {n} doc ids (e.g. {ids})")
        log.error("%s", self._bad_files[file])

    def _decode(self, file, doc_id, n_tokens, n_vectors, payload, scales, checksum) -> np.ndarray:
        record = self._record(file, doc_id)
        if n_tokens is None or n_vectors != math.ceil(n_tokens / self.ratio):
            raise CorruptRecordError(f"{record}: n_vectors={n_vectors} does not match n_tokens={n_tokens} at "
                                     f"ratio {self.ratio}; the row is corrupt - re-encode this passage")
        return decode_memory(payload, scales, checksum, n_vectors, self.hidden_size, self.dtype, record=record)

    def _decode_row(self, file, doc_id, i, cols, found, corrupt) -> None:
        try:
            if i is None:
                raise CorruptRecordError(f"{self._record(file, doc_id)}: the version's index lists it in this file "
                                         "but the file does not hold it")
            arr = self._decode(file, doc_id, cols["n_tokens"][i].as_py(), cols["n_vectors"][i].as_py(),
                               cols["memory"][i].as_py(), cols["scales"][i].as_py(), cols["checksum"][i].as_py())
        except CorruptRecordError as e:
            corrupt[doc_id] = str(e)
            return
        found[doc_id] = (arr, cols["n_tokens"][i].as_py())
        self._cache.put(doc_id, found[doc_id])

    def verify(self) -> dict:
        """Decode every record of every data file; an unreadable file is reported once and the rest still checked."""
        ok, corrupt = 0, {}
        for file in self._index.files:
            pos = self._index.positions_of_file(file)
            wanted = [(self._index.ids[int(p)].as_py(), int(p)) for p in pos]
            found: dict = {}
            if file in self._bad_files:
                for d, _ in wanted:
                    corrupt[d] = f"{self._record(file, d)}: {self._bad_files[file]}"
                continue
            self._read_rows(file, wanted, found, corrupt)
            ok += len(found)
        bad = {f: {"version": self.version, "error": m,
                   "doc_ids": [self._index.ids[int(p)].as_py() for p in self._index.positions_of_file(f)]}
               for f, m in self._bad_files.items()}
        return {"records_ok": ok, "records_corrupt": len(corrupt), "corrupt": corrupt, "bad_files": bad}


def _value_at(blobs: dict[int, bytes], offset: int, length: int) -> bytes:
    """The value at ``offset`` from the fetched blobs, after checking its 4-byte length prefix."""
    for start, blob in blobs.items():
        lo = offset - 4 - start
        if 0 <= lo and lo + 4 + length <= len(blob):
            prefix = int.from_bytes(blob[lo:lo + 4], "little")
            if prefix != length:
                raise CorruptRecordError(f"length prefix {prefix} != indexed length {length}")
            return bytes(blob[lo + 4:lo + 4 + length])
    raise CorruptRecordError(f"bytes {offset}..{offset + length} were not fetched (short read)")


def open_store(url: str, *, version: int | None = None, storage_options: dict | None = None,
               cache_bytes: int = 256 * 2**20) -> StoreReader:
    """Open ``version`` (None: the latest) of the store at ``url`` for lookups."""
    return StoreReader(url, version=version, storage_options=storage_options, cache_bytes=cache_bytes)
