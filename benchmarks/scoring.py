"""Benchmark: official-style joint predict vs scoring stored memories, on a random model of the real Nano shape.

    python benchmarks/scoring.py [--dtypes bfloat16,float32] [--docs 32] [--doc-tokens 512]

(1) official-style ``predict``: the full model (AutoModelForSeq2SeqLM), encode + MEP pool + decode per pair with
    logits over the whole vocabulary at every position (tests/reference_impl.py);
(2) kalm-batch: memories encoded once and stored with the codec; per query only codec decode + the decoder half
    with the two last-position logits.
Both in the same run, as pairs/s; plus codec bytes per vector on the model's real encoder states and the peak RSS of
an encode-only and a score-only process.
"""

from __future__ import annotations

import argparse
import json
import time

from common import machine, nano_model_dir, peak_rss_mb, run_child

QUERY = "how do I read a file line by line and strip the newline characters?"


def _documents(tokenizer, n: int, n_tokens: int) -> list[str]:
    """n distinct documents of exactly n_tokens encoder tokens (the "<Document>: " prefix included)."""
    from kalm_batch.prompts import document_text

    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "reading", "files", "line", "by", "line"]
    docs = []
    for i in range(n):
        text = " ".join(words[(i + j) % len(words)] for j in range(n_tokens * 2))
        ids = tokenizer(document_text(text), add_special_tokens=False)["input_ids"][:n_tokens]
        docs.append(tokenizer.decode(ids)[len("<Document>: "):])
    return docs


def _pairs_per_s(fn, n_pairs: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_pairs / best


def bench_dtype(model_dir, dtype: str, n_docs: int, n_tokens: int, repeats: int) -> dict:
    import torch

    from kalm_batch import KaLMReranker, Memory
    from kalm_batch.codec import decode_memory, encode_memory
    from tests.reference_impl import ReferenceReranker

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    ours = KaLMReranker(str(model_dir), dtype=dtype, chunk_size=4, batch_size=32)
    docs = _documents(ours.tokenizer, n_docs, n_tokens)
    pairs = [(QUERY, d) for d in docs]
    ref = ReferenceReranker(str(model_dir), dtype=torch_dtype, chunk_size=4)
    official = _pairs_per_s(lambda: ref.predict(pairs), len(pairs), repeats)
    codec_dtype = "bfloat16" if dtype == "bfloat16" else "float32"
    fresh = ours.encode(docs)
    stored = [encode_memory(m.to_numpy(), dtype=codec_dtype) for m in fresh]
    n_tok = [m.n_tokens for m in fresh]

    def score_stored():
        mems = [Memory(torch.from_numpy(decode_memory(e.payload, e.scales, e.checksum, e.n_vectors, e.dim,
                                                      codec_dtype)), n, 4) for e, n in zip(stored, n_tok)]
        return ours.score(QUERY, mems)

    stored_rate = _pairs_per_s(score_stored, len(pairs), repeats)
    ref_p = ref.predict(pairs).float().numpy()
    ours_p = score_stored().p_yes
    return {"dtype": dtype, "official_pairs_per_s": round(official, 2), "stored_pairs_per_s": round(stored_rate, 2),
            "speedup": round(stored_rate / official, 1), "max_abs_dP_vs_official": float(abs(ref_p - ours_p).max())}


def codec_sizes(model_dir, n_docs: int, n_tokens: int) -> dict:
    from kalm_batch import KaLMReranker
    from kalm_batch.codec import CODEC_DTYPES, encode_memory

    r = KaLMReranker(str(model_dir), dtype="bfloat16", chunk_size=4)
    mems = r.encode(_documents(r.tokenizer, n_docs, n_tokens))
    vectors = sum(m.vectors.shape[0] for m in mems)
    raw_bf16 = vectors * r.hidden_size * 2
    out = {"vectors": vectors, "raw_bf16_bytes_per_vector": r.hidden_size * 2}
    for dt in CODEC_DTYPES:
        total = sum(len(e.payload) + len(e.scales or b"") for e in (encode_memory(m.to_numpy(), dt) for m in mems))
        out[dt] = {"bytes_per_vector": round(total / vectors, 1), "vs_raw_bf16": round(total / raw_bf16, 3)}
    return out


def rss_phase(phase: str, model_dir: str, n_docs: int, n_tokens: int) -> None:
    import torch

    from kalm_batch import KaLMReranker, Memory

    r = KaLMReranker(model_dir, dtype="bfloat16", chunk_size=4)
    if phase == "encode":
        r.encode(_documents(r.tokenizer, n_docs, n_tokens))
    else:
        m = n_tokens // 4
        r.score(QUERY, [Memory(torch.randn(m, r.hidden_size), n_tokens, 4) for _ in range(n_docs)])
    print(json.dumps({"phase": phase, "peak_rss_mb": round(peak_rss_mb(), 1)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--doc-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--phase", choices=["encode", "score"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        return rss_phase(a.phase, a.model_dir, a.docs, a.doc_tokens)
    model_dir = nano_model_dir()
    results = {"machine": machine(), "docs": a.docs, "doc_tokens": a.doc_tokens, "ratio": 4}
    results["throughput"] = [bench_dtype(model_dir, dt, a.docs, a.doc_tokens, a.repeats) for dt in a.dtypes.split(",")]
    results["codec"] = codec_sizes(model_dir, a.docs, a.doc_tokens)
    results["rss"] = [json.loads(run_child(["benchmarks/scoring.py", "--phase", ph, "--model-dir", str(model_dir),
                                            "--docs", str(a.docs), "--doc-tokens", str(a.doc_tokens)]))
                      for ph in ("encode", "score")]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
