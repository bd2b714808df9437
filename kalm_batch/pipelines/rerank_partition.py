"""Score stage of the rerank job: one partition (whole queries) per call of a scoring actor, committed atomically.

``ScorePartitions`` (a Ray Data actor, ``map_batches`` over partition ids, one per batch) loads the decoder half
and opens the store reader (pinned to the plan's version) once. For each partition it reads the partition's
prepared records (``_work/prepared/part=N/``: pairs already joined with the store's doc_id -> data-file
index), then per cascade stage sorts the pairs by store data file and scores them in blocks of about
``pairs_per_block`` pairs, each block's distinct documents fetched in one store read (the reader reads only the
files and row groups they live in); between stages it keeps each query's top K (kalm_batch.cascade). It then writes
the partition's outputs (scores, run part, skipped, problems; each file atomic, fixed names) and its done marker
LAST, and returns the partition's counters. Metrics with qrels are summed per query here (kalm_batch.metrics).
"""

from __future__ import annotations

import io
import json
import os
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kalm_batch import fsio, runfolder
from kalm_batch.cascade import Scored, final_ranking, select_top
from kalm_batch.pipelines.rerank_plan import PAIR, PROBLEM, QREL, SKIP

SCORES_SCHEMA = pa.schema([
    ("qid", pa.string()), ("doc_id", pa.string()), ("score", pa.float32()), ("margin", pa.float32()),
    ("rank", pa.int32()), ("first_stage_rank", pa.int32()), ("first_stage_score", pa.float64()),
    ("stage", pa.int16()), ("ratio", pa.int16()),
])
SKIPPED_SCHEMA = pa.schema([("qid", pa.string()), ("doc_id", pa.string()), ("kind", pa.string()),
                            ("reason", pa.string()), ("stage", pa.int16())])
PROBLEM_SCHEMA = pa.schema([("kind", pa.string()), ("qid", pa.string()), ("doc_id", pa.string()),
                            ("source", pa.string()), ("line", pa.int64()), ("reason", pa.string())])


