"""The Ray Serve rerank endpoint over real HTTP on 127.0.0.1: parity with in-process scoring, batching, errors.

One Serve app (tiny model, float32, a float32 store built with ``build_store``, followed with a 0.2 s poll) serves
every test in the module; the last one refreshes its store under load (ids of their own data file, the others are
unchanged). A second app on the same Serve instance checks that a store made by another model refuses to start.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kalm_batch import KaLMReranker
from kalm_batch.reranker import Memory
from kalm_batch.serve.schemas import ServeConfig
from kalm_batch.serve.scorer import BatchLimits, TextMemoryCache, _Chunk

pytestmark = [pytest.mark.serve, pytest.mark.ray]

TIMEOUT = 60.0
TOL = 1e-5
DOCS = {f"doc-{i}": f"Passage {i}: the {w} module handles {w} data and {i % 4} related things."
        for i, w in enumerate(["json", "csv", "socket", "thread", "pickle", "zlib", "heapq", "bisect", "random",
                               "string", "struct", "array", "queue", "shutil", "glob", "fnmatch"])}
CORRUPT_ID = "doc-corrupt"
# In their own data file of the same store: the following test refreshes them (DOCS and CORRUPT_ID are unchanged)
FOLLOW_DOCS = {f"f{i}": f"Followed passage {i} on the {w} module and its {w} helpers." for i, w in
               enumerate(["json", "csv", "socket", "thread", "pickle", "zlib", "heapq", "bisect"])}
EDITED = {"f0": "f0 rewritten: the json module parses text", "f1": "f1 rewritten: csv readers and writers"}
DELETED = ["f6", "f7"]  # kept out of the load: a request for them after the switch gets the documented 404
NEW = {"f8": "a new passage about the glob module", "f9": "another new passage on fnmatch patterns"}
LOAD_IDS = ["f0", "f1", "f2", "f3", "f4", "f5"]  # edited and unchanged ids
LOAD_QUERY = "which module parses json?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corrupt_record(store: Path, doc_id: str) -> None:
    """Flip one byte of ``doc_id``'s memory payload in place in its data file (the byte-range index stays valid)."""
    for index_file in (store / "_kalm" / "index").glob("*.parquet"):
        index = pq.read_table(index_file).to_pylist()
        row = next((r for r in index if r["doc_id"] == doc_id), None)
        if row is not None:
            data = bytearray((store / row["file"]).read_bytes())
            data[row["offset"]] ^= 0xFF
            (store / row["file"]).write_bytes(bytes(data))
            return
    raise AssertionError(f"{doc_id} not found in {store}")


@pytest.fixture(scope="module")
def ray_serve():
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield serve
    serve.shutdown()
    ray.shutdown()


def _main_docs() -> dict[str, str]:
    return {**DOCS, CORRUPT_ID: "this record gets corrupted"}


@pytest.fixture(scope="module")
def served(ray_serve, tiny_model_dir, tmp_path_factory):
    """(base URL, in-process reranker, reader) for one Serve app shared by the module."""
    from kalm_batch.serve import run_serve
    from kalm_batch.store import open_store
    from kalm_batch.store.writer import build_store

    store = tmp_path_factory.mktemp("serve") / "store"
    ref = KaLMReranker(str(tiny_model_dir), dtype="float32", chunk_size=4)
    build_store(str(store), ref, _main_docs(), dtype="float32")
    _corrupt_record(store, CORRUPT_ID)
    build_store(str(store), ref, FOLLOW_DOCS, dtype="float32")  # version 1: the followed ids in their own data file
    port = _free_port()
    cfg = ServeConfig(model=str(tiny_model_dir), store=str(store), port=port, dtype="float32", num_cpus=0.5,
                      max_documents=50, max_pairs=50, max_query_chars=300, batch_wait_timeout_s=0.05,
                      max_pairs_per_batch=16, store_poll_s=0.2)
    run_serve(cfg, blocking=False)
    yield f"http://127.0.0.1:{port}", ref, open_store(str(store))


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0], timeout=TIMEOUT) as c:
        yield c


def _post(client, path: str, body, **kw) -> httpx.Response:
    return client.post(path, json=body, **kw)


