"""Load-test the Ray Serve rerank endpoint on 127.0.0.1 and compare with in-process scoring of the same pairs.

For each model (``tiny``: the test model; ``nano``: a random checkpoint of the real Nano shape, ~700 MB, written
once into the work dir), a store is built from the sample corpus (``--passages`` stdlib docstrings), Serve is
started with one scorer replica, and ``--concurrency`` async clients send ``/v2/rerank`` requests of 1 query x
``--docs`` document ids for ``--duration`` seconds, then the same with raw texts (text cache warm after the first
requests; for nano the raw-text phase is dominated by on-the-fly encoding). In-process baselines score the same kind of requests with ``KaLMReranker`` on the same memories, one
request at a time and in ``max_pairs_per_batch`` batches, with the same torch thread count.

    python benchmarks/serve.py --models tiny,nano --duration 30

Prints a markdown block (command, machine, results). Only requests that complete inside the window count; those
still in flight at the deadline are cancelled. ``pairs/s (scorer)`` and ``scorer busy`` are the scorer's decoded
pairs and decode time in the window (``GET /stats``) — the better measure when a request takes longer than the window
(the Nano shape on a small CPU, where one 20-pair request takes seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from kalm_batch import KaLMReranker
from kalm_batch.sample import write_sample_corpus
from kalm_batch.tiny import write_random_model

_MAX_PAIRS_DEFAULT = {"tiny": 40, "nano": 40}  # CPU: small batches pad less


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,nano", help="comma-separated: tiny, nano")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per phase")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--docs", type=int, default=20, help="document ids per request")
    p.add_argument("--passages", type=int, default=200, help="sample-corpus passages in the store")
    p.add_argument("--max-length", type=int, default=128, help="encoder max_length of the store (tokens)")
    p.add_argument("--max-pairs-per-batch", type=int, default=None, help="default: 40 (CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, served and in-process alike (1 avoids OpenMP thrashing on a busy box)")
    p.add_argument("--skip-texts", action="store_true", help="skip the raw-text phase")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kalm-bench-serve"),
                   help="models, corpus and stores are kept here and reused")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- fixtures


def prepare_model(kind: str, workdir: Path) -> Path:
    out = workdir / f"model-{kind}"
    if not (out / "config.json").exists():
        dtype = torch.bfloat16 if kind == "nano" else torch.float32
        write_random_model(out, shape=kind, seed=0, dtype=dtype)
    return out


def prepare_corpus(workdir: Path, passages: int) -> tuple[dict[str, str], list[str]]:
    info = write_sample_corpus(str(workdir / f"corpus-{passages}"), max_docs=passages, n_queries=50)
    docs = {}
    with open(info.corpus_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            docs[row["_id"]] = row["text"]
    with open(info.queries_path, encoding="utf-8") as f:
        queries = [json.loads(line)["text"] for line in f]
    return docs, queries


def prepare_store(kind: str, model_dir: Path, docs: dict[str, str], workdir: Path, max_length: int) -> str:
    from kalm_batch.store.writer import build_store

    store = workdir / f"store-{kind}-{len(docs)}-{max_length}"
    if not (store / "_delta_log").exists():
        build_store(str(store), KaLMReranker(str(model_dir), max_length=max_length), docs)
    return str(store)


def make_requests(docs: dict[str, str], queries: list[str], n: int, k: int, seed: int = 0) -> list[tuple]:
    rng = random.Random(seed)
    ids = list(docs)
    return [(rng.choice(queries), rng.sample(ids, k)) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    """Requests completed inside the window (``done``: (latency s, pairs)), errors, and the scorer's counters."""

    seconds: float
    done: list[tuple[float, int]] = field(default_factory=list)
    errors: int = 0
    server_pairs: int = 0
    decode_seconds: float = 0.0

    def summary(self) -> dict:
        lat = np.array([t for t, _ in self.done]) * 1000 if self.done else np.array([np.nan])
        return {"requests": len(self.done), "pairs_s": sum(p for _, p in self.done) / self.seconds,
                "server_pairs_s": self.server_pairs / self.seconds,
                "scorer_busy": self.decode_seconds / self.seconds, "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99)), "errors": self.errors}


async def _worker(client: httpx.AsyncClient, bodies: list[dict], offset: int, step: int, deadline: float,
                  out: LoadResult) -> None:
    i = offset
    while time.monotonic() < deadline:
        body = bodies[i % len(bodies)]
        t0 = time.monotonic()
        try:
            resp = await client.post("/v2/rerank", json=body)
            ok = resp.status_code == 200
        except httpx.HTTPError:
            ok = False
        if time.monotonic() > deadline:
            return  # finished after the window: not counted
        if ok:
            out.done.append((time.monotonic() - t0, len(body.get("document_ids") or body.get("documents"))))
        else:
            out.errors += 1
        i += step


async def _stats(client: httpx.AsyncClient) -> dict:
    return (await client.get("/stats")).json()


async def _wait_idle(client: httpx.AsyncClient, limit_s: float) -> None:
    """Wait until the scorer has nothing in progress (cancelled requests may leave a batch or an encode running)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        stats = await _stats(client)
        if stats["ongoing_requests"] == 0 and not stats["model_busy"]:
            return
        await asyncio.sleep(0.5)


async def run_load(base_url: str, bodies: list[dict], concurrency: int, duration: float, timeout: float) -> dict:
    out = LoadResult(seconds=duration)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as side, \
            httpx.AsyncClient(base_url=base_url, timeout=timeout,
                              limits=httpx.Limits(max_connections=concurrency)) as client:
        before = await _stats(side)
        deadline = time.monotonic() + duration
        tasks = [asyncio.create_task(_worker(client, bodies, k, concurrency, deadline, out))
                 for k in range(concurrency)]
        await asyncio.sleep(duration)
        after = await _stats(side)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        out.server_pairs = after["decoded_pairs"] - before["decoded_pairs"]
        out.decode_seconds = after["decode_seconds"] - before["decode_seconds"]
        await _wait_idle(side, timeout)
    return out.summary()


# ----------------------------------------------------------------------------------------------- in-process


def in_process(model_dir: Path, store: str, requests: list[tuple], max_pairs: int, seconds: float) -> dict:
    """pairs/s of KaLMReranker on the store's memories: one request at a time, and in max_pairs batches."""
    from kalm_batch.store import open_store

    reader = open_store(store)
    r = KaLMReranker(str(model_dir), chunk_size=reader.ratio, max_length=reader.summary()["max_length"],
                     batch_size=max_pairs)
    r.score(requests[0][0], [reader.get(requests[0][1][0])])  # load the decoder outside the timing
    group = max(1, max_pairs // len(requests[0][1]))  # requests per batch
    return {"sequential_pairs_s": _timed(lambda q, ids: _score_one(r, reader, q, ids), requests, seconds, None),
            "batched_pairs_s": _timed(lambda qs, ids: _score_batch(r, reader, qs, ids), requests, seconds, group)}


def _score_one(r, reader, query, ids) -> int:
    mems = reader.fetch(ids).memories
    r.score(query, [mems[i] for i in ids])
    return len(ids)


def _score_batch(r, reader, queries, id_lists) -> int:
    flat_q = [q for q, ids in zip(queries, id_lists) for _ in ids]
    flat_ids = [i for ids in id_lists for i in ids]
    mems = reader.fetch(flat_ids).memories
    r.score_memories(flat_q, [mems[i] for i in flat_ids])
    return len(flat_ids)


def _timed(fn, requests: list[tuple], seconds: float, group: int | None) -> float:
    """pairs/s of ``fn`` over the requests: one (query, ids) at a time (group None), or lists of ``group`` of them."""
    pairs, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds or pairs == 0:
        chunk = [requests[(i + j) % len(requests)] for j in range(group or 1)]
        i += group or 1
        if group is None:
            pairs += fn(chunk[0][0], chunk[0][1])
        else:
            pairs += fn([q for q, _ in chunk], [ids for _, ids in chunk])
    return pairs / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_model(kind: str, args: argparse.Namespace, docs: dict[str, str], queries: list[str]) -> dict:
    import ray
    from ray import serve

    from kalm_batch.serve import ServeConfig, run_serve

    workdir, ncpu = Path(args.workdir), os.cpu_count() or 1
    max_pairs = args.max_pairs_per_batch or _MAX_PAIRS_DEFAULT[kind]
    model_dir = prepare_model(kind, workdir)
    store = prepare_store(kind, model_dir, docs, workdir, args.max_length)
    requests = make_requests(docs, queries, 512, args.docs)
    port = _free_port()
    ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False)
    try:
        cfg = ServeConfig(model=str(model_dir), store=store, port=port, num_cpus=max(0.5, ncpu - 0.5),
                          torch_threads=args.threads, max_pairs_per_batch=max_pairs,
                          max_batch_size=max(args.concurrency, 16), max_documents=max(1000, args.docs))
        run_serve(cfg, blocking=False)
        base = f"http://127.0.0.1:{port}"
        by_id = [{"query": q, "document_ids": ids} for q, ids in requests]
        result = {"ids": asyncio.run(run_load(base, by_id, args.concurrency, args.duration, args.timeout)),
                  "texts": None}
        if not args.skip_texts:
            by_text = [{"query": q, "documents": [docs[i] for i in ids]} for q, ids in requests]
            result["texts"] = asyncio.run(run_load(base, by_text, args.concurrency, args.duration, args.timeout))
    finally:
        serve.shutdown()
        ray.shutdown()
    torch.set_num_threads(args.threads)
    result["in_process"] = in_process(model_dir, store, requests, max_pairs, min(args.duration, 30.0))
    result["max_pairs_per_batch"] = max_pairs
    return result


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_markdown(results: dict, args: argparse.Namespace) -> None:
    print("\n### Serve benchmark (benchmarks/serve.py)\n")
    print(f"- command: `python benchmarks/serve.py {' '.join(sys.argv[1:])}`")
    print(f"- machine: nproc={os.cpu_count()}, cpu: {_cpu_model()}, torch {torch.__version__}, torch threads "
          f"{args.threads} (served and in-process), load average at start {os.getloadavg()[0]:.1f}")
    print(f"- load: {args.concurrency} concurrent clients x {args.duration:.0f} s per phase, requests of 1 query x "
          f"{args.docs} docs, store of {args.passages} sample passages (max_length {args.max_length})\n")
    print("| model | input | pairs/s (client) | pairs/s (scorer) | scorer busy | in-process seq pairs/s | "
          "in-process batched pairs/s | served / best in-process | p50 ms | p99 ms | requests | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, res in results.items():
        ip = res["in_process"]
        best = max(ip["sequential_pairs_s"], ip["batched_pairs_s"])
        for label, s in (("doc ids", res["ids"]), ("raw texts", res["texts"])):
            if s is None:
                continue
            print(f"| {kind} (max_pairs {res['max_pairs_per_batch']}) | {label} | {s['pairs_s']:.1f} | "
                  f"{s['server_pairs_s']:.1f} | {s['scorer_busy']:.0%} | {ip['sequential_pairs_s']:.1f} | "
                  f"{ip['batched_pairs_s']:.1f} | {s['pairs_s'] / best:.2f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | {s['requests']} | "
                  f"{s['errors']} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in _MAX_PAIRS_DEFAULT]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(_MAX_PAIRS_DEFAULT)}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    docs, queries = prepare_corpus(Path(args.workdir), args.passages)
    results = {}
    for kind in kinds:
        t0 = time.time()
        results[kind] = bench_model(kind, args, docs, queries)
        print(f"[{kind}] done in {time.time() - t0:.0f} s: {json.dumps(results[kind])}", file=sys.stderr)
    print_markdown(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
