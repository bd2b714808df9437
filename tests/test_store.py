"""Contract tests for the memory store (kalm_batch.store): build, open, fetch, cache, corruption and commit protocol.

Stores are built in-process with ``build_store`` from the tiny random model, on file:// (tmp_path) and on s3:// (the
local moto server, tests marked ``s3``). Expected values always come from encoding the same passages directly.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import kalm_batch
from kalm_batch import KaLMReranker, Memory, fsio
from kalm_batch.codec import CorruptRecordError, quantize
from kalm_batch.model import ModelFingerprint
from kalm_batch.store import IncompleteStoreError, StoreError, StoreMismatchError, build_store, open_store, writer
from kalm_batch.store.manifest import SCHEMA_VERSION

MAX_LENGTH = 64
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


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
    """Expected memories for a store built with ``shard_rows`` (build_store encodes shard by shard)."""
    items = list(docs.items())
    out = {}
    for start in range(0, len(items), shard_rows):
        out.update(encoded(rr, dict(items[start:start + shard_rows])))
    return out


def quantized(memories: dict, dtype: str) -> dict:
    return {d: Memory(torch.from_numpy(quantize(m.to_numpy(), dtype)), m.n_tokens, m.ratio)
            for d, m in memories.items()}


def shard_urls(url: str) -> list[str]:
    return fsio.list_files(fsio.join_url(url, writer.SHARDS_DIR), ".parquet")


def read_table(url: str) -> pa.Table:
    return pq.read_table(io.BytesIO(fsio.read_bytes(url)))


def stored_ids(url: str) -> list[str]:
    """Every doc id in every shard file (duplicates included)."""
    return [d for u in shard_urls(url) for d in read_table(u).column("doc_id").to_pylist()]


def column_values(url: str, name: str) -> list:
    return [v for u in shard_urls(url) for v in read_table(u).column(name).to_pylist()]


def file_size(url: str) -> int:
    return len(fsio.read_bytes(url))


def write_table(url: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=writer.ROW_GROUP_ROWS)
    fsio.write_bytes_atomic(url, buf.getvalue())


def replace_cell(table: pa.Table, column: str, row: int, value) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    i = table.schema.get_field_index(column)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def assert_same_memories(got: dict, want: dict, atol: float = 0.0) -> None:
    assert set(got) == set(want)
    for d, w in want.items():
        g = got[d]
        assert (g.n_tokens, g.ratio, tuple(g.vectors.shape)) == (w.n_tokens, w.ratio, tuple(w.vectors.shape)), d
        np.testing.assert_allclose(g.vectors.numpy(), w.to_numpy(), rtol=0, atol=atol, err_msg=d)


# ----------------------------------------------------------------------------------------------- build & open
def test_manifest_describes_exactly_what_the_shards_hold(root, reranker):
    rr, docs, url = reranker(4), make_docs(12), fsio.join_url(root, "m")
    returned = build_store(url, rr, docs, shard_rows=5)
    reader = open_store(url)
    m = reader.manifest
    assert m == returned
    assert (m.schema_version, m.package_version) == (SCHEMA_VERSION, kalm_batch.__version__)
    assert m.fingerprint == rr.fingerprint.to_dict()
    assert (m.ratio, m.dtype, m.max_length, m.hidden_size) == (4, "bfloat16", MAX_LENGTH, rr.hidden_size)
    assert m.input["stored_new"] == 12

    urls = shard_urls(url)
    assert [u.rsplit("/", 1)[-1] for u in urls] == [s.name for s in m.shards] and len(urls) == 3  # 5 + 5 + 2
    tables = []
    for u, info in zip(urls, m.shards):
        data = fsio.read_bytes(u)
        assert (info.sha256, info.bytes) == (hashlib.sha256(data).hexdigest(), len(data))
        tables.append(pq.read_table(io.BytesIO(data)))
        assert info.rows == tables[-1].num_rows
    table = pa.concat_tables(tables)
    assert sorted(table.column("doc_id").to_pylist()) == sorted(docs)
    tokens = {d: len(ids) for d, ids in zip(docs, rr.tokenize_documents(list(docs.values())))}
    assert dict(zip(table.column("doc_id").to_pylist(), table.column("n_tokens").to_pylist())) == tokens
    assert max(tokens.values()) == MAX_LENGTH
    assert m.rows == len(reader) == 12
    assert m.tokens == sum(tokens.values())
    assert m.vectors == sum(-(-n // 4) for n in tokens.values()) == sum(table.column("n_vectors").to_pylist())
    assert m.memory_bytes == sum(len(p) for p in table.column("memory").to_pylist())  # no int8 scales here
    assert m.shard_bytes == sum(s.bytes for s in m.shards)

    index = fsio.read_bytes(fsio.join_url(url, m.index.name))
    assert m.index.sha256 == hashlib.sha256(index).hexdigest()
    assert m.index.rows == pq.read_table(io.BytesIO(index)).num_rows == m.rows
    summary = m.summary()
    assert (summary["rows"], summary["shards"], summary["ratio"], summary["dtype"]) == (12, 3, 4, "bfloat16")


@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_stored_memories_decode_to_the_quantized_encodings(tmp_path, reranker, dtype, ratio):
    rr, docs, url = reranker(ratio), make_docs(10), str(tmp_path / "s")
    manifest = build_store(url, rr, docs, dtype=dtype, shard_rows=64)
    want = encoded(rr, docs)
    got = open_store(url).fetch(list(docs))
    assert got.missing == [] and got.corrupt == {}
    assert manifest.codec["name"] == ("int8-absmax+zstd" if dtype == "int8" else "byteplane+zstd")
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
        assert manifest.memory_bytes == sum(len(p) for p in column_values(url, "memory")) + 4 * manifest.vectors


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


def test_a_ratio_the_store_cannot_serve_is_a_value_error(tmp_path, reranker):
    url = str(tmp_path / "s")
    build_store(url, reranker(4), make_docs(3))
    reader = open_store(url)
    for bad in (1, 2, 3, 64):
        with pytest.raises(ValueError, match=r"valid ratios: \[4, 8, 16, 32\]"):
            reader.fetch(["d0"], ratio=bad)
    with pytest.raises(ValueError, match="valid ratios"):
        reader.get("d0", ratio=2)


def test_fetch_reads_only_the_row_groups_it_needs(tmp_path, reranker, monkeypatch):
    rr, docs, url = reranker(1), make_docs(256), str(tmp_path / "big")
    build_store(url, rr, docs, dtype="float32", shard_rows=256)
    (shard,) = shard_urls(url)
    meta = pq.ParquetFile(io.BytesIO(fsio.read_bytes(shard))).metadata
    assert (meta.num_rows, meta.num_row_groups) == (256, 256 // writer.ROW_GROUP_ROWS)
    want = encoded(rr, docs)
    ids = list(docs)
    row_of = {d: i for i, d in enumerate(read_table(shard).column("doc_id").to_pylist())}

    reader = open_store(url, cache_bytes=0)
    read = _count_bytes_read(monkeypatch)
    target = next(d for d in ids if row_of[d] == 150)  # third row group
    got = reader.fetch([target])
    assert_same_memories(got.memories, {target: want[target]})
    assert 0 < read["bytes"] < file_size(shard) / 2  # the footer and one of four row groups, not the whole shard

    far = [next(d for d in ids if row_of[d] == k) for k in (200, 10)]  # first and last row group, out of order
    assert_same_memories(reader.fetch(far).memories, {d: want[d] for d in far})
    shuffled = [ids[(i * 37) % 256] for i in range(256)]
    assert_same_memories(reader.fetch(shuffled).memories, want)


def _count_bytes_read(monkeypatch) -> dict:
    """Wrap fsio.open_input so the files the reader opens count the bytes actually read from them."""
    counter = {"bytes": 0}
    real = fsio.open_input

    class Counting(io.RawIOBase):
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            data = self._f.read(n)
            counter["bytes"] += len(data)
            return data

        def readinto(self, b):
            data = self.read(len(b))
            b[:len(data)] = data
            return len(data)

        def seek(self, pos, whence=0):
            return self._f.seek(pos, whence)

        def tell(self):
            return self._f.tell()

        def readable(self):
            return True

        def seekable(self):
            return True

        def close(self):
            self._f.close()
            super().close()

    monkeypatch.setattr(fsio, "open_input", lambda url, storage_options=None: Counting(real(url, storage_options)))
    return counter


def test_unknown_ids_are_missing_not_errors(root, reranker):
    rr, docs, url = reranker(4), make_docs(5), fsio.join_url(root, "s")
    build_store(url, rr, docs)
    reader = open_store(url)
    got = reader.fetch(["d1", "nope", "d3", "", "nope"])
    assert sorted(got.memories) == ["d1", "d3"]
    assert got.missing == ["nope", ""] and got.corrupt == {}
    assert "nope" not in reader and "d1" in reader
    assert reader.shard_of("nope") is None and reader.shard_of("d1") == 0
    with pytest.raises(KeyError, match="nope"):
        reader.get("nope")
    assert reader.get("d1").n_tokens == got.memories["d1"].n_tokens


def test_cache_counts_hits_and_stays_within_its_byte_budget(tmp_path, reranker):
    rr, docs, url = reranker(4), make_docs(12), str(tmp_path / "s")
    build_store(url, rr, docs, dtype="float32")
    want = encoded(rr, docs)

    reader = open_store(url)
    first = reader.fetch(["d2"])
    assert reader.cache_info()["hits"] == 0 and reader.cache_info()["entries"] == 1
    again = reader.fetch(["d2", "d5"])
    info = reader.cache_info()
    assert (info["hits"], info["entries"]) == (1, 2)
    assert info["bytes"] == want["d2"].to_numpy().nbytes + want["d5"].to_numpy().nbytes
    np.testing.assert_array_equal(again.memories["d2"].vectors.numpy(), first.memories["d2"].vectors.numpy())

    budget = 3 * max(m.to_numpy().nbytes for m in want.values())
    small = open_store(url, cache_bytes=budget)
    for _ in range(2):
        assert_same_memories(small.fetch(list(docs)).memories, want)
        info = small.cache_info()
        assert 0 < info["bytes"] <= budget and 0 < info["entries"] < len(docs)
    none = open_store(url, cache_bytes=0)
    assert_same_memories(none.fetch(list(docs)).memories, want)
    assert none.cache_info()["bytes"] == 0 and none.cache_info()["entries"] == 0


# ----------------------------------------------------------------------------------------------- corruption
def _corrupt_one_row(url: str, column: str, change) -> tuple[str, str, int, list[str]]:
    """Rewrite the shard holding d4, changing one cell of d4's row; returns (doc id, shard name, row, other ids)."""
    reader = open_store(url)
    shard = reader.manifest.shards[reader.shard_of("d4")].name
    shard_url = fsio.join_url(url, writer.SHARDS_DIR, shard)
    table = read_table(shard_url)
    ids = table.column("doc_id").to_pylist()
    row = ids.index("d4")
    write_table(shard_url, replace_cell(table, column, row, change(table.column(column)[row].as_py())))
    return "d4", shard, row, [d for d in ids if d != "d4"]


