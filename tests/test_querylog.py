"""Tests for kalm_batch.querylog: readers on good and bad inputs, ranks, joins, qrels, TREC writing."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm_batch.querylog import (
    Candidates,
    InputError,
    Queries,
    join_queries,
    problems_summary,
    read_candidates,
    read_qrels,
    read_queries,
    top_k,
    write_trec_run,
)


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _kinds(problems) -> list[tuple[str, int]]:
    return [(p.kind, p.line) for p in problems]


# ---------------------------------------------------------------------------------------------- queries


def test_read_queries_jsonl_good_and_bad(tmp_path: Path) -> None:
    lines = [
        json.dumps({"_id": "q1", "text": "what is bm25", "metadata": {}}),
        json.dumps({"qid": 2, "query": "integer qid"}),
        "",
        "{not json",
        json.dumps({"_id": "q1", "text": "duplicate"}),
        json.dumps({"_id": "q3", "text": ""}),
        json.dumps({"title": "no id"}),
        json.dumps(["a", "list"]),
    ]
    url = _write(tmp_path / "queries.jsonl", "\n".join(lines) + "\n")
    q = read_queries(url)
    assert q.texts == {"q1": "what is bm25", "2": "integer qid", "q3": ""}
    assert _kinds(q.problems) == [
        ("malformed", 4), ("duplicate_qid", 5), ("empty_query", 6), ("malformed", 7), ("malformed", 8),
    ]
    for p in q.problems:
        assert p.source == url
        assert p.reason.startswith(f"{url}:{p.line}: ")
    assert problems_summary(q.problems) == {"duplicate_qid": 1, "empty_query": 1, "malformed": 3}


def test_read_queries_tsv_with_header_and_file_url(tmp_path: Path) -> None:
    path = tmp_path / "queries.tsv"
    _write(path, "query-id\ttext\nq1\tfirst query\nq2\twith\ttab\r\nq3\t\nno tab here\n\nq1\tagain\n")
    q = read_queries(f"file://{path}")
    assert q.texts == {"q1": "first query", "q2": "with\ttab", "q3": ""}
    assert _kinds(q.problems) == [("empty_query", 4), ("malformed", 5), ("duplicate_qid", 7)]
    assert ":5: " in q.problems[1].reason and "qid<TAB>text" in q.problems[1].reason
    assert q.lines == {"q1": 2, "q2": 3, "q3": 4}


def test_read_queries_tsv_without_header_and_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "queries.tsv"
    path.write_bytes(b"\xef\xbb\xbfq1\tcaf\xc3\xa9\nq2\tbad \xff byte\nq3\tok\n")
    q = read_queries(str(path))
    assert q.texts == {"q1": "café", "q3": "ok"}
    assert _kinds(q.problems) == [("malformed", 2)]
    assert "UTF-8" in q.problems[0].reason


def test_read_queries_gzip(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"_id": "a", "text": "zipped"}\n'))
    assert read_queries(str(path)).texts == {"a": "zipped"}


def test_read_queries_parquet(tmp_path: Path) -> None:
    path = tmp_path / "queries.parquet"
    pq.write_table(pa.table({"_id": ["q1", "q2", None, "q1"], "text": ["one", None, "x", "dup"]}), path)
    q = read_queries(str(path))
    assert q.texts == {"q1": "one"}
    assert _kinds(q.problems) == [("malformed", 2), ("malformed", 3), ("duplicate_qid", 4)]


def test_read_queries_parquet_missing_column_raises(tmp_path: Path) -> None:
    path = tmp_path / "queries.parquet"
    pq.write_table(pa.table({"id": ["q1"], "text": ["one"]}), path)
    with pytest.raises(InputError, match="qid or _id"):
        read_queries(str(path))


def test_read_queries_not_parquet_raises(tmp_path: Path) -> None:
    url = _write(tmp_path / "queries.parquet", "q1\tnot parquet\n")
    with pytest.raises(InputError, match="cannot read as Parquet"):
        read_queries(url)


# ------------------------------------------------------------------------------------------- candidates


def test_read_candidates_trec_rank_derivation_with_ties(tmp_path: Path) -> None:
    run = (
        "q1 Q0 dA 1 1.0 bm25\n"
        "q1 Q0 dB 2 3.0 bm25\n"   # highest score -> rank 1 despite file rank 2
        "q1 Q0 dC 3 1.0 bm25\n"   # ties with dA: file order keeps dA first
        "q2 Q0 dA 7 0.5 bm25\n"
        "q1 Q0 dD 4 2.0 bm25\n"
    )
    c = read_candidates(_write(tmp_path / "run.trec", run))
    assert c.rows == [
        ("q1", "dB", 1, 3.0), ("q1", "dD", 2, 2.0), ("q1", "dA", 3, 1.0), ("q1", "dC", 4, 1.0),
        ("q2", "dA", 1, 0.5),
    ]
    assert c.problems == []
    assert c.lines == {"q1": 1, "q2": 4}


def test_read_candidates_trec_bad_lines(tmp_path: Path) -> None:
    run = (
        "q1 Q0 d1 1 2.0 t\n"
        "q1 Q0 d2 2 1.0\n"           # 5 fields
        "q1 Q0 d3 x 1.0 t\n"         # non-numeric rank
        "q1 Q0 d4 4 high t\n"        # non-numeric score
        "q1 Q0 d5 5 nan t\n"         # not finite
        "q1 Q0 d1 6 0.5 t\n"         # duplicate pair
        "q1\tQ0\td6\t7\t0.1\tt\n"    # tabs are whitespace too
        "q1 Q0 d7 8 0.05 t extra\n"  # 7 fields
    )
    url = _write(tmp_path / "run.txt", run)
    c = read_candidates(url)
    assert c.rows == [("q1", "d1", 1, 2.0), ("q1", "d6", 2, 0.1)]
    assert _kinds(c.problems) == [
        ("malformed", 2), ("malformed", 3), ("malformed", 4), ("malformed", 5), ("duplicate_pair", 6),
        ("malformed", 8),
    ]
    assert c.problems[0].reason.startswith(f"{url}:2: expected 6 fields")
    assert "line 1" in c.problems[4].reason
    assert problems_summary(c.problems) == {"duplicate_pair": 1, "malformed": 5}


def test_read_candidates_parquet_rank_score_and_order(tmp_path: Path) -> None:
    with_rank = tmp_path / "ranked.parquet"
    pq.write_table(pa.table({"qid": ["q", "q", "q"], "doc_id": ["a", "b", "c"],
                             "score": [1.0, 9.0, 5.0], "rank": [3, 1, 2]}), with_rank)
    assert read_candidates(str(with_rank)).rows == [("q", "b", 1, 9.0), ("q", "c", 2, 5.0), ("q", "a", 3, 1.0)]

    scored = tmp_path / "scored.parquet"
    pq.write_table(pa.table({"qid": ["q", "q", "q"], "doc_id": ["a", "b", "c"], "score": [1.0, 9.0, 1.0]}), scored)
    assert read_candidates(str(scored)).rows == [("q", "b", 1, 9.0), ("q", "a", 2, 1.0), ("q", "c", 3, 1.0)]

    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"qid": [1, 1, 2], "doc_id": ["z", "y", "x"]}), plain)
    assert read_candidates(str(plain)).rows == [("1", "z", 1, 0.0), ("1", "y", 2, 0.0), ("2", "x", 1, 0.0)]


def test_read_candidates_parquet_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "cands.parquet"
    pq.write_table(pa.table({"qid": ["q", "q", None, "q", "q"], "doc_id": ["a", "b", "c", "a", "d"],
                             "rank": [1, 0, 3, 4, 5]}), path)
    c = read_candidates(str(path))
    assert c.rows == [("q", "a", 1, 0.0), ("q", "d", 5, 0.0)]
    assert _kinds(c.problems) == [("malformed", 2), ("malformed", 3), ("duplicate_pair", 4)]


def test_top_k_keeps_first_stage_ranks() -> None:
    rows = [("q1", f"d{i}", i, 10.0 - i) for i in range(1, 6)] + [("q2", "x", 1, 1.0), ("q2", "y", 3, 0.5)]
    c = Candidates(rows=rows, problems=[], source="s")
    kept = top_k(c, 2)
    assert kept.rows == [("q1", "d1", 1, 9.0), ("q1", "d2", 2, 8.0), ("q2", "x", 1, 1.0)]
    assert len(c.rows) == 7
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k(c, 0)


def test_join_queries_reports_missing_sides() -> None:
    q = Queries(texts={"q1": "one", "q3": "three"}, problems=[], source="queries.tsv", lines={"q1": 1, "q3": 2})
    c = Candidates(rows=[("q1", "a", 1, 2.0), ("q2", "b", 1, 1.0), ("q2", "c", 2, 0.5), ("q1", "d", 2, 1.0)],
                   problems=[], source="run.trec", lines={"q1": 1, "q2": 2})
    joined, problems = join_queries(q, c)
    assert joined == [("q1", "one", "a", 1, 2.0), ("q1", "one", "d", 2, 1.0)]
    assert _kinds(problems) == [("no_query", 2), ("no_candidates", 2)]
    assert problems[0].reason.startswith("run.trec:2: ") and "dropped 2 candidates" in problems[0].reason
    assert problems[1].source == "queries.tsv" and "'q3'" in problems[1].reason


# ------------------------------------------------------------------------------------------------ qrels


def test_read_qrels_beir_and_trec(tmp_path: Path) -> None:
    beir = _write(tmp_path / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq2\td3\t2\n")
    trec = _write(tmp_path / "qrels.txt", "q1 0 d1 1\nq1 0 d2 0\n\nq2 0 d3 2\n")
    expected = {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 2}}
    assert read_qrels(beir) == expected
    assert read_qrels(trec) == expected


@pytest.mark.parametrize(
    ("text", "line", "match"),
    [
        ("q1 0 d1 1\nq1 0 d2\n", 2, "expected 'qid 0 docid rel'"),
        ("q1\td1\t1\n\nq1\td3\t1\textra\n", 3, "expected 'query-id<TAB>corpus-id<TAB>score'"),
        ("q1 0\n", 1, "expected 'query-id"),
        ("q1 0 d1 1\nq1 0 d2 yes\n", 2, "not an integer"),
        ("q1\td1\t1\nq1\td1\t0\n", 2, "judged 1 earlier"),
    ],
)
def test_read_qrels_malformed_raises_with_location(tmp_path: Path, text: str, line: int, match: str) -> None:
    url = _write(tmp_path / "qrels.txt", text)
    with pytest.raises(InputError, match=match) as info:
        read_qrels(url)
    assert f"{url}:{line}:" in str(info.value)


# ----------------------------------------------------------------------------------------------- output


def test_write_trec_run_sorted_atomic_and_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "run.trec"
    rows = [("q2", "b", 1, 0.75), ("q1", "y", 2, 0.1234567890123), ("q1", "x", 1, 3.0)]
    write_trec_run(iter(rows), str(out), tag="rerank")
    assert out.read_text().splitlines() == [
        "q1 Q0 x 1 3.0 rerank", "q1 Q0 y 2 0.1234567890123 rerank", "q2 Q0 b 1 0.75 rerank",
    ]
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.trec"]
    c = read_candidates(str(out))
    assert c.rows == [("q1", "x", 1, 3.0), ("q1", "y", 2, 0.1234567890123), ("q2", "b", 1, 0.75)]

    write_trec_run([("q9", "z", 1, 1.0)], f"file://{out}")  # overwrite replaces the whole file
    assert out.read_text() == "q9 Q0 z 1 1.0 kalm\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.trec"]


@pytest.mark.parametrize(
    ("rows", "tag", "match"),
    [
        ([("q 1", "d", 1, 1.0)], "kalm", "whitespace"),
        ([("q1", "d", 1, float("nan"))], "kalm", "not finite"),
        ([("q1", "a", 1, 1.0), ("q1", "b", 2, 2.0)], "kalm", "descending score"),
        ([("q1", "a", 1, 1.0)], "my tag", "tag"),
    ],
)
def test_write_trec_run_rejects_bad_rows_and_leaves_nothing(tmp_path: Path, rows, tag: str, match: str) -> None:
    out = tmp_path / "run.trec"
    out.write_text("previous\n")
    with pytest.raises(ValueError, match=match):
        write_trec_run(rows, str(out), tag=tag)
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.trec"]


def test_write_trec_run_object_store_single_put() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    write_trec_run([("q1", "a", 1, 1.0)], "memory://kalm-test-querylog/run.trec")
    try:
        assert fs.cat_file("/kalm-test-querylog/run.trec") == b"q1 Q0 a 1 1.0 kalm\n"
        assert fs.ls("/kalm-test-querylog", detail=False) == ["/kalm-test-querylog/run.trec"]
    finally:
        fs.rm("/kalm-test-querylog", recursive=True)


@pytest.mark.s3
def test_round_trip_on_s3(s3_bucket: str) -> None:
    import fsspec

    fs, _ = fsspec.core.url_to_fs(s3_bucket)
    fs.pipe_file(f"{s3_bucket}/in/queries.jsonl", b'{"_id": "q1", "text": "hello"}\n{"_id": "q1", "text": "x"}\n')
    fs.pipe_file(f"{s3_bucket}/in/qrels.tsv", b"query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    queries = read_queries(f"{s3_bucket}/in/queries.jsonl")
    assert queries.texts == {"q1": "hello"}
    assert _kinds(queries.problems) == [("duplicate_qid", 2)]
    assert queries.problems[0].reason.startswith(f"{s3_bucket}/in/queries.jsonl:2: ")

    run_url = f"{s3_bucket}/out/run.trec"
    write_trec_run([("q1", "d2", 2, 0.5), ("q1", "d1", 1, 0.9)], run_url)
    assert fs.ls(f"{s3_bucket}/out", detail=False) == [f"{s3_bucket[5:]}/out/run.trec"]
    assert read_candidates(run_url).rows == [("q1", "d1", 1, 0.9), ("q1", "d2", 2, 0.5)]
    assert read_qrels(f"{s3_bucket}/in/qrels.tsv") == {"q1": {"d2": 1}}
