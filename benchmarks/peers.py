"""Benchmark: kalm-batch scoring from stored memories vs the joint cross-encoders users would deploy instead.

    python benchmarks/peers.py [--lengths 128,510,2048] [--docs 32] [--long-docs 8] [--batch 8] [--ratios 4,16]

On the same pairs (one query, N passages of T tokens, bf16, CPU, one timed run after a 2-pair warm-up), random
weights built from transformers' own classes (speed does not depend on weight values):

- Qwen3-Reranker-0.6B shape: Qwen3ForCausalLM (28 layers, hidden 1024, 16 heads / 8 KV heads, head_dim 128,
  intermediate 3072, vocab 151669, tied embeddings); the official prompt (system + instruct + query + document +
  assistant prefix, ~80 tokens around the passage) and score = softmax(yes, no) logits at the last token
  (computed for the last position only, as vLLM does, which favours the peer);
- bge-reranker-v2-m3 shape: XLMRobertaForSequenceClassification (24 layers, hidden 1024, 16 heads, intermediate
  4096, vocab 250002, 8194 positions); ``[CLS] query [SEP][SEP] passage [SEP]``, one logit;
- the official-style joint KaLM predict on the Nano shape (tests/reference_impl.py: full model, encode + MEP pool +
  decode with logits over the whole vocabulary at every position), r=4;
- kalm-batch: memories encoded once (not timed) and stored with the bf16 codec; per query only the codec decode,
  the exact coarsening to r and the decoder half with the two last-position logits.

Inputs of the peers are random token ids of the exact lengths (their tokenizers are not available offline; token
counts, not token values, set the cost). Passages longer than 512 tokens: ``--long-docs`` pairs (the per-pair cost is
what is compared). Prints a JSON record (wall and CPU ms per pair) and a table of CPU ms per pair (this process, all
threads: robust to other work on a shared host) and each peer's CPU ms / kalm-batch's.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

from common import machine, nano_model_dir
from scoring import QUERY, _documents

QUERY_TOKENS = 16  # the peers' query length in tokens (the KaLM query above is ~16 words)
QWEN_PROMPT_TOKENS = 80  # Qwen3-Reranker's system/instruct/assistant template around query and document


WARMUP = 2  # pairs scored before the timed pass (--warmup)
DTYPE = "bfloat16"  # --dtype


def _torch_dtype():
    import torch

    return getattr(torch, DTYPE)


def _time_batches(fn, items: list, batch: int) -> tuple[float, float]:
    """Warm up on WARMUP items, then one timed pass over all items in batches; (wall, CPU) seconds per item.

    CPU seconds (this process, all threads) are what a pair costs whatever else the host runs; on a shared host
    they are the fairer measure, wall seconds the one a user sees alone on the machine."""
    if WARMUP:
        fn(items[:WARMUP])
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(items), batch):
        fn(items[i:i + batch])
    return (time.perf_counter() - start) / len(items), (time.process_time() - cpu) / len(items)


def _random_ids(n_pairs: int, length: int, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1000, vocab - 1000, (length,), generator=g) for _ in range(n_pairs)]


def qwen3_reranker(n_pairs: int, doc_tokens: int, batch: int) -> tuple[float, float]:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(_torch_dtype()).eval()
    seqs = _random_ids(n_pairs, QWEN_PROMPT_TOKENS + QUERY_TOKENS + doc_tokens, cfg.vocab_size, 1)
    yes, no = 9693, 2152  # token ids of "yes" / "no" in Qwen3's vocabulary

    @torch.inference_mode()
    def score(items):
        ids = torch.stack(items)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1).logits[:, -1]
        return torch.softmax(logits[:, [yes, no]].float(), dim=-1)[:, 0]

    return _time_batches(score, seqs, batch)


def bge_reranker_v2_m3(n_pairs: int, doc_tokens: int, batch: int) -> tuple[float, float]:
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    cfg = XLMRobertaConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1, num_labels=1)
    torch.manual_seed(0)
    model = XLMRobertaForSequenceClassification(cfg).to(_torch_dtype()).eval()
    seqs = _random_ids(n_pairs, 4 + QUERY_TOKENS + doc_tokens, cfg.vocab_size, 2)

    @torch.inference_mode()
    def score(items):
        ids = torch.stack(items)
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, 0].float()

    return _time_batches(score, seqs, batch)


def kalm_official(model_dir, docs: list[str], batch: int) -> tuple[float, float]:
    from tests.reference_impl import ReferenceReranker

    ref = ReferenceReranker(str(model_dir), dtype=_torch_dtype(), chunk_size=4, max_length=4096)
    return _time_batches(lambda items: ref.predict([(QUERY, d) for d in items]), docs, batch)


def kalm_stored(model_dir, docs: list[str], batch: int, ratios: list[int]) -> dict[int, tuple[float, float]]:
    """Per ratio: seconds per pair of codec decode + coarsening to r + the decoder half (memories made beforehand)."""
    import torch

    from kalm_batch import KaLMReranker, Memory
    from kalm_batch.codec import decode_memory, encode_memory

    ours = KaLMReranker(str(model_dir), dtype=DTYPE, chunk_size=4, batch_size=batch, max_length=4096)
    fresh = ours.encode(docs)  # once per corpus: not timed
    stored = [(encode_memory(m.to_numpy(), dtype="bfloat16"), m.n_tokens) for m in fresh]

    def score(items, r):
        mems = [Memory(torch.from_numpy(decode_memory(e.payload, e.scales, e.checksum, e.n_vectors, e.dim,
                                                      "bfloat16")), n, 4).at_ratio(r) for e, n in items]
        return ours.score(QUERY, mems)

    return {r: _time_batches(lambda items, r=r: score(items, r), stored, batch) for r in ratios}


def bench_length(model_dir, doc_tokens: int, n_pairs: int, batch: int, ratios: list[int]) -> dict:
    from kalm_batch.model import load_tokenizer

    docs = _documents(load_tokenizer(model_dir), n_pairs, doc_tokens)
    secs = {f"kalm-batch stored r={r}": s for r, s in kalm_stored(model_dir, docs, batch, ratios).items()}
    gc.collect()
    for name, fn in (("KaLM official-style predict (Nano, r=4)", lambda: kalm_official(model_dir, docs, batch)),
                     ("Qwen3-Reranker-0.6B shape", lambda: qwen3_reranker(n_pairs, doc_tokens, batch)),
                     ("bge-reranker-v2-m3 shape", lambda: bge_reranker_v2_m3(n_pairs, doc_tokens, batch))):
        secs[name] = fn()
        gc.collect()
        print(f"  {doc_tokens} tokens, {name}: {1000 * secs[name][0]:.1f} ms/pair wall, "
              f"{1000 * secs[name][1]:.1f} ms/pair CPU", flush=True)
    ms = {k: 1000 * cpu for k, (_, cpu) in secs.items()}
    base = ms[f"kalm-batch stored r={ratios[0]}"]
    return {"doc_tokens": doc_tokens, "pairs": n_pairs, "ms_per_pair": {k: round(v, 2) for k, v in ms.items()},
            "wall_ms_per_pair": {k: round(1000 * w, 2) for k, (w, _) in secs.items()},
            f"x_vs_kalm_batch_r{ratios[0]}": {k: round(v / base, 1) for k, v in ms.items()}}


def table(results: list[dict], ratio: int) -> str:
    names = list(results[0]["ms_per_pair"])
    head = f"{'CPU ms per pair (x = / kalm-batch r=' + str(ratio) + ')':<44}" + "".join(
        f"{str(r['doc_tokens']) + ' tok (' + str(r['pairs']) + ' pairs)':>24}" for r in results)
    rows = [f"{n:<44}" + "".join(f"{r['ms_per_pair'][n]:>14.1f} ({r[f'x_vs_kalm_batch_r{ratio}'][n]:>5.1f}x)"
                                 for r in results) for n in names]
    return "\n".join([head, *rows])


def main() -> None:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="128,510,2048", help="passage lengths in tokens")
    p.add_argument("--docs", type=int, default=32, help="pairs (one query) at lengths <= 512")
    p.add_argument("--long-docs", type=int, default=8, help="pairs at lengths > 512 (the joint models are slow)")
    p.add_argument("--batch", type=int, default=8, help="pairs per forward, for every model")
    p.add_argument("--ratios", default="4,16", help="pooling ratios of the stored path (the first is the baseline)")
    p.add_argument("--cache", default="/tmp/kalm-bench/nano", help="where the random Nano-shape checkpoint is kept")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype of every model (float32 on CPUs without native bf16, where bf16 is emulated)")
    p.add_argument("--warmup", type=int, default=2, help="pairs scored before each timed pass")
    a = p.parse_args()
    global WARMUP, DTYPE
    WARMUP, DTYPE = a.warmup, a.dtype
    torch.manual_seed(0)
    ratios = [int(r) for r in a.ratios.split(",")]
    model_dir = nano_model_dir(a.cache)
    print(f"machine: {machine()}", flush=True)
    results = [bench_length(model_dir, t, a.docs if t <= 512 else a.long_docs, a.batch, ratios)
               for t in (int(x) for x in a.lengths.split(","))]
    print(json.dumps({"machine": machine(), "batch": a.batch, "dtype": DTYPE, "warmup": WARMUP, "results": results},
                     indent=2))
    print(table(results, ratios[0]))


if __name__ == "__main__":
    main()