def _flip_middle_byte(payload: bytes) -> bytes:
    b = bytearray(payload)
    b[len(b) // 2] ^= 0x5A
    return bytes(b)


def test_a_corrupt_record_is_reported_and_its_neighbours_still_decode(root, reranker):
    rr, docs, url = reranker(4), make_docs(10), fsio.join_url(root, "s")
    build_store(url, rr, docs, dtype="float32", shard_rows=5)
    want = shardwise_encoded(rr, docs, 5)
    bad, shard, row, neighbours = _corrupt_one_row(url, "memory", _flip_middle_byte)

    reader = open_store(url)
    got = reader.fetch([bad] + neighbours)
    assert list(got.corrupt) == [bad] and got.missing == []
    message = got.corrupt[bad]
    assert shard in message and f"row {row}" in message and repr(bad) in message
    assert_same_memories(got.memories, {d: want[d] for d in neighbours})
    with pytest.raises(CorruptRecordError, match=shard):
        reader.get(bad)
    report = reader.verify()
    assert (report["records_corrupt"], report["records_ok"]) == (1, 9) and list(report["corrupt"]) == [bad]


def test_n_tokens_inconsistent_with_the_vectors_is_corrupt(tmp_path, reranker):
    rr, docs, url = reranker(4), make_docs(6), str(tmp_path / "s")
    build_store(url, rr, docs, dtype="float32")
    bad, shard, row, neighbours = _corrupt_one_row(url, "n_tokens", lambda n: n + 9)
    reader = open_store(url)
    for ratio in (4, 8):
        got = reader.fetch([bad] + neighbours, ratio=ratio)
        assert list(got.corrupt) == [bad] and shard in got.corrupt[bad] and "n_tokens" in got.corrupt[bad]
        assert_same_memories(got.memories, {d: m for d, m in encoded(rr, docs, ratio=ratio).items() if d != bad},
                             atol=1e-6)


def test_a_store_without_manifest_or_with_another_schema_is_refused(root, reranker):
    url = fsio.join_url(root, "s")
    build_store(url, reranker(4), make_docs(3))
    manifest_url = fsio.join_url(url, "manifest.json")
    raw = fsio.read_json(manifest_url)
    fsio.write_json_atomic(manifest_url, {**raw, "schema_version": SCHEMA_VERSION + 98})
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 98}") as err:
        open_store(url)
    assert not isinstance(err.value, IncompleteStoreError)
    fsio.delete(manifest_url)
    with pytest.raises(IncompleteStoreError, match="manifest.json"):
        open_store(url)
    with pytest.raises(IncompleteStoreError):
        open_store(fsio.join_url(root, "never-built"))


