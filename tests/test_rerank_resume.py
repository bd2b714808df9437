"""Resuming the bulk rerank job: SIGKILL of a running job, then the same command finishes it, every pair exactly once;
a different model or store than the committed partitions is refused; --overwrite starts over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kalm_batch import KaLMReranker, fsio, runfolder
from kalm_batch.bm25 import read_beir_corpus, write_bm25_run
from kalm_batch.pipelines.rerank import RerankConfig, run_rerank
from kalm_batch.pipelines.rerank_output import OutputInUseError, claim_output, done_parts
from kalm_batch.querylog import read_candidates, read_queries
from kalm_batch.sample import write_sample_corpus
from kalm_batch.store import build_store, open_store
from tests.procs import kill_session

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    info = write_sample_corpus(str(root), max_docs=120, n_queries=24)
    write_bm25_run(info.corpus_path, info.queries_path, str(root / "bm25.trec"), k=8)
    corpus = read_beir_corpus(info.corpus_path)
    scorer = KaLMReranker(str(tiny_model_dir), dtype="float32", chunk_size=4, max_length=128)
    build_store(f"file://{root}/store", scorer, corpus, dtype="float32", shard_rows=32)
    flags = {"model": str(tiny_model_dir), "store": f"file://{root}/store", "queries": info.queries_path,
             "candidates": str(root / "bm25.trec"), "out": str(root / "out"), "dtype": "float32", "workers": "1",
             "partitions": "12", "batch_size": "1", "num_cpus": "2"}
    return {"root": root, "flags": flags, "scorer": scorer, "queries": read_queries(info.queries_path).texts}


def _config(flags: dict, **kw) -> RerankConfig:
    return RerankConfig(**{**flags, "partitions": int(flags["partitions"]), **kw})


def _start(flags: dict) -> subprocess.Popen:
    argv = [sys.executable, "-m", "kalm_batch.cli", "rerank"] + [a for k, v in flags.items()
                                                                 for a in (f"--{k.replace('_', '-')}", v)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = open(Path(flags["out"]).parent / "job.log", "ab")  # noqa: SIM115 (the child writes it)
    return subprocess.Popen(argv, env=env, cwd=str(REPO), stdout=log, stderr=log, start_new_session=True)


def _kill_after_first_partition(flags: dict, timeout_s: float = 900, attempts: int = 3) -> list[int]:
    """Start the job; SIGKILL it (the driver and the local Ray it started) once a partition is committed. A start
    that dies before committing anything is retried: on a loaded 2-core host Ray's own start-up can time out."""
    deadline, exits = time.monotonic() + timeout_s, []
    for _ in range(attempts):
        proc = _start(flags)
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                done = done_parts(flags["out"])
                if done:
                    return done
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            kill_session(proc.pid)  # the local Ray the job started is in its session, not its process group
        exits.append(proc.returncode)
    pytest.fail(f"the job committed no partition within {timeout_s} s (exit codes {exits})")


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_then_the_same_command_resumes_exactly_once(job, tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    flags = job["flags"]
    out = flags["out"]
    _kill_after_first_partition(flags)
    time.sleep(2)
    before = done_parts(out)
    assert before and not runfolder.is_committed(out)
    with pytest.raises(runfolder.UncommittedOutputError, match="Re-run the same `kalm-batch rerank` command"):
        runfolder.read_scores(out)
    try:
        summary = run_rerank(_config(flags))
    finally:
        ray.shutdown()
    parts = summary.partitions
    prepared = [p.name for p in Path(out, "_work", "prepared").iterdir()]  # partitions holding any record (<= 12)
    assert parts["total"] == len(prepared) <= 12 and parts["already_committed"] >= len(before)
    assert parts["scored_now"] >= 1 and parts["already_committed"] + parts["scored_now"] == parts["total"]
    table = runfolder.read_scores(out)
    got = list(zip(table.column("qid").to_pylist(), table.column("doc_id").to_pylist()))
    want = {(q, d) for q, d, rank, _ in read_candidates(flags["candidates"]).rows if rank <= 100}
    assert len(got) == len(set(got)) and set(got) == want  # every pair exactly once
    assert summary.pairs_scored == len(want) == summary.input_pairs
    reader = open_store(flags["store"])
    q = got[0][0]
    mine = {d: s for (qq, d), s in zip(got, table.column("score").to_pylist()) if qq == q}
    fresh = job["scorer"].score(job["queries"][q], [reader.get(d) for d in mine])
    assert max(abs(a - b) for a, b in zip(mine.values(), fresh.p_yes)) <= 1e-5
    # a different model than the committed partitions used is refused, not mixed
    from kalm_batch.tiny import write_random_model

    other = write_random_model(tmp_path / "other", shape="tiny", seed=1)
    with pytest.raises(OutputInUseError, match="weights_sha256"):
        run_rerank(_config(flags, model=str(other), allow_mismatch=True))
    assert runfolder.is_committed(out)


def test_overwrite_removes_the_jobs_outputs_and_keeps_other_files(tmp_path):
    out = str(tmp_path / "out")
    plan = {"plan_id": "a", "stages": [[4, 5]]}
    assert claim_output(out, plan, overwrite=False) == "fresh"
    for name in ("scores/part-00000.parquet", "_work/done/part-00000.json", "run.trec", runfolder.COMMIT_MARKER):
        fsio.write_bytes_atomic(fsio.join_url(out, name), b"{}")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert claim_output(out, plan, overwrite=False) == "resume" and not runfolder.is_committed(out)
    with pytest.raises(OutputInUseError, match=r"stages: \[\[4, 5\]\] \(committed partitions\) vs \[\[4, 4\]\]"):
        claim_output(out, {"plan_id": "b", "stages": [[4, 4]]}, overwrite=False)
    assert claim_output(out, {"plan_id": "b", "stages": [[4, 4]]}, overwrite=True) == "fresh"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_work", "notes.txt"]
    assert done_parts(out) == [] and fsio.read_json(fsio.join_url(out, runfolder.PLAN_FILE))["plan_id"] == "b"
    fresh = str(tmp_path / "other")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "scores.parquet").write_text("an old run")
    with pytest.raises(OutputInUseError, match="not empty"):
        claim_output(fresh, plan, overwrite=False)
