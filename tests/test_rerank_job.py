"""The bulk rerank job on a real local Ray: multi-file and hostile inputs, scores equal to in-process core scoring,
exact pair accounting, qrels metrics equal to ir-measures over the whole run, the commit marker, cascades, S3, dry run.

One Ray session (2 CPUs) is shared by the module. Stores are float32 (lossless), models compute in float32, so every
score must equal ``KaLMReranker.score`` on the same memories within 1e-5. Kill-and-resume: tests/test_rerank_resume.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from kalm_batch import KaLMReranker, fsio, runfolder
from kalm_batch.bm25 import read_beir_corpus, write_bm25_run
from kalm_batch.metrics import evaluate_run, read_run
from kalm_batch.pipelines.rerank import RerankConfig, run_eval, run_rerank
from kalm_batch.pipelines.rerank_output import OutputInUseError
from kalm_batch.querylog import read_candidates, read_qrels, read_queries
from kalm_batch.sample import write_sample_corpus
from kalm_batch.store import build_store, open_store

TOL = 1e-5
UNCOMMITTED = "holds no committed rerank run .*Re-run the same `kalm-batch rerank` command to resume it"


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return KaLMReranker(str(tiny_model_dir), dtype="float32", chunk_size=4, max_length=128)


def write_inputs(root: Path, info, corpus: dict) -> dict:
    """Queries in a folder of two files (+ an empty one), candidates as a glob over two TREC files and a Parquet
    file, with hostile rows of every kind appended. Returns what the job should make of them."""
    queries = read_queries(info.queries_path).texts
    qids = list(queries)
    first_q = qids[0]
    qdir, cdir = root / "queries", root / "cands"
    qdir.mkdir()
    cdir.mkdir()
    (qdir / "a.jsonl").write_text("".join(json.dumps({"_id": q, "text": queries[q]}) + "\n" for q in qids[:10]) +
                                  json.dumps({"_id": first_q, "text": "another text"}) + "\n"  # duplicate qid
                                  '{"_id": "q-sur", "text": "lone \\ud800 surrogate"}\n'  # refused: bad_text
                                  '{"_id": "q 1", "text": "whitespace qid"}\n'  # refused: bad_id
                                  '{"_id": "q-empty", "text": ""}\n{"_id": "q-lonely", "text": "no candidates"}\n'
                                  "{not json\n")
    (qdir / "b.tsv").write_text("qid\ttext\n" + "".join(f"{q}\t{queries[q]}\n" for q in qids[10:]))
    (qdir / "empty.tsv").write_text("")
    write_bm25_run(info.corpus_path, info.queries_path, str(root / "bm25.trec"), k=6)
    lines = (root / "bm25.trec").read_text().splitlines()
    docs = list(corpus)
    extra = [f"q-empty Q0 {docs[0]} 1 2.0 x", f"q-empty Q0 {docs[1]} 2 1.0 x",
             f"{first_q} Q0 no-such-doc 1 99.0 x",  # not in the store: skipped, and it is rank 1 of its query
             f"q-ghost Q0 {docs[2]} 1 1.0 x", f"q-sur Q0 {docs[3]} 1 1.0 x",  # no usable query: skipped
             "this line is malformed", lines[0]]  # a duplicate (qid, doc_id) pair
    half = len(lines) // 2
    (cdir / "run-a.trec").write_text("\n".join(lines[:half]) + "\n")
    (cdir / "run-b.trec").write_text("\n".join(lines[half:] + extra) + "\n")
    pq.write_table(pa.table({"qid": ["q\t2", "q-pq"], "doc_id": [docs[4], "d 5"], "score": [1.0, 1.0]}),
                   cdir / "run-c.parquet")  # both refused: bad_id
    (root / "all.trec").write_text("\n".join(lines + extra) + "\n")  # the same TREC rows, as one file
    return {"queries": str(qdir), "candidates": f"{cdir}/run-*", "first_q": first_q,
            "texts": {**{q: queries[q] for q in qids}, "q-empty": ""}}


@pytest.fixture(scope="module")
def data(tmp_path_factory, scorer):
    root = tmp_path_factory.mktemp("rerank-data")
    info = write_sample_corpus(str(root), max_docs=150, n_queries=20)
    corpus = dict(read_beir_corpus(info.corpus_path))
    store = f"file://{root}/store"
    build_store(store, scorer, list(corpus.items()), dtype="float32", shard_rows=32)
    return {"root": root, "store": store, "corpus": corpus, "qrels": info.qrels_path,
            **write_inputs(root, info, corpus)}


def _config(data, out, **kw) -> RerankConfig:
    base = {"model": kw.pop("model"), "store": data["store"], "queries": data["queries"], "candidates": data["candidates"],
                "out": out, "dtype": "float32", "num_cpus": 2, "workers": "1", "partitions": 3}
    return RerankConfig(**{**base, **kw})


def _dataset(out: str, name: str) -> pa.Table:
    fs, path = fsio.fs_for_pyarrow(fsio.join_url(out, name))
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def _in_process(scorer, store: str, pairs, queries: dict, ratio: int) -> dict:
    """Core scoring of each (qid, doc_id) from the store's memories, one query at a time (today's job's scores)."""
    reader = open_store(store)
    by_q: dict[str, list[str]] = {}
    for qid, doc in sorted(pairs):
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
    assert len(got) == table.num_rows  # every (qid, doc_id) exactly once
    assert set(got) == set(want)
    assert max(abs(got[k][0] - want[k][0]) for k in want) <= TOL
    assert max(abs(got[k][1] - want[k][1]) for k in want) <= 1e-4


