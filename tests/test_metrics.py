"""Tests for kalm_batch.metrics (ir-measures based evaluation and reporting)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kalm_batch.metrics import compare_runs, eval_files, evaluate_run, format_table, read_run
from kalm_batch.querylog import write_trec_run

QRELS = {"q1": {"d1": 1, "d9": 0}, "q2": {"d2": 2}}


def test_run_equal_to_qrels_is_perfect() -> None:
    run = {"q1": {"d1": 1.0}, "q2": {"d2": 1.0}}
    result = evaluate_run(run, QRELS)
    assert result["nDCG@10"] == pytest.approx(1.0)
    assert result["RR@10"] == pytest.approx(1.0)
    assert result["R@100"] == pytest.approx(1.0)
    assert result["n_queries"] == 2


def test_relevant_doc_at_rank_two_gives_rr_half() -> None:
    run = {"q1": {"x": 2.0, "d1": 1.0}}
    result = evaluate_run(run, {"q1": {"d1": 1}}, measures=("RR@10", "nDCG@10", "P@1"))
    assert result["RR@10"] == pytest.approx(0.5)
    assert result["nDCG@10"] == pytest.approx(0.6309, abs=1e-4)  # 1 / log2(3)
    assert result["P@1"] == pytest.approx(0.0)


def test_query_missing_from_run_counts_as_zero() -> None:
    perfect_q1 = {"q1": {"d1": 1.0}}
    result = evaluate_run(perfect_q1, QRELS)
    assert result["nDCG@10"] == pytest.approx(0.5)
    assert result["RR@10"] == pytest.approx(0.5)
    assert result["n_queries"] == 2
    assert evaluate_run({"q1": {"d1": 1.0}, "q2": {}}, QRELS)["RR@10"] == pytest.approx(0.5)


def test_unjudged_run_queries_are_ignored_and_empty_qrels_rejected() -> None:
    run = {"q1": {"d1": 1.0}, "q2": {"d2": 1.0}, "extra": {"d1": 5.0}}
    assert evaluate_run(run, QRELS)["nDCG@10"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no judgements"):
        evaluate_run(run, {"q1": {}})
    with pytest.raises(ValueError, match="unknown measure"):
        evaluate_run(run, QRELS, measures=("NotAMeasure@3",))


def test_compare_runs_and_format_table() -> None:
    runs = {"bm25": {"q1": {"x": 2.0, "d1": 1.0}}, "reranked": {"q1": {"d1": 2.0, "x": 1.0}, "q2": {"d2": 1.0}}}
    results = compare_runs(runs, QRELS)
    assert results["bm25"]["RR@10"] == pytest.approx(0.25)
    assert results["reranked"]["RR@10"] == pytest.approx(1.0)
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["run", "nDCG@10", "RR@10", "R@100", "n"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["bm25", f"{results['bm25']['nDCG@10']:.4f}", "0.2500", "0.5000", "2"]
    assert lines[3].split() == ["reranked", "1.0000", "1.0000", "1.0000", "2"]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule share the fixed width
    assert format_table({"r": {"RR@10": 0.5}}, measures=("RR@10", "nDCG@10")).splitlines()[2].split() == [
        "r", "0.5000", "-", "-",
    ]


def test_eval_files_and_read_run(tmp_path: Path) -> None:
    run_path = tmp_path / "run.trec"
    write_trec_run([("q1", "x", 1, 2.0), ("q1", "d1", 2, 1.0), ("q2", "d2", 1, 0.5)], str(run_path))
    qrels_path = tmp_path / "qrels.tsv"
    qrels_path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td3\t1\n")
    assert read_run(str(run_path)) == {"q1": {"x": 2.0, "d1": 1.0}, "q2": {"d2": 0.5}}
    result = eval_files(str(run_path), str(qrels_path), measures=("RR@10",))
    assert result == {"RR@10": pytest.approx((0.5 + 1.0 + 0.0) / 3), "n_queries": 3}


def test_read_run_rejects_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 a 1 1.0 t\nq1 Q0 b 2 t\n")
    with pytest.raises(ValueError, match=r"run\.trec:2: expected 6 fields"):
        read_run(str(path))
