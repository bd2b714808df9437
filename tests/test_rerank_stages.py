"""Stages of the bulk rerank job without Ray: per-file validated reads, the per-query plan, worker pools, flags, and
the store/model check."""

from __future__ import annotations

import argparse
import json
import logging
import runpy
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm_batch import KaLMReranker
from kalm_batch.cli import main as cli_main
from kalm_batch.pipelines.cluster import parse_workers
from kalm_batch.pipelines.rerank import add_rerank_arguments, config_from_args, open_checked_store, run_rerank
from kalm_batch.pipelines.rerank_inputs import RAW_SCHEMA, file_items, id_problem, read_file_records
from kalm_batch.pipelines.rerank_plan import plan_group
from kalm_batch.store import StoreMismatchError, build_store


def _records(role: str, url: str) -> pa.Table:
    batch = {k: [v] for k, v in file_items(*(([url] if r == role else []) for r in "qcr"))[0].items()}
    return pa.concat_tables(list(read_file_records(batch)))


def test_reads_validate_every_value(tmp_path):
    q = tmp_path / "queries.jsonl"
    q.write_text('{"_id": "q1", "text": "fine"}\n{"_id": "q2", "text": "bad \\ud800"}\n'
                 '{"_id": "q 3", "text": "x"}\n{"_id": 7, "text": "int ids are fine"}\n[1]\n')
    t = _records("q", str(q)).to_pylist()
    assert [(r["role"], r["qid"], r["kind"]) for r in t] == [
        ("q", "q1", None), ("p", "q2", "bad_text"), ("p", "q 3", "bad_id"), ("q", "7", None), ("p", None, "malformed")]
    assert all(r["reason"].startswith(f"{q}:{i}: ") for i, r in enumerate(t, 1) if r["role"] == "p")
    c = tmp_path / "run.parquet"
    pq.write_table(pa.table({"qid": ["q1", "q\t2", "q1"], "doc_id": ["d1", "d2", "d 3"], "rank": [1, 1, 2]}), c)
    t = _records("c", str(c)).to_pylist()
    assert [(r["role"], r["qid"], r["kind"], r["order"]) for r in t] == [
        ("c", "q1", None, "rank"), ("p", "q\t2", "bad_id", None), ("p", "q1", "bad_id", None)]
    empty = tmp_path / "empty.trec"
    empty.write_text("\n")
    assert [(r["kind"], r["source"]) for r in _records("c", str(empty)).to_pylist()] == [("empty_file", str(empty))]
    assert id_problem("a b", "qid") and id_problem("\udc80", "doc_id") and id_problem(True, "qid")
    assert id_problem("ok", "qid") is None and id_problem(12, "qid") is None


def _raw(**kw) -> dict:
    row = dict.fromkeys(RAW_SCHEMA.names)
    return {**row, "file_index": 0, "source": "f", **kw}


def test_plan_group_ranks_dedupes_and_keeps_the_top_k():
    rows = [_raw(role="q", gkey="q", qid="q", text="hello", line=1, file_role="q", file_index=0),
            _raw(role="q", gkey="q", qid="q", text="other", line=2, file_role="q", file_index=0)]
    rows += [_raw(role="c", gkey="q", qid="q", doc_id=d, score=s, order="score", line=i, file_index=1)
             for i, (d, s) in enumerate([("a", 1.0), ("b", 3.0), ("c", 2.0), ("b", 9.0), ("d", 2.0)], 1)]
    rows.append(_raw(role="r", gkey="q", qid="q", doc_id="a", rel=1, line=1, file_index=2))
    out = plan_group(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), top_k=3, partitions=7).to_pylist()
    pairs = [(r["doc_id"], r["first_stage_rank"], r["query"]) for r in out if r["role"] == "pair"]
    assert pairs == [("b", 1, "hello"), ("c", 2, "hello"), ("d", 3, "hello")]  # ties by file order; first text kept
    kinds = sorted(r["kind"] for r in out if r["role"] == "problem")
    assert kinds == ["duplicate_pair", "duplicate_qid"]
    assert [(r["doc_id"], r["rel"]) for r in out if r["role"] == "qrel"] == [("a", 1)]
    assert [r["first_stage_rank"] for r in out if r["role"] == "query"] == [3]
    assert len({r["part"] for r in out}) == 1 and 0 <= out[0]["part"] < 7
    # no usable query: the top-k candidates become skipped pairs, plus one no_query problem naming the refusal
    lonely = [_raw(role="p", gkey="z", qid="z", kind="bad_text", reason="f:1: bad", line=1, file_role="q")]
    lonely += [_raw(role="c", gkey="z", qid="z", doc_id=d, score=0.0, order="order", line=i, file_index=1)
               for i, d in enumerate("xyz", 1)]
    out = plan_group(pa.Table.from_pylist(lonely, schema=RAW_SCHEMA), top_k=2, partitions=7).to_pylist()
    assert [(r["doc_id"], r["kind"]) for r in out if r["role"] == "skip"] == [("x", "no_query"), ("y", "no_query")]
    no_query = [r for r in out if r["kind"] == "no_query" and r["role"] == "problem"]
    assert len(no_query) == 1 and "refused" in no_query[0]["reason"] and no_query[0]["qid"] == "z"


