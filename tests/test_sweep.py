"""``kalm-batch sweep`` on a real local Ray over a small float32 store of the tiny model.

Every setting's metrics must equal those of a separate ``run_rerank`` at that ratio / cascade on the same pairs; the
PNG must be a real image of the expected size; bad input must be refused before anything is scored or written;
``--sample-queries`` must pick the same queries for a seed.
"""

from __future__ import annotations

import io
import json
import struct
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm_batch import KaLMReranker, fsio
from kalm_batch.bm25 import read_beir_corpus, write_bm25_run
from kalm_batch.cli import main as cli_main
from kalm_batch.metrics import evaluate_run, per_query, read_run
from kalm_batch.pipelines.rerank import RerankConfig, run_rerank
from kalm_batch.querylog import read_candidates, read_qrels
from kalm_batch.sample import write_sample_corpus
from kalm_batch.store.writer import build_store
from kalm_batch.sweep import SweepConfig, pick_queries, plan_sweep, read_rerank_output, run_sweep
from kalm_batch.sweep_report import PLOT_HINT, paired_bootstrap, render_png, write_report

TOP_K = 8
CASCADE = "8:8,4:4"


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir):
    """A sample corpus with BM25 candidates and a float32 store at r0 = 4 (scores are exact, so runs repeat)."""
    root = tmp_path_factory.mktemp("sweep-data")
    info = write_sample_corpus(str(root), max_docs=60, n_queries=8)
    write_bm25_run(info.corpus_path, info.queries_path, str(root / "bm25.trec"), k=TOP_K)
    scorer = KaLMReranker(str(tiny_model_dir), dtype="float32", chunk_size=4, max_length=128)
    store = f"file://{root}/store"
    build_store(store, scorer, read_beir_corpus(info.corpus_path), dtype="float32", shard_rows=32)
    return {"root": root, "store": store, "queries": info.queries_path, "candidates": str(root / "bm25.trec"),
            "qrels": info.qrels_path, "model": str(tiny_model_dir)}


