"""The bulk rerank job: rerank every query's first-stage candidates from a memory store on Ray Data, never encoding.

Driver: read queries and candidates (kalm_batch.querylog), keep the top-k per query by first-stage rank, open the
store to check its manifest and the model fingerprint, tag each (query, doc) pair with the shard holding the doc and
sort by shard. Ray Data: blocks of whole shards, ``map_batches(ScoreShards, batch_size=None)`` on an actor pool, so
each shard's needed row groups are read once, by one actor, for all the pairs that need them (no per-pair random
reads; no shuffle either, since the driver already holds the pairs). A cascade runs one such dataset per stage; the
driver picks each stage's candidates from the previous stage's scores (kalm_batch.cascade).

Outputs under ``--out``, each written atomically (kalm_batch.fsio): ``scores.parquet`` (qid, doc_id, score = P(yes),
margin, rank, first_stage_rank, first_stage_score, stage, ratio), ``run.trec`` (score = (stage - 1) + P(yes), so a
cascade's tiers stay in order; a single stage writes P(yes) itself), ``problems.jsonl`` and ``skipped.tsv`` (every
skipped or flagged input, with its reason), ``summary.json`` and, with ``--qrels``, ``metrics.json``.

Empty queries are scored like any other: the decoder template still holds and the model scores "" exactly as the
reference does (they are also listed as ``empty_query`` problems, flagged but kept).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Literal

from pydantic import BaseModel, Field

from kalm_batch import fsio
from kalm_batch.cascade import Stage, final_ranking, plan_stages, select_top
from kalm_batch.cliutil import add_model_arguments, model_from_args
from kalm_batch.model import DEFAULT_MODEL
from kalm_batch.pipelines import rerank_stages as S
from kalm_batch.querylog import join_queries, read_candidates, read_queries, top_k

log = logging.getLogger(__name__)


class RerankConfig(BaseModel):
    """Settings of one bulk rerank run; the CLI (``kalm-batch rerank``) and jobs/rerank_queries.py share its flags."""

    model: str = Field(DEFAULT_MODEL, description="checkpoint directory or hub id (must be the model that made the store)")
    store: str = Field(description="memory store URL made by the encode job (file://, s3://, local path)")
    queries: str = Field(description="queries: BEIR queries.jsonl, qid<TAB>text TSV or Parquet (qid, text)")
    candidates: str = Field(description="first-stage candidates: TREC run or Parquet (qid, doc_id[, score][, rank])")
    out: str = Field(description="output folder URL for scores.parquet, run.trec, problems, summary and metrics")
    top_k: int | None = Field(None, ge=1, description="rerank each query's top K first-stage candidates "
                              "(default 100; with --cascade, the first stage's K)")
    ratio: int | None = Field(None, description="pooling ratio to score at (a multiple of the store's r0; default r0)")
    cascade: str | None = Field(None, description="cascade R1:K1,R2:K2,...: top K1 at ratio R1, then the top K2 of "
                                "those at R2, ... (K strictly decreasing), e.g. 32:100,4:20")
    instruction: str | None = Field(None, description="task instruction in the decoder prompt (default: the model's)")
    qrels: str | None = Field(None, description="qrels (BEIR TSV or TREC) to compare first-stage and reranked runs")
    address: str | None = Field(None, description="Ray address: unset/'local' starts a local Ray, 'auto' joins one")
    workers: int = Field(1, ge=1, description="scoring actors")
    gpus_per_worker: float | None = Field(None, description="GPUs per scoring actor (default: 1 if the cluster has GPUs)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype of the decoder (auto: bfloat16 on GPU, float32 on CPU)")
    allow_mismatch: bool = Field(False, description="score even if the store was made by another model (WARNING)")
    batch_size: int = Field(32, ge=1, description="max pairs per decoder forward")
    max_tokens_per_batch: int = Field(32768, ge=1, description="padded prompt tokens + memory vectors per forward")
    query_max_length: int = Field(512, ge=1, description="query truncation length in tokens")
    pairs_per_block: int = Field(4096, ge=1, description="pairs per Ray Data block (blocks hold whole shards)")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads per actor on CPU (default: Ray's)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all)")
    tag: str = Field("kalm-rerank", description="run tag written in run.trec")
    storage_options: dict | None = Field(None, description="fsspec options for every URL (not a flag)")


class RerankSummary(BaseModel):
    """What a run did and cost (also written to ``summary.json``)."""

    out: str
    stages: list[dict] = Field(description="per stage: ratio, k, pairs, vectors attended, seconds")
    pairs_scored: int
    pairs_per_s: float = Field(description="pairs scored / wall seconds of the scoring stages")
    wall_s: float = Field(description="the whole run, reading inputs to writing outputs")
    fetch_decode_s: float = Field(description="store read + decode + coarsen, summed over actors")
    score_s: float = Field(description="decoder scoring, summed over actors")
    fetch_decode_share: float = Field(description="fetch_decode_s / (fetch_decode_s + score_s)")
    queries_ranked: int
    problems: dict[str, int] = Field(description="problems by kind (skipped or flagged inputs)")
    skipped_pairs: int
    metrics: dict | None = None
    metrics_table: str | None = None
    outputs: dict[str, str]

    def table(self) -> str:
        keys = ["pairs_scored", "pairs_per_s", "wall_s", "fetch_decode_s", "score_s", "fetch_decode_share",
                "queries_ranked", "skipped_pairs", "problems"]
        width = max(map(len, keys))
        lines = [f"{k:<{width}}  {getattr(self, k)}" for k in keys]
        lines += [f"{'stage ' + str(s['stage']):<{width}}  r={s['ratio']} k={s['k']} pairs={s['pairs']} "
                  f"vectors={s['vectors']} score_s={s['score_s']} wall_s={s['wall_s']}" for s in self.stages]
        return "\n".join(lines + ([self.metrics_table] if self.metrics_table else []))


# ----- flags ---------------------------------------------------------------------------------------------------
def add_rerank_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per RerankConfig field (``--top-k`` for ``top_k``...), help from the field descriptions."""
    add_model_arguments(parser, RerankConfig)
    return parser