# ----------------------------------------------------------------------------------------------- commit protocol
def test_rerun_is_a_no_op_and_new_docs_are_appended(root, reranker):
    rr, url = reranker(4), fsio.join_url(root, "s")
    first_docs, new_docs = make_docs(8), make_docs(4, prefix="n")
    first = build_store(url, rr, first_docs, shard_rows=3)
    before = {u: fsio.read_bytes(u) for u in shard_urls(url)}

    again = build_store(url, rr, first_docs, shard_rows=3)
    assert {u: fsio.read_bytes(u) for u in shard_urls(url)} == before
    assert again.shards == first.shards and again.rows == 8 and again.created_at == first.created_at
    assert (again.input["stored_new"], again.input["skipped_existing"]) == (0, 8)

    more = build_store(url, rr, {**first_docs, **new_docs}, shard_rows=10)
    assert (more.rows, more.input["stored_new"]) == (12, 4)
    after = shard_urls(url)
    assert set(before) < set(after)
    assert all(fsio.read_bytes(u) == data for u, data in before.items())
    (added,) = set(after) - set(before)
    assert sorted(read_table(added).column("doc_id").to_pylist()) == sorted(new_docs)
    assert sorted(stored_ids(url)) == sorted({**first_docs, **new_docs})
    want = quantized({**shardwise_encoded(rr, first_docs, 3), **encoded(rr, new_docs)}, "bfloat16")
    assert_same_memories(open_store(url).fetch(list({**first_docs, **new_docs})).memories, want)