def _sweep_config(data, out, **kw) -> SweepConfig:
    base = {"model": data["model"], "store": data["store"], "queries": data["queries"],
            "candidates": data["candidates"], "qrels": data["qrels"], "out": str(out), "top_k": TOP_K,
            "dtype": "float32", "num_cpus": 2, "bootstrap": 2000}
    return SweepConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def swept(ray_session, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-out") / "sweep"
    report = run_sweep(_sweep_config(data, out, ratios=[4, 8], cascades=[CASCADE]))
    return out, report


def _png_size(blob: bytes) -> tuple[int, int]:
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and blob[12:16] == b"IHDR"
    return struct.unpack(">II", blob[16:24])


@pytest.mark.ray
@pytest.mark.slow
def test_every_setting_equals_a_separate_rerank_run(swept, data, tmp_path):
    _out, report = swept
    rows = {r["setting"]: r for r in report["settings"]}
    assert list(rows) == ["r=4", "r=8", f"cascade {CASCADE}"]
    # r=4 (= r0) is checked against its own run's metrics.json; r=8 and the cascade against separate runs
    own = json.loads(fsio.read_bytes(fsio.join_url(rows["r=4"]["out"], "metrics.json")))["runs"]["reranked"]
    assert rows["r=4"]["metrics"] == pytest.approx({m: own[m] for m in rows["r=4"]["metrics"]}, abs=1e-12)
    qrels = read_qrels(data["qrels"])
    for name, kw in (("r=8", {"ratio": 8}), (f"cascade {CASCADE}", {"cascade": CASCADE})):
        sep = str(tmp_path / name.replace(" ", "_"))
        run_rerank(RerankConfig(model=data["model"], store=data["store"], queries=data["queries"],
                                candidates=data["candidates"], out=sep, top_k=TOP_K, qrels=data["qrels"],
                                dtype="float32", num_cpus=2, **kw))
        metrics = json.loads(fsio.read_bytes(fsio.join_url(sep, "metrics.json")))["runs"]
        for m in ("nDCG@10", "RR@10", "R@100"):
            assert rows[name]["metrics"][m] == pytest.approx(metrics["reranked"][m], abs=1e-12), (name, m)
            assert report["first_stage"]["metrics"][m] == pytest.approx(metrics["first-stage"][m], abs=1e-12)
        # the same ranking, document for document
        mine, theirs = read_run(fsio.join_url(rows[name]["out"], "run.trec")), read_run(f"{sep}/run.trec")
        assert mine.keys() == theirs.keys() and all(mine[q] == pytest.approx(theirs[q], abs=1e-6) for q in mine)
        assert evaluate_run(read_run(f"{sep}/run.trec"), qrels)["nDCG@10"] == pytest.approx(
            rows[name]["metrics"]["nDCG@10"], abs=1e-12)


@pytest.mark.ray
@pytest.mark.slow
def test_report_work_bytes_and_significance(swept, data):
    out, report = swept
    rows = {r["setting"]: r for r in report["settings"]}
    n = report["n_queries"]
    assert n == 8 and not report["sampled"] and report["r0"] == 4
    # work per query: each query's candidates (BM25 may find fewer than TOP_K); the cascade scores them, then the
    # best 4 of them again
    per_q = Counter(q for q, _, rank, _ in read_candidates(data["candidates"]).rows if rank <= TOP_K)
    assert rows["r=4"]["pairs_per_query"] == rows["r=8"]["pairs_per_query"] == sum(per_q.values()) / n
    assert rows[f"cascade {CASCADE}"]["pairs_per_query"] == sum(c + min(c, 4) for c in per_q.values()) / n
    assert rows["r=8"]["vectors_per_query"] < rows["r=4"]["vectors_per_query"]
    # the decoder reads the same prompt at every ratio; a cascade feeds it once per stage
    assert rows["r=4"]["decoder_tokens_per_query"] == rows["r=8"]["decoder_tokens_per_query"] > TOP_K
    assert rows[f"cascade {CASCADE}"]["decoder_tokens_per_query"] > rows["r=4"]["decoder_tokens_per_query"]
    assert all(r["decoder_s_per_query"] > 0 for r in rows.values())
    # bytes per passage: measured, int8 below bf16, halving-ish with r; the cascade needs the r=4 store
    b4, b8 = rows["r=4"]["bytes_per_passage"], rows["r=8"]["bytes_per_passage"]
    assert b4["int8"] < b4["bfloat16"] and b8["bfloat16"] < b4["bfloat16"] and b8["vectors"] < b4["vectors"]
    assert rows[f"cascade {CASCADE}"]["bytes_per_passage"] == b4
    # paired differences against the best setting (which has none)
    best = rows[report["best"]]
    assert best["vs_best"] is None and best["metrics"]["nDCG@10"] == max(r["metrics"]["nDCG@10"] for r in rows.values())
    for row in [*rows.values(), report["first_stage"]]:
        if row is best:
            continue
        d = row["vs_best"]["nDCG@10"]
        assert d["diff"] == pytest.approx(row["metrics"]["nDCG@10"] - best["metrics"]["nDCG@10"], abs=1e-12)
        assert d["ci95"][0] <= d["diff"] <= d["ci95"][1] and 0.0 <= d["p"] <= 1.0
    assert "bootstrap" in report["significance"]
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["best"] == report["best"] and len(saved["settings"]) == 3
    md = (out / "sweep.md").read_text()
    assert all(name in md for name in rows) and "first stage" in md and "p=" in md and "sweep.png" in md


@pytest.mark.ray
@pytest.mark.slow
def test_plot_is_a_real_png(swept):
    import matplotlib.image

    out, report = swept
    blob = (out / "sweep.png").read_bytes()
    assert report["outputs"]["plot"].endswith("sweep.png")
    assert _png_size(blob) == (1100, 450)
    pixels = matplotlib.image.imread(io.BytesIO(blob), format="png")
    assert pixels.shape[:2] == (450, 1100) and pixels[..., :3].std() > 0.05  # drawn, not blank


def test_refusals_happen_before_any_scoring(data, tmp_path):
    cases = [
        ({"ratios": [6]}, "not a multiple of the store's r0=4"),
        ({"ratios": [2]}, "not a multiple of the store's r0=4"),
        ({"ratios": [64]}, "not a trained pooling ratio"),
        ({"cascades": ["8:8,4:8"]}, "K strictly decreasing"),
        ({"cascades": ["8:5,4:2"]}, "start the cascade at K1=8 or pass --top-k 5"),
    ]
    for kw, message in cases:
        out = tmp_path / "never"
        with pytest.raises(ValueError, match=message):
            run_sweep(_sweep_config(data, out, **kw))
        assert not out.exists()
    other = tmp_path / "other-qrels.tsv"
    other.write_text("query-id\tcorpus-id\tscore\nnobody\tstdlib-000001\t1\n")
    with pytest.raises(ValueError, match="has a judgement in"):
        run_sweep(_sweep_config(data, tmp_path / "never", qrels=str(other)))
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="R1:K1|RATIO:K"):
        SweepConfig(store="s", queries="q", candidates="c", qrels="r", out="o", cascades=["8-100"])