def _expected(data, k: int) -> tuple[set, set, set]:
    """(pairs to score, skipped: doc not in store, skipped: no query) from the single-file copy of the TREC rows."""
    rows = [r for r in read_candidates(str(data["root"] / "all.trec")).rows if r[2] <= k]
    usable = {(q, d) for q, d, _, _ in rows if q in data["texts"]}
    return ({p for p in usable if p[1] in data["corpus"]}, {p for p in usable if p[1] not in data["corpus"]},
            {(q, d) for q, d, _, _ in rows if q not in data["texts"]})


@pytest.mark.ray
def test_end_to_end_from_many_files_with_hostile_rows(ray_session, data, scorer, tiny_model_dir, tmp_path):
    out = str(tmp_path / "out")
    cfg = _config(data, out, model=str(tiny_model_dir), top_k=5, qrels=data["qrels"])
    summary = run_rerank(cfg)
    scored, missing, no_query = _expected(data, 5)
    table = runfolder.read_scores(out)
    _assert_scores_match(table, _in_process(scorer, data["store"], scored, data["texts"], ratio=4))
    assert set(table.column("ratio").to_pylist()) == {4} and set(table.column("stage").to_pylist()) == {1}
    # every input pair is scored or skipped with a reason; nothing else
    skipped = _dataset(out, "skipped").to_pylist()
    assert {(r["qid"], r["doc_id"]) for r in skipped if r["kind"] == "doc_not_in_store"} == missing
    assert {(r["qid"], r["doc_id"]) for r in skipped if r["kind"] == "no_query"} == no_query
    assert all(r["reason"] for r in skipped)
    assert summary.input_pairs == len(scored) + len(missing) + len(no_query) == summary.pairs_scored + \
        summary.skipped_pairs and summary.skipped_pairs == len(skipped)
    # every bad input row is a problem with its reason (and its qid where one was read)
    problems = _dataset(out, "problems").to_pylist()
    by_kind: dict[str, list] = {}
    for p in problems:
        by_kind.setdefault(p["kind"], []).append(p)
    assert {k: len(v) for k, v in by_kind.items()} == summary.problems
    assert {p["qid"] for p in by_kind["bad_id"]} >= {"q 1", "q\t2"} and len(by_kind["bad_id"]) == 3
    assert [p["qid"] for p in by_kind["bad_text"]] == ["q-sur"] and "surrogate" in by_kind["bad_text"][0]["reason"]
    assert [p["qid"] for p in by_kind["duplicate_qid"]] == [data["first_q"]]
    assert "different text" in by_kind["duplicate_qid"][0]["reason"]
    assert {p["qid"] for p in by_kind["no_query"]} == {"q-ghost", "q-sur"}
    assert [p["qid"] for p in by_kind["no_candidates"]] == ["q-lonely"]
    assert [p["qid"] for p in by_kind["empty_query"]] == ["q-empty"]
    assert len(by_kind["malformed"]) == 2 and len(by_kind["duplicate_pair"]) == 1
    assert [p["source"].endswith("empty.tsv") for p in by_kind["empty_file"]] == [True]
    assert all(p["reason"] for p in problems)
    # ranking: dense ranks following descending score; the merged run.trec says the same
    run = read_run(fsio.join_url(out, "run.trec"))
    for qid in set(table.column("qid").to_pylist()):
        rows = sorted((r for r in table.to_pylist() if r["qid"] == qid), key=lambda r: r["rank"])
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
        assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
        assert run[qid] == pytest.approx({r["doc_id"]: r["score"] for r in rows}, abs=1e-7)
    # metrics summed per query in the workers == ir-measures over the whole run
    qrels = read_qrels(data["qrels"])
    whole = evaluate_run(run, qrels)
    assert summary.metrics["reranked"] == pytest.approx(whole, abs=1e-12)
    first = {}
    for q, d, rank, _ in read_candidates(str(data["root"] / "all.trec")).rows:
        if rank <= 5 and q in data["texts"]:
            first.setdefault(q, {})[d] = -float(rank)
    assert summary.metrics["first-stage"] == pytest.approx(evaluate_run(first, qrels), abs=1e-12)
    assert run_eval(out, data["qrels"]) == pytest.approx(whole)
    saved = json.loads(fsio.read_bytes(fsio.join_url(out, "summary.json")))
    assert saved["store"]["version"] == 0 and saved["partitions"]["total"] == 3
    # per actor: partitions and busy seconds (a share of its life) holding each partition's fetch, scoring and
    # writing; seconds are rounded to 3-4 decimals (a fast machine may read 0.0), so bounds and sums, not "> 0"
    actors = saved["actors"]
    assert actors and sum(a["partitions"] for a in actors) == saved["partitions"]["scored_now"] == 3
    assert all(a["busy_s"] >= 0 and 0 <= a["busy_share"] <= 1 for a in actors)
    assert sum(a["busy_s"] for a in actors) >= saved["fetch_decode_s"] + saved["score_s"] + saved["write_s"] - 1e-3
    # a reused --out never mixes runs: another plan is refused, the same command resumes (here: nothing left)
    with pytest.raises(OutputInUseError, match="stages"):
        run_rerank(_config(data, out, model=str(tiny_model_dir), top_k=4, qrels=data["qrels"]))
    assert runfolder.is_committed(out)
    fsio.delete(fsio.join_url(out, runfolder.COMMIT_MARKER))
    with pytest.raises(runfolder.UncommittedOutputError, match=UNCOMMITTED):
        runfolder.read_scores(out)
    with pytest.raises(runfolder.UncommittedOutputError, match=UNCOMMITTED):
        run_eval(fsio.join_url(out, "run.trec"), data["qrels"])
    again = run_rerank(cfg)
    assert again.partitions == {"total": 3, "scored_now": 0, "already_committed": 3}
    assert again.pairs_scored == summary.pairs_scored and runfolder.is_committed(out)


