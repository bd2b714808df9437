"""The bulk rerank job on a real local Ray: scores equal in-process core scoring, cascade, problems, store refusals.

One Ray session (2 CPUs) is shared by the module. Stores are float32 (lossless), models compute in float32, so every
score must equal ``KaLMReranker.score`` on the same memories within 1e-5.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from kalm_batch import KaLMReranker, fsio
from kalm_batch.bm25 import read_beir_corpus, write_bm25_run
from kalm_batch.cascade import CascadeError
from kalm_batch.metrics import read_run
from kalm_batch.pipelines import rerank_stages as S
from kalm_batch.pipelines.rerank import (
    RerankConfig,
    add_rerank_arguments,
    config_from_args,
    open_checked_store,
    run_eval,
    run_rerank,
)
from kalm_batch.querylog import read_candidates, read_queries
from kalm_batch.sample import write_sample_corpus
from kalm_batch.store import StoreMismatchError, open_store
from kalm_batch.store.writer import build_store

TOL = 1e-5


@pytest.fixture(scope="module")
def ray_session(s3_server):
    """Started after the S3 server so the workers inherit its AWS_* endpoint; shut down after the module."""
    import ray

    from kalm_batch.pipelines.cluster import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return KaLMReranker(str(tiny_model_dir), dtype="float32", chunk_size=4, max_length=128)


@pytest.fixture(scope="module")
def data(tmp_path_factory, scorer):
    """Sample corpus + BM25 candidates with every kind of bad input appended, and a float32 store (r0 = 4)."""
    root = tmp_path_factory.mktemp("rerank-data")
    info = write_sample_corpus(str(root), max_docs=150, n_queries=20)
    write_bm25_run(info.corpus_path, info.queries_path, str(root / "bm25.trec"), k=6)
    corpus = read_beir_corpus(info.corpus_path)
    queries = read_queries(info.queries_path).texts
    bm25 = (root / "bm25.trec").read_text()
    first_q = next(iter(queries))
    extra = [f"q-empty Q0 {corpus[0][0]} 1 2.0 x", f"q-empty Q0 {corpus[1][0]} 2 1.0 x",
             f"{first_q} Q0 no-such-doc 1 99.0 x",  # unknown doc: listed, skipped; it is rank 1 of its query
             "q-ghost Q0 stdlib-000001 1 1.0 x",  # candidate of a query that does not exist
             "this line is malformed",
             bm25.splitlines()[0]]  # a duplicate (qid, doc_id) pair
    (root / "candidates.trec").write_text(bm25 + "\n".join(extra) + "\n")
    lines = Path(info.queries_path).read_text() + json.dumps({"_id": "q-empty", "text": ""}) + "\n" + \
        json.dumps({"_id": "q-lonely", "text": "a query without candidates"}) + "\n"
    (root / "queries-all.jsonl").write_text(lines)
    store = f"file://{root}/store"
    build_store(store, scorer, corpus, dtype="float32", shard_rows=32)
    return {"root": root, "store": store, "corpus": dict(corpus), "queries": {**queries, "q-empty": ""},
            "candidates": str(root / "candidates.trec"), "queries_url": str(root / "queries-all.jsonl"),
            "qrels": info.qrels_path, "first_q": first_q}


def _config(data, out, **kw) -> RerankConfig:
    base = dict(model=kw.pop("model"), store=data["store"], queries=data["queries_url"], candidates=data["candidates"],
                out=out, dtype="float32", num_cpus=2)
    return RerankConfig(**{**base, **kw})


def _scores(out: str) -> pa.Table:
    return pq.read_table(io.BytesIO(fsio.read_bytes(fsio.join_url(out, "scores.parquet"))))


def _problems(out: str) -> list[dict]:
    text = fsio.read_bytes(fsio.join_url(out, "problems.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


def _in_process(scorer, store: str, rows: dict, queries: dict, ratio: int) -> dict:
    """Core scoring of each (qid, doc_id) from the store's memories, one query at a time."""
    reader = open_store(store)
    by_q: dict[str, list[str]] = {}
    for qid, doc in rows:
        by_q.setdefault(qid, []).append(doc)
    want = {}
    for qid, docs in by_q.items():
        got = reader.fetch(docs, ratio)
        s = scorer.score(queries[qid], [got.memories[d] for d in docs])
        want.update({(qid, d): (float(p), float(m)) for d, p, m in zip(docs, s.p_yes, s.margin)})
    return want


def _assert_scores_match(table: pa.Table, want: dict) -> None:
    got = {(q, d): (p, m) for q, d, p, m in zip(*(table.column(c).to_pylist() for c in
                                                 ("qid", "doc_id", "score", "margin")))}
    assert set(got) == set(want)
    assert max(abs(got[k][0] - want[k][0]) for k in want) <= TOL
    assert max(abs(got[k][1] - want[k][1]) for k in want) <= 1e-4