def test_cli_refuses_with_a_message(data, tmp_path, capsys):
    args = ["sweep", "--model", data["model"], "--store", data["store"], "--queries", data["queries"],
            "--candidates", data["candidates"], "--qrels", data["qrels"], "--out", str(tmp_path / "o"),
            "--top-k", str(TOP_K), "--ratios", "4,6"]
    assert cli_main(args) == 2
    assert "6 is not a multiple of the store's r0=4; pass ratios from [4, 8, 16, 32]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sample_queries_is_deterministic_for_a_seed(data, tmp_path):
    plans = [plan_sweep(_sweep_config(data, tmp_path, sample_queries=3, seed=s)) for s in (1, 1, 2, 3, 4)]
    assert plans[0].sampled and len(plans[0].qrels) == 3 and plans[0].n_eligible == 8
    assert list(plans[0].qrels) == list(plans[1].qrels) and plans[0].first_stage == plans[1].first_stage
    assert len({tuple(p.qrels) for p in plans}) > 1  # other seeds pick other queries
    eligible = [f"q{i}" for i in range(20)]
    assert pick_queries(eligible, 5, 7) == pick_queries(list(reversed(eligible))[::-1], 5, 7)
    assert pick_queries(eligible, 50, 7) == eligible and pick_queries(eligible, None, 7) == eligible


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_sampled_sweep_through_the_cli_onto_s3(ray_session, s3_bucket, data, capsys):
    out = f"{s3_bucket}/sampled"
    args = ["sweep", "--model", data["model"], "--store", data["store"], "--queries", data["queries"],
            "--candidates", data["candidates"], "--qrels", data["qrels"], "--out", str(out), "--top-k", str(TOP_K),
            "--ratios", "8", "--sample-queries", "3", "--seed", "1", "--dtype", "float32", "--num-cpus", "2",
            "--bootstrap", "500"]
    assert cli_main(args) == 0
    assert f"plot: {out}/sweep.png" in capsys.readouterr().out
    report = json.loads(fsio.read_bytes(f"{out}/sweep.json"))
    assert _png_size(fsio.read_bytes(f"{out}/sweep.png")) == (1100, 450)
    want = list(plan_sweep(_sweep_config(data, out, sample_queries=3, seed=1)).qrels)
    assert report["sampled"] and report["sample"] == {"n": 3, "of": 8, "seed": 1}
    assert sorted(report["queries"]) == sorted(want)
    scores, _ = read_rerank_output(report["settings"][0]["out"])
    assert set(scores.column("qid").to_pylist()) == set(want)
    assert "random **sample** of 3 of the 8" in fsio.read_bytes(f"{out}/sweep.md").decode()


