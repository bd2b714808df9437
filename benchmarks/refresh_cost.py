"""Benchmark: refreshing a store vs re-encoding everything, random Nano shape, CPU, in-process (``build_store``).

    python benchmarks/refresh_cost.py [--docs 60] [--max-length 256]

A store of --docs stdlib passages; then a corpus with 10% of them edited, 5% removed and 10% new. Timed:
(a) the refresh (``build_store`` on the existing store, ``delete_missing=True``): the encoder's seconds (calls of
    ``encode`` counted and timed) and the wall time (prepare, encode, write, commit with the file rewrites);
(b) a full re-encode of the new corpus into a fresh store: the same two numbers.
The encoder work is what the store saves; the job's fixed costs (Ray start, model load) are outside both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from common import machine, nano_model_dir

from kalm_batch import KaLMReranker
from kalm_batch.sample import write_sample_corpus
from kalm_batch.store import build_store, open_store


class TimedEncoder:
    def __init__(self, rr):
        self.rr, self.seconds, self.texts = rr, 0.0, 0

    def __getattr__(self, name):
        return getattr(self.rr, name)

    def encode(self, texts, **kw):
        t = time.perf_counter()
        out = self.rr.encode(texts, **kw)
        self.seconds += time.perf_counter() - t
        self.texts += len(texts)
        return out


def corpora(n: int, workdir: str) -> tuple[dict[str, str], dict[str, str]]:
    info = write_sample_corpus(workdir, max_docs=int(n * 1.1) + 1, n_queries=1)
    with open(info.corpus_path) as f:
        rows = [json.loads(line) for line in f]
    texts = {r["_id"]: (r["title"] + " " + r["text"]) if r.get("title") else r["text"] for r in rows}
    ids = list(texts)
    old = {d: texts[d] for d in ids[:n]}
    new = dict(old)
    for d in ids[: n // 10]:
        new[d] = old[d] + " (edited)"
    for d in ids[n // 10: n // 10 + n // 20]:
        del new[d]
    for d in ids[n: n + n // 10]:
        new[d] = texts[d]
    return old, new


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=60)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--dtype", default="float32", help="compute dtype (bf16 is emulated, slow, on CPUs without it)")
    ns = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kalm-refresh-")
    old, new = corpora(ns.docs, work + "/corpus")
    rr = KaLMReranker(str(nano_model_dir()), chunk_size=4, max_length=ns.max_length, dtype=ns.dtype)
    rr.encode(["warm up the encoder"])
    store = f"{work}/store"
    build_store(store, rr, old, shard_rows=16)
    enc = TimedEncoder(rr)
    t = time.perf_counter()
    commit = build_store(store, enc, new, shard_rows=16, delete_missing=True)
    refresh = {"wall_s": round(time.perf_counter() - t, 2), "encoder_s": round(enc.seconds, 2), "encoded": enc.texts,
               "new": commit.new, "refreshed": commit.refreshed, "deleted": commit.deleted}
    full_enc = TimedEncoder(rr)
    t = time.perf_counter()
    build_store(f"{work}/full", full_enc, new, shard_rows=16)
    full = {"wall_s": round(time.perf_counter() - t, 2), "encoder_s": round(full_enc.seconds, 2),
            "encoded": full_enc.texts}
    assert len(open_store(store)) == len(open_store(f"{work}/full")) == len(new)
    print(json.dumps({"machine": machine(), "docs": ns.docs, "corpus_after": len(new), "max_length": ns.max_length, "dtype": ns.dtype,
                      "refresh": refresh, "full_reencode": full,
                      "encoder_s_ratio": round(refresh["encoder_s"] / full["encoder_s"], 3),
                      "wall_s_ratio": round(refresh["wall_s"] / full["wall_s"], 3)}, indent=2))


if __name__ == "__main__":
    main()