def _expected_pairs(data, k: int) -> set[tuple[str, str]]:
    cands = read_candidates(data["candidates"])
    return {(q, d) for q, d, rank, _ in cands.rows if rank <= k and q in data["queries"] and d in data["corpus"]}


@pytest.mark.ray
def test_end_to_end_file(ray_session, data, scorer, tiny_model_dir, tmp_path):
    out = f"file://{tmp_path}/out"
    summary = run_rerank(_config(data, out, model=str(tiny_model_dir), top_k=5, workers=2, pairs_per_block=20,
                                 qrels=data["qrels"]))
    table = _scores(out)
    pairs = _expected_pairs(data, 5)
    assert table.num_rows == len(pairs) == summary.pairs_scored
    _assert_scores_match(table, _in_process(scorer, data["store"], pairs, data["queries"], ratio=4))
    # the empty query is scored like any other (the template holds): it equals the core's score of ""
    empty = table.filter(pc.equal(table.column("qid"), "q-empty"))
    assert empty.num_rows == 2
    # fresh encoding (no store) gives the same scores for one query's candidates
    q = data["first_q"]
    mine = table.filter(pc.equal(table.column("qid"), q))
    fresh = scorer.score(data["queries"][q], scorer.encode([data["corpus"][d] for d in mine.column("doc_id").to_pylist()]))
    assert np.max(np.abs(fresh.p_yes - mine.column("score").to_numpy())) <= TOL
    # ranking: per query dense ranks following descending score; run.trec says the same
    run = read_run(fsio.join_url(out, "run.trec"))
    for qid in set(table.column("qid").to_pylist()):
        rows = sorted((r for r in table.to_pylist() if r["qid"] == qid), key=lambda r: r["rank"])
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
        assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
        assert run[qid] == pytest.approx({r["doc_id"]: r["score"] for r in rows}, abs=1e-7)
        assert {r["stage"] for r in rows} == {1}
    # every bad input is listed with a reason, and nothing else went missing
    problems = _problems(out)
    kinds = {p["kind"] for p in problems}
    assert {"doc_not_in_store", "no_query", "no_candidates", "malformed", "duplicate_pair", "empty_query"} <= kinds
    missing = [p for p in problems if p["kind"] == "doc_not_in_store"]
    assert [(p["qid"], p["doc_id"]) for p in missing] == [(q, "no-such-doc")] and "no-such-doc" in missing[0]["reason"]
    assert summary.problems["doc_not_in_store"] == 1 and summary.skipped_pairs == 1
    skipped = fsio.read_bytes(fsio.join_url(out, "skipped.tsv")).decode().splitlines()
    assert skipped[0].split("\t")[:3] == ["kind", "qid", "doc_id"]
    assert any(line.startswith(f"doc_not_in_store\t{q}\tno-such-doc\t") for line in skipped)
    assert len(skipped) == len(problems) + 1
    # metrics and summary
    metrics = json.loads(fsio.read_bytes(fsio.join_url(out, "metrics.json")))
    assert set(metrics["runs"]) == {"first-stage", "reranked"} and "nDCG@10" in metrics["table"]
    saved = json.loads(fsio.read_bytes(fsio.join_url(out, "summary.json")))
    assert saved["pairs_scored"] == table.num_rows and saved["stages"][0]["ratio"] == 4
    assert saved["stages"][0]["shard_reads"] == saved["stages"][0]["shards"] >= 2  # each shard read once
    assert saved["stages"][0]["vectors"] > table.num_rows and saved["score_s"] > 0 and saved["fetch_decode_s"] > 0


@pytest.mark.ray
@pytest.mark.s3
def test_end_to_end_s3_at_a_coarser_ratio(ray_session, s3_bucket, data, scorer, tiny_model_dir):
    qids = list(data["queries"])[:4]
    cands = [r for r in read_candidates(data["candidates"]).rows if r[0] in qids and r[2] <= 4]
    docs = sorted({d for _, d, _, _ in cands if d in data["corpus"]})
    store = f"{s3_bucket}/store"
    build_store(store, scorer, [(d, data["corpus"][d]) for d in docs], dtype="float32", shard_rows=8)
    run_text = "".join(f"{q} Q0 {d} {r} {s} bm25\n" for q, d, r, s in cands)
    fsio.write_bytes_atomic(f"{s3_bucket}/in/run.trec", run_text.encode())
    fsio.write_bytes_atomic(f"{s3_bucket}/in/queries.tsv",
                            "".join(f"{q}\t{data['queries'][q]}\n" for q in qids).encode())
    out = f"{s3_bucket}/out"
    summary = run_rerank(RerankConfig(model=str(tiny_model_dir), store=store, queries=f"{s3_bucket}/in/queries.tsv",
                                      candidates=f"{s3_bucket}/in/run.trec", out=out, ratio=8, dtype="float32"))
    table = _scores(out)
    pairs = {(q, d) for q, d, _, _ in cands if d in data["corpus"]}
    _assert_scores_match(table, _in_process(scorer, store, pairs, data["queries"], ratio=8))
    assert set(table.column("ratio").to_pylist()) == {8} and summary.stages[0]["ratio"] == 8
    for name in ("run.trec", "problems.jsonl", "skipped.tsv", "summary.json"):
        assert fsio.exists(fsio.join_url(out, name))


