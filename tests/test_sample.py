"""Tests for kalm_batch.sample: the stdlib-docstring BEIR sample dataset."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from kalm_batch.corpus import Passage, read_corpus_file
from kalm_batch.sample import make_query, write_sample_corpus


def _jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _qrels(path: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    info = write_sample_corpus(str(out), max_docs=1500, n_queries=60, seed=3)
    return out, info


def test_deterministic_bytes(sample, tmp_path):
    out, info = sample
    again = write_sample_corpus(str(tmp_path / "again"), max_docs=1500, n_queries=60, seed=3)
    for a, b in [(info.corpus_path, again.corpus_path), (info.queries_path, again.queries_path),
                 (info.qrels_path, again.qrels_path)]:
        assert Path(a).read_bytes() == Path(b).read_bytes()
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["corpus.jsonl", "queries.jsonl", "test.tsv"]  # no temp files left behind


def test_layout_and_counts(sample):
    out, info = sample
    assert info.corpus_path == str(out / "corpus.jsonl")
    assert info.queries_path == str(out / "queries.jsonl")
    assert info.qrels_path == str(out / "qrels" / "test.tsv")
    docs, queries = _jsonl(info.corpus_path), _jsonl(info.queries_path)
    assert len(docs) == info.n_docs == 1500
    assert len(queries) == info.n_queries == 60
    assert [d["_id"] for d in docs] == [f"stdlib-{i:06d}" for i in range(1, 1501)]
    assert all(set(d) == {"_id", "title", "text"} and len(d["text"]) >= 40 for d in docs)
    assert all(set(q) == {"_id", "text"} for q in queries)
    assert len({d["title"].split(".")[0] for d in docs}) > 50  # a spread over many modules, not the first N
    assert not any(d["title"].split(".")[0] in {"test", "idlelib", "tkinter"} for d in docs)
    assert Path(info.qrels_path).read_text().splitlines()[0] == "query-id\tcorpus-id\tscore"


def test_qrels_point_to_existing_docs_and_queries(sample):
    _, info = sample
    doc_ids = {d["_id"] for d in _jsonl(info.corpus_path)}
    query_ids = [q["_id"] for q in _jsonl(info.queries_path)]
    qrels = _qrels(info.qrels_path)
    assert len(qrels) == len(query_ids)
    assert sorted(r["query-id"] for r in qrels) == sorted(query_ids)
    assert all(r["corpus-id"] in doc_ids and r["score"] == "1" for r in qrels)


def test_queries_are_not_title_matches(sample):
    _, info = sample
    docs = {d["_id"]: d for d in _jsonl(info.corpus_path)}
    queries = {q["_id"]: q["text"] for q in _jsonl(info.queries_path)}
    for r in _qrels(info.qrels_path):
        title, query = docs[r["corpus-id"]]["title"], queries[r["query-id"]]
        assert title.lower() not in query.lower()
        assert title.rsplit(".", 1)[-1].lower() not in query.lower()
        assert len(query.split()) >= 4


def test_lengths_long_tailed(sample):
    _, info = sample
    lengths = [len(d["text"]) for d in _jsonl(info.corpus_path)]
    assert max(lengths) > 5 * statistics.median(lengths)


def test_readable_by_corpus_reader(sample):
    _, info = sample
    items = list(read_corpus_file(info.corpus_path))
    assert len(items) == info.n_docs and all(isinstance(x, Passage) for x in items)


def test_make_query():
    assert make_query("json.dumps", "Serialize obj to a JSON formatted str.\n\nMore.") == \
        "Serialize obj to a JSON formatted str."
    assert make_query("os.path.join", "Join two or more pathname components, inserting '/' as needed.") == \
        "two or more pathname components, inserting '/' as needed."
    assert make_query("m.f", "Too short. But the rest is long enough.") is None
    assert make_query("m.get", "Use the getter to fetch values from a store.") is None  # name inside a word


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_docs"):
        write_sample_corpus(str(tmp_path), max_docs=0)
    with pytest.raises(ValueError, match="n_queries"):
        write_sample_corpus(str(tmp_path), n_queries=-1)