@pytest.mark.parametrize("field", ["dtype", "ratio", "model", "max_length"])
def test_a_store_refuses_a_run_with_other_settings(tmp_path, reranker, other_model_dir, field):
    url = str(tmp_path / "s")
    docs = make_docs(4)
    build_store(url, reranker(4), docs, dtype="bfloat16")
    rr, dtype = {"dtype": (reranker(4), "float32"), "ratio": (reranker(1), "bfloat16"),
                 "model": (reranker(4, model_dir=other_model_dir), "bfloat16"),
                 "max_length": (reranker(4, max_length=32), "bfloat16")}[field]
    with pytest.raises(StoreMismatchError, match="fingerprint" if field == "model" else field) as err:
        build_store(url, rr, make_docs(2, prefix="x"), dtype=dtype)
    assert "overwrite" in str(err.value)
    reader = open_store(url)  # the refused run changed nothing
    assert (len(reader), reader.manifest.dtype, reader.manifest.ratio) == (4, "bfloat16", 4)
    assert sorted(stored_ids(url)) == sorted(docs)


def test_overwrite_replaces_the_store(tmp_path, reranker):
    url = str(tmp_path / "s")
    build_store(url, reranker(4), make_docs(5), dtype="bfloat16")
    new_docs = make_docs(3, prefix="n")
    m = build_store(url, reranker(1), new_docs, dtype="float32", overwrite=True)
    assert (m.dtype, m.ratio, m.rows) == ("float32", 1, 3)
    assert sorted(stored_ids(url)) == sorted(new_docs)
    assert_same_memories(open_store(url).fetch(list(new_docs)).memories, encoded(reranker(1), new_docs))


