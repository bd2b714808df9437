"""The CLI chain as a user runs it, each step a ``kalm-batch`` subprocess:
tiny-model -> sample-corpus -> encode -> inspect --verify -> rerank -> eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]


def kalm_batch(*args: str, timeout: float = 600) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "kalm_batch.cli", *args], check=False, capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, f"kalm-batch {args[0]} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def test_cli_chain(tmp_path):
    model, data, store, out = tmp_path / "model", tmp_path / "data", tmp_path / "store", tmp_path / "out"
    assert "wrote a random tiny" in kalm_batch("tiny-model", str(model))
    kalm_batch("sample-corpus", str(data), "--max-docs", "40", "--queries", "5")
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line)["_id"] for line in (data / "queries.jsonl").read_text().splitlines()]
    assert len(corpus) == 40 and len(queries) == 5

    encoded = kalm_batch("encode", "--model", str(model), "--corpus", str(data / "corpus.jsonl"), "--store",
                         str(store), "--ratio", "4", "--dtype", "bfloat16", "--max-length", "128", "--num-cpus", "2")
    assert "encode summary" in encoded

    info = json.loads(kalm_batch("inspect", str(store), "--verify"))
    assert info["rows"] == len(corpus) and info["ratios"] == [4, 8, 16, 32]
    assert info["settings"]["dtype"] == "bfloat16" and info["settings"]["ratio"] == 4
    assert info["verify"]["records_corrupt"] == 0 and info["verify"]["records_ok"] == len(corpus), info["verify"]

    # the user's first-stage run: every query against the first 8 passages
    candidates = tmp_path / "first-stage.trec"
    candidates.write_text("".join(f"{q} Q0 {d['_id']} {r + 1} {10 - r} bm25\n"
                                  for q in queries for r, d in enumerate(corpus[:8])))
    qrels = next((data / "qrels").glob("*.tsv"))
    kalm_batch("rerank", "--model", str(model), "--store", str(store), "--queries", str(data / "queries.jsonl"),
               "--candidates", str(candidates), "--out", str(out), "--dtype", "float32", "--num-cpus", "2")
    run = [line.split() for line in (out / "run.trec").read_text().splitlines()]
    assert sorted((r[0], r[2]) for r in run) == sorted((q, d["_id"]) for q in queries for d in corpus[:8])
    for q in queries:  # ranks 1..8 by descending score within each query
        mine = sorted((int(r[3]), float(r[4])) for r in run if r[0] == q)
        assert [rank for rank, _ in mine] == list(range(1, 9))
        assert [s for _, s in mine] == sorted((s for _, s in mine), reverse=True)

    table = kalm_batch("eval", "--run", str(out / "run.trec"), "--qrels", str(qrels))
    header, row = table.splitlines()[0].split(), table.splitlines()[-1].split()
    assert header[0] == "run" and header[-1] == "n" and row[0] == str(out / "run.trec")
    assert int(row[-1]) == len(queries)
    assert all(0.0 <= float(x) <= 1.0 for x in row[1:-1])