def config_from_args(ns: argparse.Namespace) -> RerankConfig:
    """A RerankConfig from parsed flags (the same helper every kalm-batch config uses)."""
    return model_from_args(RerankConfig, ns)


# ----- the job -------------------------------------------------------------------------------------------------
def open_checked_store(store: str, model: str, *, allow_mismatch: bool = False, storage_options: dict | None = None):
    """Open the store and refuse it unless ``model`` made it; returns (reader, reranker with no weights loaded).

    A fingerprint mismatch (config, tokenizer or weights hash) raises StoreMismatchError naming both; with
    ``allow_mismatch`` the store reader logs a loud WARNING instead. A different hidden size is refused either way
    (those memories cannot be scored at all).
    """
    from kalm_batch.reranker import KaLMReranker
    from kalm_batch.store import check_compatible, open_store

    reader = open_store(store, storage_options=storage_options)
    reranker = KaLMReranker(model, chunk_size=reader.ratio)  # config, tokenizer and fingerprint only
    check_compatible(reader, reranker, allow_mismatch=allow_mismatch)
    return reader, reranker


def summarize(out: str, costs: list[dict], ranking: dict, problems: list[dict], metrics: dict | None,
              outputs: dict[str, str], *, wall_s: float) -> RerankSummary:
    from collections import Counter

    pairs = sum(c["pairs"] for c in costs)
    stage_wall = sum(c["wall_s"] for c in costs)
    fetch_s, score_s = sum(c["fetch_decode_s"] for c in costs), sum(c["score_s"] for c in costs)
    return RerankSummary(
        out=out, stages=costs, pairs_scored=pairs, pairs_per_s=round(pairs / stage_wall, 2) if stage_wall else 0.0,
        wall_s=round(wall_s, 3), fetch_decode_s=round(fetch_s, 4), score_s=round(score_s, 4),
        fetch_decode_share=round(fetch_s / (fetch_s + score_s), 4) if fetch_s + score_s else 0.0,
        queries_ranked=sum(1 for placed in ranking.values() if placed),
        problems=dict(sorted(Counter(p["kind"] for p in problems).items())),
        skipped_pairs=sum(1 for p in problems if p["kind"] in ("doc_not_in_store", "corrupt_record")),
        metrics=metrics["runs"] if metrics else None, metrics_table=metrics["table"] if metrics else None,
        outputs=outputs)