def test_read_rerank_output_reads_a_committed_scores_dataset(tmp_path):
    """The rerank job's scores/ dataset (several parts) and run.trec; a folder without the commit marker is refused."""
    from kalm_batch.runfolder import COMMIT_MARKER, UncommittedOutputError

    table = pa.table({"qid": ["a", "a", "b"], "doc_id": ["x", "y", "x"], "stage": pa.array([1, 1, 1], pa.int16())})
    (tmp_path / "run.trec").write_text("a Q0 x 1 0.9 t\na Q0 y 2 0.5 t\nb Q0 x 1 0.7 t\n")
    (tmp_path / "scores").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "scores" / "part-0.parquet")
    pq.write_table(table.slice(2), tmp_path / "scores" / "part-1.parquet")
    with pytest.raises(UncommittedOutputError, match="no committed rerank run"):
        read_rerank_output(str(tmp_path))
    (tmp_path / COMMIT_MARKER).write_text("{}")
    scores, run = read_rerank_output(str(tmp_path))
    assert scores.sort_by("qid").to_pylist() == table.to_pylist() and run == {"a": {"x": 0.9, "y": 0.5},
                                                                              "b": {"x": 0.7}}


def test_per_query_means_are_the_aggregate_metrics():
    qrels = {"a": {"x": 1, "z": 2}, "b": {"y": 1}, "c": {"w": 1}}  # c: judged, not in the run -> 0
    run = {"a": {"x": 0.2, "y": 0.9, "z": 0.5}, "b": {"y": 0.1, "x": 0.3}, "d": {"x": 1.0}}
    values = per_query(run, qrels)
    agg = evaluate_run(run, qrels)
    assert set(values["nDCG@10"]) == {"a", "b", "c"} and values["RR@10"]["c"] == 0.0 and values["RR@10"]["b"] == 0.5
    for m, v in values.items():
        assert np.mean(list(v.values())) == pytest.approx(agg[m])


def test_paired_bootstrap():
    same = paired_bootstrap(np.zeros(10), 1000, 0)
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0], "p": 1.0}
    better = paired_bootstrap(np.full(20, 0.1) + np.linspace(-0.01, 0.01, 20), 2000, 0)
    assert better["diff"] == pytest.approx(0.1) and better["ci95"][0] > 0 and better["p"] < 0.01
    noisy = paired_bootstrap(np.array([0.3, -0.3, 0.2, -0.2, 0.01]), 2000, 0)
    assert noisy["p"] > 0.5 and noisy["ci95"][0] < 0 < noisy["ci95"][1]
    assert paired_bootstrap(np.array([0.3, -0.3, 0.2]), 500, 3) == paired_bootstrap(np.array([0.3, -0.3, 0.2]), 500, 3)


def test_without_matplotlib_json_and_markdown_still_written(swept_report_stub, tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib..." now raises ImportError
    assert render_png(swept_report_stub) is None
    report = write_report(str(tmp_path), swept_report_stub)
    assert "plot" not in report["outputs"] and not (tmp_path / "sweep.png").exists()
    assert PLOT_HINT in (tmp_path / "sweep.md").read_text() and (tmp_path / "sweep.json").exists()
    assert "kalm-batch[plot]" in caplog.text


@pytest.fixture
def swept_report_stub() -> dict:
    """A two-setting report as build_report makes it (numbers made up; only rendering is tested with it)."""
    row = {"cascade": None, "ratio": 4, "decoder_s_per_query": 0.5, "fetch_decode_s_per_query": 0.01,
           "pairs_per_query": 10.0, "vectors_per_query": 300.0, "decoder_tokens_per_query": 600.0,
           "bytes_per_passage": {"bfloat16": 4000.0, "int8": 2100.0}}
    metrics = {"nDCG@10": 0.5, "RR@10": 0.4, "R@100": 0.9}
    diff = {m: {"diff": -0.1, "ci95": [-0.2, 0.0], "p": 0.04} for m in metrics}
    return {"store": "s", "r0": 4, "model": "m", "top_k": 10, "measures": list(metrics), "n_queries": 5,
            "queries": [], "eligible_queries": 5, "sampled": False, "sample": None, "best": "r=4",
            "ranked_by": "nDCG@10", "significance": "paired bootstrap", "bytes_note": "b", "outputs": {},
            "settings": [{**row, "setting": "r=4", "metrics": metrics, "vs_best": None},
                         {**row, "setting": "r=8", "ratio": 8, "metrics": metrics, "vs_best": diff}],
            "first_stage": {"setting": "first stage", "metrics": metrics, "vs_best": diff}}
