"""The contract through public paths only: stores made by the encode job (``run_encode``) on S3 in bfloat16 and
int8, read by the rerank job (``run_rerank``, its Parquet output) and by Serve (HTTP), the rerank job's
``--instruction``, and Serve refusing a store made with other weights of the same config.

Stores and outputs are read back only through public outputs (the job's files, HTTP), so these tests survive
rewrites of the store and pipeline internals.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from kalm_batch import KaLMReranker, fsio
from kalm_batch.pipelines.encode import EncodeConfig, run_encode
from kalm_batch.pipelines.rerank import RerankConfig, run_rerank

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.serve]

MAX_LENGTH = 96
WORDS = ["json", "csv", "socket", "thread", "pickle", "zlib", "heapq", "bisect", "random", "string", "struct", "queue"]
DOCS = {f"d{i:02d}": f"The {w} module: " + f"it handles {w} data and {i % 5} related things. " * (1 + i % 9)
        for i, w in enumerate(WORDS * 2)}  # 24 passages of 8 to 100+ tokens; the longest are truncated
QUERIES = {"q1": "how do I parse json data", "q2": "a thread safe queue", "q3": "compress bytes with zlib"}
INSTRUCTION = "Given a question about Python, find the module documentation that answers it."
# Measured (tiny model, this corpus, in-process codec round trip): max |P(yes) - P_fp32(yes)| over the 72 pairs is
# 3.3e-5 (4.9e-5 with INSTRUCTION) from bfloat16 memories and 1.3e-4 (9.4e-5) from int8 ones; the float32 scores
# spread over 0.016 and INSTRUCTION moves them by up to 5.7e-3. The tolerances are ~3x the measurement.
STORE_TOL = {"bfloat16": 1e-4, "int8": 4e-4}
RUNS = [("bfloat16", None), ("bfloat16", "instruction"), ("int8", None)]  # (store dtype, instruction), CI budget
SAME = 1e-5  # two float32 scorers reading the same stored memories


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_scores(out: str) -> dict[tuple[str, str], float]:
    """{(qid, doc_id): P(yes)} from the rerank job's committed scores/ dataset."""
    from kalm_batch.runfolder import read_scores

    table = read_scores(out)
    cols = table.to_pydict()
    return {(q, d): s for q, d, s in zip(cols["qid"], cols["doc_id"], cols["score"])}


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """A local Ray (2 CPUs) started after the S3 server so its workers inherit the endpoint."""
    import ray
    from ray import serve

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    yield serve
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(s3_server, tiny_model_dir):
    """Corpus, queries and candidates (every query x every passage) on S3; float32 reference scores."""
    import json

    bucket = s3_server.create_bucket("kalm-contract-paths")
    fsio.write_bytes_atomic(f"{bucket}/in/corpus.jsonl",
                            "".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in DOCS.items()).encode())
    fsio.write_bytes_atomic(f"{bucket}/in/queries.tsv", "".join(f"{q}\t{t}\n" for q, t in QUERIES.items()).encode())
    fsio.write_bytes_atomic(f"{bucket}/in/run.trec", "".join(
        f"{q} Q0 {d} {r + 1} {100 - r} first\n" for q in QUERIES for r, d in enumerate(DOCS)).encode())
    ref = KaLMReranker(str(tiny_model_dir), dtype="float32", chunk_size=4, max_length=MAX_LENGTH)
    fp32 = {}
    for ins in (None, INSTRUCTION):
        pairs = [(q, d) for q in QUERIES for d in DOCS]
        scores = ref.predict([(QUERIES[q], DOCS[d]) for q, d in pairs], instruction=ins)
        fp32[ins] = dict(zip(pairs, scores))
    return {"bucket": bucket, "fp32": fp32}


@pytest.fixture(scope="module")
def stores(ray_local, inputs, tiny_model_dir):
    bucket = inputs["bucket"]
    out = {}
    for dtype in STORE_TOL:
        url = f"{bucket}/stores/{dtype} r4"
        summary = run_encode(EncodeConfig(model=str(tiny_model_dir), corpus=f"{bucket}/in/corpus.jsonl", store=url,
                                          ratio=4, dtype=dtype, model_dtype="float32", max_length=MAX_LENGTH,
                                          title_field=None, num_cpus=2, shard_rows=10))
        assert summary.stored_new == len(DOCS) and summary.rejected == 0
        out[dtype] = url
    return out


def _rerank(inputs, tiny_model_dir, store, out, **kw):
    bucket = inputs["bucket"]
    return run_rerank(RerankConfig(model=str(tiny_model_dir), store=store, queries=f"{bucket}/in/queries.tsv",
                                   candidates=f"{bucket}/in/run.trec", out=out, dtype="float32", num_cpus=2, **kw))