def _crashed_run(url: str, rr: KaLMReranker, docs: dict[str, str], dtype: str = "bfloat16") -> None:
    """What a run leaves behind when it dies after committing a shard but before finalize_store."""
    settings = writer.settings_for(rr, dtype=dtype, text_join="as_given")
    assert writer.prepare_store(url, settings) == {}  # nothing committed yet (ids -> text hashes)
    memories = rr.encode(list(docs.values()))
    table = writer.memory_table(list(docs), memories, [writer.text_hash(t) for t in docs.values()],
                                ["<crashed>"] * len(docs), list(range(len(docs))), dtype, 3)
    writer.write_shard(url, table)


def test_a_crashed_run_is_refused_by_readers_and_resumed_exactly_once(root, reranker):
    rr, url, docs = reranker(4), fsio.join_url(root, "s"), make_docs(11)
    committed = dict(list(docs.items())[:4])
    _crashed_run(url, rr, committed)
    with pytest.raises(IncompleteStoreError):
        open_store(url)
    crashed_shards = shard_urls(url)
    settings = writer.settings_for(rr, dtype="bfloat16", text_join="as_given")
    assert writer.prepare_store(url, settings) == {d: writer.text_hash(t) for d, t in committed.items()}

    m = build_store(url, rr, docs, shard_rows=4)
    assert (m.rows, m.input["stored_new"], m.input["skipped_existing"]) == (11, 7, 4)
    assert set(crashed_shards) <= set(shard_urls(url))
    ids = stored_ids(url)
    assert len(ids) == len(set(ids)) == 11 and set(ids) == set(docs)
    got = open_store(url).fetch(list(docs))
    assert got.missing == [] and got.corrupt == {}
    want = {**quantized(encoded(rr, committed), "bfloat16"),
            **quantized(shardwise_encoded(rr, {d: t for d, t in docs.items() if d not in committed}, 4),
                         "bfloat16")}
    assert_same_memories(got.memories, want)


def test_a_crashed_run_can_only_be_resumed_with_its_settings(tmp_path, reranker):
    url = str(tmp_path / "s")
    _crashed_run(url, reranker(4), make_docs(3), dtype="int8")
    with pytest.raises(StoreMismatchError, match="dtype: 'int8'"):
        build_store(url, reranker(4), make_docs(5), dtype="bfloat16")
    m = build_store(url, reranker(4), make_docs(5), dtype="int8")
    assert (m.rows, m.input["stored_new"], m.dtype) == (5, 2, "int8")


