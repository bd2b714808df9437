"""Benchmark the bulk rerank job on CPU with a random Nano-shape model (bf16): throughput, cascade cost, store share.

    python benchmarks/rerank.py [--docs 100] [--queries 2 4] [--workers 1] [--cascade] [--work-dir DIR]

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


def _prepare(work: Path, n_docs: int, n_queries: int, dtype: str, max_length: int):
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
    encoder = KaLMReranker(str(model), dtype=dtype, chunk_size=4, max_length=max_length)
    t = time.perf_counter()
    commit = build_store(f"file://{work}/store", encoder, corpus, dtype="bfloat16")
    built = commit.new + commit.refreshed if commit else 0
    note = f"built in {time.perf_counter() - t:.1f} s" if built else "reused from --work-dir"
    return str(model), info.queries_path, run, f"file://{work}/store", queries, rows, note


def _in_process(model: str, store: str, queries: dict, rows: list, ratio: int,
                batch_size: int, dtype: str) -> tuple[float, int, float]:
    """Score the pairs in this process from memories already in RAM, after a warm-up.

    Returns (seconds, pairs, mean decoder prompt tokens per pair)."""
    from kalm_batch import KaLMReranker
    from kalm_batch.store import open_store

    reader = open_store(store)
    memories = reader.fetch([d for _, d, _, _ in rows], ratio).memories
    reranker = KaLMReranker(model, dtype=dtype, chunk_size=4, batch_size=batch_size)
    qs, ms = [queries[q] for q, _, _, _ in rows], [memories[d] for _, d, _, _ in rows]
    reranker.score_memories(qs[:batch_size], ms[:batch_size])  # load the decoder, warm up
    t = time.perf_counter()
    reranker.score_memories(qs, ms)
    seconds = time.perf_counter() - t
    return seconds, len(rows), sum(len(reranker.prompt_ids(q)) for q in queries.values()) / len(queries)


def _job(model, store, queries_url, run, out, *, workers, threads, batch_size, dtype, **kw):
    from kalm_batch.pipelines.rerank import RerankConfig, run_rerank

    cfg = RerankConfig(model=model, store=store, queries=queries_url, candidates=run, out=out, workers=workers,
                       dtype=dtype, cpu_threads=threads, batch_size=batch_size, **kw)
    return run_rerank(cfg)


def _size_rows(label: str, summary, loop_pps: float) -> list[str]:
    d = summary.stages[0]
    busy = d["fetch_decode_s"] + d["score_s"]
    actor_busy = sum(a["busy_s"] for a in summary.actors)
    return [
        (f"| {label}: job pairs/s over actor fetch+decode+score time | {d['pairs'] / busy:.1f} pairs/s ({busy:.2f} s) "
        f"= {d['pairs'] / busy / loop_pps:.2f} x loop | >= 0.85 x |"),
        (f"| {label}: job pairs/s over actor busy time (+ partition read, cascade, write) | "
        f"{d['pairs'] / actor_busy:.1f} pairs/s ({actor_busy:.2f} s) = {d['pairs'] / actor_busy / loop_pps:.2f} x loop | |"),
        (f"| {label}: wall split: prepare (read+validate+plan+join+write) / score pass (actor start incl.) / commit | "
        f"{summary.prepare_s:.1f} s / {summary.score_wall_s:.1f} s / {summary.commit_s:.1f} s of {summary.wall_s:.1f} s | |"),
        (f"| {label}: inside the actors: fetch+decode / score / write | {d['fetch_decode_s']:.2f} s / {d['score_s']:.2f} s "
        f"/ {summary.write_s:.2f} s | |"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--queries", type=int, nargs="+", default=[2], help="log sizes: queries x --docs candidates")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cascade", action="store_true", help="also time --cascade 32:100,4:20 on the largest log")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--dtype", default="float32", help="compute dtype (the store is bf16 either way); bf16 "
                                                           "compute is emulated (slow) on CPUs without native bf16")
    parser.add_argument("--max-length", type=int, default=512, help="encoder max_length of the store")
    args = parser.parse_args(argv)
    import ray
    import torch

    from kalm_batch.pipelines.cluster import init_ray

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kalm-bench-rerank-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    common = {"workers": str(args.workers), "threads": threads, "batch_size": args.batch_size, "dtype": args.dtype}
    rows, loop_note = [], []
    for n_queries in args.queries:
        model, queries_url, run, store, queries, pairs, store_note = _prepare(work, args.docs, n_queries,
                                                                             args.dtype, args.max_length)
        top = [r for r in pairs if r[2] <= 100]
        loop_s, loop_pairs, prompt_len = _in_process(model, store, queries, top, 4, args.batch_size, args.dtype)
        loop_pps = loop_pairs / loop_s
        init_ray(None, num_cpus=os.cpu_count())
        direct = _job(model, store, queries_url, run, str(work / f"out-direct-{n_queries}"), ratio=4, top_k=100,
                      overwrite=True, **common)
        label = f"{loop_pairs} pairs"
        rows += [f"| {label}: in-process loop, memories in RAM | {loop_pps:.1f} pairs/s ({loop_s:.2f} s) | |"]
        rows += _size_rows(label, direct, loop_pps)
        loop_note.append(f"{n_queries} queries x {min(100, args.docs)} candidates ({store_note})")
        if args.cascade and n_queries == args.queries[-1]:
            cascade = _job(model, store, queries_url, run, str(work / "out-cascade"), cascade="32:100,4:20",
                           overwrite=True, **common)
            d = direct.stages[0]
            busy = d["fetch_decode_s"] + d["score_s"]
            casc = sum(s["score_s"] + s["fetch_decode_s"] for s in cascade.stages)
            rows.append(f"| cascade 32:100,4:20 vs direct r=4: actor seconds | {casc:.2f} s vs {busy:.2f} s = "
                        f"{casc / busy:.2f} | <= 0.4 |")
        ray.shutdown()
    cmd = "python benchmarks/rerank.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "### Bulk rerank (benchmarks/rerank.py)", "", f"- command: `{cmd.strip()}`",
        (f"- machine: {os.cpu_count()} CPUs ({_cpu_model()}), shared with other jobs; torch {torch.__version__} CPU, "
        f"ray {ray.__version__}; random Nano-shape model, {args.dtype} compute, bf16 store at r0=4 (max_length {args.max_length}); logs: "
        f"{'; '.join(loop_note)}; {args.workers} actor(s) x {threads} torch thread(s), batch size {args.batch_size}; "
        f"decoder prompt ~{prompt_len:.0f} tokens"), "",
        "| measure | value | target |", "|---|---|---|", *rows]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
