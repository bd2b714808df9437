"""Stages of the bulk rerank job, as plain functions and callable classes (each runs without Ray).

- ``pairs_table`` (driver): the (query, candidate) pairs of one cascade stage as an Arrow table, each pair tagged with
  the store data file holding its document (``StoreReader.file_of``); documents the store lacks are returned apart.
- ``shard_blocks`` (driver): the shard-sorted pairs cut into Ray Data blocks of whole shards.
- ``ScoreShards`` (actor, ``map_batches`` with one block per batch): for every pair of the shards in its block, it
  fetches the distinct documents in one store read (the reader groups ids by shard and reads only the row groups they
  live in), then scores all the pairs with the decoder half. Loads only the decoder; opens the store reader once.
- ``scored_by_query`` (driver): a stage's result table back into per-query ``Scored`` lists for the cascade.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kalm_batch.cascade import Scored

log = logging.getLogger(__name__)

PAIR_SCHEMA = pa.schema([
    ("qid", pa.string()), ("query", pa.string()), ("doc_id", pa.string()), ("shard", pa.int32()),
    ("first_stage_rank", pa.int32()), ("stage", pa.int16()), ("ratio", pa.int16()),
])
RESULT_SCHEMA = pa.schema([
    ("qid", pa.string()), ("doc_id", pa.string()), ("stage", pa.int16()), ("ratio", pa.int16()),
    ("shard", pa.int32()), ("first_stage_rank", pa.int32()), ("p_yes", pa.float32()), ("margin", pa.float32()),
    ("n_vectors", pa.int32()), ("error", pa.string()), ("batch", pa.string()),  # which actor call scored it
    ("fetch_s", pa.float64()), ("score_s", pa.float64()),  # the batch's seconds, spread evenly over its pairs
])


def pairs_table(pairs: Sequence[tuple[str, str, str, int]], reader, *, stage: int,
                ratio: int) -> tuple[pa.Table, list[tuple[str, str]]]:
    """``pairs`` = (qid, query, doc_id, first_stage_rank) -> (table sorted by shard, [(qid, doc_id) not in store])."""
    cols: dict[str, list] = {name: [] for name in ("qid", "query", "doc_id", "shard", "first_stage_rank")}
    missing, file_codes = [], {}
    for qid, query, doc_id, rank in pairs:
        file = reader.file_of(doc_id)
        shard = None if file is None else file_codes.setdefault(file, len(file_codes))
        if shard is None:
            missing.append((qid, doc_id))
            continue
        for name, value in zip(cols, (qid, query, doc_id, shard, rank)):
            cols[name].append(value)
    n = len(cols["qid"])
    table = pa.table({**cols, "stage": [stage] * n, "ratio": [ratio] * n}, schema=PAIR_SCHEMA)
    return table.sort_by([("shard", "ascending")]), missing


def shard_blocks(table: pa.Table, target_rows: int) -> list[pa.Table]:
    """Cut a shard-sorted pair table into blocks of whole shards (about ``target_rows`` pairs each, never splitting a
    shard), so the scoring stage reads each needed shard once, in one actor call. At least one (maybe empty) block."""
    if table.num_rows == 0:
        return [table]
    shards = table.column("shard").to_numpy()
    starts = [0] + (np.flatnonzero(shards[1:] != shards[:-1]) + 1).tolist()
    blocks, begin = [], 0
    for start in starts[1:] + [table.num_rows]:
        if start - begin >= target_rows or start == table.num_rows:
            blocks.append(table.slice(begin, start - begin))
            begin = start
    return blocks


class ScoreShards:
    """Score the pairs of whole shards: one store read for their distinct documents, then the decoder half.

    The reranker never encodes, so only its decoder half is loaded. Records the store reports corrupt (or, should the
    index change, missing) come back as rows with ``error`` set and NaN scores; the other pairs are scored.
    """

    def __init__(self, model: str, store: str, *, storage_options: dict | None = None, dtype: str | None = None,
                 device: str | None = None, instruction: str | None = None, batch_size: int = 32,
                 query_max_length: int = 512, max_tokens_per_batch: int = 32768, cpu_threads: int | None = None,
                 cache_bytes: int = 64 * 2**20):
        import torch

        from kalm_batch.reranker import KaLMReranker
        from kalm_batch.store import open_store

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.reader = open_store(store, storage_options=storage_options, cache_bytes=cache_bytes)
        self.reranker = KaLMReranker(model, device=device, dtype=None if dtype == "auto" else dtype,
                                     batch_size=batch_size, query_max_length=query_max_length,
                                     chunk_size=self.reader.ratio, max_tokens_per_batch=max_tokens_per_batch)
        self.instruction = instruction
        self._calls = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return RESULT_SCHEMA.empty_table()
        c = {name: batch.column(name).to_pylist() for name in ("qid", "query", "doc_id", "shard",
                                                                "first_stage_rank", "stage", "ratio")}
        ratios = set(c["ratio"])
        if len(ratios) != 1:
            raise ValueError(f"a batch mixes ratios {sorted(ratios)}; run one cascade stage per dataset")
        t0 = time.perf_counter()
        fetched = self.reader.fetch(c["doc_id"], ratios.pop())
        t1 = time.perf_counter()
        ok = [i for i, d in enumerate(c["doc_id"]) if d in fetched.memories]
        n = batch.num_rows
        p_yes, margin = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
        n_vectors = np.zeros(n, np.int32)
        if ok:
            mems = [fetched.memories[c["doc_id"][i]] for i in ok]
            scores = self.reranker.score_memories([c["query"][i] for i in ok], mems, instruction=self.instruction)
            p_yes[ok], margin[ok] = scores.p_yes, scores.margin
            n_vectors[ok] = [m.vectors.shape[0] for m in mems]
        t2 = time.perf_counter()
        self._calls += 1
        errors = [None if d in fetched.memories else
                  fetched.corrupt.get(d, f"doc_id {d!r} is not in store {self.reader.url}") for d in c["doc_id"]]
        return pa.table({
            "qid": c["qid"], "doc_id": c["doc_id"], "stage": c["stage"], "ratio": c["ratio"], "shard": c["shard"],
            "first_stage_rank": c["first_stage_rank"], "p_yes": p_yes, "margin": margin, "n_vectors": n_vectors,
            "error": errors, "batch": [f"{os.getpid()}-{self._calls}"] * n, "fetch_s": np.full(n, (t1 - t0) / n), "score_s": np.full(n, (t2 - t1) / n),
        }, schema=RESULT_SCHEMA)


def scored_by_query(results: pa.Table) -> dict[str, list[Scored]]:
    """The successfully scored pairs of a stage's result table, per query, in table order."""
    out: dict[str, list[Scored]] = {}
    cols = [results.column(n).to_pylist() for n in ("qid", "doc_id", "p_yes", "margin", "first_stage_rank", "error")]
    for qid, doc_id, p, m, rank, error in zip(*cols):
        if error is None:
            out.setdefault(qid, []).append(Scored(doc_id, float(p), float(m), int(rank)))
    return out