@pytest.mark.ray
def test_cascade_job(ray_session, data, scorer, tiny_model_dir, tmp_path):
    out = str(tmp_path / "cascade")
    summary = run_rerank(_config(data, out, model=str(tiny_model_dir), cascade="16:5,4:2"))
    table = _scores(out)
    pairs = _expected_pairs(data, 5)
    coarse = _in_process(scorer, data["store"], pairs, data["queries"], ratio=16)
    by_q: dict[str, list[str]] = {}
    for qid, doc in sorted(pairs):
        by_q.setdefault(qid, []).append(doc)
    top2 = {(q, d) for q, docs in by_q.items() for d in sorted(docs, key=lambda d: -coarse[(q, d)][0])[:2]}
    fine = _in_process(scorer, data["store"], top2, data["queries"], ratio=4)
    want = {k: fine.get(k, coarse[k]) for k in pairs}
    _assert_scores_match(table, want)
    rows = table.to_pylist()
    assert {(r["qid"], r["doc_id"]) for r in rows if r["stage"] == 2} == top2
    assert all(r["ratio"] == (4 if r["stage"] == 2 else 16) for r in rows)
    for q, docs in by_q.items():
        placed = [r["doc_id"] for r in sorted((r for r in rows if r["qid"] == q), key=lambda r: r["rank"])]
        head = sorted((d for d in docs if (q, d) in top2), key=lambda d: -fine[(q, d)][0])
        tail = sorted((d for d in docs if (q, d) not in top2), key=lambda d: -coarse[(q, d)][0])
        assert placed == head + tail
    s1, s2 = summary.stages
    assert (s1["ratio"], s1["k"], s1["pairs"], s2["ratio"], s2["k"], s2["pairs"]) == (16, 5, len(pairs), 4, 2, len(top2))
    assert s2["vectors"] > 0 and s1["score_s"] > 0 and s2["score_s"] > 0


