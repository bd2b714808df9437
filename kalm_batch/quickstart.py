"""End to end on the embedded default: tiny model -> sample corpus -> encode (Ray) -> BM25 -> rerank (Ray) -> metrics
-> a small sweep (r=4 vs r=8 from the same store: table and plot).

Everything runs locally: a local Ray, local files (or, with ``s3=True``, a moto S3 server on 127.0.0.1), the tiny
random model. Scores of a random model are not meaningful — the point is that every stage runs as it would on a
cluster with a real checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _local_s3():
    try:
        from storage.local_s3 import LocalS3
    except ImportError as e:  # pragma: no cover - depends on how kalm-batch was installed
        raise RuntimeError("--s3 needs the test extra (moto server): pip install -e '.[test]'") from e
    with LocalS3(bucket="kalm") as s3:
        s3.apply_env()
        yield f"s3://{s3.bucket}"


def run_quickstart(out: str, *, s3: bool = False, max_docs: int = 300, n_queries: int = 30) -> dict:
    from kalm_batch import fsio
    from kalm_batch.bm25 import write_bm25_run
    from kalm_batch.pipelines.encode import EncodeConfig, run_encode
    from kalm_batch.pipelines.rerank import RerankConfig, run_rerank
    from kalm_batch.sample import write_sample_corpus
    from kalm_batch.tiny import write_random_model

    root = Path(out).resolve()
    model = write_random_model(root / "tiny-model", shape="tiny")
    sample = write_sample_corpus(str(root / "sample"), max_docs=max_docs, n_queries=n_queries)
    with (_local_s3() if s3 else contextlib.nullcontext(str(root))) as base:
        corpus = sample.corpus_path
        if s3:
            corpus = f"{base}/corpus/corpus.jsonl"
            fsio.write_bytes_atomic(corpus, Path(sample.corpus_path).read_bytes())
        store = f"{base}/store"
        enc = run_encode(EncodeConfig(model=str(model), corpus=corpus, store=store, ratio=4, dtype="bfloat16",
                                      max_length=256))
        print("encode summary\n" + enc.table())
        bm25 = str(root / "bm25.trec")
        write_bm25_run(sample.corpus_path, sample.queries_path, bm25, k=100)
        summary = run_rerank(RerankConfig(model=str(model), store=store, queries=sample.queries_path,
                                          candidates=bm25, out=f"{base}/reranked", top_k=50, qrels=sample.qrels_path))
        print(f"rerank: {summary.pairs_scored} pairs at {summary.pairs_per_s} pairs/s; outputs in {summary.out}")
        sweep = _small_sweep(str(model), store, sample, bm25, str(root / "sweep"))
        return {"encode": enc.model_dump(), "rerank": summary.model_dump(), "sweep": sweep}


def _small_sweep(model: str, store: str, sample, candidates: str, out: str) -> dict:
    """Two ratios of the same store (r0 = 4 and 8) on the same pairs: the table and the plot to choose r from."""
    from kalm_batch.sweep import SweepConfig, run_sweep

    report = run_sweep(SweepConfig(model=model, store=store, queries=sample.queries_path, candidates=candidates,
                                   qrels=sample.qrels_path, out=out, ratios=[4, 8], top_k=50))
    print(f"sweep (r=4 vs r=8, same pairs): table {report['outputs']['sweep.md']}")
    print(f"sweep plot: {report['outputs']['plot']}" if "plot" in report["outputs"] else
          "sweep plot: not drawn (matplotlib missing): pip install 'kalm-batch[plot]'")
    return report