# ---------------------------------------------------------------------------------------------------- info first


def test_info_reports_model_store_limits_and_lazy_encoder(client, served):
    _, ref, reader = served
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["model"]["fingerprint"] == ref.fingerprint.to_dict()
    assert info["store"]["rows"] == len(DOCS) + 1 + len(FOLLOW_DOCS) and info["store"]["ratio"] == 4
    assert info["ratios"] == reader.ratios == [4, 8, 16, 32]
    assert info["limits"]["max_documents"] == 50 and info["limits"]["max_query_chars"] == 300
    assert info["batching"]["max_pairs_per_batch"] == 16
    assert info["model"]["decoder_loaded"] is True
    assert info["model"]["encoder_loaded"] is False  # doc ids only need the decoder
    assert _post(client, "/v2/rerank", {"query": "json", "document_ids": ["doc-0"]}).status_code == 200
    assert client.get("/info").json()["model"]["encoder_loaded"] is False
    assert _post(client, "/v2/rerank", {"query": "json", "documents": ["raw text"]}).status_code == 200
    assert client.get("/info").json()["model"]["encoder_loaded"] is True  # loaded by the raw-text request


# ---------------------------------------------------------------------------------------------------- parity


def _expected_ids(ref, reader, query, ids, ratio=None, instruction=None):
    mems = reader.fetch(ids, ratio).memories
    return ref.score(query, [mems[i] for i in ids], instruction=instruction)


def test_cohere_document_ids_match_in_process(client, served):
    _, ref, reader = served
    ids = list(DOCS)[:10]
    resp = _post(client, "/v2/rerank", {"model": "rerank-v3.5", "query": "csv data", "document_ids": ids,
                                        "top_n": 4})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    want = _expected_ids(ref, reader, "csv data", ids).p_yes
    order = sorted(range(len(ids)), key=lambda i: -want[i])[:4]
    assert [r["index"] for r in body["results"]] == order
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], want[order], atol=TOL)
    assert body["meta"]["billed_units"] == {"search_units": 1} and body["id"]