def read_records(out: str, part: int, storage_options: dict | None = None) -> pa.Table:
    from kalm_batch.pipelines.rerank_stages import prepared_dataset

    return prepared_dataset(out, storage_options, part).to_table()


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class ScorePartitions:
    """Score, rank and write whole partitions; see the module docstring. ``__call__`` returns counters as JSON."""

    def __init__(self, model: str, store: str, out: str, *, stages: list[tuple[int, int]], store_version: int | None,
                 plan_id: str, tag: str = "kalm-rerank", storage_options: dict | None = None,
                 dtype: str | None = None, device: str | None = None, instruction: str | None = None,
                 batch_size: int = 32, query_max_length: int = 512, max_tokens_per_batch: int = 32768,
                 pairs_per_block: int = 4096, cpu_threads: int | None = None, measures: list[str] | None = None,
                 cache_bytes: int = 64 * 2**20):
        import torch

        from kalm_batch.reranker import KaLMReranker
        from kalm_batch.store import open_store

        self.started = time.time()
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.reader = open_store(store, version=store_version, storage_options=storage_options, cache_bytes=cache_bytes)
        self.reranker = KaLMReranker(model, device=device, dtype=None if dtype in (None, "auto") else dtype,
                                     batch_size=batch_size, query_max_length=query_max_length,
                                     chunk_size=self.reader.ratio, max_tokens_per_batch=max_tokens_per_batch)
        self.out, self.stages, self.plan_id, self.tag = out, stages, plan_id, tag
        self.storage_options, self.instruction, self.pairs_per_block = storage_options, instruction, pairs_per_block
        self.measures = measures
        self.actor = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        return {"counters": [json.dumps(self.run_partition(int(p))) for p in batch["part"]]}

    # ----- one partition -----------------------------------------------------------------------------------------
    def run_partition(self, part: int) -> dict:
        t0 = time.perf_counter()
        records = read_records(self.out, part, self.storage_options)
        pairs = records.filter(pc.equal(records.column("role"), PAIR))
        found = pairs.filter(pc.invert(pc.is_null(pairs.column("file"))))
        skipped = _skips_from_records(records) + _missing(pairs.filter(pc.is_null(pairs.column("file"))),
                                                          self.reader.url)
        first = {(q, d): (r, s) for q, d, r, s in zip(*(pairs.column(c).to_pylist() for c in
                 ("qid", "doc_id", "first_stage_rank", "first_stage_score")))}
        queries = dict(zip(found.column("qid").to_pylist(), found.column("query").to_pylist()))
        todo = list(zip(*(found.column(c).to_pylist() for c in ("qid", "doc_id", "file", "first_stage_rank"))))
        files = {(q, d): f for q, d, f, _ in todo}
        per_stage, costs = [], []
        for number, (ratio, k) in enumerate(self.stages, start=1):
            if number > 1:
                todo = [(q, s.doc_id, files[(q, s.doc_id)], s.first_stage_rank)
                        for q, items in select_top(per_stage[-1], k).items() for s in items]
            scored, errors, cost = self._score_stage(todo, queries, ratio)
            skipped += [(q, d, "corrupt_record", f"candidate ({q!r}, {d!r}) skipped: {e}", number) for q, d, e in errors]
            per_stage.append(scored)
            costs.append({"stage": number, "ratio": ratio, "k": k, **cost})
        ranking = final_ranking(per_stage)
        extra = {"costs": costs, "actor": self.actor, "actor_started": self.started}
        return self._write(part, records, ranking, first, skipped, per_stage, extra, t0)

    def _score_stage(self, todo: list[tuple], queries: dict[str, str], ratio: int):
        """Pairs sorted by data file, in blocks: one store fetch per block, then the decoder. -> (scored, errors, cost)"""
        todo = sorted(todo, key=lambda t: (t[2], t[0], t[1]))
        scored: dict[str, list[Scored]] = {}
        errors, fetch_s, score_s, vectors, n = [], 0.0, 0.0, 0, 0
        for start in range(0, len(todo), self.pairs_per_block):
            block = todo[start:start + self.pairs_per_block]
            t0 = time.perf_counter()
            fetched = self.reader.fetch([d for _, d, _, _ in block], ratio)
            t1 = time.perf_counter()
            ok = [t for t in block if t[1] in fetched.memories]
            errors += [(q, d, fetched.corrupt.get(d, f"doc_id {d!r} is not in store {self.reader.url}"))
                       for q, d, _, _ in block if d not in fetched.memories]
            if ok:
                mems = [fetched.memories[d] for _, d, _, _ in ok]
                s = self.reranker.score_memories([queries[q] for q, _, _, _ in ok], mems, instruction=self.instruction)
                for (q, d, _, rank), p, m in zip(ok, np.asarray(s.p_yes, np.float32), np.asarray(s.margin, np.float32)):
                    scored.setdefault(q, []).append(Scored(d, float(p), float(m), int(rank)))
                vectors += sum(int(mem.vectors.shape[0]) for mem in mems)
                n += len(ok)
            fetch_s, score_s = fetch_s + t1 - t0, score_s + time.perf_counter() - t1
        files = len({f for _, _, f, _ in todo})
        return scored, errors, {"pairs": n, "errors": len(errors), "vectors": vectors, "files": files,
                                "fetch_decode_s": round(fetch_s, 4), "score_s": round(score_s, 4)}

    # ----- outputs -----------------------------------------------------------------------------------------------
    def _write(self, part: int, records: pa.Table, ranking: dict, first: dict, skipped: list[tuple],
               per_stage: list, extra: dict, t0: float) -> dict:
        from kalm_batch.querylog import write_trec_run

        so = self.storage_options
        t_write = time.perf_counter()
        scores = _scores_table(ranking, first, [r for r, _ in self.stages])
        fsio.write_bytes_atomic(runfolder.part_url(self.out, "scores", part, ".parquet"), _parquet_bytes(scores), so)
        run_rows = [(q, p.scored.doc_id, p.rank, p.run_score) for q, placed in ranking.items() for p in placed]
        write_trec_run(run_rows, runfolder.part_url(self.out, "run", part, ".trec"), tag=self.tag, storage_options=so)
        skipped_t = pa.table(dict(zip(SKIPPED_SCHEMA.names, map(list, zip(*skipped)) if skipped else
                                      [[] for _ in SKIPPED_SCHEMA.names])), schema=SKIPPED_SCHEMA)
        fsio.write_bytes_atomic(runfolder.part_url(self.out, "skipped", part, ".parquet"), _parquet_bytes(skipped_t), so)
        problems = records.filter(pc.equal(records.column("role"), PROBLEM)).select(PROBLEM_SCHEMA.names)
        fsio.write_bytes_atomic(runfolder.part_url(self.out, "problems", part, ".parquet"),
                                _parquet_bytes(problems.cast(PROBLEM_SCHEMA)), so)
        counters = {
            "part": part, "plan_id": self.plan_id, "input_pairs": len(first) + _count(records, SKIP),
            "pairs_scored": scores.num_rows, "queries_ranked": len(ranking), "run_lines": len(run_rows),
            "skipped": _kinds(s[2] for s in skipped),
            "problems": _kinds(problems.column("kind").to_pylist()),
        }
        if self.measures is not None:
            counters["metrics"] = self._metrics(records, first, ranking, per_stage)
        now = time.perf_counter()
        counters.update(extra, busy_s=round(now - t0, 4), write_s=round(now - t_write, 4), finished=time.time())
        fsio.write_json_atomic(runfolder.part_url(self.out, runfolder.DONE_DIR, part, ".json"), counters, so)
        return counters

    def _metrics(self, records: pa.Table, first: dict, ranking: dict, per_stage: list) -> dict:
        from kalm_batch.metrics import per_query_sums

        qrels: dict[str, dict[str, int]] = {}
        judged = records.filter(pc.equal(records.column("role"), QREL))
        for q, d, rel in zip(*(judged.column(c).to_pylist() for c in ("qid", "doc_id", "rel"))):
            qrels.setdefault(q, {})[d] = rel
        runs: dict[str, dict] = {"first-stage": {}}
        for (q, d), (rank, _) in first.items():
            runs["first-stage"].setdefault(q, {})[d] = -float(rank)
        if len(self.stages) > 1:
            for i, ((ratio, k), scored) in enumerate(zip(self.stages, per_stage), start=1):
                runs[f"stage{i}-r{ratio}-k{k}"] = {q: {s.doc_id: s.margin for s in items} for q, items in scored.items()}
        runs["reranked"] = {q: {p.scored.doc_id: p.run_score for p in placed} for q, placed in ranking.items()}
        return {name: per_query_sums(run, qrels, self.measures) for name, run in runs.items()}


