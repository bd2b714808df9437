"""The in-memory lookup index of one table version: doc id -> (data file, byte ranges, shape, checksum).

Compact on purpose (a replica holds it for the whole store): the doc ids sorted in one Arrow string array and the
rest in numpy arrays, looked up by binary search - about 40 bytes per passage plus its id (see BENCHMARKS.md).
"""

from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class _Ids:
    """A sorted Arrow string array seen as a Python sequence (for ``bisect``)."""

    def __init__(self, arr: pa.Array):
        self.arr = arr

    def __len__(self) -> int:
        return len(self.arr)

    def __getitem__(self, i: int) -> str:
        return self.arr[i].as_py()


class VersionIndex:
    """Built from the per-data-file index tables of one version (each with INDEX_SCHEMA columns)."""

    def __init__(self, files: list[str], tables: list[pa.Table]):
        self.files = list(files)
        cols = ["doc_id", "file", "offset", "length", "scales_offset", "n_tokens", "n_vectors", "checksum"]
        if tables:
            t = pa.concat_tables([x.select(cols) for x in tables])
        else:
            from kalm_batch.store.layout import INDEX_SCHEMA

            t = INDEX_SCHEMA.empty_table().select(cols)
        t = t.take(pc.sort_indices(t, [("doc_id", "ascending")]))
        self.ids = pc.cast(t.column("doc_id"), pa.string()).combine_chunks()
        self.file_code = pc.index_in(t.column("file"), value_set=pa.array(self.files, pa.string())).to_numpy(
            zero_copy_only=False).astype(np.int32)
        self.offset = t.column("offset").to_numpy().astype(np.int64)
        self.length = t.column("length").to_numpy().astype(np.int32)
        scales = t.column("scales_offset").to_numpy().astype(np.int64)
        self.scales_offset = scales if (scales >= 0).any() else None  # only int8 stores have scales
        self.n_tokens = t.column("n_tokens").to_numpy().astype(np.int32)
        self.n_vectors = t.column("n_vectors").to_numpy().astype(np.int32)
        self.checksum = (t.column("checksum").to_numpy().astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)
        self._seq = _Ids(self.ids)
        self.duplicates = self._duplicates()

    def _duplicates(self) -> list[str]:
        if len(self.ids) < 2:
            return []
        same = pc.equal(self.ids[1:], self.ids[:-1]).to_numpy(zero_copy_only=False)
        return [self.ids[i + 1].as_py() for i in np.flatnonzero(same)]

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, doc_id: str) -> int:
        """Position of ``doc_id``, or -1."""
        i = bisect.bisect_left(self._seq, doc_id)
        return i if i < len(self.ids) and self.ids[i].as_py() == doc_id else -1

    def file_of(self, pos: int) -> str:
        return self.files[self.file_code[pos]]

    def positions_of_file(self, file: str) -> np.ndarray:
        return np.flatnonzero(self.file_code == self.files.index(file))

    def nbytes(self) -> int:
        arrays = [self.file_code, self.offset, self.length, self.n_tokens, self.n_vectors, self.checksum]
        if self.scales_offset is not None:
            arrays.append(self.scales_offset)
        return int(sum(a.nbytes for a in arrays) + self.ids.nbytes)