def _score_stage(cfg: RerankConfig, table) -> tuple:
    """One Ray Data pass over blocks of whole shards, scored on the actor pool; returns (results, wall seconds)."""
    import pyarrow as pa
    import ray

    from kalm_batch.pipelines.cluster import actor_resources

    if table.num_rows == 0:
        return S.RESULT_SCHEMA.empty_table(), 0.0
    start = time.perf_counter()
    ds = ray.data.from_arrow(S.shard_blocks(table, cfg.pairs_per_block))
    scored = ds.map_batches(
        S.ScoreShards, batch_size=None, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        fn_constructor_args=(cfg.model, cfg.store),
        fn_constructor_kwargs=dict(storage_options=cfg.storage_options, dtype=cfg.dtype, instruction=cfg.instruction,
                                   batch_size=cfg.batch_size, query_max_length=cfg.query_max_length,
                                   max_tokens_per_batch=cfg.max_tokens_per_batch, cpu_threads=cfg.cpu_threads),
        **actor_resources(cfg.gpus_per_worker, cfg.workers))
    tables = [t for t in ray.get(scored.to_arrow_refs()) if t.num_rows]
    results = pa.concat_tables([t.cast(S.RESULT_SCHEMA) for t in tables]) if tables else S.RESULT_SCHEMA.empty_table()
    return results, time.perf_counter() - start


def _stage_pairs(stage_no: int, pairs, previous, queries: dict[str, str], k: int):
    """Stage 1 scores the given pairs; stage i > 1 the top ``k`` of stage i-1 per query."""
    if stage_no == 1:
        return pairs
    return [(qid, queries[qid], s.doc_id, s.first_stage_rank)
            for qid, items in select_top(previous, k).items() for s in items]


def _run_stages(cfg: RerankConfig, reader, stages: list[Stage], pairs, queries: dict[str, str]):
    """Every stage in turn; returns (per-stage {qid: [Scored]}, per-stage costs, pair-level problem records)."""
    per_stage, costs, problems = [], [], []
    for number, stage in enumerate(stages, start=1):
        todo = _stage_pairs(number, pairs, per_stage[-1] if per_stage else {}, queries, stage.k)
        table, missing = S.pairs_table(todo, reader, stage=number, ratio=stage.ratio)
        problems += [S.missing_doc(cfg.candidates, cfg.store, qid, doc) for qid, doc in missing]
        results, wall = _score_stage(cfg, table)
        problems += S.error_records(results, cfg.store)
        per_stage.append(S.scored_by_query(results))
        costs.append(S.stage_cost(results, stage=number, ratio=stage.ratio, k=stage.k, wall_s=wall))
        log.info("stage %d (r=%d, k=%d): %s", number, stage.ratio, stage.k, costs[-1])
    return per_stage, costs, problems


def run_rerank(cfg: RerankConfig) -> RerankSummary:
    """Run the whole job (local Ray unless ``cfg.address``); outputs are written under ``cfg.out``."""
    from kalm_batch.pipelines.cluster import init_ray

    start = time.perf_counter()
    reader, _ = open_checked_store(cfg.store, cfg.model, allow_mismatch=cfg.allow_mismatch,
                                     storage_options=cfg.storage_options)
    stages = plan_stages(ratios=reader.ratios, cascade=cfg.cascade, ratio=cfg.ratio, top_k=cfg.top_k)
    queries = read_queries(cfg.queries, cfg.storage_options)
    candidates = read_candidates(cfg.candidates, cfg.storage_options)
    joined, join_problems = join_queries(queries, top_k(candidates, stages[0].k))
    problems = [S.input_problem(p) for p in queries.problems + candidates.problems + join_problems]
    pairs = [(qid, text, doc, rank) for qid, text, doc, rank, _ in joined]
    if pairs:
        init_ray(cfg.address, num_cpus=cfg.num_cpus)
    per_stage, costs, pair_problems = _run_stages(cfg, reader, stages, pairs, queries.texts)
    ranking = final_ranking(per_stage)
    outputs = S.write_outputs(cfg.out, ranking, joined, problems + pair_problems, stages, tag=cfg.tag,
                              storage_options=cfg.storage_options)
    metrics = S.write_metrics(cfg.out, cfg.qrels, joined, ranking, per_stage, stages,
                              cfg.storage_options) if cfg.qrels else None
    if metrics:
        outputs["metrics"] = fsio.join_url(cfg.out, "metrics.json")
        log.info("metrics:\n%s", metrics["table"])
    summary = summarize(cfg.out, costs, ranking, problems + pair_problems, metrics, outputs,
                          wall_s=time.perf_counter() - start)
    fsio.write_json_atomic(outputs["summary"], {**summary.model_dump(), "config": cfg.model_dump(
        exclude={"storage_options"}), "store": reader.summary()}, cfg.storage_options)
    return summary


def run_eval(run_url: str, qrels_url: str, storage_options: dict | None = None) -> dict:
    """``kalm-batch eval``: nDCG@10, RR@10 and R@100 of a TREC run against qrels (BEIR TSV or TREC), via ir-measures."""
    from kalm_batch.metrics import eval_files

    return eval_files(run_url, qrels_url, storage_options=storage_options)