@pytest.fixture(scope="module")
def job_runs(inputs, stores, tiny_model_dir):
    runs = {}
    for dtype, with_instruction in RUNS:
        ins = INSTRUCTION if with_instruction else None
        out = f"{inputs['bucket']}/out/{dtype}-{with_instruction or 'default'}"
        summary = _rerank(inputs, tiny_model_dir, stores[dtype], out, instruction=ins)
        assert summary.pairs_scored == len(QUERIES) * len(DOCS)
        runs[dtype, ins] = job_scores(out)
    return runs


@pytest.mark.parametrize("dtype", list(STORE_TOL))
def test_rerank_job_over_an_s3_store_scores_within_the_codec_error(inputs, job_runs, dtype):
    got = job_runs[dtype, None]
    want = inputs["fp32"][None]
    assert set(got) == set(want)
    err = max(abs(got[k] - want[k]) for k in want)
    assert err <= STORE_TOL[dtype], f"max |dP| {err:.2e} from a {dtype} store"
    assert np.ptp(list(want.values())) > 20 * STORE_TOL[dtype]  # a constant output would fail
    if dtype == "int8":  # lossy: the scores really went through the int8 codec
        assert err > SAME


def test_rerank_job_instruction_reaches_the_prompt(inputs, job_runs):
    dtype = "bfloat16"
    got, default = job_runs[dtype, INSTRUCTION], job_runs[dtype, None]
    want = inputs["fp32"][INSTRUCTION]
    assert max(abs(got[k] - want[k]) for k in want) <= STORE_TOL[dtype]
    moved = max(abs(got[k] - default[k]) for k in got)
    assert moved > 10 * STORE_TOL[dtype], f"--instruction moved scores by only {moved:.2e}"


@pytest.fixture(scope="module")
def serve_port(ray_local):
    return _free_port()


@pytest.mark.parametrize("dtype", list(STORE_TOL))
def test_serve_over_an_s3_store_equals_the_rerank_job(ray_local, serve_port, stores, job_runs, tiny_model_dir, dtype):
    from kalm_batch.serve import ServeConfig, run_serve

    cfg = ServeConfig(model=str(tiny_model_dir), store=stores[dtype], port=serve_port, dtype="float32",
                      num_cpus=0.5, ingress_num_cpus=0.05, app_name=f"contract-{dtype}",
                      route_prefix=f"/{dtype}", max_constructor_retries=1)
    run_serve(cfg, blocking=False)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}/{dtype}", timeout=120) as c:
            for ins in [i for d, i in job_runs if d == dtype]:
                for qid, query in QUERIES.items():
                    body = {"query": query, "document_ids": list(DOCS), **({"instruction": ins} if ins else {})}
                    resp = c.post("/score", json=body)
                    assert resp.status_code == 200, resp.text
                    served = [r["score"] for r in resp.json()["results"]]
                    want = [job_runs[dtype, ins][qid, d] for d in DOCS]
                    assert np.max(np.abs(np.asarray(served) - want)) <= SAME, (dtype, ins, qid)
    finally:
        ray_local.delete(f"contract-{dtype}", _blocking=True)


def test_serve_refuses_a_store_made_with_other_weights_of_the_same_config(ray_local, serve_port, inputs,
                                                                         tiny_model_dir, tmp_path):
    from kalm_batch.serve import ServeConfig, run_serve
    from kalm_batch.store import StoreMismatchError
    from kalm_batch.tiny import write_random_model

    other = write_random_model(tmp_path / "other-weights", shape="tiny", seed=1)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (other / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name  # only the weights differ
    store = str(tmp_path / "other-store")
    run_encode(EncodeConfig(model=str(other), corpus=f"{inputs['bucket']}/in/corpus.jsonl", store=store, ratio=4,
                            dtype="bfloat16", model_dtype="float32", max_length=MAX_LENGTH, title_field=None,
                            num_cpus=2))
    cfg = ServeConfig(model=str(tiny_model_dir), store=store, port=serve_port, num_cpus=0.25, ingress_num_cpus=0.05,
                      app_name="contract-mismatch", route_prefix="/mismatch", max_constructor_retries=1)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_serve, cfg, False)
        try:
            with pytest.raises(StoreMismatchError, match="weights_sha256") as info:  # refused before deploying
                future.result(timeout=240)  # bounded: a hang is a failure, not a stuck suite
        finally:
            ray_local.delete("contract-mismatch", _blocking=False)
    message = str(info.value)
    assert "weights_sha256" in message and "config_sha256" not in message, message
