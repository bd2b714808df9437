"""Benchmark: point lookups on the Delta store on the moto S3 server, and the lookup index for 1M ids.

    python benchmarks/store_lookup.py [--docs 300] [--lookups 20] [--batch 100] [--million 1000000]

(1) A store of --docs synthetic Nano-shape memories (hidden 640, r=4, bf16, 20..600 tokens, random values: they
    compress less than real memories, so payloads are larger than real ones) on the moto S3 server (127.0.0.1).
    Each of --lookups random ids is fetched by a fresh reader (cold: no cache, opening not counted); every HTTP request
    to S3 is counted with its response bytes (botocore events), and compared with the passage's payload bytes.
(2) One cold fetch of --batch random ids (one reader).
(3) Opening a version: requests and seconds on S3; then a local store of --million ids (tiny 1-vector memories) for
    the open time and the in-memory index size per million ids.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine

from kalm_batch.memory import Memory
from kalm_batch.store import StoreSettings, StoreWriter, open_store
from kalm_batch.store.layout import DATA_SCHEMA, write_data_file
from kalm_batch.store.writer import memory_table

HIDDEN, RATIO = 640, 4


def settings(dtype="bfloat16", hidden=HIDDEN) -> StoreSettings:
    fp = {"model_id": "synthetic/nano-shape", "revision": None, "config_sha256": "0" * 64,
          "tokenizer_sha256": "0" * 64, "weights_sha256": "0" * 64}
    return StoreSettings(fingerprint=fp, document_template="<Document>: {text}", text_join="as_given",
                         max_length=1024, ratio=RATIO, dtype=dtype, hidden_size=hidden)


def build_synthetic(url: str, n: int, dtype: str, rows_per_file: int = 256, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    writer = StoreWriter(url, settings(dtype))
    writer.prepare()
    files, payload = [], {}
    for start in range(0, n, rows_per_file):
        ids = [f"doc-{i:07d}" for i in range(start, min(n, start + rows_per_file))]
        mems = []
        for _ in ids:
            n_tokens = int(rng.integers(20, 600))
            vec = torch.from_numpy(rng.standard_normal((-(-n_tokens // RATIO), HIDDEN)).astype(np.float32) * 0.5)
            mems.append(Memory(vec, n_tokens, RATIO))
        table = memory_table(ids, mems, ["x"] * len(ids), ["synthetic"] * len(ids), list(range(len(ids))), dtype, 3)
        payload.update(zip(ids, table.column("nbytes").to_pylist()))
        files.append(writer.write(table))
    writer.commit(files)
    return payload


class S3Requests:
    """Count HTTP requests and response bytes of an s3fs filesystem (botocore events)."""

    def __init__(self, fs):
        self.requests, self.bytes = 0, 0
        fs.connect()
        events = fs.s3.meta.events
        events.register("before-send.s3", self._sent)
        events.register("after-call.s3", self._received)

    def _sent(self, **kw):
        self.requests += 1

    def _received(self, http_response=None, **kw):
        self.bytes += int(http_response.headers.get("content-length", 0)) if http_response is not None else 0

    def reset(self):
        self.requests, self.bytes = 0, 0


def lookups(url: str, payload: dict[str, int], n: int, batch: int, seed: int = 1) -> dict:
    rng = random.Random(seed)
    ids = sorted(payload)
    rows = []
    for doc in rng.sample(ids, n):
        reader = open_store(url, cache_bytes=0)
        count = S3Requests(reader._fs)
        t = time.perf_counter()
        reader.get(doc)
        rows.append((count.requests, count.bytes, payload[doc], time.perf_counter() - t))
    reader = open_store(url, cache_bytes=0)
    count = S3Requests(reader._fs)
    some = rng.sample(ids, batch)
    t = time.perf_counter()
    got = reader.fetch(some)
    assert not got.missing and not got.corrupt and len(got.memories) == batch
    batch_row = {"ids": batch, "requests": count.requests, "bytes": count.bytes,
                 "payload_bytes": sum(payload[d] for d in some), "seconds": round(time.perf_counter() - t, 4)}
    batch_row["bytes_over_payload"] = round(batch_row["bytes"] / batch_row["payload_bytes"], 3)
    ratio = [b / p for _, b, p, _ in rows]
    return {
        "cold_lookups": n, "median_requests": statistics.median(r for r, *_ in rows),
        "max_requests": max(r for r, *_ in rows), "median_bytes": statistics.median(b for _, b, _, _ in rows),
        "median_payload_bytes": statistics.median(p for _, _, p, _ in rows),
        "median_bytes_over_payload": round(statistics.median(ratio), 4), "max_bytes_over_payload": round(max(ratio), 4),
        "median_seconds": round(statistics.median(s for *_, s in rows), 4), "batch": batch_row,
    }


def open_cost(url: str) -> dict:
    import s3fs

    fs = s3fs.S3FileSystem()
    count = S3Requests(fs)  # the reader's fs is this cached instance
    t = time.perf_counter()
    reader = open_store(url)
    secs = time.perf_counter() - t
    return {"open_seconds": round(secs, 3), "open_requests_s3fs": count.requests, "files": len(reader.index_files()),
            "note": "delta-rs reads the log with its own client (not counted); s3fs requests = index files"}


def million(n: int, rows_per_file: int = 8192) -> dict:
    """A local store of ``n`` ids with 1-vector int8-free memories (the index, not the payload, is measured)."""
    import resource

    url = tempfile.mkdtemp(prefix="kalm-1m-") + "/store"
    writer = StoreWriter(url, settings("bfloat16", hidden=8))
    writer.prepare()
    files = []
    t = time.perf_counter()
    for start in range(0, n, rows_per_file):
        k = min(rows_per_file, n - start)
        ids = [f"passage-{i:09d}" for i in range(start, start + k)]
        table = pa.table({"doc_id": ids, "n_tokens": pa.array([4] * k, pa.int32()), "n_vectors": pa.array([1] * k, pa.int32()),
                          "memory": [os.urandom(24) for _ in range(k)], "scales": pa.nulls(k, pa.binary()),
                          "checksum": pa.array([0] * k, pa.int64()), "nbytes": pa.array([24] * k, pa.int32()),
                          "text_sha256": ["x"] * k, "source": ["synthetic"] * k, "line": pa.array(range(k), pa.int64())},
                         schema=DATA_SCHEMA)
        files.append(write_data_file(url, table))
    writer.commit(files)
    build_s = time.perf_counter() - t
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    reader = open_store(url)
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    probes = [f"passage-{i:09d}" for i in random.Random(0).sample(range(n), 1000)]
    assert all(reader.file_of(p) for p in probes)
    lookup_us = (time.perf_counter() - t) / len(probes) * 1e6
    return {"ids": n, "files": len(files), "build_seconds": round(build_s, 1), "open_seconds": round(open_s, 2),
            "index_bytes": reader.index_nbytes(), "index_bytes_per_million_ids": round(reader.index_nbytes() / n * 1e6),
            "peak_rss_growth_mb_during_open": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024),
            "id_lookup_us": round(lookup_us, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--lookups", type=int, default=20)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--million", type=int, default=1_000_000)
    ns = ap.parse_args()
    from storage.local_s3 import LocalS3

    out = {"machine": machine()}
    with LocalS3(bucket="kalm-bench") as s3:
        s3.apply_env()
        for dtype in ("bfloat16", "int8"):
            url = f"s3://kalm-bench/store-{dtype}"
            payload = build_synthetic(url, ns.docs, dtype)
            out[f"s3_{dtype}"] = {**lookups(url, payload, ns.lookups, ns.batch), **open_cost(url)}
    if ns.million:
        out["million"] = million(ns.million)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