def test_jina_raw_texts_match_predict(client, served):
    _, ref, _ = served
    texts = list(DOCS.values())[:6]
    resp = _post(client, "/v1/rerank", {"query": "thread", "documents": texts[:3] + [{"text": t} for t in texts[3:]],
                                        "top_n": 3, "return_documents": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    want = np.asarray(ref.predict([("thread", t) for t in texts]))  # predict returns list[float]
    assert len(body["results"]) == 3 and body["usage"]["total_tokens"] > 0
    for r in body["results"]:
        assert abs(r["relevance_score"] - want[r["index"]]) < TOL
        assert r["document"] == {"text": texts[r["index"]]}
    assert [r["index"] for r in body["results"]] == list(np.argsort(-want, kind="stable")[:3])


def test_tei_raw_scores_are_margins(client, served):
    _, ref, _ = served
    texts = list(DOCS.values())[4:9]
    want = ref.predict_scores([("zlib data", t) for t in texts])
    for raw, values in ((True, want.margin), (False, want.p_yes)):
        resp = _post(client, "/rerank", {"query": "zlib data", "texts": texts, "raw_scores": raw, "return_text": True})
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert [r["index"] for r in got] == list(np.argsort(-values, kind="stable"))
        for r in got:
            assert abs(r["score"] - values[r["index"]]) < TOL and r["text"] == texts[r["index"]]


def test_score_pairs_keep_input_order_mixing_ids_and_texts(client, served):
    _, ref, reader = served
    pairs = [{"id": "a", "query": "heapq", "document_id": "doc-6"},
             {"query": "random numbers", "document": DOCS["doc-8"]},
             {"query": "heapq", "document": "an unrelated passage about birds"}]
    resp = _post(client, "/score", {"pairs": pairs, "return_margin": True})
    assert resp.status_code == 200, resp.text
    res = resp.json()["results"]
    mem6 = reader.get("doc-6")
    texts = ref.encode([DOCS["doc-8"], "an unrelated passage about birds"])
    want = ref.score_memories(["heapq", "random numbers", "heapq"], [mem6, *texts])
    assert [r["index"] for r in res] == [0, 1, 2]
    assert [r.get("id") for r in res] == ["a", None, None]  # an explicit id wins over the document id
    np.testing.assert_allclose([r["score"] for r in res], want.p_yes, atol=TOL)
    np.testing.assert_allclose([r["margin"] for r in res], want.margin, atol=TOL)


def test_score_query_form_with_ratio_and_instruction(client, served):
    _, ref, reader = served
    ids = ["doc-1", "doc-2", "doc-3"]
    body = {"query": "socket", "document_ids": ids, "ratio": 8, "instruction": "Find code documentation."}
    resp = _post(client, "/score", body)
    assert resp.status_code == 200, resp.text
    want = _expected_ids(ref, reader, "socket", ids, ratio=8, instruction="Find code documentation.")
    np.testing.assert_allclose([r["score"] for r in resp.json()["results"]], want.p_yes, atol=TOL)
    default = _expected_ids(ref, reader, "socket", ids)
    assert not np.allclose(want.p_yes, default.p_yes, atol=TOL)  # ratio and instruction really changed the input


def test_max_tokens_per_doc_truncates_raw_texts(client, served, tiny_model_dir):
    texts = [DOCS["doc-9"], DOCS["doc-10"] * 3]
    resp = _post(client, "/v2/rerank", {"query": "string", "documents": texts, "max_tokens_per_doc": 20})
    assert resp.status_code == 200, resp.text
    short = KaLMReranker(str(tiny_model_dir), dtype="float32", chunk_size=4, max_length=20)
    want = short.predict([("string", t) for t in texts])
    got = {r["index"]: r["relevance_score"] for r in resp.json()["results"]}
    np.testing.assert_allclose([got[0], got[1]], want, atol=TOL)
    assert not np.allclose(want, served[1].predict([("string", t) for t in texts]), atol=TOL)


def test_document_ids_and_raw_texts_give_the_same_scores(client):
    ids = ["doc-3", "doc-7", "doc-11"]
    by_id = _post(client, "/score", {"query": "struct", "document_ids": ids}).json()["results"]
    by_text = _post(client, "/score", {"query": "struct", "documents": [DOCS[i] for i in ids]}).json()["results"]
    np.testing.assert_allclose([r["score"] for r in by_id], [r["score"] for r in by_text], atol=TOL)


def test_request_larger_than_the_pair_budget_is_split_and_scored(client, served):
    _, ref, reader = served
    ids = list(DOCS) * 2  # 32 pairs, max_pairs_per_batch=16
    resp = _post(client, "/score", {"query": "array", "document_ids": ids})
    assert resp.status_code == 200, resp.text
    want = _expected_ids(ref, reader, "array", ids).p_yes
    np.testing.assert_allclose([r["score"] for r in resp.json()["results"]], want, atol=TOL)
    assert all(b["pairs"] <= 16 for b in client.get("/stats").json()["recent"])


# ---------------------------------------------------------------------------------------------------- batching


def _concurrent_round(base_url: str, bodies: list[dict]) -> list[httpx.Response]:
    barrier = threading.Barrier(len(bodies))

    def send(body):
        with httpx.Client(base_url=base_url, timeout=TIMEOUT) as c:
            barrier.wait(timeout=TIMEOUT)
            return c.post("/score", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def test_concurrent_requests_are_batched_together(client, served):
    base, ref, reader = served
    ids = list(DOCS)
    bodies = [{"query": f"query {k}", "document_ids": ids[k: k + 3]} for k in range(8)]
    for _ in range(3):  # batching depends on arrival times; a few rounds make "never batched" a real failure
        before = client.get("/stats").json()["multi_request_batches"]
        responses = _concurrent_round(base, bodies)
        for body, resp in zip(bodies, responses):
            assert resp.status_code == 200, resp.text
            want = _expected_ids(ref, reader, body["query"], body["document_ids"]).p_yes
            np.testing.assert_allclose([r["score"] for r in resp.json()["results"]], want, atol=TOL)
        stats = client.get("/stats").json()
        if stats["multi_request_batches"] > before:
            break
    assert stats["multi_request_batches"] > before and stats["max_requests_per_batch"] > 1, stats
    assert stats["max_pairs_per_batch_seen"] <= 16


def test_batch_limits_count_pairs_and_chunks():
    limits = BatchLimits(max_batch_size=2, max_pairs_per_batch=10)
    chunk = lambda n: _Chunk(0, [[1]] * n, [], limits)
    assert limits.size([chunk(4), chunk(5)]) == 9
    assert limits.size([chunk(4), chunk(7)]) == 11  # over the pair budget: serve.batch defers the second chunk
    assert limits.size([chunk(1), chunk(1), chunk(1)]) == 11  # over the chunk count
    assert limits.size([chunk(12)]) == 10  # a lone chunk always fits


def test_run_serve_refuses_resources_the_cluster_lacks():
    from kalm_batch.serve.app import check_resources

    cfg = ServeConfig(model="m", store="s", num_cpus=4)
    with pytest.raises(ValueError, match="num_cpus=4.0 .* exceeds the 2 CPUs"):
        check_resources(cfg, {"CPU": 2.0})
    with pytest.raises(ValueError, match="num_gpus=1.0 .* has 0 GPUs"):
        check_resources(cfg.model_copy(update={"num_cpus": 0.5, "num_gpus": 1.0}), {"CPU": 2.0})
    check_resources(cfg.model_copy(update={"num_cpus": 0.5}), {"CPU": 2.0})


def test_text_cache_is_bounded_by_bytes():
    cache = TextMemoryCache(max_bytes=3 * 4 * 8)  # three [1, 8] float32 memories
    for i in range(5):
        cache.put(cache.key(f"t{i}", 100), Memory(torch.zeros(1, 8), 3, 4), 3)
    assert cache.info()["entries"] == 3 and cache.bytes <= cache.max_bytes
    assert cache.get(cache.key("t0", 100)) is None and cache.get(cache.key("t4", 100)) is not None
    assert cache.get(cache.key("t4", 50)) is None  # another truncation length is another memory


# ---------------------------------------------------------------------------------------------------- errors

BAD_REQUESTS = [
    ("/v2/rerank", b"{not json", 422, "invalid_json"),
    ("/v2/rerank", {"documents": ["a"]}, 422, "validation_error"),
    ("/v2/rerank", {"query": 5, "documents": ["a"]}, 422, "validation_error"),
    ("/v2/rerank", {"query": "q", "documents": "not a list"}, 422, "validation_error"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": "3"}, 422, "validation_error"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "document_ids": ["doc-1"]}, 422, "validation_error"),
    ("/rerank", {"query": "q"}, 422, "validation_error"),
    ("/v2/rerank", {"query": "q", "documents": []}, 422, "validation_error"),
    ("/score", {"pairs": [{"query": "q", "document": "a", "document_id": "doc-1"}]}, 422, "validation_error"),
    ("/score", {"pairs": [{"query": "q", "document": "a"}], "query": "q"}, 422, "validation_error"),
    ("/v2/rerank", {"query": "q", "documents": ["a"] * 51}, 413, "too_many_documents"),
    ("/score", {"pairs": [{"query": "q", "document": "a"}] * 51}, 413, "too_many_pairs"),
    ("/v1/rerank", {"query": "q" * 301, "documents": ["a"]}, 413, "query_too_long"),
    ("/rerank", {"query": "q", "texts": ["x" * 1100]}, 413, "document_too_long"),
    ("/v2/rerank", {"query": "q", "document_ids": ["doc-1", "nope-1", "nope-2"]}, 404, "unknown_document_ids"),
    ("/v2/rerank", {"query": "q", "document_ids": ["doc-1"], "ratio": 2}, 422, "invalid_ratio"),
    ("/nowhere", {}, 404, "http_error"),
]


@pytest.mark.parametrize("path,body,status,error_type", BAD_REQUESTS)
def test_bad_requests_get_4xx_with_a_json_error(client, path, body, status, error_type):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    resp = client.post(path, headers={**kw.pop("headers", {}), "X-Request-ID": "bad-req-1"}, **kw)
    assert resp.status_code == status, resp.text
    err = resp.json()
    assert err["error_type"] == error_type and err["error"] and err["request_id"] == "bad-req-1"
    if status == 404 and error_type == "unknown_document_ids":
        assert err["details"]["unknown_document_ids"] == ["nope-1", "nope-2"]
    if error_type == "invalid_ratio":
        assert err["details"]["valid_ratios"] == [4, 8, 16, 32] and "4, 8, 16, 32" in err["error"]
    if status == 413:
        assert "limit" in err["error"] or "max_length" in err["error"]


def test_truncate_true_accepts_long_texts(client):
    resp = _post(client, "/rerank", {"query": "q", "texts": ["x" * 1100], "truncate": True})
    assert resp.status_code == 200, resp.text


def test_corrupt_record_is_a_500_with_the_request_id(client):
    resp = _post(client, "/v2/rerank", {"query": "q", "document_ids": ["doc-1", CORRUPT_ID]},
                 headers={"X-Request-ID": "corrupt-42"})
    assert resp.status_code == 500
    err = resp.json()
    assert err["error_type"] == "corrupt_record" and err["request_id"] == "corrupt-42"
    assert CORRUPT_ID in err["error"] and resp.headers["x-request-id"] == "corrupt-42"


def test_request_id_is_echoed(client):
    resp = _post(client, "/v2/rerank", {"query": "q", "document_ids": ["doc-1"]}, headers={"X-Request-ID": "r-7"})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "r-7" and resp.json()["id"] == "r-7"
    assert client.get("/health").headers.get("x-request-id")  # Serve assigns one when the client sends none


# ---------------------------------------------------------------------------------------------------- start-up


def test_store_from_another_model_refuses_to_start(ray_serve, served, tiny_model_dir, tmp_path):
    from kalm_batch.serve import run_serve
    from kalm_batch.store import StoreMismatchError
    from kalm_batch.store.writer import build_store
    from kalm_batch.tiny import write_random_model

    other = write_random_model(tmp_path / "other-model", shape="tiny", seed=1)
    # The fingerprint hashes config + tokenizer, not weights: seed=1 alone gives the same fingerprint, so make this
    # model's config differ too (as any genuinely different checkpoint's does).
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "kalm_test_variant": "seed-1"}))
    store = tmp_path / "other-store"
    build_store(str(store), KaLMReranker(str(other), dtype="float32"), {"d": "some text"}, dtype="float32")
    cfg = ServeConfig(model=str(tiny_model_dir), store=str(store), num_cpus=0.25, ingress_num_cpus=0.05,
                      port=int(served[0].rsplit(":", 1)[1]), app_name="mismatch", route_prefix="/mismatch")
    # the start-up check refuses before anything is deployed (no constructor retries for an error no retry fixes)
    with pytest.raises(StoreMismatchError, match="config_sha256"):
        run_serve(cfg, blocking=False)
    assert "mismatch" not in ray_serve.status().applications
    assert client_ok(served[0])  # the main app is unaffected


def client_ok(base_url: str) -> bool:
    with httpx.Client(base_url=base_url, timeout=TIMEOUT) as c:
        return c.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------------------- following

class _Load:
    """A few client threads sending the same /v2/rerank request over HTTP until stopped (each with its own
    client); every response is kept as (status, store version from meta, {index: score} or the error body)."""

    def __init__(self, base_url: str, threads: int = 3, max_requests: int = 2000):
        self.base_url, self.max_requests = base_url, max_requests
        self.stop = threading.Event()
        self.responses: list[list[tuple[int, int | None, object]]] = [[] for _ in range(threads)]
        self.errors: list[str] = []  # a client-side failure (no HTTP response at all) ends that thread
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def _run(self, k: int) -> None:
        body = {"query": LOAD_QUERY, "document_ids": LOAD_IDS}
        with httpx.Client(base_url=self.base_url, timeout=TIMEOUT) as c:
            while not self.stop.is_set() and len(self.responses[k]) < self.max_requests:
                try:
                    resp = c.post("/v2/rerank", json=body)
                except httpx.HTTPError as e:
                    self.errors.append(f"client {k}: {type(e).__name__}: {e}")
                    return
                if resp.status_code != 200:
                    self.responses[k].append((resp.status_code, None, resp.text))
                    continue
                out = resp.json()
                scores = {r["index"]: r["relevance_score"] for r in out["results"]}
                self.responses[k].append((200, out["meta"]["kalm"]["store_version"], scores))

    def wait_for(self, condition, what: str, timeout: float = 60.0) -> None:
        """Bounded wait (each client request is itself bounded by TIMEOUT)."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert not self.errors, f"requests failed without an HTTP response: {self.errors}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def count(self, version: int) -> list[int]:
        return [sum(1 for _, v, _ in rs if v == version) for rs in self.responses]


def test_serve_follows_a_refresh_under_load_with_zero_failed_requests(client, served):
    """Clients keep sending rerank requests while a refresh (edits, deletes, new ids) commits a new version of the
    module app's store (polled every 0.2 s): every response is a 200 scored wholly on the old or wholly on the new
    version (its meta says which, and its scores match that version's memories); after the switch, refreshed ids
    score as a fresh encode of their new text, deleted ids get the documented 404 and new ids score."""
    from kalm_batch.store.writer import build_store

    base, ref, reader = served
    store, v0 = reader.url, client.get("/info").json()["store"]["version"]
    switches = client.get("/info").json()["store"]["follow"]["switches"]
    new_docs = {**{k: v for k, v in FOLLOW_DOCS.items() if k not in DELETED}, **EDITED, **NEW}
    want = {v0: ref.score(LOAD_QUERY, ref.encode([FOLLOW_DOCS[d] for d in LOAD_IDS])).p_yes,
            v0 + 1: ref.score(LOAD_QUERY, ref.encode([new_docs[d] for d in LOAD_IDS])).p_yes}  # fresh encodes
    assert not np.allclose(want[v0], want[v0 + 1], atol=TOL)  # the edits change the scores the load sees
    load = _Load(base)
    try:
        for t in load.threads:
            t.start()
        load.wait_for(lambda: min(load.count(v0)) >= 2, "responses on the first version")
        v1 = build_store(store, ref, {**_main_docs(), **new_docs}, dtype="float32", delete_missing=True)
        assert (v1.version, v1.refreshed, v1.deleted, v1.new) == (v0 + 1, len(EDITED), len(DELETED), len(NEW))
        load.wait_for(lambda: client.get("/info").json()["store"]["version"] == v1.version,
                      "/info to show the new version", timeout=30.0)
        load.wait_for(lambda: min(load.count(v1.version)) >= 2, "responses on the new version")
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(timeout=TIMEOUT)
    failed = [r for rs in load.responses for r in rs if r[0] != 200]
    assert not load.errors and not failed, f"{len(failed)} failed requests during the switch, e.g. {failed[:3]}"
    for rs in load.responses:
        versions = [v for _, v, _ in rs]
        assert set(versions) == {v0, v1.version} and versions == sorted(versions)  # one switch, no way back
        for _, v, scores in rs:  # each response is scored on the memories of the version it names
            np.testing.assert_allclose([scores[i] for i in range(len(LOAD_IDS))], want[v], atol=TOL)
    assert client.get("/info").json()["store"]["follow"]["switches"] == switches + 1

    gone = _post(client, "/v2/rerank", {"query": "q", "document_ids": ["f2", *DELETED]})
    assert gone.status_code == 404, gone.text
    err = gone.json()
    assert err["error_type"] == "unknown_document_ids" and err["details"]["store_version"] == v1.version
    assert sorted(err["details"]["unknown_document_ids"]) == DELETED and f"version {v1.version}" in err["error"]
    added = [*EDITED, *NEW]
    resp = _post(client, "/v2/rerank", {"query": "glob patterns", "document_ids": added})
    assert resp.status_code == 200, resp.text
    got = {r["index"]: r["relevance_score"] for r in resp.json()["results"]}
    fresh = ref.score("glob patterns", ref.encode([new_docs[d] for d in added])).p_yes
    np.testing.assert_allclose([got[i] for i in range(len(added))], fresh, atol=TOL)
    assert resp.json()["meta"]["kalm"]["store_version"] == v1.version