def stage_cost(results: pa.Table, *, stage: int, ratio: int, k: int, wall_s: float) -> dict:
    """What a stage cost: pairs, memory vectors attended, store fetch+decode and scoring seconds (summed over
    actors), the stage's wall-clock seconds (actor start-up included), and how many (actor call, shard) reads
    happened for how many distinct shards (equal when every shard was read once)."""
    scored = results.filter(pc.is_null(results.column("error")))
    fetch_s = float(pc.sum(results.column("fetch_s")).as_py() or 0.0)
    score_s = float(pc.sum(results.column("score_s")).as_py() or 0.0)
    return {
        "stage": stage, "ratio": ratio, "k": k, "pairs": scored.num_rows, "errors": results.num_rows - scored.num_rows,
        "vectors": int(pc.sum(scored.column("n_vectors")).as_py() or 0),
        "fetch_decode_s": round(fetch_s, 4), "score_s": round(score_s, 4), "wall_s": round(wall_s, 4),
        "shards": len(set(results.column("shard").to_pylist())),
        "shard_reads": len(set(zip(results.column("batch").to_pylist(), results.column("shard").to_pylist()))),
        "pairs_per_s": round(scored.num_rows / wall_s, 2) if wall_s > 0 else 0.0,
    }


# ----- driver side: problem records and outputs ------------------------------------------------------------------
PROBLEM_FIELDS = ("kind", "qid", "doc_id", "source", "line", "reason")


def input_problem(p) -> dict:
    """A kalm_batch.querylog Problem (malformed line, duplicate pair, no query, no candidates...) as a record."""
    return {"kind": p.kind, "qid": None, "doc_id": None, "source": p.source, "line": p.line, "reason": p.reason}


def missing_doc(candidates_url: str, store_url: str, qid: str, doc_id: str) -> dict:
    return {"kind": "doc_not_in_store", "qid": qid, "doc_id": doc_id, "source": candidates_url, "line": None,
            "reason": f"candidate ({qid!r}, {doc_id!r}): doc_id {doc_id!r} is not in store {store_url}; skipped "
                      "(encode it into the store to rerank it)"}


