"""Reading a memory store: manifest checks, point lookups through the index, checksums, coarsening, an LRU cache.

Lookups group the requested ids by shard and read only the row groups and columns they need. Memories are cached
at the store's ratio r0 (bounded by bytes) and coarsened exactly to any multiple of r0 on the way out.
"""

from __future__ import annotations

import math
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from kalm_batch import fsio
from kalm_batch.codec import CorruptRecordError, decode_memory
from kalm_batch.pooling import ALLOWED_RATIOS
from kalm_batch.reranker import Memory
from kalm_batch.store.manifest import StoreMismatchError, load_manifest
from kalm_batch.store.writer import SHARDS_DIR

log = logging.getLogger(__name__)
_READ_COLUMNS = ["doc_id", "n_tokens", "n_vectors", "memory", "scales", "checksum"]


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


class StoreReader:
    """A finished store opened for point lookups by doc id."""

    def __init__(self, url: str, *, storage_options: dict | None = None, cache_bytes: int = 256 * 2**20):
        self.url, self.storage_options = url, storage_options
        self.manifest = load_manifest(url, storage_options)
        self._shards = [s.name for s in self.manifest.shards]
        index_url = fsio.join_url(url, self.manifest.index.name)
        with fsio.open_input(index_url, storage_options) as f:
            index = pq.read_table(f)
        self._index = dict(zip(index.column("doc_id").to_pylist(),
                               zip(index.column("shard").to_pylist(), index.column("row").to_pylist())))
        self._row_groups: dict[int, np.ndarray] = {}
        self._cache = _LRU(cache_bytes)

    # ----- identity ----------------------------------------------------------------------------------------------
    @property
    def ratio(self) -> int:
        return self.manifest.ratio

    @property
    def ratios(self) -> list[int]:
        return [r for r in ALLOWED_RATIOS if r % self.ratio == 0]

    def check_model(self, fingerprint, allow_mismatch: bool = False) -> None:
        """Refuse to score this store with a model other than the one that encoded it."""
        stored = self.manifest.fingerprint
        diffs = fingerprint.differences(stored)
        if not diffs:
            return
        message = (f"store {self.url} was encoded by {stored.get('model_id')!r} but the scoring model is "
                   f"{fingerprint.model_id!r}; they differ in {'; '.join(diffs)} (model != store). Score with the "
                   "model that made the store, or re-encode the corpus.")
        if not allow_mismatch:
            raise StoreMismatchError(message)
        log.warning("ALLOWING A MODEL/STORE MISMATCH (scores will not be the official ones): %s", message)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._index

    def shard_of(self, doc_id: str) -> int | None:
        loc = self._index.get(doc_id)
        return None if loc is None else loc[0]

    # ----- SHIM (issue 12): the settled reading API on today's layout; issue 11's Delta reader replaces it --------
    version = 0  # today's layout has no table versions: every store reads as version 0

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def codec(self) -> str:
        return str(self.manifest.codec.get("name", "zstd"))

    @property
    def hidden_size(self) -> int:
        return self.manifest.hidden_size

    @property
    def fingerprint(self) -> dict:
        return dict(self.manifest.fingerprint)

    def check_ratio(self, r: int | None) -> int:
        return self._check_ratio(r)

    def file_of(self, doc_id: str) -> str | None:
        """Relative path of the data file holding ``doc_id`` (SHIM: a shard under ``shards/``)."""
        shard = self.shard_of(doc_id)
        return None if shard is None else f"{SHARDS_DIR}/{self._shards[shard]}"

    def index_files(self) -> list[str]:
        """URLs of Parquet files with columns ``doc_id``, ``file`` (each doc once) for this version.

        SHIM: derived from today's index and written once (idempotent, named by the index's hash) under
        ``STORE/_shim_index/``; issue 11's reader serves its own table's index files instead.
        """
        import io

        import pyarrow as pa

        url = fsio.join_url(self.url, "_shim_index", f"doc-file-{self.manifest.index.sha256[:16]}.parquet")
        if not fsio.exists(url, self.storage_options):
            docs = list(self._index)
            files = [f"{SHARDS_DIR}/{self._shards[self._index[d][0]]}" for d in docs]
            buf = io.BytesIO()
            pq.write_table(pa.table({"doc_id": pa.array(docs, pa.string()), "file": pa.array(files, pa.string())}),
                           buf, compression="zstd")
            fsio.write_bytes_atomic(url, buf.getvalue(), self.storage_options)
        return [url]

    def summary(self) -> dict:
        return {"url": self.url, "version": self.version, "ratio": self.ratio, "dtype": self.dtype,
                "codec": self.codec, "model_id": self.fingerprint.get("model_id"), "fingerprint": self.fingerprint,
                "rows": len(self), "vectors": self.manifest.vectors}
    # ----- end of SHIM -------------------------------------------------------------------------------------------

    def cache_info(self) -> dict:
        c = self._cache
        return {"hits": c.hits, "misses": c.misses, "bytes": c.bytes, "entries": len(c._items),
                "max_bytes": c.max_bytes}

    # ----- lookups -----------------------------------------------------------------------------------------------
    def _check_ratio(self, ratio: int | None) -> int:
        r = self.ratio if ratio is None else ratio
        if r not in self.ratios:
            raise ValueError(f"ratio {ratio!r} cannot be served by this store (r0={self.ratio}); "
                             f"valid ratios: {self.ratios}")
        return r

    def fetch(self, doc_ids: Sequence[str], ratio: int | None = None) -> FetchResult:
        """Memories for ``doc_ids`` at ``ratio``; unknown ids go to ``missing``, corrupt records to ``corrupt``."""
        r = self._check_ratio(ratio)
        result = FetchResult()
        by_shard: dict[int, list[tuple[str, int]]] = {}
        found: dict[str, tuple[np.ndarray, int]] = {}
        for d in dict.fromkeys(doc_ids):
            loc = self._index.get(d)
            if loc is None:
                result.missing.append(d)
            elif (hit := self._cache.get(d)) is not None:
                found[d] = hit
            else:
                by_shard.setdefault(loc[0], []).append((d, loc[1]))
        for shard, wanted in by_shard.items():
            self._read_shard_rows(shard, wanted, found, result.corrupt)
        for d, (arr, n_tokens) in found.items():
            mem = Memory(torch.from_numpy(arr), n_tokens, self.ratio)
            result.memories[d] = mem.at_ratio(r) if r != self.ratio else mem
        return result

    def get(self, doc_id: str, ratio: int | None = None) -> Memory:
        res = self.fetch([doc_id], ratio)
        if res.missing:
            raise KeyError(f"doc id {doc_id!r} is not in store {self.url}")
        if res.corrupt:
            raise CorruptRecordError(res.corrupt[doc_id])
        return res.memories[doc_id]

    def _shard_url(self, shard: int) -> str:
        return fsio.join_url(self.url, SHARDS_DIR, self._shards[shard])

    def _read_shard_rows(self, shard: int, wanted: list[tuple[str, int]], found: dict, corrupt: dict) -> None:
        url = self._shard_url(shard)
        with fsio.open_input(url, self.storage_options) as f:
            pf = pq.ParquetFile(f)
            if shard not in self._row_groups:
                sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
                self._row_groups[shard] = np.cumsum([0] + sizes)
            starts = self._row_groups[shard]
            groups = sorted({int(np.searchsorted(starts, row, side="right") - 1) for _, row in wanted})
            table = pf.read_row_groups(groups, columns=_READ_COLUMNS)
        offsets = {g: int(sum(starts[x + 1] - starts[x] for x in groups[:i])) for i, g in enumerate(groups)}
        cols = {c: table.column(c) for c in _READ_COLUMNS}
        for doc_id, row in wanted:
            g = int(np.searchsorted(starts, row, side="right") - 1)
            i = offsets[g] + row - int(starts[g])
            self._decode_row(doc_id, i, row, shard, cols, found, corrupt)

    def _decode_row(self, doc_id, i, row, shard, cols, found, corrupt) -> None:
        record = f"shard {self._shards[shard]} row {row} doc_id {doc_id!r}"
        try:
            if cols["doc_id"][i].as_py() != doc_id:
                raise CorruptRecordError(f"{record}: the index points to a row holding {cols['doc_id'][i].as_py()!r}")
            n_vectors, n_tokens = cols["n_vectors"][i].as_py(), cols["n_tokens"][i].as_py()
            if n_tokens is None or n_vectors != math.ceil(n_tokens / self.ratio):
                raise CorruptRecordError(f"{record}: n_vectors={n_vectors} does not match n_tokens={n_tokens} at "
                                         f"ratio {self.ratio}; the row is corrupt - re-encode this passage")
            arr = decode_memory(cols["memory"][i].as_py(), cols["scales"][i].as_py(), cols["checksum"][i].as_py(),
                                n_vectors, self.manifest.hidden_size, self.manifest.dtype, record=record)
        except CorruptRecordError as e:
            corrupt[doc_id] = str(e)
            return
        value = (arr, n_tokens)
        self._cache.put(doc_id, value)
        found[doc_id] = value

    def verify(self) -> dict:
        """Decode every record and check its checksum; returns counts and the corrupt records' messages."""
        ok, bad = 0, {}
        for shard in range(len(self._shards)):
            with fsio.open_input(self._shard_url(shard), self.storage_options) as f:
                table = pq.read_table(f, columns=_READ_COLUMNS)
            cols = {c: table.column(c) for c in _READ_COLUMNS}
            for row, doc_id in enumerate(cols["doc_id"].to_pylist()):
                found: dict = {}
                self._decode_row(doc_id, row, row, shard, cols, found, bad)
                ok += len(found)
        return {"records_ok": ok, "records_corrupt": len(bad), "corrupt": bad}


def open_store(url: str, *, version: int | None = None, storage_options: dict | None = None,
               cache_bytes: int = 256 * 2**20) -> StoreReader:
    if version not in (None, 0):  # SHIM (issue 12): today's layout has only version 0
        from kalm_batch.store.manifest import StoreError

        raise StoreError(f"store {url} has no version {version}; this store layout only has version 0")
    return StoreReader(url, storage_options=storage_options, cache_bytes=cache_bytes)
