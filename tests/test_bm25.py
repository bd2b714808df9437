"""Tests for kalm_batch.bm25 (bm25s first-stage retrieval) on a tiny hand-made corpus."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kalm_batch.bm25 import bm25_candidates, read_beir_corpus, write_bm25_run
from kalm_batch.querylog import read_candidates

CORPUS = [
    ("cats", "Cats are small domesticated felines that purr and chase mice."),
    ("rockets", "Rockets burn liquid fuel to reach orbit around the earth."),
    ("bread", "Bake bread with flour, water, yeast and salt in a hot oven."),
    ("volcano", "A volcano erupts lava, ash and gas from the earth's mantle."),
]


def test_obvious_match_ranks_first() -> None:
    queries = {"q_cat": "why do cats purr", "q_bake": "how to bake bread with yeast", "q_orbit": "rocket fuel orbit"}
    rows = bm25_candidates(CORPUS, queries, k=10)
    top = {qid: doc for qid, doc, rank, _ in rows if rank == 1}
    assert top == {"q_cat": "cats", "q_bake": "bread", "q_orbit": "rockets"}
    for qid in queries:
        ranked = [(rank, score) for q, _, rank, score in rows if q == qid]
        assert [rank for rank, _ in ranked] == list(range(1, len(ranked) + 1))
        assert all(a[1] >= b[1] > 0 for a, b in itertools.pairwise(ranked))
    assert max(rank for *_, rank, _ in rows) <= len(CORPUS)  # k capped at the corpus size


def test_k_limits_and_shared_terms() -> None:
    rows = bm25_candidates(CORPUS, {"q": "earth"}, k=1)
    assert len(rows) == 1 and rows[0][1] in {"rockets", "volcano"} and rows[0][2] == 1
    both = bm25_candidates(CORPUS, {"q": "earth"}, k=100)
    assert {doc for _, doc, _, _ in both} == {"rockets", "volcano"}  # docs without the term are not returned
    with pytest.raises(ValueError, match="k must be >= 1"):
        bm25_candidates(CORPUS, {"q": "earth"}, k=0)


def test_empty_and_unmatched_queries_get_no_candidates() -> None:
    queries = {"empty": "", "stop": "the of and", "unknown": "zebra quasar", "ok": "lava"}
    rows = bm25_candidates(CORPUS, queries, k=5)
    assert [(qid, doc, rank) for qid, doc, rank, _ in rows] == [("ok", "volcano", 1)]
    assert bm25_candidates([], {"q": "lava"}) == []
    assert bm25_candidates(CORPUS, {}) == []


def test_write_bm25_run_from_beir_files(tmp_path: Path) -> None:
    corpus_path = tmp_path / "corpus.jsonl"
    records = [{"_id": doc_id, "title": "", "text": text} for doc_id, text in CORPUS]
    records.append({"_id": "felix", "title": "Felix the cat", "text": "A cartoon character."})
    corpus_path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    queries_path = tmp_path / "queries.jsonl"
    queries_path.write_text('{"_id": "q1", "text": "felix"}\n{"_id": "q2", "text": ""}\n')
    out = tmp_path / "bm25.trec"
    n = write_bm25_run(str(corpus_path), str(queries_path), str(out), k=3)
    candidates = read_candidates(str(out))
    assert n == len(candidates.rows) == 1
    assert candidates.rows[0][:3] == ("q1", "felix", 1)
    assert out.read_text().split()[-1] == "bm25"
    assert read_beir_corpus(str(corpus_path))[-1] == ("felix", "Felix the cat A cartoon character.")


def test_read_beir_corpus_rejects_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"_id": "a", "text": "x"}\n{"text": "no id"}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: expected a JSON object with '_id'"):
        read_beir_corpus(str(path))
