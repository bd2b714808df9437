"""The corpus encode job on a real local Ray, to file:// and to the moto S3 server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kalm_batch import KaLMReranker, fsio
from kalm_batch.pipelines import encode_stages as S
from kalm_batch.pipelines.encode import EncodeConfig, NoGoodRowsError, default_rows_per_task, run_encode
from kalm_batch.pooling import n_vectors
from kalm_batch.sample import write_sample_corpus
from kalm_batch.store import StoreMismatchError, load_manifest, open_store
from kalm_batch.store.manifest import IncompleteStoreError

pytestmark = [pytest.mark.ray]
MAX_LEN = 64
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    from kalm_batch.pipelines.cluster import init_ray
    import ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_corpus(str(tmp_path_factory.mktemp("sample")), max_docs=60, n_queries=5)


def _cfg(model, corpus, store, **kw) -> EncodeConfig:
    base = dict(model=str(model), corpus=corpus, store=store, max_length=MAX_LEN, dtype="float32",
                shard_rows=16, rows_per_task=16)
    base.update(kw)
    return EncodeConfig(**base)


def _corpus_texts(path) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        out[row["_id"]] = (row["title"] + " " + row["text"]) if row.get("title") else row["text"]
    return out


def _assert_store_matches_core(store_url, model_dir, texts: dict[str, str], ratio=4):
    reader = open_store(store_url)
    assert len(reader) == len(texts)
    core = KaLMReranker(str(model_dir), dtype="float32", max_length=MAX_LEN, chunk_size=ratio)
    ids = sorted(texts)
    fetched = reader.fetch(ids)
    assert not fetched.missing and not fetched.corrupt
    for doc_id, mem in zip(ids, core.encode([texts[i] for i in ids])):
        got = fetched.memories[doc_id]
        assert got.n_tokens == mem.n_tokens and got.vectors.shape == mem.vectors.shape
        assert torch.max(torch.abs(got.vectors - mem.vectors)).item() <= 1e-6, doc_id


def test_encode_sample_corpus_to_local_store(tiny_model_dir, sample, tmp_path):
    store = f"file://{tmp_path}/store dir"
    summary = run_encode(_cfg(tiny_model_dir, sample.corpus_path, store))
    texts = _corpus_texts(sample.corpus_path)
    assert summary.input_rows == summary.stored_new == len(texts) and summary.rejected == 0
    assert summary.truncated > 0 and 0 <= summary.padding_ratio < 0.5
    # the encoder actor's busy time is part of the job's time; its load time is reported on its own
    assert 0 < summary.encoder_seconds <= summary.seconds and 0 < summary.encoder_busy_share <= 1
    assert 0 < summary.encoder_load_seconds < summary.seconds
    m = load_manifest(store)
    assert m.rows == len(texts) and sum(s.rows for s in m.shards) == m.rows and len(m.shards) >= 3
    assert m.settings.ratio == 4 and m.settings.dtype == "float32" and m.settings.max_length == MAX_LEN
    assert m.input["input_rows"] == m.input["stored_new"] + m.input["rejected"] and m.input["files"] == 1
    _assert_store_matches_core(store, tiny_model_dir, texts)
    assert open_store(store).verify()["records_corrupt"] == 0

    again = run_encode(_cfg(tiny_model_dir, sample.corpus_path, store))  # same command: nothing new
    assert again.stored_new == 0 and again.skipped_existing == len(texts)
    assert load_manifest(store).shards == m.shards


def test_resume_reports_passages_whose_text_changed(tiny_model_dir, sample, tmp_path):
    store = str(tmp_path / "store")
    run_encode(_cfg(tiny_model_dir, sample.corpus_path, store))
    rows = [json.loads(line) for line in Path(sample.corpus_path).read_text().splitlines()]
    old_texts = _corpus_texts(sample.corpus_path)
    rows[3]["text"] = rows[3]["text"] + " (edited)"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_encode(_cfg(tiny_model_dir, str(edited), store))
    assert summary.stored_new == 0 and summary.skipped_existing == len(rows)
    assert summary.changed_since_stored == 1  # said out loud, not silently kept
    changed = [json.loads(line) for line in (tmp_path / "store" / "errors" / "changed.jsonl").read_text().splitlines()]
    assert [(c["doc_id"], c["line"], c["reason"]) for c in changed] == [(rows[3]["_id"], 4, S.CHANGED_TEXT)]
    assert load_manifest(store).input["changed_since_stored"] == 1
    _assert_store_matches_core(store, tiny_model_dir, old_texts)  # the store itself is unchanged
    again = run_encode(_cfg(tiny_model_dir, sample.corpus_path, store))  # the original corpus: nothing changed
    assert again.changed_since_stored == 0
    assert (tmp_path / "store" / "errors" / "changed.jsonl").read_text() == ""


@pytest.mark.s3
def test_encode_from_s3_corpus_to_s3_store(tiny_model_dir, sample, s3_bucket):
    corpus = f"{s3_bucket}/corpus/part-0.jsonl"
    fsio.write_bytes_atomic(corpus, Path(sample.corpus_path).read_bytes())
    store = f"{s3_bucket}/stores/tiny r4"
    summary = run_encode(_cfg(tiny_model_dir, f"{s3_bucket}/corpus/", store, dtype="bfloat16"))
    assert summary.stored_new == len(_corpus_texts(sample.corpus_path))
    reader = open_store(store)
    assert reader.manifest.dtype == "bfloat16" and reader.verify()["records_corrupt"] == 0
    # bf16 memories equal the core's memories rounded to bf16
    core = KaLMReranker(str(tiny_model_dir), dtype="float32", max_length=MAX_LEN)
    texts = _corpus_texts(sample.corpus_path)
    some = sorted(texts)[:10]
    got = reader.fetch(some).memories
    for d, mem in zip(some, core.encode([texts[i] for i in some])):
        want = mem.vectors.to(torch.bfloat16).float()
        assert torch.max(torch.abs(got[d].vectors - want)).item() <= 1e-2 * max(1.0, want.abs().max().item())


def _write_dirty_corpus(root: Path) -> dict:
    root.mkdir(parents=True)
    good = [{"_id": f"g{i}", "title": f"T{i}", "text": f"good passage {i} about things"} for i in range(6)]
    lines = [json.dumps(r) for r in good]
    lines += [
        '{"_id": "bad-json", "text": ',                       # malformed JSON
        json.dumps({"title": "no id", "text": "x"}),           # missing id
        json.dumps({"_id": "", "text": "x"}),                  # empty id
        json.dumps({"_id": "empty-text", "text": "   "}),      # empty text
        json.dumps({"_id": "int-text", "text": 42}),           # non-string text
        json.dumps({"_id": "g0", "text": "a duplicate of g0"}),  # duplicate id (first kept)
        json.dumps({"_id": "long", "text": "word " * 500}),    # longer than max_length: truncated, stored
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"_id": "bad-utf8", "text": "\xff\xfe"}\n'
    (root / "a.jsonl").write_bytes(data)
    (root / "b.jsonl.gz").write_bytes(b"this is not gzip")  # unreadable file
    (root / "c.jsonl").write_text(json.dumps({"_id": "g0", "text": "another duplicate"}) + "\n")
    return {"input_rows": len(lines) + 1 + 1 + 1, "stored": 7, "rejected": 9}


def test_bad_rows_are_recorded_and_the_rest_is_stored(tiny_model_dir, tmp_path):
    expect = _write_dirty_corpus(tmp_path / "dirty")
    store = str(tmp_path / "store")
    summary = run_encode(_cfg(tiny_model_dir, str(tmp_path / "dirty"), store))
    assert summary.stored_new == expect["stored"] and summary.rejected == expect["rejected"]
    assert summary.input_rows == expect["input_rows"] == summary.stored_new + summary.rejected
    assert summary.truncated == 1
    errors = [json.loads(x) for x in (tmp_path / "store/errors/rejected.jsonl").read_text().splitlines()]
    reasons = " | ".join(e["reason"] for e in errors)
    for needle in ("JSON", "id", "text", "UTF-8", "duplicate doc_id 'g0'", "b.jsonl.gz"):
        assert needle in reasons or any(needle in e["source"] for e in errors), needle
    assert sum("duplicate" in e["reason"] for e in errors) == 2
    reader = open_store(store)
    assert sorted(reader._index) == sorted([f"g{i}" for i in range(6)] + ["long"])
    # the first g0 was kept
    from kalm_batch.store.writer import text_hash
    import pyarrow.parquet as pq

    rows = [r for s in reader.manifest.shards
            for r in pq.read_table(str(tmp_path / "store/shards" / s.name)).to_pylist() if r["doc_id"] == "g0"]
    assert len(rows) == 1 and rows[0]["text_sha256"] == text_hash("T0 good passage 0 about things")
    m = reader.manifest
    assert m.input["input_rows"] == m.rows + m.input["rejected"]


def test_all_bad_corpus_is_an_error_not_an_empty_store(tiny_model_dir, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n{broken\n')
    with pytest.raises(NoGoodRowsError, match="every one of the 2 input rows"):
        run_encode(_cfg(tiny_model_dir, str(tmp_path / "bad.jsonl"), str(tmp_path / "store")))
    with pytest.raises(IncompleteStoreError):
        open_store(str(tmp_path / "store"))
    assert len((tmp_path / "store/errors/rejected.jsonl").read_text().splitlines()) == 2


def test_other_settings_are_refused_unless_overwrite(tiny_model_dir, sample, tmp_path):
    store = str(tmp_path / "store")
    run_encode(_cfg(tiny_model_dir, sample.corpus_path, store))
    with pytest.raises(StoreMismatchError, match="ratio: 4 .store. != 8"):
        run_encode(_cfg(tiny_model_dir, sample.corpus_path, store, ratio=8))
    with pytest.raises(StoreMismatchError, match="max_length"):
        run_encode(_cfg(tiny_model_dir, sample.corpus_path, store, max_length=32))
    summary = run_encode(_cfg(tiny_model_dir, sample.corpus_path, store, ratio=8, overwrite=True))
    assert summary.skipped_existing == 0 and load_manifest(store).settings.ratio == 8


def test_resume_after_the_driver_is_killed(tiny_model_dir, tmp_path):
    """Kill the job's driver (and its local Ray) once shards exist; the same command then completes exactly once."""
    info = write_sample_corpus(str(tmp_path / "corpus"), max_docs=240, n_queries=1)
    store = tmp_path / "store"
    cmd = [sys.executable, str(REPO / "jobs/encode_corpus.py"), "--model", str(tiny_model_dir), "--corpus",
           info.corpus_path, "--store", str(store), "--max-length", "96", "--dtype", "float32", "--shard-rows", "8",
           "--rows-per-task", "8", "--num-cpus", "2"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list((store / "shards").glob("*.parquet"))) >= 2:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    partial = list((store / "shards").glob("*.parquet"))
    assert partial, "the job wrote no shard before the deadline"
    if (store / "manifest.json").exists():
        pytest.fail("the job finished before it could be killed; make the corpus bigger")
    with pytest.raises(IncompleteStoreError):
        open_store(str(store))
    summary = run_encode(_cfg(tiny_model_dir, info.corpus_path, str(store), max_length=96, shard_rows=8,
                              rows_per_task=8))
    texts = _corpus_texts(info.corpus_path)
    assert summary.skipped_existing >= 8 and summary.skipped_existing + summary.stored_new == len(texts)
    m = load_manifest(str(store))
    assert m.rows == len(texts) == sum(s.rows for s in m.shards)
    reader = open_store(str(store))
    assert sorted(reader._index) == sorted(texts)  # each doc id exactly once
    shard_ids = []
    import pyarrow.parquet as pq

    for s in m.shards:
        shard_ids += pq.read_table(str(store / "shards" / s.name), columns=["doc_id"]).column("doc_id").to_pylist()
    assert sorted(shard_ids) == sorted(texts)
    assert reader.verify()["records_corrupt"] == 0
    sample_ids = sorted(texts)[::20]
    core = KaLMReranker(str(tiny_model_dir), dtype="float32", max_length=96)
    got = reader.fetch(sample_ids).memories
    for d, mem in zip(sample_ids, core.encode([texts[i] for i in sample_ids])):
        assert torch.max(torch.abs(got[d].vectors - mem.vectors)).item() <= 1e-6


def test_default_sort_window_bounds_a_calls_memories():
    # 1024 passages per encoder call unless their memories could exceed 2^18 vectors (max_length / ratio each)
    assert default_rows_per_task(4, 512) == default_rows_per_task(4, 1024) == 1024
    assert default_rows_per_task(1, 1024) == 256 and default_rows_per_task(2, 1024) == 512
    assert default_rows_per_task(1, 32768) == 64  # never below 64: very long passages still batch
    for ratio in (1, 2, 4, 8, 16, 32):
        for max_length in (128, 512, 1024, 8192):
            n = default_rows_per_task(ratio, max_length)
            assert 64 <= n <= 1024 and (n == 64 or n * n_vectors(max_length, ratio) <= 1 << 18)
