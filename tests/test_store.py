"""Contract tests for the memory store (kalm_batch.store): a Delta table built, opened at a version, fetched from by
ranged reads, refreshed, deleted from, time-travelled, damaged, and written by two writers at once.

Stores are built in-process with ``build_store`` from the tiny random model, on file:// (tmp_path) and on s3:// (the
local moto server, tests marked ``s3``). Expected values always come from encoding the same passages directly.
"""

from __future__ import annotations

import io
import logging
import os
import stat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import kalm_batch
from kalm_batch import KaLMReranker, Memory, fsio
from kalm_batch.codec import CorruptRecordError, decode_memory, quantize
from kalm_batch.model import ModelFingerprint
from kalm_batch.store import (
    ConcurrentWriterError,
    IncompleteStoreError,
    OldLayoutError,
    StoreMismatchError,
    StoreVersionError,
    StoreWriter,
    build_store,
    check_compatible,
    open_store,
)
from kalm_batch.store.settings import SCHEMA_VERSION, delta_options, table_uri
from kalm_batch.store.writer import memory_table, settings_for, text_hash

MAX_LENGTH = 64
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


# ----------------------------------------------------------------------------------------------- helpers & fixtures
def make_docs(n: int, prefix: str = "d") -> dict[str, str]:
    """Passages of varied length; every seventh one is longer than MAX_LENGTH tokens (truncated)."""
    docs = {}
    for i in range(n):
        n_words = 40 if i % 7 == 3 else 1 + (i * 3) % 11
        docs[f"{prefix}{i}"] = f"{prefix} {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n_words))
    return docs


@pytest.fixture(scope="module")
def reranker(tiny_model_dir):
    """reranker(ratio, max_length, model_dir): float32 CPU rerankers, one per setting, shared by the module."""
    made: dict = {}

    def get(ratio: int = 4, max_length: int = MAX_LENGTH, model_dir=None) -> KaLMReranker:
        key = (ratio, max_length, str(model_dir or tiny_model_dir))
        if key not in made:
            made[key] = KaLMReranker(key[2], max_length=max_length, chunk_size=ratio, dtype="float32", batch_size=16)
        return made[key]

    return get


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    from kalm_batch.tiny import write_random_model

    return write_random_model(tmp_path_factory.mktemp("tiny-model-seed1") / "model", shape="tiny", seed=1)


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def root(request, tmp_path) -> str:
    """A base URL under which a test creates its stores: file://<tmp_path>/stores or s3://<fresh bucket>/stores."""
    if request.param == "file":
        return "file://" + str(tmp_path / "stores")
    return request.getfixturevalue("s3_bucket") + "/stores"


def encoded(rr: KaLMReranker, docs: dict[str, str], ratio=None) -> dict:
    """Direct encodings, in the same order (hence the same batches) as build_store of a single shard uses."""
    kwargs = {} if ratio is None else {"ratio": ratio}
    return dict(zip(docs, rr.encode(list(docs.values()), **kwargs)))


def shardwise_encoded(rr, docs: dict[str, str], shard_rows: int) -> dict:
    """Expected memories for a store built with ``shard_rows`` (build_store encodes file by file)."""
    items = list(docs.items())
    out = {}
    for start in range(0, len(items), shard_rows):
        out.update(encoded(rr, dict(items[start:start + shard_rows])))
    return out


def quantized(memories: dict, dtype: str) -> dict:
    return {d: Memory(torch.from_numpy(quantize(m.to_numpy(), dtype)), m.n_tokens, m.ratio)
            for d, m in memories.items()}


def delta(url: str, version: int | None = None):
    """The store's table opened with deltalake alone."""
    import deltalake

    return deltalake.DeltaTable(table_uri(url), version=version, storage_options=delta_options(url))


def data_files(url: str, version: int | None = None) -> list[str]:
    return delta(url, version).get_add_actions(flatten=True).column("path").to_pylist()


def local_path(url: str) -> str:
    return fsio.url_to_fs(url)[1]


def assert_same_memories(got: dict, want: dict, atol: float = 0.0) -> None:
    assert set(got) == set(want)
    for d, w in want.items():
        g = got[d]
        assert (g.n_tokens, g.ratio, tuple(g.vectors.shape)) == (w.n_tokens, w.ratio, tuple(w.vectors.shape)), d
        np.testing.assert_allclose(g.vectors.numpy(), w.to_numpy(), rtol=0, atol=atol, err_msg=d)


