"""Benchmark: the whole encode job vs the bare encoder (the limit) vs a naive loop, Nano shape, CPU.

    python benchmarks/encode.py [--docs 200,800] [--max-length 512] [--dtype bfloat16]
    python benchmarks/encode.py --window-table   # padding vs the encoder actor's sort window (tokenizer only)

(1) `run_encode` end to end (local Ray, read -> tokenize -> encode -> codec -> Parquet shards -> manifest);
(2) the encoder forward alone over the same passages in length-sorted token-budget batches, no I/O (timed just before
    and just after (1), in the benchmark's process; their mean is the reference);
(3) a naive loop: arrival order, fixed batches of 32, padded to the longest (first size only: it is slow).
With two sizes it also reports the marginal (steady-state) rate: extra docs over extra seconds, job vs bare.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from common import machine, nano_model_dir


def _texts(corpus_path: str) -> list[str]:
    out = []
    with open(corpus_path) as f:
        for line in f:
            row = json.loads(line)
            out.append((row["title"] + " " + row["text"]) if row.get("title") else row["text"])
    return out


def bare_sorted(r, ids) -> float:
    t = time.perf_counter()
    r.encode_ids(ids)
    return time.perf_counter() - t


def naive(r, ids, batch: int = 32) -> float:
    import torch

    t = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            longest = max(map(len, chunk))
            x = torch.full((len(chunk), longest), r.tokenizer.pad_token_id)
            m = torch.zeros((len(chunk), longest), dtype=torch.long)
            for i, row in enumerate(chunk):
                x[i, : len(row)] = torch.tensor(row)
                m[i, : len(row)] = 1
            r.encoder(input_ids=x, attention_mask=m)
    return time.perf_counter() - t


def padding_by_window(model, work: str, max_length: int, max_tokens: int, windows=(256, 512, 1024, 2048, 4096)) -> dict:
    """Padded tokens when each window of passages (in arrival order) is sorted on its own, vs one global sort, over the
    whole stdlib sample (no forward pass: it only needs the tokenizer). An encoder actor sorts one window per call."""
    from kalm_batch import KaLMReranker
    from kalm_batch.batching import token_budget_batches
    from kalm_batch.sample import write_sample_corpus

    sample = write_sample_corpus(f"{work}/sample-all", max_docs=100_000, n_queries=0)
    r = KaLMReranker(str(model), max_length=max_length)
    lengths = [len(x) for x in r.tokenize_documents(_texts(sample.corpus_path))]

    def padded(window: int) -> int:
        total = 0
        for a in range(0, len(lengths), window):
            part = lengths[a:a + window]
            total += sum(max(part[i] for i in b) * len(b) for b in token_budget_batches(part, 64, max_tokens))
        return total

    tokens, best = sum(lengths), padded(len(lengths))
    by_window = {w: padded(w) for w in windows}
    return {"docs": len(lengths), "tokens": tokens, "global_padding_ratio": round(1 - tokens / best, 4),
            "windows": {w: {"padding_ratio": round(1 - tokens / n, 4), "padded_vs_global": round(n / best, 3)}
                        for w, n in by_window.items()}}


def settle_cluster(seconds: float = 10.0) -> None:
    """Let a just-started local Ray finish booting its pre-started workers (a job submitted to a running cluster does
    not pay for that): one no-op task per CPU, then a pause."""
    import os

    import ray

    @ray.remote(num_cpus=1)
    def noop() -> None:
        return None

    ray.get([noop.remote() for _ in range(os.cpu_count() or 1)])
    time.sleep(seconds)


def measure(model, work: str, n_docs: int, a, with_naive: bool) -> dict:
    from kalm_batch import KaLMReranker
    from kalm_batch.pipelines.cluster import init_ray
    from kalm_batch.pipelines.encode import EncodeConfig, run_encode
    from kalm_batch.sample import write_sample_corpus

    sample = write_sample_corpus(f"{work}/sample-{n_docs}", max_docs=n_docs, n_queries=0)
    r = KaLMReranker(str(model), dtype=a.dtype, max_length=a.max_length, batch_size=64,
                     max_tokens_per_batch=a.max_tokens_per_batch)
    ids = r.tokenize_documents(_texts(sample.corpus_path))
    tokens = sum(map(len, ids))
    r.encode_ids(ids[:4])  # warm-up
    t_bare_before = bare_sorted(r, ids)
    t_naive = naive(r, ids) if with_naive else None
    init_ray(None)  # a cluster is already up when a job is submitted; its start-up is not the job's cost
    settle_cluster()
    job = run_encode(EncodeConfig(model=str(model), corpus=sample.corpus_path, store=f"{work}/store-{n_docs}",
                                  model_dtype=a.dtype, dtype="bfloat16", max_length=a.max_length,
                                  max_tokens_per_batch=a.max_tokens_per_batch, batch_size=64,
                                  rows_per_task=a.rows_per_task, shard_rows=256))
    # the bare encoder again, right after the job: this shared machine drifts by ~10% between minutes, so the job is
    # compared with the mean of a bare run just before and one just after it
    t_bare_after = bare_sorted(r, ids)
    del r
    t_bare = (t_bare_before + t_bare_after) / 2
    res = {
        "docs": len(ids), "tokens": tokens,
        "job": {"docs_per_s": job.docs_per_s, "tokens_per_s": job.tokens_per_s, "seconds": job.seconds,
                "padding_ratio": job.padding_ratio, "bytes_per_doc": job.bytes_per_doc,
                "worker_peak_rss_mb": job.worker_peak_rss_mb, "encoder_seconds": job.encoder_seconds,
                "encoder_busy_share": job.encoder_busy_share, "encoder_load_seconds": job.encoder_load_seconds},
        "bare_sorted": {"docs_per_s": round(len(ids) / t_bare, 2), "tokens_per_s": round(tokens / t_bare, 1),
                        "seconds": round(t_bare, 2), "seconds_before_after": [round(t_bare_before, 2),
                                                                              round(t_bare_after, 2)]},
    }
    res["job_vs_bare"] = round(job.docs_per_s / res["bare_sorted"]["docs_per_s"], 3)
    # what the job spends beyond the bare encoder's time for the same passages (start-up, I/O, tail)
    res["job_overhead_s"] = round(job.seconds - t_bare, 1)
    if t_naive is not None:
        res["naive"] = {"docs_per_s": round(len(ids) / t_naive, 2), "tokens_per_s": round(tokens / t_naive, 1)}
        res["bare_vs_naive"] = round(t_naive / t_bare, 2)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", default="200", help="comma-separated corpus sizes, e.g. 200,800")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-tokens-per-batch", type=int, default=8192)
    p.add_argument("--window-table", action="store_true",
                   help="only print padding vs the actor's sort window over the whole stdlib sample (no model run)")
    p.add_argument("--rows-per-task", type=int, default=None,
                   help="passages per encoder-actor call (sorted within); default: the job's (1024 here)")
    a = p.parse_args()

    model = nano_model_dir()
    work = tempfile.mkdtemp(prefix="kalm-bench-encode-")
    if a.window_table:
        print(json.dumps(padding_by_window(model, work, a.max_length, a.max_tokens_per_batch), indent=2))
        return
    sizes = [int(x) for x in a.docs.split(",")]
    runs = [measure(model, work, n, a, with_naive=(i == 0)) for i, n in enumerate(sizes)]
    out = {"machine": machine(), "max_length": a.max_length, "dtype": a.dtype, "runs": runs}
    if len(runs) >= 2:  # steady state: extra docs over extra seconds, job vs bare
        lo, hi = runs[0], runs[-1]
        d_docs = hi["docs"] - lo["docs"]
        job_marginal = d_docs / (hi["job"]["seconds"] - lo["job"]["seconds"])
        bare_marginal = d_docs / (hi["bare_sorted"]["seconds"] - lo["bare_sorted"]["seconds"])
        out["marginal"] = {"job_docs_per_s": round(job_marginal, 2), "bare_docs_per_s": round(bare_marginal, 2),
                           "job_vs_bare": round(job_marginal / bare_marginal, 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
