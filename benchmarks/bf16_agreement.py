"""Benchmark: how far low-precision scores move, and what the official code's own batch-size floor is.

Table 1 (batched agreement): kalm-batch vs an official-style model (``tests/official_reference.py``: loaded with
``from_pretrained(dtype=...)``, parameters cast, decoder padded to a multiple of 8) in bf16/fp16, at batch 1 and 32,
next to the official-style model against itself at batch 1 vs 32 (the floor: in bf16 the official code differs from
itself between batch sizes). Per row: bit-equal scores, max |dP(yes)|, Kendall tau per query (min / mean).

Table 2 (coarsening a low-precision store): memories encoded at r0, rounded to the store's codec dtype, coarsened to
k*r0 and scored (float32 compute), vs memories pooled directly at k*r0 from the same token states and stored in that
dtype, both against the exact float32 scores at k*r0.

    python benchmarks/bf16_agreement.py [--queries 6 --docs 40 --shape tiny]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import machine, nano_model_dir, tiny_model_dir


def kendall_tau(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    i, j = np.triu_indices(len(a), 1)
    s = np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
    return float(s.sum() / len(s))


def corpus(n_queries: int, n_docs: int, seed: int = 0):
    """Passages of 2 to ~400 words (many past max_length), queries of 2 to ~60 words, from a fixed vocabulary."""
    rng = np.random.default_rng(seed)
    words = ["json", "csv", "socket", "thread", "pickle", "zlib", "heapq", "bisect", "random", "string", "struct",
             "queue", "parse", "file", "line", "read", "data", "object", "module", "function", "return", "value",
             "error", "path", "list", "default", "name", "type", "set", "get"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(2, 400)))) for _ in range(n_docs)]
    queries = [" ".join(rng.choice(words, size=int(rng.integers(2, 60)))) for _ in range(n_queries)]
    return queries, docs


def _row(name, a, b, n_queries, n_docs):
    a, b = a.reshape(n_queries, n_docs), b.reshape(n_queries, n_docs)
    taus = [kendall_tau(x, y) for x, y in zip(a, b)]
    return (f"| {name} | {int((a == b).sum())}/{a.size} | {np.abs(a - b).max():.1e} | "
            f"{min(taus):.3f} / {np.mean(taus):.3f} |")


def batched_table(model_dir, queries, docs, max_length: int) -> list[str]:
    from kalm_batch import KaLMReranker
    from tests.official_reference import OfficialStyleReranker

    pairs = [(q, d) for q in queries for d in docs]
    fp32 = np.asarray(KaLMReranker(str(model_dir), dtype="float32", max_length=max_length).predict(pairs))
    out = ["| dtype: A vs B | bit-equal | max abs dP | Kendall tau per query (min / mean) |", "|---|---|---|---|"]
    for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        ref = OfficialStyleReranker(model_dir, dtype=dt, max_length=max_length)
        ref1, ref32 = ref.predict(pairs, batch_size=1), ref.predict(pairs, batch_size=32)
        ours = KaLMReranker(str(model_dir), dtype=name, max_length=max_length)
        ours1 = np.asarray(ours.predict(pairs, batch_size=1), np.float32)
        ours32 = np.asarray(ours.predict(pairs, batch_size=32), np.float32)
        out += [_row(f"{name}: ours b1 vs official b1", ours1, ref1, len(queries), len(docs)),
                _row(f"{name}: ours b32 vs official b32", ours32, ref32, len(queries), len(docs)),
                _row(f"{name}: official b1 vs official b32 (floor)", ref1, ref32, len(queries), len(docs)),
                _row(f"{name}: ours b32 vs float32", ours32, fp32.astype(np.float32), len(queries), len(docs))]
    return out


def coarsen_table(model_dir, queries, docs, max_length: int, r0: int = 4) -> list[str]:
    from kalm_batch import KaLMReranker, Memory
    from kalm_batch.codec import decode_memory, encode_memory

    r = KaLMReranker(str(model_dir), dtype="float32", max_length=max_length, chunk_size=r0)

    def stored(mems, dtype):
        out = []
        for m in mems:
            e = encode_memory(m.to_numpy(), dtype=dtype)
            vec = decode_memory(e.payload, e.scales, e.checksum, e.n_vectors, e.dim, dtype)
            out.append(Memory(torch.from_numpy(vec), m.n_tokens, m.ratio))
        return out

    def scores(mems):
        return np.concatenate([r.score(q, mems).p_yes for q in queries])

    base = r.encode(docs, ratio=r0)
    head = ("| store dtype | read at | coarsened from r0: max abs dP / min tau | pooled directly at k*r0: "
            "max abs dP / min tau |")
    out = [head, "|---|---|---|---|"]
    for dtype in ("float32", "bfloat16", "int8"):
        at_r0 = stored(base, dtype)
        for k in (2, 4, 8):
            exact = scores(r.encode(docs, ratio=k * r0))
            coarse = scores([m.at_ratio(k * r0) for m in at_r0])
            direct = scores(stored(r.encode(docs, ratio=k * r0), dtype))
            cells = []
            for s in (coarse, direct):
                taus = [kendall_tau(x, y) for x, y in zip(s.reshape(len(queries), -1),
                                                          exact.reshape(len(queries), -1))]
                cells.append(f"{np.abs(s - exact).max():.1e} / {min(taus):.3f}")
            out.append(f"| {dtype} | {k}*r0 = {k * r0} | {cells[0]} | {cells[1]} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--shape", choices=["tiny", "nano"], default="tiny")
    ap.add_argument("--tables", choices=["both", "batched", "coarsen"], default="both",
                    help="which table to print (the batched one runs bf16/fp16, slow on CPUs without native bf16)")
    ns = ap.parse_args()
    model_dir = tiny_model_dir() if ns.shape == "tiny" else nano_model_dir()
    queries, docs = corpus(ns.queries, ns.docs)
    t0 = time.perf_counter()
    print(f"# {ns.shape} model, {ns.queries} queries x {ns.docs} passages, max_length {ns.max_length}; {machine()}")
    if ns.tables in ("both", "batched"):
        print("\n".join(batched_table(model_dir, queries, docs, ns.max_length)))
        print()
    if ns.tables in ("both", "coarsen"):
        print("\n".join(coarsen_table(model_dir, queries, docs, ns.max_length)))
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
