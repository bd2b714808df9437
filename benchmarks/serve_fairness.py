"""Fairness of the Serve endpoint: latency of small requests while one large request runs (issue 14).

For each model (``tiny``: the test model; ``nano``: a random checkpoint of the real Nano shape), a store of
``--passages`` sample-corpus passages is built and Serve runs one scorer replica. Then, per token budget
(``--budgets``: the default ``max_batch_tokens``/``max_encode_tokens``, and a huge one that puts the whole large
request in one batch, i.e. no interleaving, as before issue 14):

1. *alone*: ``--small`` small requests (a short query x 2 document ids), one after another;
2. *under load*: one large legal request (a ``--query-chars`` query, a ``--instruction-chars`` instruction and
   ``--texts`` raw texts of ``--text-chars`` characters each) runs while small requests are sent one after another
   until it ends.

Prints a markdown block: the large request's time, small-request p50/p99 alone and under load, per budget.

    python benchmarks/serve_fairness.py --models tiny,nano
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from common import machine, nano_model_dir, tiny_model_dir

from kalm_batch import KaLMReranker
from kalm_batch.sample import write_sample_corpus

HUGE = 10**9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,nano")
    p.add_argument("--passages", type=int, default=40)
    p.add_argument("--max-length", type=int, default=512, help="encoder max_length of the store (tokens)")
    p.add_argument("--small", type=int, default=10, help="small requests in the 'alone' phase")
    p.add_argument("--texts", type=int, default=16, help="raw texts in the large request")
    p.add_argument("--text-chars", type=int, default=4000)
    p.add_argument("--query-chars", type=int, default=3000)
    p.add_argument("--instruction-chars", type=int, default=450,
                   help="within the default max_instruction_tokens=512 for the byte-level tiny tokenizer too")
    p.add_argument("--budgets", default="default,huge", help="comma-separated: default (the ServeConfig defaults), huge (no split) or "
                                                      "BATCH/ENCODE token budgets, e.g. 512/256")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the scorer")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kalm-bench-fairness"))
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(kind: str, args) -> tuple[Path, str, list[str], list[str]]:
    from kalm_batch.store.writer import build_store

    model = nano_model_dir() if kind == "nano" else tiny_model_dir()
    info = write_sample_corpus(str(Path(args.workdir) / "corpus"), max_docs=max(args.passages, args.texts))
    with open(info.corpus_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    docs = {r["_id"]: r["text"] for r in rows[: args.passages]}
    store = Path(args.workdir) / f"store-{kind}-{args.passages}-{args.max_length}"
    if not (store / "_delta_log").exists():
        build_store(str(store), KaLMReranker(str(model), max_length=args.max_length), docs)
    words = " ".join(r["text"] for r in rows).split()
    return model, str(store), list(docs), words


def _text(words: list[str], chars: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    out, n = [], 0
    while n < chars:
        w = words[int(rng.integers(len(words)))]
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_budget(base: str, ids: list[str], large: dict, n_small: int) -> dict:
    with httpx.Client(base_url=base, timeout=900) as c:
        def small(i: int) -> float:
            t0 = time.perf_counter()
            r = c.post("/v2/rerank", json={"query": f"what does {ids[i % len(ids)]} do",
                                           "document_ids": [ids[i % len(ids)], ids[(i + 1) % len(ids)]]})
            assert r.status_code == 200, r.text
            return time.perf_counter() - t0

        small(0)  # warm
        alone = [small(i) for i in range(n_small)]
        result: dict = {}

        def send_large():
            t0 = time.perf_counter()
            with httpx.Client(base_url=base, timeout=900) as lc:
                r = lc.post("/v2/rerank", json=large)
            result["large_s"], result["large_status"] = time.perf_counter() - t0, r.status_code
            if r.status_code != 200:
                print(f"large request refused: {r.text}")

        thread = threading.Thread(target=send_large)
        thread.start()
        time.sleep(0.5)
        loaded, i = [], 0
        while thread.is_alive():
            loaded.append(small(i))
            i += 1
        thread.join()
    return {"alone_p50": _pct(alone, 50), "alone_p99": _pct(alone, 99), "loaded_p50": _pct(loaded, 50),
            "loaded_p99": _pct(loaded, 99), "loaded_max": max(loaded, default=float("nan")), "n_loaded": len(loaded),
            **result}


def _budget(spec: str) -> dict:
    """``default`` (the ServeConfig defaults), ``huge`` (no split) or ``BATCH/ENCODE`` token budgets."""
    if spec == "default":
        return {}
    if spec == "huge":
        return {"max_batch_tokens": HUGE, "max_encode_tokens": HUGE}
    batch, encode = (int(x) for x in spec.split("/"))
    return {"max_batch_tokens": batch, "max_encode_tokens": encode}


def bench_model(kind: str, args) -> dict:
    import ray
    from ray import serve

    from kalm_batch.serve import ServeConfig, run_serve

    model, store, ids, words = prepare(kind, args)
    ncpu = os.cpu_count() or 1
    large = {"query": _text(words, args.query_chars, 1), "instruction": _text(words, args.instruction_chars, 2),
             "documents": [_text(words, args.text_chars, 10 + k) for k in range(args.texts)]}
    out = {}
    ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False)
    try:
        for budget in args.budgets.split(","):
            port = _free_port()
            extra = _budget(budget)
            cfg = ServeConfig(model=str(model), store=store, port=port, num_cpus=max(0.5, ncpu - 0.5),
                              torch_threads=args.threads, text_cache_bytes=0, **extra)  # no cache: each large request encodes its texts
            run_serve(cfg, blocking=False)
            out[budget] = run_budget(f"http://127.0.0.1:{port}", ids, large, args.small)
            out[budget]["max_batch_tokens"] = cfg.max_batch_tokens
            out[budget]["max_encode_tokens"] = cfg.max_encode_tokens
            serve.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results = {kind: bench_model(kind, args) for kind in args.models.split(",")}
    print(f"\n`python benchmarks/serve_fairness.py {' '.join(sys.argv[1:] if argv is None else argv)}` on {machine()}; large request: "
          f"{args.query_chars}-char query, {args.instruction_chars}-char instruction, {args.texts} raw texts of "
          f"{args.text_chars} chars (store max_length {args.max_length}); {args.threads} scorer torch thread(s)\n")
    print("| model | budget (batch / encode tokens) | large request s | small alone p50 / p99 s | "
          "small under load p50 / p99 / max s | small requests under load |")
    print("|---|---|---|---|---|---|")
    for kind, per in results.items():
        for budget, r in per.items():
            b = f"{budget} ({r['max_batch_tokens']} / {r['max_encode_tokens']})"
            print(f"| {kind} | {b} | {r['large_s']:.1f} ({r['large_status']}) | {r['alone_p50']:.3f} / "
                  f"{r['alone_p99']:.3f} | {r['loaded_p50']:.2f} / {r['loaded_p99']:.2f} / {r['loaded_max']:.2f} | "
                  f"{r['n_loaded']} |")
    print("\n" + json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
