"""Where decoder time goes: per-pair cost vs the number of memory vectors, and what that means for cascades.

    python benchmarks/decoder_cost.py [--vectors 8,32,128,256,512,1024] [--pairs 16] [--repeats 2]

Random Nano-shape model (bf16, CPU), one realistic prompt (the default instruction + a sample query), ``--pairs``
pairs per batch, memories of n random vectors (decoder speed does not depend on the values). Fits
cost(n) = a + b * n seconds per pair by least squares, then gives, for passages of L tokens, the cost of the cascade
``32:100,4:20`` relative to direct r=4 on 100 candidates:
    (100 * cost(L/32) + 20 * cost(L/4)) / (100 * cost(L/4))
both from the fit and measured directly at L = 4 * n for each measured n that is a multiple of 8.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import machine, nano_model_dir


def per_pair_seconds(r, prompt: list[int], n_vectors: int, pairs: int, repeats: int) -> float:
    import torch

    from kalm_batch import Memory

    mems = [Memory(torch.randn(n_vectors, r.hidden_size).to(torch.bfloat16), n_vectors * 4, 4) for _ in range(pairs)]
    r.score_prompt_ids([prompt] * pairs, mems)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        r.score_prompt_ids([prompt] * pairs, mems)
        best = min(best, time.perf_counter() - t)
    return best / pairs


def cascade_ratio(cost, tokens: int) -> float:
    return (100 * cost(max(1, tokens // 32)) + 20 * cost(max(1, tokens // 4))) / (100 * cost(max(1, tokens // 4)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vectors", default="8,32,128,256,512,1024")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    from kalm_batch import KaLMReranker

    r = KaLMReranker(str(nano_model_dir()), dtype="bfloat16", batch_size=a.pairs, max_tokens_per_batch=1 << 30)
    prompt = r.prompt_ids("how do I parse command line arguments with a default value")
    ns = [int(x) for x in a.vectors.split(",")]
    measured = {n: per_pair_seconds(r, prompt, n, a.pairs, a.repeats) for n in ns}
    b, a0 = np.polyfit(ns, [measured[n] for n in ns], 1)
    fit = lambda n: a0 + b * n
    direct = {4 * n: round((100 * measured[n // 8] + 20 * measured[n]) / (100 * measured[n]), 3)
              for n in ns if n // 8 in measured}
    out = {
        "machine": machine(), "prompt_tokens": len(prompt), "pairs_per_batch": a.pairs,
        "ms_per_pair": {n: round(1000 * s, 2) for n, s in measured.items()},
        "fit_ms": {"a_per_pair": round(1000 * a0, 2), "b_per_vector": round(1000 * b, 4),
                   "vectors_that_cost_as_much_as_the_prompt": round(a0 / b) if b > 0 else None},
        "cascade_32_100_4_20_vs_direct_r4_fit": {L: round(cascade_ratio(fit, L), 3)
                                                  for L in (164, 512, 1024, 2048, 8192, 32768)},
        "cascade_measured_at_passage_tokens": direct,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