@pytest.mark.parametrize("copy_name", ["part-00000000000000000000.parquet", "part-zzzzzzzzzzzzzzzzzzzz.parquet"])
def test_a_duplicate_shard_is_kept_once(root, reranker, copy_name):
    rr, url, docs = reranker(4), fsio.join_url(root, "s"), make_docs(9)
    build_store(url, rr, docs, dtype="float32", shard_rows=4)
    original = shard_urls(url)[1]
    fsio.write_bytes_atomic(fsio.join_url(url, writer.SHARDS_DIR, copy_name), fsio.read_bytes(original))
    assert len(stored_ids(url)) == 9 + read_table(original).num_rows

    m = writer.finalize_store(url, writer.settings_for(rr, dtype="float32", text_join="as_given"), level=3)
    ids = stored_ids(url)
    assert len(ids) == len(set(ids)) == m.rows == 9
    assert [s.name for s in m.shards] == [u.rsplit("/", 1)[-1] for u in shard_urls(url)]
    got = open_store(url).fetch(list(docs))
    assert got.corrupt == {} and got.missing == []
    assert_same_memories(got.memories, shardwise_encoded(rr, docs, 4))


def test_a_doc_id_repeated_within_a_shard_is_kept_once(tmp_path, reranker):
    rr, url = reranker(4), str(tmp_path / "s")
    texts = ["first text", "other", "second text for the same id"]
    ids = ["dup", "other", "dup"]
    settings = writer.settings_for(rr, dtype="float32", text_join="as_given")
    writer.prepare_store(url, settings)
    memories = rr.encode(texts)
    table = writer.memory_table(ids, memories, [writer.text_hash(t) for t in texts], ["x"] * 3, [0, 1, 2], "float32", 3)
    writer.write_shard(url, table)
    m = writer.finalize_store(url, settings, level=3)
    assert m.rows == 2 and sorted(stored_ids(url)) == ["dup", "other"]
    got = open_store(url).fetch(["dup", "other"])
    assert_same_memories(got.memories, {"dup": memories[0], "other": memories[1]})  # the first "dup" row wins


# ----------------------------------------------------------------------------------------------- model checks
def test_check_model_accepts_the_encoding_model_only(tmp_path, reranker):
    rr, url = reranker(4), str(tmp_path / "s")
    build_store(url, rr, make_docs(2))
    reader = open_store(url)
    reader.check_model(rr.fingerprint)
    reader.check_model(reranker(4, max_length=32).fingerprint)  # same model, other settings: still the same model
    other = ModelFingerprint(model_id="someone/other-reranker", revision="abc123", config_sha256="0" * 64,
                             tokenizer_sha256=rr.fingerprint.tokenizer_sha256,
                             weights_sha256=rr.fingerprint.weights_sha256)
    with pytest.raises(StoreMismatchError) as err:
        reader.check_model(other)
    message = str(err.value)
    assert repr(rr.fingerprint.model_id) in message and "'someone/other-reranker'" in message
    assert "config_sha256" in message and "tokenizer_sha256" not in message and "weights_sha256" not in message
    reader.check_model(other, allow_mismatch=True)


def test_check_model_refuses_a_model_with_other_weights(tmp_path, reranker, other_model_dir):
    url = str(tmp_path / "s")
    build_store(url, reranker(4), make_docs(2))
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        open_store(url).check_model(reranker(4, model_dir=other_model_dir).fingerprint)


def test_the_same_model_under_another_path_is_the_same_model(tmp_path, reranker, tiny_model_dir):
    import shutil

    url = str(tmp_path / "s")
    build_store(url, reranker(4), make_docs(2))
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy of the model")
    moved = reranker(4, model_dir=copy)
    open_store(url).check_model(moved.fingerprint)
    assert build_store(url, moved, make_docs(3)).rows == 3  # resuming from the other path is allowed


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
    m = build_store(url, rr, docs, dtype="float32", shard_rows=3)
    assert m.rows == len(AWKWARD_IDS) and m.input["skipped_existing"] == 1
    reader = open_store(url)
    assert all(d in reader for d in AWKWARD_IDS)
    got = reader.fetch(AWKWARD_IDS)
    assert got.missing == [] and got.corrupt == {}
    assert_same_memories(got.memories, shardwise_encoded(rr, dict(docs[:len(AWKWARD_IDS)]), 3))
    assert reader.verify()["records_ok"] == len(AWKWARD_IDS)
    if not url.startswith("s3://"):
        again = open_store("file://" + url)
        assert len(again) == len(AWKWARD_IDS) and again.get("x" * 500).n_tokens == got.memories["x" * 500].n_tokens