@pytest.mark.ray
def test_dry_run_counts_without_writing(ray_session, data, tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    summary = run_rerank(_config(data, str(out), model=str(tiny_model_dir), cascade="16:5,4:2", dry_run=True))
    scored, missing, no_query = _expected(data, 5)
    est = summary.estimate
    assert summary.dry_run and not out.exists()
    assert (est["input_pairs"], est["pairs_in_store"], est["pairs_doc_missing"], est["pairs_no_query"]) == \
        (len(scored) + len(missing) + len(no_query), len(scored), len(missing), len(no_query))
    assert est["queries"] == len(data["texts"]) + 1  # + q-lonely (a query without candidates); q-sur, "q 1" refused
    assert est["problems"]["bad_id"] == 3 and est["problems"]["malformed"] == 2 and est["problems"]["empty_file"] == 1
    per_query: dict[str, int] = {}
    for q, _ in scored | missing:
        per_query[q] = per_query.get(q, 0) + 1
    s1, s2 = est["stages"]
    assert (s1["ratio"], s1["k"], s1["pairs"]) == (16, 5, len(scored))
    assert s2["pairs"] <= sum(min(2, n) for n in per_query.values()) and s2["pairs"] > 0
    assert s1["vectors"] > 0 and s1["prompt_tokens"] > 0 and s1["decoder_tokens"] == s1["prompt_tokens"] + s1["vectors"]


def _corrupt_one_record(store_dir: Path, doc_id: str) -> str:
    """Flip bytes inside one record's memory payload, keeping its checksum; returns the data file's name."""
    reader = open_store(f"file://{store_dir}")
    rel = reader.file_of(doc_id)
    path = store_dir / rel
    table = pq.read_table(path)
    row = table.column("doc_id").to_pylist().index(doc_id)
    payloads = table.column("memory").to_pylist()
    bad = bytearray(payloads[row])
    for i in range(len(bad) // 3, len(bad) // 3 + 8):
        bad[i] ^= 0xFF
    payloads[row] = bytes(bad)
    table = table.set_column(table.schema.get_field_index("memory"), "memory", pa.array(payloads, pa.binary()))
    pq.write_table(table, path, row_group_size=64)
    return rel.rsplit("/", 1)[-1]


@pytest.mark.ray
def test_cascade_with_a_corrupt_record(ray_session, data, scorer, tiny_model_dir, tmp_path):
    store_dir = tmp_path / "store"
    shutil.copytree(data["root"] / "store", store_dir)
    scored, missing, no_query = _expected(data, 5)
    q = data["first_q"]
    victim = min(d for qq, d in scored if qq == q)
    name = _corrupt_one_record(store_dir, victim)
    out = str(tmp_path / "cascade")
    summary = run_rerank(_config(data, out, model=str(tiny_model_dir), store=f"file://{store_dir}",
                                 cascade="16:5,4:2"))
    table = runfolder.read_scores(out)
    pairs = scored - {(q, victim)}
    coarse = _in_process(scorer, data["store"], pairs, data["texts"], ratio=16)
    by_q: dict[str, list[str]] = {}
    for qid, doc in sorted(pairs):
        by_q.setdefault(qid, []).append(doc)
    top2 = {(qq, d) for qq, docs in by_q.items() for d in sorted(docs, key=lambda d: -coarse[(qq, d)][0])[:2]}
    fine = _in_process(scorer, data["store"], top2, data["texts"], ratio=4)
    _assert_scores_match(table, {k: fine.get(k, coarse[k]) for k in pairs})
    rows = table.to_pylist()
    assert {(r["qid"], r["doc_id"]) for r in rows if r["stage"] == 2} == top2
    assert all(r["ratio"] == (4 if r["stage"] == 2 else 16) for r in rows)
    for qq, docs in by_q.items():
        placed = [r["doc_id"] for r in sorted((r for r in rows if r["qid"] == qq), key=lambda r: r["rank"])]
        head = sorted((d for d in docs if (qq, d) in top2), key=lambda d: -fine[(qq, d)][0])
        tail = sorted((d for d in docs if (qq, d) not in top2), key=lambda d: -coarse[(qq, d)][0])
        assert placed == head + tail
    corrupt = [r for r in _dataset(out, "skipped").to_pylist() if r["kind"] == "corrupt_record"]
    assert [(r["qid"], r["doc_id"]) for r in corrupt] == [(q, victim)] and name in corrupt[0]["reason"]
    assert summary.skipped == {"corrupt_record": 1, "doc_not_in_store": len(missing), "no_query": len(no_query)}
    assert summary.input_pairs == summary.pairs_scored + summary.skipped_pairs
    s1, s2 = summary.stages
    assert (s1["ratio"], s1["k"], s1["pairs"], s2["ratio"], s2["k"], s2["pairs"]) == \
        (16, 5, len(pairs), 4, 2, len(top2))


@pytest.mark.ray
@pytest.mark.s3
def test_s3_inputs_store_and_outputs(ray_session, s3_bucket, data, scorer, tiny_model_dir):
    qids = [q for q in data["texts"] if q != "q-empty"][:4]
    cands = [r for r in read_candidates(str(data["root"] / "all.trec")).rows if r[0] in qids and r[2] <= 4]
    docs = sorted({d for _, d, _, _ in cands if d in data["corpus"]})
    store = f"{s3_bucket}/store"
    build_store(store, scorer, [(d, data["corpus"][d]) for d in docs], dtype="float32", shard_rows=8)
    half = len(cands) // 2
    for name, rows in (("a.trec", cands[:half]), ("b.trec", cands[half:])):
        fsio.write_bytes_atomic(f"{s3_bucket}/in/run/{name}", "".join(f"{q} Q0 {d} {r} {s} bm25\n"
                                                                      for q, d, r, s in rows).encode())
    fsio.write_bytes_atomic(f"{s3_bucket}/in/queries.tsv",
                            "".join(f"{q}\t{data['texts'][q]}\n" for q in qids).encode())
    out = f"{s3_bucket}/out"
    summary = run_rerank(RerankConfig(model=str(tiny_model_dir), store=store, queries=f"{s3_bucket}/in/queries.tsv",
                                      candidates=f"{s3_bucket}/in/run/", out=out, ratio=8, dtype="float32",
                                      workers="1", partitions=2))
    pairs = {(q, d) for q, d, _, _ in cands if d in data["corpus"]}
    table = runfolder.read_scores(out)
    _assert_scores_match(table, _in_process(scorer, store, pairs, data["texts"], ratio=8))
    assert set(table.column("ratio").to_pylist()) == {8} and summary.stages[0]["ratio"] == 8
    not_stored = {(q, d) for q, d, _, _ in cands if d not in data["corpus"]}  # the first query's "no-such-doc"
    assert summary.pairs_scored == len(pairs) and summary.skipped == {"doc_not_in_store": len(not_stored)}
    for name in ("run.trec", "summary.json", runfolder.COMMIT_MARKER):
        assert fsio.exists(fsio.join_url(out, name))
