"""Data files and their lookup indexes: the bytes on disk that make one-ranged-read point lookups possible.

A data file is one Parquet row group whose ``memory`` (and ``scales``) column chunks are PLAIN-encoded, uncompressed
(the codec already zstd-compresses) and unpaged in practice (a 1 GiB page limit), with no dictionary. In such a chunk
each value is stored as a 4-byte little-endian length followed by its bytes, so after writing we locate every value
in the file and record ``(offset, length)`` in the data file's *index* (``_kalm/index/<data file name>``), a small
Parquet with one row per doc. A reader then fetches ``[offset - 4, offset + length)``, checks the length prefix and
the codec's CRC, and falls back to a normal row-group read if either does not match. Other Parquet readers (Polars,
deltalake, Spark) read the data files as ordinary Parquet.
"""

from __future__ import annotations

import io
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from kalm_batch import fsio
from kalm_batch.store.settings import INDEX_DIR

DATA_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False), ("n_tokens", pa.int32()), ("n_vectors", pa.int32()),
    pa.field("memory", pa.binary(), nullable=False), ("scales", pa.binary()), ("checksum", pa.int64()),
    ("nbytes", pa.int32()), ("text_sha256", pa.string()), ("source", pa.string()), ("line", pa.int64()),
])
INDEX_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("file", pa.string()), ("offset", pa.int64()), ("length", pa.int32()),
    ("scales_offset", pa.int64()), ("scales_length", pa.int32()), ("n_tokens", pa.int32()),
    ("n_vectors", pa.int32()), ("checksum", pa.int64()), ("text_sha256", pa.string()),
])
_RAW = ("memory", "scales")
_WRITE_OPTIONS = {
    "compression": {name: ("NONE" if name in _RAW else "ZSTD") for name in DATA_SCHEMA.names},
    "use_dictionary": [name for name in DATA_SCHEMA.names if name not in _RAW],
    "write_statistics": [name for name in DATA_SCHEMA.names if name not in _RAW],
    "column_encoding": {name: "PLAIN" for name in _RAW},
    "data_page_size": 1 << 30, "data_page_version": "1.0",
}


def new_file_name() -> str:
    return f"part-{uuid.uuid4().hex}.parquet"


def index_url(store_url: str, file: str) -> str:
    return fsio.join_url(store_url, INDEX_DIR, file)


def as_data_table(table: pa.Table) -> pa.Table:
    """The data columns, in order, with the data file's types (extra columns are dropped)."""
    return pa.table([table.column(n).cast(DATA_SCHEMA.field(n).type) for n in DATA_SCHEMA.names], schema=DATA_SCHEMA)


def _value_offsets(data: bytes, values: list[bytes | None], lo: int, hi: int, what: str) -> list[int]:
    """Where each (non-null) value's bytes start in ``data[lo:hi]``, found in order after its length prefix."""
    out, pos = [], lo
    for v in values:
        if v is None:
            out.append(-1)
            continue
        at = data.find(len(v).to_bytes(4, "little") + v, pos, hi)
        if at < 0:
            raise RuntimeError(f"internal error: a {what} value was not found PLAIN-encoded in its column chunk "
                               "(pyarrow wrote an unexpected layout); point lookups cannot be indexed")
        out.append(at + 4)
        pos = at + 4 + len(v)
    return out


def _chunk_range(meta: pq.FileMetaData, name: str) -> tuple[int, int]:
    col = meta.row_group(0).column(DATA_SCHEMA.names.index(name))
    start = min(x for x in (col.dictionary_page_offset, col.data_page_offset) if x is not None and x > 0)
    return start, start + col.total_compressed_size


def encode_data_file(table: pa.Table, file: str) -> tuple[bytes, pa.Table]:
    """Parquet bytes of one data file (one row group) and its index table (byte ranges of every memory)."""
    table = as_data_table(table)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=max(1, table.num_rows), **_WRITE_OPTIONS)
    data = buf.getvalue()
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    memories, scales = table.column("memory").to_pylist(), table.column("scales").to_pylist()
    offsets = _value_offsets(data, memories, *_chunk_range(meta, "memory"), "memory")
    scale_offsets = _value_offsets(data, scales, *_chunk_range(meta, "scales"), "scales")
    index = pa.table({
        "doc_id": table.column("doc_id"), "file": pa.array([file] * table.num_rows, pa.string()),
        "offset": pa.array(offsets, pa.int64()), "length": pa.array([len(m) for m in memories], pa.int32()),
        "scales_offset": pa.array(scale_offsets, pa.int64()),
        "scales_length": pa.array([-1 if s is None else len(s) for s in scales], pa.int32()),
        "n_tokens": table.column("n_tokens"), "n_vectors": table.column("n_vectors"),
        "checksum": table.column("checksum"), "text_sha256": table.column("text_sha256"),
    }, schema=INDEX_SCHEMA)
    return data, index


def index_bytes(index: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(index, buf, compression="zstd")
    return buf.getvalue()


def write_data_file(store_url: str, table: pa.Table, storage_options: dict | None = None) -> dict:
    """Write one data file and then its index (each atomically); returns what the commit needs to add it.

    Nothing is visible to readers until a commit adds the file to the table; an uncommitted file is an orphan that
    ``vacuum`` removes.
    """
    file = new_file_name()
    data, index = encode_data_file(table, file)
    fsio.write_bytes_atomic(fsio.join_url(store_url, file), data, storage_options)
    fsio.write_bytes_atomic(index_url(store_url, file), index_bytes(index), storage_options)
    return {"path": file, "size": len(data), "rows": table.num_rows}


def read_index(store_url: str, file: str, storage_options: dict | None = None) -> pa.Table:
    with fsio.open_input(index_url(store_url, file), storage_options) as f:
        return pq.read_table(f, schema=INDEX_SCHEMA)


def read_indexes(store_url: str, files: list[str], storage_options: dict | None = None,
                 threads: int = 16) -> dict[str, pa.Table | Exception]:
    """Each file's index (or the exception reading it raised), read in parallel."""
    def one(file: str):
        try:
            return read_index(store_url, file, storage_options)
        except Exception as e:  # noqa: BLE001 - reported per file by the caller, never fatal for the other files
            return e

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        return dict(zip(files, pool.map(one, files)))


def read_data_file(store_url: str, file: str, columns: list[str] | None = None,
                   storage_options: dict | None = None) -> pa.Table:
    with fsio.open_input(fsio.join_url(store_url, file), storage_options) as f:
        return pq.read_table(f, columns=columns)