class CountingEncoder:
    """The reranker, counting the passages it encodes (refresh must encode only what changed)."""

    def __init__(self, rr):
        self.rr, self.texts = rr, []

    def __getattr__(self, name):
        return getattr(self.rr, name)

    def encode(self, texts, **kw):
        self.texts += list(texts)
        return self.rr.encode(texts, **kw)


# ----------------------------------------------------------------------------------------------- the table
def test_a_store_is_a_delta_table_that_other_tools_read(root, reranker):
    """deltalake and Polars alone (no kalm-batch reader) see the same ids and memory bytes at the same version."""
    import polars as pl

    rr, docs, url = reranker(4), make_docs(12), fsio.join_url(root, "m")
    commit = build_store(url, rr, docs, shard_rows=5)
    assert (commit.version, commit.new, commit.refreshed, commit.deleted, commit.files_added) == (0, 12, 0, 0, 3)
    reader = open_store(url)
    assert (reader.version, len(reader)) == (0, 12)
    assert (reader.ratio, reader.dtype, reader.hidden_size, reader.codec) == (4, "bfloat16", rr.hidden_size,
                                                                                "byteplane+zstd")
    assert reader.fingerprint == rr.fingerprint.to_dict()
    s = reader.summary()
    assert (s["url"], s["version"], s["rows"], s["files"], s["model_id"]) == (url, 0, 12, 3, rr.fingerprint.model_id)
    assert (s["schema_version"], s["package_version"], s["max_length"]) == (SCHEMA_VERSION, kalm_batch.__version__,
                                                                             MAX_LENGTH)
    tokens = {d: len(ids) for d, ids in zip(docs, rr.tokenize_documents(list(docs.values())))}
    assert s["tokens"] == sum(tokens.values()) and s["vectors"] == sum(-(-n // 4) for n in tokens.values())

    table = delta(url).to_pyarrow_table()
    assert sorted(table.column("doc_id").to_pylist()) == sorted(docs)
    assert dict(zip(table.column("doc_id").to_pylist(), table.column("n_tokens").to_pylist())) == tokens
    assert s["memory_bytes"] == sum(len(p) for p in table.column("memory").to_pylist())
    opts = delta_options(url)
    frame = pl.read_delta(table_uri(url), version=0, storage_options=opts or None)
    assert sorted(frame["doc_id"].to_list()) == sorted(docs)
    got = reader.fetch(list(docs)).memories
    for row in frame.iter_rows(named=True):  # the bytes other tools read decode to what kalm-batch serves
        arr = decode_memory(row["memory"], row["scales"], row["checksum"], row["n_vectors"], reader.hidden_size,
                            reader.dtype)
        np.testing.assert_array_equal(arr, got[row["doc_id"]].to_numpy())


@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_stored_memories_decode_to_the_quantized_encodings(tmp_path, reranker, dtype, ratio):
    rr, docs, url = reranker(ratio), make_docs(10), str(tmp_path / "s")
    build_store(url, rr, docs, dtype=dtype, shard_rows=64)
    want = encoded(rr, docs)
    reader = open_store(url)
    got = reader.fetch(list(docs))
    assert got.missing == [] and got.corrupt == {}
    assert reader.codec == ("int8-absmax+zstd" if dtype == "int8" else "byteplane+zstd")
    for d, w in want.items():
        g = got.memories[d]
        assert (g.n_tokens, g.ratio, g.vectors.dtype) == (w.n_tokens, ratio, w.vectors.dtype)
        raw, dec = w.to_numpy(), g.vectors.numpy()
        np.testing.assert_array_equal(dec, quantize(raw, dtype), err_msg=d)
        if dtype == "float32":
            np.testing.assert_array_equal(dec, raw)
        if dtype == "int8":  # per-vector absmax scaling: error at most half a quantization step
            step = np.abs(raw).max(axis=1, keepdims=True) / 127.0
            assert np.all(np.abs(dec - raw) <= step / 2 * (1 + 1e-5) + 1e-30), d
    if dtype == "int8":
        table = delta(url).to_pyarrow_table()
        payload = sum(len(p) for p in table.column("memory").to_pylist())
        assert reader.summary()["memory_bytes"] == payload + 4 * reader.summary()["vectors"]


# ----------------------------------------------------------------------------------------------- fetch
@pytest.mark.parametrize("r0", [1, 4])
def test_fetch_at_every_ratio_equals_encoding_at_that_ratio(root, reranker, r0):
    rr, docs, url = reranker(r0), make_docs(9), fsio.join_url(root, f"r{r0}")
    build_store(url, rr, docs, dtype="float32")
    reader = open_store(url)
    assert reader.ratios == [r for r in (1, 2, 4, 8, 16, 32) if r % r0 == 0]
    for r in reader.ratios:
        got = reader.fetch(list(docs), ratio=r)
        assert_same_memories(got.memories, encoded(rr, docs, ratio=r), atol=1e-6)
    assert_same_memories(reader.fetch(list(docs)).memories, encoded(rr, docs), atol=0.0)  # default: r0


def test_check_ratio_accepts_any_positive_multiple_of_r0(tmp_path, reranker):
    url = str(tmp_path / "s")
    build_store(url, reranker(4), make_docs(3))
    reader = open_store(url)
    assert (reader.check_ratio(None), reader.check_ratio(4), reader.check_ratio(12), reader.check_ratio(64)) == (
        4, 4, 12, 64)
    for bad in (1, 2, 3, 0, -4, 6, True, 4.0):
        with pytest.raises(ValueError, match="multiple of 4"):
            reader.check_ratio(bad)
    with pytest.raises(ValueError, match="multiple of 4"):
        reader.get("d0", ratio=2)
    m12 = reader.get("d0", ratio=12)
    assert m12.ratio == 12 and m12.vectors.shape[0] == -(-m12.n_tokens // 12)


class FsCounter:
    """Count what the reader's filesystem is asked for: ranged reads (requests, bytes) and whole-file opens."""

    def __init__(self, monkeypatch, reader):
        self.ranges, self.bytes, self.opened = 0, 0, []
        fs = reader._fs
        real_ranges = fs.cat_ranges

        def cat_ranges(paths, starts, ends, **kw):
            self.ranges += len(paths)
            out = real_ranges(paths, starts, ends, **kw)
            self.bytes += sum(len(b) for b in out if isinstance(b, bytes))
            return out

        monkeypatch.setattr(fs, "cat_ranges", cat_ranges)
        real_open = fsio.open_input
        monkeypatch.setattr(fsio, "open_input", lambda url, so=None: self.opened.append(url) or real_open(url, so))


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_cold_lookup_reads_about_one_passage(tmp_path, reranker, monkeypatch, dtype):
    rr, docs, url = reranker(1), make_docs(200), str(tmp_path / "big")
    build_store(url, rr, docs, dtype=dtype, shard_rows=100)
    want = quantized(encoded(rr, docs), dtype)
    opened = []
    real_open = fsio.open_input
    monkeypatch.setattr(fsio, "open_input", lambda u, so=None: opened.append(u) or real_open(u, so))
    reader = open_store(url, cache_bytes=0)
    monkeypatch.setattr(fsio, "open_input", real_open)
    assert opened and all("/_kalm/index/" in u for u in opened)  # opening read the indexes, no data file

    count = FsCounter(monkeypatch, reader)
    table = delta(url).to_pyarrow_table()
    nbytes = dict(zip(table.column("doc_id").to_pylist(), table.column("nbytes").to_pylist()))
    target = "d150"
    got = reader.fetch([target])
    assert_same_memories(got.memories, {target: want[target]}, atol=0 if dtype != "int8" else 1e-6)
    per_value = 2 if dtype == "int8" else 1  # the int8 scales are a second column chunk
    assert count.ranges == per_value and count.opened == []  # no footer, no row group
    assert count.bytes == nbytes[target] + 4 * per_value  # the payload (+ scales) and their length prefixes

    count.ranges = count.bytes = 0
    some = [f"d{i}" for i in range(0, 200, 10)]
    assert_same_memories(reader.fetch(some).memories, {d: want[d] for d in some},
                         atol=0 if dtype != "int8" else 1e-6)
    assert count.ranges <= per_value * len(some) and count.opened == []
    assert count.bytes <= sum(nbytes[d] for d in some) + 4 * per_value * len(some) + 4096 * count.ranges


def test_a_stale_index_falls_back_to_reading_the_row(tmp_path, reranker, monkeypatch):
    rr, docs, url = reranker(4), make_docs(8), str(tmp_path / "s")
    build_store(url, rr, docs, dtype="float32")
    (file,) = data_files(url)
    index_path = os.path.join(local_path(url), "_kalm", "index", file)
    index = pq.read_table(index_path)
    shifted = pa.compute.add(index.column("offset"), 3)
    pq.write_table(index.set_column(index.schema.get_field_index("offset"), "offset", shifted), index_path)
    reader = open_store(url)
    got = reader.fetch(list(docs))
    assert got.corrupt == {} and got.missing == []
    assert_same_memories(got.memories, encoded(rr, docs))


def test_unknown_ids_are_missing_not_errors(root, reranker):
    rr, docs, url = reranker(4), make_docs(5), fsio.join_url(root, "s")
    build_store(url, rr, docs)
    reader = open_store(url)
    got = reader.fetch(["d1", "nope", "d3", "", "nope"])
    assert sorted(got.memories) == ["d1", "d3"]
    assert got.missing == ["nope", ""] and got.corrupt == {}
    assert "nope" not in reader and "d1" in reader
    assert reader.file_of("nope") is None and reader.file_of("d1") == data_files(url)[0]
    with pytest.raises(KeyError, match="nope"):
        reader.get("nope")
    assert reader.get("d1").n_tokens == got.memories["d1"].n_tokens


def test_index_files_list_each_doc_once_with_its_data_file(root, reranker):
    rr, docs, url = reranker(4), make_docs(11), fsio.join_url(root, "s")
    build_store(url, rr, docs, shard_rows=4)
    build_store(url, rr, {**docs, "d2": "edited", "new": "a new passage"}, shard_rows=4)  # refresh: files rewritten
    reader = open_store(url)
    urls = reader.index_files()
    assert len(urls) == len(data_files(url))
    index = pa.concat_tables([pq.read_table(io.BytesIO(fsio.read_bytes(u)), columns=["doc_id", "file"]) for u in urls])
    pairs = list(zip(index.column("doc_id").to_pylist(), index.column("file").to_pylist()))
    assert sorted(d for d, _ in pairs) == sorted([*docs, "new"])  # each doc once
    assert all(reader.file_of(d) == f for d, f in pairs)
    assert set(index.column("file").to_pylist()) == set(data_files(url))


def test_cache_counts_hits_and_stays_within_its_byte_budget(tmp_path, reranker):
    rr, docs, url = reranker(4), make_docs(12), str(tmp_path / "s")
    build_store(url, rr, docs, dtype="float32")
    want = encoded(rr, docs)
    reader = open_store(url)
    reader.fetch(["d2"])
    assert reader.cache_info()["hits"] == 0 and reader.cache_info()["entries"] == 1
    again = reader.fetch(["d2", "d5"])
    assert reader.cache_info()["hits"] == 1 and reader.cache_info()["misses"] == 2
    assert_same_memories(again.memories, {d: want[d] for d in ("d2", "d5")})
    small = open_store(url, cache_bytes=want["d0"].to_numpy().nbytes + 1)
    small.fetch(list(docs))
    assert small.cache_info()["bytes"] <= small.cache_info()["max_bytes"]


# ----------------------------------------------------------------------------------------------- damage
def _flip_payload_bytes(url: str, doc_id: str) -> str:
    """Flip bytes inside one stored memory, in place in its data file; returns the file name."""
    reader = open_store(url)
    file = reader.file_of(doc_id)
    index = pq.read_table(os.path.join(local_path(url), "_kalm", "index", file)).to_pylist()
    row = next(r for r in index if r["doc_id"] == doc_id)
    path = os.path.join(local_path(url), file)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    for i in range(row["offset"] + row["length"] // 2, row["offset"] + row["length"] // 2 + 4):
        data[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))
    return file


def test_a_corrupt_record_is_reported_and_its_neighbours_still_decode(tmp_path, reranker):
    rr, docs, url = reranker(4), make_docs(10), str(tmp_path / "s")
    build_store(url, rr, docs, dtype="float32", shard_rows=5)
    file = _flip_payload_bytes(url, "d3")
    reader = open_store(url)
    got = reader.fetch(list(docs))
    assert list(got.corrupt) == ["d3"] and got.missing == []
    message = got.corrupt["d3"]
    assert file in message and "version 0" in message and "'d3'" in message and url in message
    assert_same_memories(got.memories, {d: m for d, m in encoded(rr, docs).items() if d != "d3"})
    with pytest.raises(CorruptRecordError, match=file):
        reader.get("d3")
    report = reader.verify()
    assert (report["records_ok"], report["records_corrupt"], list(report["corrupt"])) == (9, 1, ["d3"])


def test_a_truncated_data_file_stays_partial(root, reranker, caplog):
    """One of three data files cut to 60%: reported once (file, version, its ids); the rest is served and verified."""
    rr, docs, url = reranker(4), make_docs(12), fsio.join_url(root, "s")
    build_store(url, rr, docs, dtype="float32", shard_rows=4)
    reader = open_store(url)
    victim = reader.file_of("d5")
    lost = sorted(d for d in docs if reader.file_of(d) == victim)
    data = fsio.read_bytes(fsio.join_url(url, victim))
    fsio.write_bytes_atomic(fsio.join_url(url, victim), data[: int(len(data) * 0.6)])
    reader = open_store(url, cache_bytes=0)
    with caplog.at_level(logging.ERROR, logger="kalm_batch.store.reader"):
        got = reader.fetch(list(docs))
        again = reader.fetch(lost)
    assert sorted(got.corrupt) == lost == sorted(again.corrupt) and got.missing == []
    assert all(victim in m and "version 0" in m for m in got.corrupt.values())
    assert_same_memories(got.memories, {d: m for d, m in encoded(rr, docs).items() if d not in lost}, atol=0)
    assert sum(victim in r.getMessage() for r in caplog.records) == 1  # reported once
    report = reader.verify()
    assert report["records_ok"] == len(docs) - len(lost) and sorted(report["corrupt"]) == lost
    assert list(report["bad_files"]) == [victim]
    assert report["bad_files"][victim]["version"] == 0 and sorted(report["bad_files"][victim]["doc_ids"]) == lost


def test_store_files_are_readable_by_others_as_the_umask_allows(tmp_path, reranker):
    old = os.umask(0o022)
    try:
        url = str(tmp_path / "s")
        build_store(url, reranker(4), make_docs(3))
    finally:
        os.umask(old)
    root = local_path(url)
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    assert any(f.endswith(".parquet") for f in files)
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) & 0o044 == 0o044, f


# ----------------------------------------------------------------------------------------------- versions
def test_refresh_replaces_changed_adds_new_deletes_missing_and_keeps_old_versions(root, reranker):
    rr, url = reranker(4), fsio.join_url(root, "s")
    docs = make_docs(10)
    build_store(url, rr, docs, dtype="float32", shard_rows=4)
    v1 = shardwise_encoded(rr, docs, 4)
    changed = {**docs, "d2": "d2 was edited today", "n1": "a brand new passage"}
    del changed["d7"]
    counting = CountingEncoder(rr)
    commit = build_store(url, counting, changed, dtype="float32", shard_rows=4, delete_missing=True)
    assert sorted(counting.texts) == sorted(["d2 was edited today", "a brand new passage"])  # nothing else encoded
    assert (commit.version, commit.new, commit.refreshed, commit.deleted) == (1, 1, 1, 1)
    latest = open_store(url)
    assert latest.version == 1 and sorted(delta(url).to_pyarrow_table().column("doc_id").to_pylist()) == sorted(
        changed)  # each id once, as deltalake itself sees it
    want = {**{d: m for d, m in v1.items() if d in changed}, **encoded(rr, {d: changed[d] for d in ("d2", "n1")})}
    assert_same_memories(latest.fetch(list(changed)).memories, want)
    old = open_store(url, version=0)  # time travel: version 0 is untouched
    assert old.version == 0 and len(old) == 10 and "n1" not in old
    assert_same_memories(old.fetch(list(docs)).memories, v1)
    assert build_store(url, CountingEncoder(rr), changed, dtype="float32", delete_missing=True) is None  # no-op
    assert open_store(url).version == 1
    kept = build_store(url, rr, {"d0": docs["d0"]}, dtype="float32")  # without delete_missing nothing is removed
    assert kept is None and len(open_store(url)) == len(changed)


def test_no_refresh_keeps_stale_memories(tmp_path, reranker):
    rr, url, docs = reranker(4), str(tmp_path / "s"), make_docs(4)
    build_store(url, rr, docs, dtype="float32")
    counting = CountingEncoder(rr)
    assert build_store(url, counting, {**docs, "d1": "edited"}, dtype="float32", refresh=False) is None
    assert counting.texts == []
    assert_same_memories(open_store(url).fetch(["d1"]).memories, {"d1": encoded(rr, docs)["d1"]})


def test_a_version_that_does_not_exist_is_a_clear_error(tmp_path, reranker):
    url = str(tmp_path / "s")
    build_store(url, reranker(4), make_docs(2))
    build_store(url, reranker(4), make_docs(3))
    for bad in (2, 99, -1):
        with pytest.raises(StoreVersionError, match=r"has no version .*versions are 0\.\.1"):
            open_store(url, version=bad)
    assert (open_store(url, version=0).version, len(open_store(url, version=0)), len(open_store(url))) == (0, 2, 3)


def test_no_store_and_an_old_layout_store_are_refused_with_what_to_do(tmp_path, reranker):
    with pytest.raises(IncompleteStoreError, match="kalm-batch encode"):
        open_store(str(tmp_path / "nothing here"))
    old = tmp_path / "old"
    (old / "shards").mkdir(parents=True)
    (old / "manifest.json").write_text('{"schema_version": 1}')
    with pytest.raises(OldLayoutError, match="old layout.*Re-encode"):
        open_store(str(old))
    with pytest.raises(OldLayoutError, match="--overwrite"):
        build_store(str(old), reranker(4), make_docs(2))
    build_store(str(old), reranker(4), make_docs(2), overwrite=True)
    assert len(open_store(str(old))) == 2 and not (old / "manifest.json").exists()


def test_other_settings_are_refused_and_overwrite_is_a_new_version(tmp_path, reranker):
    url = str(tmp_path / "s")
    build_store(url, reranker(4), make_docs(4))
    with pytest.raises(StoreMismatchError, match="ratio: 4 .store. != 8"):
        build_store(url, reranker(8), make_docs(4))
    with pytest.raises(StoreMismatchError, match="dtype"):
        build_store(url, reranker(4), make_docs(4), dtype="int8")
    commit = build_store(url, reranker(8), make_docs(3), overwrite=True)
    assert commit.version == 2  # 1 = the overwrite (new settings, no rows), 2 = the rows
    now, before = open_store(url), open_store(url, version=0)
    assert (now.ratio, len(now), before.ratio, len(before)) == (8, 3, 4, 4)


@pytest.mark.parametrize(("where", "fresh"), [("file", False), ("file", True),
                                               pytest.param("s3", False, marks=pytest.mark.s3),
                                               pytest.param("s3", True, marks=pytest.mark.s3)])
def test_two_writers_at_once_one_commits_the_other_gets_a_clear_error(request, tmp_path, reranker, where, fresh):
    """On an existing store (a version conflict) and on a fresh one (both create the table): one wins."""
    rr = reranker(4)
    url = (request.getfixturevalue("s3_bucket") if where == "s3" else "file://" + str(tmp_path)) + "/store"
    before = {} if fresh else make_docs(4)
    if before:
        build_store(url, rr, before)
    base = -1 if fresh else 0
    settings = settings_for(rr, dtype="bfloat16", text_join="as_given")
    a, b = StoreWriter(url, settings, storage_options=None), StoreWriter(url, settings)
    a.prepare()
    b.prepare()
    docs = {"x1": "one passage", "d1": "d1 edited by both writers"}

    def table(prefix: str):
        mems = rr.encode([prefix + t for t in docs.values()])
        return memory_table(list(docs), mems, [text_hash(prefix + t) for t in docs.values()], ["t"] * 2, [0, 1],
                            "bfloat16", 3)

    fa, fb = a.write(table("a: ")), b.write(table("b: "))
    assert a.commit([fa]).version == base + 1
    with pytest.raises(ConcurrentWriterError, match=rf"another writer committed version {base + 1} of .* re-running"):
        b.commit([fb])
    reader = open_store(url)
    assert reader.version == base + 1 and len(reader) == len({*before, *docs})
    ids = delta(url).to_pyarrow_table().column("doc_id").to_pylist()
    assert sorted(ids) == sorted({*before, *docs})  # nothing of writer b, nothing twice
    assert_same_memories(reader.fetch(["x1"]).memories,
                         quantized({"x1": rr.encode(["a: one passage"])[0]}, "bfloat16"))


def test_a_doc_id_repeated_in_new_files_is_stored_once(tmp_path, reranker):
    rr, url = reranker(4), str(tmp_path / "s")
    settings = settings_for(rr, dtype="float32", text_join="as_given")
    w = StoreWriter(url, settings)
    w.prepare()
    mems = rr.encode(["first", "second", "third"])
    t1 = memory_table(["dup", "dup", "other"], mems, ["h1", "h2", "h3"], ["s"] * 3, [0, 1, 2], "float32", 3)
    t2 = memory_table(["dup"], mems[2:], ["h3"], ["s"], [3], "float32", 3)
    commit = w.commit([w.write(t1), w.write(t2)])
    assert commit.new == 2
    reader = open_store(url)
    assert sorted(delta(url).to_pyarrow_table().column("doc_id").to_pylist()) == ["dup", "other"]
    assert_same_memories(reader.fetch(["dup", "other"]).memories, {"dup": mems[0], "other": mems[2]})


# ----------------------------------------------------------------------------------------------- model checks
def test_check_compatible_accepts_the_encoding_model_only(tmp_path, reranker, other_model_dir, caplog):
    rr, url = reranker(4), str(tmp_path / "s")
    build_store(url, rr, make_docs(2))
    reader = open_store(url)
    check_compatible(reader, rr)
    check_compatible(reader, reranker(4, max_length=32))  # same model, other settings: still the same model
    other = reranker(4, model_dir=other_model_dir)
    with pytest.raises(StoreMismatchError, match="Score with the model that made the store, or re-encode") as err:
        check_compatible(reader, other)
    message = str(err.value)
    assert "weights_sha256" in message and url in message and "version 0" in message
    with caplog.at_level(logging.WARNING):
        check_compatible(reader, other, allow_mismatch=True)
    assert "MISMATCH" in caplog.text

    class Wider:
        hidden_size = rr.hidden_size * 2
        fingerprint = rr.fingerprint

    with pytest.raises(StoreMismatchError, match="wide memories"):
        check_compatible(reader, Wider(), allow_mismatch=True)


def test_a_fingerprint_with_another_config_is_named(tmp_path, reranker):
    rr, url = reranker(4), str(tmp_path / "s")
    build_store(url, rr, make_docs(2))

    class Other:
        hidden_size = rr.hidden_size
        fingerprint = ModelFingerprint(model_id="someone/other-reranker", revision="abc123", config_sha256="0" * 64,
                                       tokenizer_sha256=rr.fingerprint.tokenizer_sha256,
                                       weights_sha256=rr.fingerprint.weights_sha256)

    with pytest.raises(StoreMismatchError, match="Score with the model that made the store, or re-encode") as err:
        check_compatible(open_store(url), Other())
    message = str(err.value)
    assert repr(rr.fingerprint.model_id) in message and "'someone/other-reranker'" in message
    assert "config_sha256" in message and "tokenizer_sha256" not in message


def test_the_same_model_under_another_path_is_the_same_model(tmp_path, reranker, tiny_model_dir):
    import shutil

    url = str(tmp_path / "s")
    build_store(url, reranker(4), make_docs(2))
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy of the model")
    moved = reranker(4, model_dir=copy)
    check_compatible(open_store(url), moved)
    assert build_store(url, moved, make_docs(3)).new == 1  # refreshing from the other path is allowed


# ----------------------------------------------------------------------------------------------- awkward names
AWKWARD_IDS = ["with space", "ünïcödé 文档 🤖", "a/b/../c", "x" * 500, "tab\there", "'quote\"", "d0"]


@pytest.mark.parametrize("where", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_awkward_doc_ids_and_store_urls(request, tmp_path, reranker, where):
    rr = reranker(4)
    if where == "s3":
        url = request.getfixturevalue("s3_bucket") + "/my stores ünï/store 1"
    else:
        url = str(tmp_path / "my stores ünï 文档" / "store 1")
    docs = [(d, f"passage for {d[:20]}") for d in AWKWARD_IDS] + [("d0", "a later duplicate is ignored")]
    commit = build_store(url, rr, docs, dtype="float32", shard_rows=3)
    assert commit.new == len(AWKWARD_IDS)
    reader = open_store(url)
    assert all(d in reader for d in AWKWARD_IDS)
    got = reader.fetch(AWKWARD_IDS)
    assert got.missing == [] and got.corrupt == {}
    assert_same_memories(got.memories, shardwise_encoded(rr, dict(docs[:len(AWKWARD_IDS)]), 3))
    assert reader.verify()["records_ok"] == len(AWKWARD_IDS)
    if not url.startswith("s3://"):
        again = open_store("file://" + url)
        assert len(again) == len(AWKWARD_IDS) and again.get("x" * 500).n_tokens == got.memories["x" * 500].n_tokens