def error_records(results: pa.Table, store_url: str) -> list[dict]:
    """Pairs a stage could not score (corrupt store record); the reason names shard, row and doc_id."""
    bad = results.filter(pc.invert(pc.is_null(results.column("error"))))
    return [{"kind": "corrupt_record" if "not in store" not in e else "doc_not_in_store", "qid": q, "doc_id": d,
             "source": store_url, "line": None, "reason": f"candidate ({q!r}, {d!r}) skipped: {e}"}
            for q, d, e in zip(*(bad.column(n).to_pylist() for n in ("qid", "doc_id", "error")))]


def scores_table(ranking: dict, joined: Sequence[tuple]) -> pa.Table:
    """scores.parquet: one row per ranked candidate, best first within each query."""
    first = {(qid, doc): (rank, score) for qid, _, doc, rank, score in joined}
    rows = [(qid, p.scored.doc_id, p.scored.p_yes, p.scored.margin, p.rank, *first[(qid, p.scored.doc_id)], p.stage)
            for qid, placed in ranking.items() for p in placed]
    names = ["qid", "doc_id", "score", "margin", "rank", "first_stage_rank", "first_stage_score", "stage"]
    types = [pa.string(), pa.string(), pa.float32(), pa.float32(), pa.int32(), pa.int32(), pa.float64(), pa.int16()]
    cols = list(zip(*rows)) if rows else [[] for _ in names]
    return pa.table({n: pa.array(c, t) for n, c, t in zip(names, cols, types)})


def _tsv_cell(value) -> str:
    return "" if value is None else str(value).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def write_outputs(out: str, ranking: dict, joined: Sequence[tuple], problems: list[dict], stages, *, tag: str,
                  storage_options: dict | None = None) -> dict[str, str]:
    """scores.parquet, run.trec, problems.jsonl and skipped.tsv under ``out`` (each atomically); returns their URLs."""
    import io
    import json

    import pyarrow.parquet as pq

    from kalm_batch import fsio
    from kalm_batch.querylog import write_trec_run

    urls = {name: fsio.join_url(out, f) for name, f in (("scores", "scores.parquet"), ("run", "run.trec"),
            ("problems", "problems.jsonl"), ("skipped", "skipped.tsv"), ("summary", "summary.json"))}
    buf = io.BytesIO()
    table = scores_table(ranking, joined)
    pq.write_table(table.append_column("ratio", pa.array([stages[s - 1].ratio for s in
                                                            table.column("stage").to_pylist()], pa.int16())), buf)
    fsio.write_bytes_atomic(urls["scores"], buf.getvalue(), storage_options)
    run_rows = [(qid, p.scored.doc_id, p.rank, p.run_score) for qid, placed in ranking.items() for p in placed]
    write_trec_run(run_rows, urls["run"], tag=tag, storage_options=storage_options)
    lines = "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in problems)
    fsio.write_bytes_atomic(urls["problems"], lines.encode("utf-8", "surrogatepass"), storage_options)
    tsv = "\t".join(PROBLEM_FIELDS) + "\n" + "".join(
        "\t".join(_tsv_cell(p[f]) for f in PROBLEM_FIELDS) + "\n" for p in problems)
    fsio.write_bytes_atomic(urls["skipped"], tsv.encode("utf-8", "surrogatepass"), storage_options)
    return urls


def write_metrics(out: str, qrels_url: str, joined: Sequence[tuple], ranking: dict, per_stage: list, stages,
                  storage_options: dict | None = None) -> dict:
    """metrics.json: first stage (score = -rank, its own order) vs each cascade stage vs the final reranked run."""
    from kalm_batch import fsio
    from kalm_batch.metrics import DEFAULT_MEASURES, compare_runs, format_table
    from kalm_batch.querylog import read_qrels

    runs: dict[str, dict[str, dict[str, float]]] = {"first-stage": {}}
    for qid, _, doc, rank, _ in joined:
        runs["first-stage"].setdefault(qid, {})[doc] = -float(rank)
    if len(stages) > 1:
        for i, (stage, scored) in enumerate(zip(stages, per_stage), start=1):
            runs[f"stage{i}-r{stage.ratio}-k{stage.k}"] = {
                qid: {s.doc_id: s.margin for s in items} for qid, items in scored.items()}
    runs["reranked"] = {qid: {p.scored.doc_id: p.run_score for p in placed} for qid, placed in ranking.items()}
    results = compare_runs(runs, read_qrels(qrels_url, storage_options))
    metrics = {"measures": list(DEFAULT_MEASURES), "qrels": qrels_url, "runs": results,
               "table": format_table(results)}
    fsio.write_json_atomic(fsio.join_url(out, "metrics.json"), metrics, storage_options)
    return metrics
