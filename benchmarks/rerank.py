"""Benchmark the bulk rerank job on CPU with a random Nano-shape model (bf16): throughput, cascade cost, store share.

    python benchmarks/rerank.py [--docs 100] [--queries 2] [--workers 1] [--work-dir DIR]

(``--queries 5`` is the issue's 5 x 100 pairs; on 2 shared CPU cores that takes ~15 minutes, hence the default of 2.)

Measures, on the same pairs (every query x all --docs candidates, BM25 order then corpus order):
1. the bulk job (``run_rerank``, local Ray, one stage at r=4) pairs/s — over the stage's wall time (actor start-up and
   decoder load included) and over the actors' busy time (store fetch+decode + scoring);
2. an in-process loop scoring the same pairs from memories already in RAM (``score_memories``; target 1 >= 0.8 x 2);
3. ``--cascade 32:100,4:20`` vs direct r=4 on the top 100: scoring seconds and memory vectors attended (target <= 0.4);
4. store fetch+decode time as a share of the direct job's actor time (target <= 10%).
Prints a markdown block (command, machine, results). Writes only under --work-dir (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _prepare(work: Path, n_docs: int, n_queries: int):
    """Nano-shape random model (bf16), sample corpus, a bf16 store at r0=4 and a TREC run of every doc per query."""
    import torch

    from kalm_batch import KaLMReranker
    from kalm_batch.bm25 import bm25_candidates, read_beir_corpus
    from kalm_batch.querylog import read_queries, write_trec_run
    from kalm_batch.sample import write_sample_corpus
    from kalm_batch.store.writer import build_store
    from kalm_batch.tiny import write_random_model

    model = work / "nano"
    if not (model / "config.json").exists():
        write_random_model(model, shape="nano", dtype=torch.bfloat16)
    info = write_sample_corpus(str(work / "data"), max_docs=n_docs, n_queries=n_queries)
    corpus = read_beir_corpus(info.corpus_path)
    queries = read_queries(info.queries_path).texts
    rows = []
    for qid in queries:
        ranked = [d for q, d, _, _ in bm25_candidates(corpus, {qid: queries[qid]}, k=len(corpus)) if q == qid]
        ranked += [d for d, _ in corpus if d not in set(ranked)]
        rows += [(qid, d, r, float(len(ranked) - r)) for r, d in enumerate(ranked, start=1)]
    run = str(work / "data" / "candidates.trec")
    write_trec_run(rows, run, tag="first")
    encoder = KaLMReranker(str(model), dtype="bfloat16", chunk_size=4, max_length=512)
    t = time.perf_counter()
    commit = build_store(f"file://{work}/store", encoder, corpus, dtype="bfloat16", overwrite=True)
    built = commit.new + commit.refreshed if commit else 0
    note = f"built in {time.perf_counter() - t:.1f} s" if built else "reused from --work-dir"
    return str(model), info.queries_path, run, f"file://{work}/store", queries, rows, note


def _in_process(model: str, store: str, queries: dict, rows: list, ratio: int,
                batch_size: int) -> tuple[float, int, float]:
    """Score the pairs in this process from memories already in RAM, after a warm-up.

    Returns (seconds, pairs, mean decoder prompt tokens per pair)."""
    from kalm_batch import KaLMReranker
    from kalm_batch.store import open_store

    reader = open_store(store)
    memories = reader.fetch([d for _, d, _, _ in rows], ratio).memories
    reranker = KaLMReranker(model, dtype="bfloat16", chunk_size=4, batch_size=batch_size)
    qs, ms = [queries[q] for q, _, _, _ in rows], [memories[d] for _, d, _, _ in rows]
    reranker.score_memories(qs[:batch_size], ms[:batch_size])  # load the decoder, warm up
    t = time.perf_counter()
    reranker.score_memories(qs, ms)
    seconds = time.perf_counter() - t
    return seconds, len(rows), sum(len(reranker.prompt_ids(q)) for q in queries.values()) / len(queries)


def _job(model, store, queries_url, run, out, *, workers, threads, batch_size, **kw):
    from kalm_batch.pipelines.rerank import RerankConfig, run_rerank

    cfg = RerankConfig(model=model, store=store, queries=queries_url, candidates=run, out=out, workers=workers,
                       dtype="bfloat16", cpu_threads=threads, batch_size=batch_size, **kw)
    return run_rerank(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args(argv)
    import ray
    import torch

    from kalm_batch.pipelines.cluster import init_ray

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kalm-bench-rerank-"))
    work.mkdir(parents=True, exist_ok=True)
    model, queries_url, run, store, queries, rows, store_note = _prepare(work, args.docs, args.queries)
    top = [r for r in rows if r[2] <= 100]
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    loop_s, loop_pairs, prompt_len = _in_process(model, store, queries, top, 4, args.batch_size)
    init_ray(None, num_cpus=os.cpu_count())
    common = dict(workers=args.workers, threads=threads, batch_size=args.batch_size)
    direct = _job(model, store, queries_url, run, str(work / "out-direct"), ratio=4, top_k=100, **common)
    cascade = _job(model, store, queries_url, run, str(work / "out-cascade"), cascade="32:100,4:20", **common)
    ray.shutdown()
    d = direct.stages[0]
    busy = d["fetch_decode_s"] + d["score_s"]
    loop_pps = loop_pairs / loop_s
    casc_score = sum(s["score_s"] + s["fetch_decode_s"] for s in cascade.stages)
    casc_vec = sum(s["vectors"] for s in cascade.stages)
    cmd = "python benchmarks/rerank.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "### Bulk rerank (benchmarks/rerank.py)", "", f"- command: `{cmd.strip()}`",
        f"- machine: {os.cpu_count()} CPUs ({_cpu_model()}), torch {torch.__version__} CPU, ray {ray.__version__}; "
        f"random Nano-shape model, bf16 compute, bf16 store at r0=4 ({args.docs} sample passages, "
        f"{store_note}); {args.queries} queries x {min(100, args.docs)} candidates = {loop_pairs} pairs; "
        f"{args.workers} actor(s) x {threads} torch thread(s), batch size {args.batch_size}", "",
        "| measure | value | target |", "|---|---|---|",
        f"| (2) in-process loop, memories in RAM | {loop_pps:.1f} pairs/s ({loop_s:.2f} s) | |",
        f"| (1) bulk job, actor busy time (fetch+decode+score) | {d['pairs'] / busy:.1f} pairs/s "
        f"({busy:.2f} s) = {d['pairs'] / busy / loop_pps:.2f} x (2) | >= 0.8 x |",
        f"| (1') bulk job, stage wall (actor start + decoder load incl.) | {d['pairs_per_s']:.1f} pairs/s "
        f"({d['wall_s']:.2f} s) = {d['pairs_per_s'] / loop_pps:.2f} x (2) | |",
        f"| cascade 32:100,4:20 vs direct r=4 on 100: actor seconds | {casc_score:.2f} s vs {busy:.2f} s = "
        f"{casc_score / busy:.2f} | <= 0.4 |",
        f"| cascade vs direct: memory vectors attended | {casc_vec} vs {d['vectors']} = {casc_vec / d['vectors']:.2f} "
        "| |",
        f"| store fetch+decode share of the direct job's actor time | {d['fetch_decode_s']:.3f} s / {busy:.2f} s = "
        f"{100 * d['fetch_decode_s'] / busy:.1f} % | <= 10 % |",
        f"| decoder work per pair: prompt tokens / memory vectors at r=4 / at r=32 | {prompt_len:.0f} / "
        f"{d['vectors'] / d['pairs']:.1f} / {cascade.stages[0]['vectors'] / cascade.stages[0]['pairs']:.1f} | |",
        f"| whole job wall (inputs to outputs), direct / cascade | {direct.wall_s:.1f} s / {cascade.wall_s:.1f} s | |",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