def _corrupt_one_record(store_dir, doc_id: str) -> tuple[str, int]:
    """Flip bytes inside one record's memory payload in its data file, keeping its checksum; returns (file, row)."""
    reader = open_store(f"file://{store_dir}")
    name = reader.file_of(doc_id)
    index = pq.read_table(store_dir / "_kalm" / "index" / name)
    row = index.column("doc_id").to_pylist().index(doc_id)
    offset, length = index.column("offset")[row].as_py(), index.column("length")[row].as_py()
    data = bytearray((store_dir / name).read_bytes())
    for i in range(offset + length // 3, offset + length // 3 + 8):
        data[i] ^= 0xFF
    (store_dir / name).write_bytes(bytes(data))
    return name, row


@pytest.mark.ray
def test_corrupt_record_is_reported_and_the_job_completes(ray_session, data, tiny_model_dir, tmp_path):
    store_dir = tmp_path / "store"
    shutil.copytree(data["root"] / "store", store_dir)
    q = data["first_q"]
    victim = next(d for qq, d, rank, _ in read_candidates(data["candidates"]).rows
                  if qq == q and rank <= 3 and d in data["corpus"])
    shard, _ = _corrupt_one_record(store_dir, victim)
    out = str(tmp_path / "out")
    summary = run_rerank(_config(data, out, model=str(tiny_model_dir), store=f"file://{store_dir}", top_k=3))
    errors = [p for p in _problems(out) if p["kind"] == "corrupt_record"]
    assert len(errors) == 1 and (errors[0]["qid"], errors[0]["doc_id"]) == (q, victim)
    assert shard in errors[0]["reason"] and "version" in errors[0]["reason"] and victim in errors[0]["reason"]
    table = _scores(out)
    scored = set(zip(table.column("qid").to_pylist(), table.column("doc_id").to_pylist()))
    assert (q, victim) not in scored and scored == _expected_pairs(data, 3) - {(q, victim)}
    assert summary.problems["corrupt_record"] == 1 and summary.skipped_pairs == 2  # + the unknown doc


# ----- no Ray needed --------------------------------------------------------------------------------------------
def test_score_shards_stage_without_ray(data, scorer, tiny_model_dir):
    reader = open_store(data["store"])
    q = data["first_q"]
    docs = [d for d in data["corpus"]][:40:3]
    table, missing = S.pairs_table([(q, data["queries"][q], d, i) for i, d in enumerate(docs + ["nope"], 1)],
                                   reader, stage=1, ratio=8)
    assert missing == [(q, "nope")] and table.column("shard").to_pylist() == sorted(table.column("shard").to_pylist())
    blocks = S.shard_blocks(table, 3)
    assert sum(b.num_rows for b in blocks) == table.num_rows
    assert [len(set(b.column("shard").to_pylist())) for b in blocks] == [1] * len(blocks)  # never split a shard
    assert len({s for b in blocks for s in set(b.column("shard").to_pylist())}) == len(blocks)
    stage = S.ScoreShards(str(tiny_model_dir), data["store"], dtype="float32")
    assert stage.reranker._encoder is None
    got = pa.concat_tables([stage(b) for b in blocks])
    assert stage.reranker._encoder is None and stage.reranker._decoder is not None  # decoder half only
    want = scorer.score(data["queries"][q], [reader.get(d, 8) for d in got.column("doc_id").to_pylist()])
    assert np.max(np.abs(got.column("p_yes").to_numpy() - want.p_yes)) <= TOL
    assert got.column("error").null_count == got.num_rows


def test_fingerprint_mismatch_is_refused(data, tiny_model_dir, tmp_path, caplog):
    from kalm_batch.tiny import write_random_model

    other_dir = write_random_model(tmp_path / "other", shape="tiny", seed=1)  # same config, other weights
    other = KaLMReranker(str(other_dir), dtype="float32", chunk_size=4, max_length=128)
    store = f"file://{tmp_path}/other-store"
    build_store(store, other, list(data["corpus"].items())[:5], dtype="float32")
    with pytest.raises(StoreMismatchError, match="weights_sha256") as err:
        run_rerank(_config(data, str(tmp_path / "out"), model=str(tiny_model_dir), store=store))
    assert str(other_dir) in str(err.value) and str(tiny_model_dir) in str(err.value)
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING):
        reader, _ = open_checked_store(store, str(tiny_model_dir), allow_mismatch=True)
    assert len(reader) == 5
    assert any("MISMATCH" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_bad_ratio_and_cascade_are_refused_before_scoring(data, tiny_model_dir, tmp_path):
    with pytest.raises(CascadeError, match="ratio 2 cannot be served"):
        run_rerank(_config(data, str(tmp_path / "a"), model=str(tiny_model_dir), ratio=2))
    with pytest.raises(CascadeError, match="strictly decreasing"):
        run_rerank(_config(data, str(tmp_path / "b"), model=str(tiny_model_dir), cascade="16:5,4:5"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_run_eval_of_the_qrels_themselves_is_perfect(data, tmp_path):
    rows = [line.split("\t") for line in Path(data["qrels"]).read_text().splitlines()[1:]]
    run = tmp_path / "perfect.trec"
    run.write_text("".join(f"{q} Q0 {d} 1 1.0 oracle\n" for q, d, _ in rows))
    metrics = run_eval(str(run), data["qrels"])
    assert metrics["nDCG@10"] == 1.0 and metrics["RR@10"] == 1.0 and metrics["n_queries"] == len(rows)


def test_flags_round_trip_to_config():
    import argparse

    parser = add_rerank_arguments(argparse.ArgumentParser())
    ns = parser.parse_args(["--model", "m", "--store", "s3://b/s", "--queries", "q", "--candidates", "c", "--out", "o",
                            "--cascade", "32:100,4:20", "--workers", "3", "--gpus-per-worker", "0.5",
                            "--allow-mismatch", "--instruction", "Find code."])
    cfg = config_from_args(ns)
    assert (cfg.model, cfg.store, cfg.cascade, cfg.workers, cfg.gpus_per_worker, cfg.allow_mismatch,
            cfg.instruction, cfg.top_k, cfg.dtype) == ("m", "s3://b/s", "32:100,4:20", 3, 0.5, True, "Find code.",
                                                       None, "auto")
    with pytest.raises(SystemExit):
        parser.parse_args(["--store", "s"])  # the other required flags are missing
    with pytest.raises(SystemExit):
        parser.parse_args(["--store", "s", "--queries", "q", "--candidates", "c", "--out", "o", "--dtype", "fp8"])
