"""``kalm-batch sweep``: rerank the same pairs at several pooling ratios (and cascades) from one store, then compare
quality, decoder cost and store bytes per setting, as a table (``sweep.json``, ``sweep.md``) and a plot (``sweep.png``).

One store encoded at r0 serves every trained ratio that is a multiple of r0 exactly, so a sweep never re-encodes.
Each setting is one run of the bulk rerank job through its public entry point (``run_rerank(RerankConfig(...))``)
on the same (query, candidate) pairs, written under ``OUT/runs/<setting>/``; the sweep then reads each run's
``run.trec`` and scores back (:func:`read_rerank_output`) and its summary (decoder seconds, pairs, memory vectors).

Everything that can be refused is refused by :func:`plan_sweep` before any scoring: a ratio the store cannot serve,
a cascade whose K does not decrease or whose first K is not ``--top-k`` (it would rerank other pairs), qrels that
judge none of the queries. Statistics and rendering live in kalm_batch.sweep_report.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import re
from dataclasses import dataclass, field

from pydantic import BaseModel, Field, field_validator

from kalm_batch import fsio
from kalm_batch.cascade import CascadeError, parse_cascade, validate_stages
from kalm_batch.cliutil import add_model_arguments, model_from_args
from kalm_batch.metrics import DEFAULT_MEASURES, Qrels, Run, per_query, read_run
from kalm_batch.model import DEFAULT_MODEL
from kalm_batch.pipelines import rerank
from kalm_batch.pooling import ALLOWED_RATIOS

log = logging.getLogger(__name__)

MEASURES = DEFAULT_MEASURES  # nDCG@10 (the one settings are ranked by), RR@10, R@100
CODEC_SIZES = ("bfloat16", "int8")


class SweepConfig(BaseModel):
    """Settings of one sweep; ``kalm-batch sweep`` and jobs/sweep.py share its flags."""

    model: str = Field(DEFAULT_MODEL, description="checkpoint directory or hub id (the model that made the store)")
    store: rerank.StoreUrl
    queries: str = Field(description="queries: BEIR queries.jsonl, qid<TAB>text TSV or Parquet (qid, text)")
    candidates: str = Field(description="first-stage candidates: TREC run or Parquet (qid, doc_id[, score][, rank])")
    qrels: str = Field(description="qrels (BEIR TSV or TREC) judging the queries; every setting is scored on them")
    out: str = Field(description="output folder URL for sweep.json, sweep.md, sweep.png and runs/<setting>/")
    ratios: list[int] | None = Field(None, description="pooling ratios to score at, e.g. 4,8,16,32 (multiples of "
                                     "the store's r0; default r0, 2r0, 4r0, ... up to 32)")
    cascades: list[str] | None = Field(None, description="cascades to compare too, each R1:K1,R2:K2,... with "
                                       "K1 = --top-k and K strictly decreasing, e.g. 32:100,4:20 16:100,4:10")
    top_k: int = Field(100, ge=1, description="rerank each query's top K first-stage candidates in every setting")
    sample_queries: int | None = Field(None, ge=1, description="sweep N judged queries picked at random (seeded by "
                                       "--seed) instead of all of them; the report says it is a sample")
    seed: int = Field(0, description="seed of --sample-queries, the bootstrap and the passages measured for bytes")
    bootstrap: int = Field(10000, ge=100, description="paired bootstrap resamples over queries")
    bytes_sample: int = Field(256, ge=1, description="stored passages (of the swept candidates) re-encoded to "
                              "measure bytes per passage at each ratio")
    instruction: rerank.Instruction
    address: rerank.RayAddress
    workers: int = Field(1, ge=1, description="scoring actors")
    gpus_per_worker: rerank.GpusPerWorker
    dtype: rerank.ComputeDtype
    allow_mismatch: rerank.AllowMismatch
    batch_size: rerank.BatchSize
    query_max_length: rerank.QueryMaxLength
    cpu_threads: rerank.CpuThreads
    num_cpus: rerank.LocalRayCpus
    storage_options: rerank.StorageOptions

    @field_validator("ratios", mode="before")
    @classmethod
    def _split_ratios(cls, value):
        """``"4,8"``, ``["4,8", "16"]`` and ``[4, 8]`` all mean ratios 4 and 8."""
        if value is None or isinstance(value, int):
            return value if value is None else [value]
        items = [value] if isinstance(value, str) else value
        parts = [p for item in items for p in re.split(r"[,\s]+", str(item).strip()) if p]
        if not parts:
            raise ValueError("no ratio given; pass e.g. --ratios 4,8,16")
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"ratios {value!r}: pass integers separated by commas, e.g. --ratios 4,8,16") from None

    @field_validator("cascades", mode="before")
    @classmethod
    def _split_cascades(cls, value):
        """One string may hold several cascades separated by spaces or ';'; each must parse as R1:K1,R2:K2,..."""
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        specs = [s for item in items for s in re.split(r"[;\s]+", str(item).strip()) if s]
        for spec in specs:
            parse_cascade(spec)  # CascadeError (a ValueError) names the bad stage
        return specs


@dataclass(frozen=True)
class Setting:
    """One swept setting: a single ratio or a cascade; ``finest`` is the finest ratio it reads (its store's r)."""

    name: str
    slug: str
    ratio: int | None = None
    cascade: str | None = None

    @property
    def finest(self) -> int:
        return self.ratio if self.cascade is None else min(s.ratio for s in parse_cascade(self.cascade))


@dataclass
class SweepPlan:
    """What a sweep will do, decided (and checked) before any scoring."""

    r0: int
    settings: list[Setting]
    queries: dict[str, str]  # the swept queries' texts
    qrels: Qrels  # judgements of the evaluated queries (the metrics' denominator)
    first_stage: Run  # top-k candidates of the swept queries, score = -rank
    n_eligible: int  # judged queries that have a text and candidates
    sampled: bool
    doc_ids: list[str] = field(default_factory=list)  # swept candidates (bytes are measured on these)


# ----- flags ---------------------------------------------------------------------------------------------------
def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per SweepConfig field (``--sample-queries`` for ``sample_queries``...)."""
    add_model_arguments(parser, SweepConfig)
    return parser


def config_from_args(ns: argparse.Namespace) -> SweepConfig:
    return model_from_args(SweepConfig, ns)


# ----- planning: every refusal happens here, before any scoring ------------------------------------------------
def servable_ratios(r0: int) -> list[int]:
    """The trained ratios a store encoded at ``r0`` serves exactly: r0, 2r0, 4r0, ... up to 32."""
    return [r for r in ALLOWED_RATIOS if r >= r0 and r % r0 == 0]


def plan_settings(r0: int, ratios: list[int] | None, cascades: list[str] | None, top_k: int) -> list[Setting]:
    """The settings to sweep (ratios ascending, then cascades in the order given); raises ValueError naming what to
    pass when a ratio or a cascade cannot be served from a store at ``r0`` or would rerank other pairs."""
    allowed = servable_ratios(r0)
    settings = []
    for r in sorted(set(ratios if ratios is not None else allowed)):
        if r % r0:
            raise ValueError(f"--ratios: {r} is not a multiple of the store's r0={r0}; pass ratios from {allowed}")
        if r not in allowed:
            raise ValueError(f"--ratios: {r} is not a trained pooling ratio; pass ratios from {allowed}")
        settings.append(Setting(f"r={r}", f"r{r}", ratio=r))
    for spec in dict.fromkeys(cascades or []):
        stages = validate_stages(parse_cascade(spec), allowed, spec)
        if stages[0].k != top_k:
            raise CascadeError(f"--cascades {spec!r}: its first stage keeps K1={stages[0].k} but --top-k is {top_k}; "
                               f"every setting must rerank the same pairs, so start the cascade at K1={top_k} or "
                               f"pass --top-k {stages[0].k}")
        slug = "cascade-" + "-".join(f"{s.ratio}x{s.k}" for s in stages)
        settings.append(Setting(f"cascade {spec}", slug, cascade=spec))
    if not settings:
        raise ValueError("nothing to sweep: pass --ratios and/or --cascades")
    return settings


def pick_queries(eligible: list[str], n: int | None, seed: int) -> list[str]:
    """``n`` of the ``eligible`` qids at random, deterministic for a seed (all of them when ``n`` is unset or too
    large); returned in the order of ``eligible``."""
    if n is None or n >= len(eligible):
        return list(eligible)
    chosen = set(random.Random(seed).sample(sorted(eligible), n))
    return [q for q in eligible if q in chosen]


def _read_inputs(cfg: SweepConfig):
    from kalm_batch.querylog import read_candidates, read_qrels, read_queries, top_k

    queries = read_queries(cfg.queries, cfg.storage_options)
    candidates = top_k(read_candidates(cfg.candidates, cfg.storage_options), cfg.top_k)
    qrels = read_qrels(cfg.qrels, cfg.storage_options)
    return queries.texts, candidates.rows, qrels


def plan_sweep(cfg: SweepConfig) -> SweepPlan:
    """Open the store (its Delta log and index, no memories), read the inputs and check everything; no scoring, nothing written."""
    from kalm_batch.store import open_store

    r0 = open_store(cfg.store, storage_options=cfg.storage_options).ratio
    settings = plan_settings(r0, cfg.ratios, cfg.cascades, cfg.top_k)
    texts, rows, qrels = _read_inputs(cfg)
    judged = {q for q, docs in qrels.items() if docs}
    with_candidates = dict.fromkeys(q for q, _, _, _ in rows)
    eligible = [q for q in with_candidates if q in texts and q in judged]
    if not eligible:
        raise ValueError(f"no query of {cfg.queries} with candidates in {cfg.candidates} has a judgement in "
                         f"{cfg.qrels} ({len(with_candidates)} queries with candidates, {len(judged)} judged); pass "
                         "the qrels of these queries (BEIR qrels/<split>.tsv or TREC qrels) with matching query ids")
    chosen = pick_queries(eligible, cfg.sample_queries, cfg.seed)
    sampled = len(chosen) < len(eligible)
    keep = set(chosen) if sampled else set(with_candidates) & set(texts)
    first_stage: Run = {}
    for qid, doc, rank, _ in rows:
        if qid in keep:
            first_stage.setdefault(qid, {})[doc] = -float(rank)
    return SweepPlan(r0=r0, settings=settings, queries={q: texts[q] for q in texts if q in keep},
                     qrels={q: qrels[q] for q in chosen} if sampled else qrels, first_stage=first_stage,
                     n_eligible=len(eligible), sampled=sampled,
                     doc_ids=list(dict.fromkeys(d for docs in first_stage.values() for d in docs)))


# ----- inputs and runs -------------------------------------------------------------------------------------------
def write_sample_inputs(cfg: SweepConfig, plan: SweepPlan) -> dict[str, str]:
    """The sampled queries, candidates and qrels as files under ``OUT/inputs/`` (the original URLs if not sampled)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not plan.sampled:
        return {"queries": cfg.queries, "candidates": cfg.candidates, "qrels": cfg.qrels}
    urls = {k: fsio.join_url(cfg.out, "inputs", f) for k, f in
            (("queries", "queries.parquet"), ("candidates", "candidates.parquet"), ("qrels", "qrels.tsv"))}
    cands = [(q, d, -s) for q, docs in plan.first_stage.items() for d, s in docs.items()]
    tables = {"queries": pa.table({"qid": list(plan.queries), "text": list(plan.queries.values())}),
              "candidates": pa.table({"qid": [c[0] for c in cands], "doc_id": [c[1] for c in cands],
                                      "rank": pa.array([int(c[2]) for c in cands], pa.int64())})}
    for name, table in tables.items():
        buf = io.BytesIO()
        pq.write_table(table, buf)
        fsio.write_bytes_atomic(urls[name], buf.getvalue(), cfg.storage_options)
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{rel}\n" for q, docs in plan.qrels.items() for d, rel in docs.items())
    fsio.write_bytes_atomic(urls["qrels"], qrels.encode(), cfg.storage_options)
    return urls


def rerank_config(cfg: SweepConfig, setting: Setting, inputs: dict[str, str]):
    """The RerankConfig of one setting: the sweep's shared options, this setting's ratio or cascade, its own out."""
    shared = {k: getattr(cfg, k) for k in rerank.RerankConfig.model_fields if k in SweepConfig.model_fields}
    shared.update(inputs, out=fsio.join_url(cfg.out, "runs", setting.slug), ratio=setting.ratio,
                  cascade=setting.cascade, top_k=cfg.top_k, tag=f"kalm-sweep-{setting.slug}")
    return rerank.RerankConfig(**shared)


def read_rerank_output(out: str, storage_options: dict | None = None):
    """(scores table, run) of one committed rerank run folder (``scores/`` dataset and ``run.trec``); an uncommitted
    folder is refused (kalm_batch.runfolder)."""
    from kalm_batch.runfolder import read_scores

    scores = read_scores(out, storage_options)
    return scores, read_run(fsio.join_url(out, "run.trec"), storage_options)


def _work(summary, scores, prompt_tokens: dict[str, int]) -> dict:
    """Per ranked query: pairs, memory vectors, decoder prompt tokens, decoder and fetch seconds.

    A document's ``stage`` is the last cascade stage that scored it, and stages are nested, so it was scored
    ``stage`` times; its query's prompt tokens are fed to the decoder each time."""
    qids, stages = scores.column("qid").to_pylist(), scores.column("stage").to_pylist()
    n = len(set(qids)) or 1
    tokens = sum(prompt_tokens[q] * s for q, s in zip(qids, stages))
    return {"queries_ranked": len(set(qids)), "pairs_per_query": sum(stages) / n,
            "vectors_per_query": sum(s.get("vectors", 0) for s in summary.stages) / n,
            "decoder_tokens_per_query": tokens / n,
            "decoder_s_per_query": summary.score_s / n, "fetch_decode_s_per_query": summary.fetch_decode_s / n,
            "wall_s": summary.wall_s, "pairs_scored": summary.pairs_scored}


def run_setting(cfg: SweepConfig, plan: SweepPlan, setting: Setting, inputs: dict[str, str],
                prompt_tokens: dict[str, int]) -> dict:
    """Rerank the pairs at one setting, then its per-query metrics and its work per query."""
    rcfg = rerank_config(cfg, setting, inputs)
    log.info("sweep: %s -> %s", setting.name, rcfg.out)
    summary = rerank.run_rerank(rcfg)
    scores, run = read_rerank_output(rcfg.out, cfg.storage_options)
    stage_pairs = sum(int(s.get("pairs", 0)) for s in summary.stages)  # decoder calls: a doc once per stage reached
    if sum(scores.column("stage").to_pylist()) != stage_pairs or scores.num_rows != summary.pairs_scored:
        raise RuntimeError(f"{rcfg.out}: scores hold {scores.num_rows} documents whose stages sum to "
                           f"{sum(scores.column('stage').to_pylist())} pairs, but the summary says "
                           f"{summary.pairs_scored} documents and {stage_pairs} stage pairs were scored; the run's "
                           "outputs are inconsistent")
    return {"setting": setting.name, "slug": setting.slug, "ratio": setting.ratio, "cascade": setting.cascade,
            "store_ratio": setting.finest, "out": rcfg.out, "per_query": per_query(run, plan.qrels, MEASURES),
            **_work(summary, scores, prompt_tokens)}


def prompt_token_counts(cfg: SweepConfig, plan: SweepPlan) -> dict[str, int]:
    """Decoder prompt tokens per swept query (the template around the truncated query), from the tokenizer alone."""
    from kalm_batch.reranker import KaLMReranker

    tok = KaLMReranker(cfg.model, chunk_size=plan.r0, query_max_length=cfg.query_max_length)  # no weights loaded
    return {q: len(tok.prompt_ids(text, cfg.instruction)) for q, text in plan.queries.items()}


def bytes_per_passage(cfg: SweepConfig, plan: SweepPlan) -> dict[int, dict]:
    """Mean stored bytes per passage (codec payload + scales) a store at each swept ratio would take, measured by
    re-encoding up to ``bytes_sample`` of the swept candidates' stored memories at that ratio (bf16 and int8)."""
    from kalm_batch.codec import encode_memory, encoded_nbytes
    from kalm_batch.store import open_store

    reader = open_store(cfg.store, storage_options=cfg.storage_options)
    ids = plan.doc_ids if len(plan.doc_ids) <= cfg.bytes_sample else \
        random.Random(cfg.seed).sample(plan.doc_ids, cfg.bytes_sample)
    out = {}
    for r in sorted({s.finest for s in plan.settings}):
        mems = list(reader.fetch(ids, r).memories.values())
        if not mems:
            raise ValueError(f"none of {len(ids)} swept candidates is in store {cfg.store}; encode the corpus the "
                             "candidates come from")
        arrays = [m.to_numpy() for m in mems]
        out[r] = {"passages": len(arrays), "vectors": sum(a.shape[0] for a in arrays) / len(arrays),
                  **{dt: sum(encoded_nbytes(encode_memory(a, dt)) for a in arrays) / len(arrays)
                     for dt in CODEC_SIZES}}
    return out


# ----- the command -------------------------------------------------------------------------------------------------
def run_sweep(cfg: SweepConfig) -> dict:
    """Plan (refusing bad input before any scoring), rerank at every setting, then write sweep.json, sweep.md and
    (with matplotlib) sweep.png under ``cfg.out``; returns the report (also in sweep.json)."""
    from kalm_batch import sweep_report as R

    plan = plan_sweep(cfg)
    tokens = prompt_token_counts(cfg, plan)
    inputs = write_sample_inputs(cfg, plan)
    results = [run_setting(cfg, plan, s, inputs, tokens) for s in plan.settings]
    report = R.build_report(cfg, plan, results, bytes_per_passage(cfg, plan),
                            per_query(plan.first_stage, plan.qrels, MEASURES))
    return R.write_report(cfg.out, report, cfg.storage_options)