def test_parse_workers():
    assert parse_workers("auto") is None and parse_workers(3) == (3, 3) and parse_workers("1:8") == (1, 8)
    for bad in ("0", "4:2", "many"):
        with pytest.raises(ValueError, match="--workers"):
            parse_workers(bad)


def test_flags_round_trip_to_config(capsys):
    parser = add_rerank_arguments(argparse.ArgumentParser())
    ns = parser.parse_args(["--model", "m", "--store", "s3://b/s", "--queries", "q", "--candidates", "c", "--out", "o",
                            "--cascade", "32:100,4:20", "--gpus-per-worker", "0.5", "--store-version", "3",
                            "--dry-run", "--allow-mismatch", "--instruction", "Find code."])
    cfg = config_from_args(ns)
    assert (cfg.model, cfg.store, cfg.cascade, cfg.workers, cfg.gpus_per_worker, cfg.allow_mismatch, cfg.store_version,
            cfg.dry_run, cfg.overwrite, cfg.instruction, cfg.top_k, cfg.dtype) == (
        "m", "s3://b/s", "32:100,4:20", "auto", 0.5, True, 3, True, False, "Find code.", None, "auto")
    assert config_from_args(parser.parse_args(["--store", "s", "--queries", "q", "--candidates", "c", "--out", "o",
                                               "--workers", "2:6"])).workers == "2:6"
    with pytest.raises(SystemExit):
        parser.parse_args(["--store", "s"])
    assert "the following arguments are required: --queries, --candidates, --out" in capsys.readouterr().err



@pytest.mark.parametrize(("job", "command"), [("rerank_queries.py", "rerank"), ("sweep.py", "sweep")])
def test_job_entrypoint_takes_the_commands_flags(job, command, monkeypatch, capsys):
    """jobs/<job> is ``kalm-batch <command>``: the same parser, so the same flags, defaults and help."""
    path = Path(__file__).resolve().parents[1] / "jobs" / job
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the job puts its working dir first
    with pytest.raises(SystemExit) as job_exit:
        runpy.run_path(str(path), run_name="__main__")
    job_help = capsys.readouterr().out
    with pytest.raises(SystemExit) as cli_exit:
        cli_main([command, "--help"])
    assert job_exit.value.code == cli_exit.value.code == 0
    assert job_help == capsys.readouterr().out and "--store STORE" in job_help and "--batch-size" in job_help

def test_store_of_another_model_is_refused_before_any_output(tiny_model_dir, tmp_path, caplog):
    from kalm_batch.tiny import write_random_model

    other_dir = write_random_model(tmp_path / "other", shape="tiny", seed=1)  # same config, other weights
    other = KaLMReranker(str(other_dir), dtype="float32", chunk_size=4, max_length=128)
    store = f"file://{tmp_path}/other-store"
    build_store(store, other, [("d1", "one"), ("d2", "two")], dtype="float32")
    (tmp_path / "q.tsv").write_text("q1\thello\n")
    (tmp_path / "c.trec").write_text("q1 Q0 d1 1 1.0 x\n")
    cfg = {"model": str(tiny_model_dir), "store": store, "queries": str(tmp_path / "q.tsv"),
               "candidates": str(tmp_path / "c.trec"), "out": str(tmp_path / "out")}
    from kalm_batch.pipelines.rerank import RerankConfig

    with pytest.raises(StoreMismatchError, match="weights_sha256") as err:
        run_rerank(RerankConfig(**cfg))
    assert str(other_dir) in str(err.value) and str(tiny_model_dir) in str(err.value)
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING):
        reader, _ = open_checked_store(store, str(tiny_model_dir), allow_mismatch=True)
    assert len(reader) == 2 and reader.version == 0
    assert any("MISMATCH" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert json.loads(json.dumps(reader.summary()))["rows"] == 2