def _count(records: pa.Table, role: str) -> int:
    return int(pc.sum(pc.equal(records.column("role"), role)).as_py() or 0)


def _kinds(kinds) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in kinds:
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def _skips_from_records(records: pa.Table) -> list[tuple]:
    t = records.filter(pc.equal(records.column("role"), SKIP))
    return [(q, d, k, r, 1) for q, d, k, r in zip(*(t.column(c).to_pylist() for c in ("qid", "doc_id", "kind", "reason")))]


def _missing(t: pa.Table, store_url: str) -> list[tuple]:
    return [(q, d, "doc_not_in_store", (f"candidate ({q!r}, {d!r}): doc_id {d!r} is not in store {store_url}; skipped "
             "(encode it into the store to rerank it)"), 1) for q, d in zip(t.column("qid").to_pylist(),
                                                                          t.column("doc_id").to_pylist())]


def _scores_table(ranking: dict, first: dict, ratios: list[int]) -> pa.Table:
    rows = [(q, p.scored.doc_id, p.scored.p_yes, p.scored.margin, p.rank, *first[(q, p.scored.doc_id)], p.stage,
             ratios[p.stage - 1]) for q, placed in ranking.items() for p in placed]
    cols = list(zip(*rows)) if rows else [[] for _ in SCORES_SCHEMA.names]
    return pa.table({f.name: pa.array(c, f.type) for f, c in zip(SCORES_SCHEMA, cols)}, schema=SCORES_SCHEMA)
