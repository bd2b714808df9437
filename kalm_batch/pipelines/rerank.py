"""The bulk rerank job: rerank query logs of any size from a memory store on Ray Data, resumably, never encoding.

Shape: ``RerankConfig`` -> ``build_records_pipeline`` / ``build_score_pipeline`` (lazy Ray Data datasets) ->
``run_rerank`` (executes them, returns ``RerankSummary``). The driver holds plans and counters only:

1. prepare (once per output folder, committed by ``_work/prepared.json``): one read task per input file validates
   every record (kalm_batch.pipelines.rerank_inputs); ``groupby(qid).map_groups`` dedupes, ranks, keeps the top k,
   attaches the query text and assigns each query a partition (rerank_plan); a hash ``join`` with the store's
   doc_id -> data-file index (``reader.index_files()``) tags each pair with its file.
   Each partition's records are written with ``write_parquet(partition_cols=["part"])``.
2. score: ``map_batches`` of the uncommitted partitions on an actor pool (``--workers auto``: one actor per GPU, else
   per CPUS_PER_CPU_ACTOR CPUs); each actor sorts a partition's pairs by data file, scores them stage by stage (the
   cascade's per-query selection runs there, on whole queries), writes the partition's outputs and commits it
   (rerank_partition). A killed job, run again with the same command, skips committed partitions.
3. commit: counters added up (``input pairs = scored + skipped``, checked), metrics averaged from per-query sums,
   ``run.trec`` merged when small, ``summary.json``, then ``_COMMITTED`` last (layout: kalm_batch/runfolder.py).

``--dry-run`` runs step 1's read, plan and join without writing or loading the decoder and reports counts and the
work per stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from kalm_batch import fsio, runfolder
from kalm_batch.cascade import Stage, plan_stages
from kalm_batch.cliutil import add_model_arguments, model_from_args
from kalm_batch.model import DEFAULT_MODEL
from kalm_batch.pipelines import rerank_output as O

log = logging.getLogger(__name__)
PLAN_VERSION = 1
AUTO_PARTITION_BYTES = 8 * 2**20  # --partitions auto: one partition per 8 MiB of candidate files (~200k TREC lines)


# ----- options a sweep passes on to each of its rerank runs: defined once, used by RerankConfig and SweepConfig -----
StoreUrl = Annotated[str, Field(description="memory store URL made by the encode job (file://, s3://, local path)")]
Instruction = Annotated[str | None, Field(None, description="task instruction in the decoder prompt (default: the "
                                                            "model's)")]
RayAddress = Annotated[str | None, Field(None, description="Ray address: unset/'local' starts a local Ray, 'auto' "
                                                           "joins one")]
GpusPerWorker = Annotated[float | None, Field(None, description="GPUs per scoring actor (default: 1 if the cluster "
                                                                "has GPUs)")]
ComputeDtype = Annotated[Literal["auto", "float32", "bfloat16", "float16"], Field(
    "auto", description="compute dtype of the decoder (auto: bfloat16 on GPU, float32 on CPU)")]
AllowMismatch = Annotated[bool, Field(False, description="score even if the store was made by another model "
                                                         "(WARNING)")]
BatchSize = Annotated[int, Field(32, ge=1, description="max pairs per decoder forward")]
QueryMaxLength = Annotated[int, Field(512, ge=1, description="query truncation length in tokens")]
CpuThreads = Annotated[int | None, Field(None, ge=1, description="torch threads per actor on CPU (default: Ray's)")]
LocalRayCpus = Annotated[int | None, Field(None, ge=1, description="CPUs for a local Ray (default: all)")]
StorageOptions = Annotated[dict | None, Field(None, description="fsspec options for every URL (not a flag)")]


class RerankConfig(BaseModel):
    """Settings of one bulk rerank run; the CLI (``kalm-batch rerank``) and jobs/rerank_queries.py share its flags."""

    model: str = Field(DEFAULT_MODEL, description="checkpoint directory or hub id (must be the model that made the store)")
    store: StoreUrl
    store_version: int | None = Field(None, ge=0, description="store table version to read (default: the latest)")
    queries: str = Field(description="queries: file, directory or glob of BEIR queries.jsonl, qid<TAB>text TSV or "
                         "Parquet (qid, text)")
    candidates: str = Field(description="first-stage candidates: file, directory or glob of TREC runs or Parquet "
                            "(qid, doc_id[, score][, rank])")
    out: str = Field(description="output folder URL (scores/, run/, run.trec, skipped/, problems/, summary.json...)")
    top_k: int | None = Field(None, ge=1, description="rerank each query's top K first-stage candidates "
                              "(default 100; with --cascade, the first stage's K)")
    ratio: int | None = Field(None, description="pooling ratio to score at (a multiple of the store's r0; default r0)")
    cascade: str | None = Field(None, description="cascade R1:K1,R2:K2,...: top K1 at ratio R1, then the top K2 of "
                                "those at R2, ... (K strictly decreasing), e.g. 32:100,4:20")
    instruction: Instruction
    qrels: str | None = Field(None, description="qrels (BEIR TSV or TREC; file, directory or glob) to compare the "
                              "first-stage and reranked runs, per query in the workers")
    dry_run: bool = Field(False, description="validate the inputs against the store and report counts and the work "
                          "per stage, without loading the decoder or writing outputs")
    overwrite: bool = Field(False, description="delete this job's outputs in --out and start over (default: resume a "
                            "run of the same plan, refuse anything else)")
    partitions: int | None = Field(None, ge=1, description="units of resumption, by hash of qid (default: one per "
                                   "8 MiB of candidate files)")
    merge_limit: int = Field(5_000_000, ge=0, description="also merge the run parts into OUT/run.trec when the run "
                             "has at most this many lines")
    address: RayAddress
    workers: int | str = Field("auto", description="scoring actors: auto (one per GPU, else one per 8 CPUs), N, or MIN:MAX "
                         "(a pool that grows on an autoscaling cluster)")
    gpus_per_worker: GpusPerWorker
    dtype: ComputeDtype
    allow_mismatch: AllowMismatch
    batch_size: BatchSize
    max_tokens_per_batch: int = Field(32768, ge=1, description="padded prompt tokens + memory vectors per forward")
    query_max_length: QueryMaxLength
    pairs_per_block: int = Field(4096, ge=1, description="pairs per store fetch in a scoring actor (sorted by file)")
    cpu_threads: CpuThreads
    num_cpus: LocalRayCpus
    tag: str = Field("kalm-rerank", description="run tag written in run.trec")
    storage_options: StorageOptions


class RerankSummary(BaseModel):
    """What a run did and cost (also written to ``summary.json``)."""

    out: str
    dry_run: bool = False
    store: dict = Field(default_factory=dict, description="the store read: url, version, ratio, model id, rows")
    stages: list[dict] = Field(description="per stage: ratio, k, pairs, vectors attended, seconds")
    input_pairs: int = Field(0, description="top-k candidate pairs with valid ids = pairs_scored + skipped_pairs")
    pairs_scored: int
    skipped_pairs: int
    skipped: dict[str, int] = Field(default_factory=dict, description="skipped pairs by reason")
    pairs_per_s: float = Field(description="pairs scored / wall seconds of the scoring pass")
    wall_s: float = Field(description="the whole run, reading inputs to committing outputs")
    prepare_s: float = 0.0
    score_wall_s: float = 0.0
    fetch_decode_s: float = Field(description="store read + decode + coarsen, summed over actors")
    score_s: float = Field(description="decoder scoring, summed over actors")
    write_s: float = Field(0.0, description="writing the partitions' outputs, summed over actors")
    commit_s: float = Field(0.0, description="adding up the counters, merging run.trec, summary and commit marker")
    fetch_decode_share: float = Field(description="fetch_decode_s / (fetch_decode_s + score_s)")
    queries_ranked: int
    problems: dict[str, int] = Field(description="bad or flagged inputs by kind (rows of problems/)")
    partitions: dict = Field(default_factory=dict, description="total, scored by this call, already committed")
    actors: list[dict] = Field(default_factory=list, description="per scoring actor: partitions, busy seconds, share")
    estimate: dict | None = Field(None, description="--dry-run: counts and the work per stage")
    metrics: dict | None = None
    metrics_table: str | None = None
    outputs: dict[str, str] = Field(default_factory=dict)

    def table(self) -> str:
        keys = ["input_pairs", "pairs_scored", "skipped_pairs", "skipped", "pairs_per_s", "wall_s", "prepare_s",
                "score_wall_s", "fetch_decode_s", "score_s", "write_s", "commit_s", "fetch_decode_share", "queries_ranked", "problems",
                "partitions"]
        width = max(map(len, keys))
        lines = [f"{k:<{width}}  {getattr(self, k)}" for k in keys]
        lines += [f"{'stage ' + str(s['stage']):<{width}}  r={s['ratio']} k={s['k']} pairs={s['pairs']} "
                  f"vectors={s['vectors']} score_s={s.get('score_s')}" for s in self.stages]
        lines += [f"{'actor ' + a['actor']:<{width}}  partitions={a['partitions']} busy_s={a['busy_s']} "
                  f"busy_share={a['busy_share']}" for a in self.actors]
        if self.estimate:
            lines.append("dry run: " + json.dumps(self.estimate, sort_keys=True))
        return "\n".join(lines + ([self.metrics_table] if self.metrics_table else []))


# ----- flags ---------------------------------------------------------------------------------------------------
def add_rerank_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per RerankConfig field (``--top-k`` for ``top_k``...), help from the field descriptions."""
    add_model_arguments(parser, RerankConfig)
    return parser


def config_from_args(ns: argparse.Namespace) -> RerankConfig:
    """A RerankConfig from parsed flags (the same helper every kalm-batch config uses)."""
    return model_from_args(RerankConfig, ns)


# ----- the store and the plan -----------------------------------------------------------------------------------
def open_checked_store(store: str, model: str, *, version: int | None = None, allow_mismatch: bool = False,
                       storage_options: dict | None = None):
    """Open the store (pinned to ``version``) and refuse it unless ``model`` made it (kalm_batch.store.compat);
    returns (reader, reranker with no weights loaded)."""
    from kalm_batch.reranker import KaLMReranker
    from kalm_batch.store import check_compatible, open_store

    reader = open_store(store, version=version, storage_options=storage_options)
    reranker = KaLMReranker(model, chunk_size=reader.ratio)  # config, tokenizer and fingerprint only
    check_compatible(reader, reranker, allow_mismatch=allow_mismatch)
    return reader, reranker


def store_ratios(reader) -> list[int]:
    from kalm_batch.pooling import ALLOWED_RATIOS

    return [r for r in ALLOWED_RATIOS if r % reader.ratio == 0]


def input_files(cfg: RerankConfig) -> dict[str, list[str]]:
    from kalm_batch.pipelines.rerank_inputs import list_input_files

    so = cfg.storage_options
    return {"queries": list_input_files(cfg.queries, so, "queries"),
            "candidates": list_input_files(cfg.candidates, so, "candidates"),
            "qrels": list_input_files(cfg.qrels, so, "qrels") if cfg.qrels else []}


def auto_partitions(files: list[str], storage_options: dict | None = None) -> int:
    total = 0
    for url in files:
        fs, path = fsio.url_to_fs(url, storage_options)
        total += int(fs.size(path) or 0)
    return max(1, math.ceil(total / AUTO_PARTITION_BYTES))


def file_identity(url: str, storage_options: dict | None = None) -> str:
    """Size and version stamp (ETag, else modification time) of an input file: a changed file is another plan."""
    fs, path = fsio.url_to_fs(url, storage_options)
    info = fs.info(path)
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    return f"{url} size={info.get('size')} stamp={stamp}"


def make_plan(cfg: RerankConfig, reader, reranker, stages: list[Stage], files: dict, partitions: int) -> dict:
    """What the output folder is filled with; a resume must match it exactly (kalm_batch.pipelines.rerank_output)."""
    fp = reranker.fingerprint.to_dict()
    inputs = {role: [file_identity(u, cfg.storage_options) for u in urls] for role, urls in files.items()}
    plan = {"plan_version": PLAN_VERSION, "inputs": inputs,
            "model": {k: fp.get(k) for k in ("config_sha256", "tokenizer_sha256", "weights_sha256")},
            "store": {"url": reader.url, "version": reader.version},
            "stages": [[s.ratio, s.k] for s in stages], "partitions": partitions,
            "scoring": {"instruction": cfg.instruction, "dtype": cfg.dtype, "query_max_length": cfg.query_max_length,
                        "tag": cfg.tag}}
    return {**plan, "plan_id": O.plan_id(plan)}


# ----- the lazy pipelines ---------------------------------------------------------------------------------------
def shuffle_partitions(partitions: int) -> int:
    """Hash-shuffle width of the groupby/join stages: grows with the work (one per 4 partitions, ~32 MiB of
    candidate files), capped at 64."""
    return max(1, min(64, math.ceil(partitions / 4)))


def build_records_pipeline(cfg: RerankConfig, files: dict, *, top_k: int, partitions: int, index_urls: list[str]):
    """read (one task per file) -> groupby(qid).map_groups(plan) -> join with the store's doc_id -> file index."""
    import ray

    from kalm_batch.pipelines import rerank_inputs as I
    from kalm_batch.pipelines.cluster import stage_remote_args
    from kalm_batch.pipelines.rerank_plan import plan_group

    remote = stage_remote_args()
    items = I.file_items(files["queries"], files["candidates"], files["qrels"])
    raw = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        I.read_file_records, batch_size=1, fn_kwargs={"storage_options": cfg.storage_options}, num_cpus=0.5, **remote)
    shuffle = shuffle_partitions(partitions)
    records = raw.groupby("gkey", num_partitions=shuffle).map_groups(plan_group, batch_format="pyarrow", num_cpus=0.5,
                                             fn_kwargs={"top_k": top_k, "partitions": partitions}, **remote)
    fs, _ = fsio.fs_for_pyarrow(index_urls[0], cfg.storage_options)
    paths = [fsio.fs_for_pyarrow(u, cfg.storage_options)[1] for u in index_urls]
    index = ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=len(paths), **remote).select_columns(
        ["doc_id", "file"])  # one block per index file (Ray's default of 200 read tasks costs minutes on small stores)
    return records.join(index, join_type="left_outer", on=("doc_id",), num_partitions=shuffle)


def write_prepared(cfg: RerankConfig, joined) -> None:
    """Execute the records pipeline into ``_work/prepared/part=N/`` (Ray Data ``write_parquet``, hive partitions)."""
    from kalm_batch.pipelines.cluster import stage_remote_args

    url = fsio.join_url(cfg.out, runfolder.PREPARED_DIR)
    fs, path = fsio.fs_for_pyarrow(url, cfg.storage_options)
    joined.write_parquet(path, filesystem=fs, partition_cols=["part"], ray_remote_args=stage_remote_args() or None)


def build_score_pipeline(cfg: RerankConfig, parts: list[int], plan: dict, *, measures: list[str] | None):
    """The uncommitted partitions, one per ``map_batches`` call of a ScorePartitions actor (see rerank_partition)."""
    import ray

    from kalm_batch.pipelines.cluster import stage_remote_args, worker_pool
    from kalm_batch.pipelines.rerank_partition import ScorePartitions

    strategy, resources, _ = worker_pool(cfg.workers, cfg.gpus_per_worker)
    items = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=max(1, len(parts)))
    return items.map_batches(
        ScorePartitions, batch_size=1, compute=strategy,
        fn_constructor_args=(cfg.model, cfg.store, cfg.out),
        fn_constructor_kwargs={
            "stages": plan["stages"], "store_version": plan["store"]["version"], "plan_id": plan["plan_id"], "tag": cfg.tag,
            "storage_options": cfg.storage_options, "dtype": cfg.dtype, "instruction": cfg.instruction,
            "batch_size": cfg.batch_size, "query_max_length": cfg.query_max_length,
            "max_tokens_per_batch": cfg.max_tokens_per_batch, "pairs_per_block": cfg.pairs_per_block,
            "cpu_threads": cfg.cpu_threads, "measures": measures},
        **resources, **stage_remote_args())


# ----- the job -------------------------------------------------------------------------------------------------
def run_rerank(cfg: RerankConfig) -> RerankSummary:
    """Run (or resume) the whole job; outputs are committed under ``cfg.out`` (``--dry-run``: nothing written)."""
    from kalm_batch.pipelines.cluster import init_ray
    from kalm_batch.pipelines.rerank_stages import dry_run_report

    start = time.perf_counter()
    reader, reranker = open_checked_store(cfg.store, cfg.model, version=cfg.store_version,
                                          allow_mismatch=cfg.allow_mismatch, storage_options=cfg.storage_options)
    stages = plan_stages(ratios=store_ratios(reader), cascade=cfg.cascade, ratio=cfg.ratio, top_k=cfg.top_k)
    files = input_files(cfg)
    partitions = cfg.partitions or auto_partitions(files["candidates"], cfg.storage_options)
    plan = make_plan(cfg, reader, reranker, stages, files, partitions)
    if not cfg.dry_run:  # refuse a foreign --out before starting anything
        O.claim_output(cfg.out, plan, overwrite=cfg.overwrite, storage_options=cfg.storage_options)
    init_ray(cfg.address, num_cpus=cfg.num_cpus)
    if cfg.dry_run:
        joined = build_records_pipeline(cfg, files, top_k=stages[0].k, partitions=partitions,
                                        index_urls=reader.index_files())
        return dry_run_report(cfg, joined, reader, stages, start)
    prepared = _prepare(cfg, reader, files, stages, plan)
    prepare_s = time.perf_counter() - start
    committed = set(O.done_parts(cfg.out, cfg.storage_options))
    todo = [p for p in prepared["parts"] if p not in committed]
    t = time.perf_counter()
    if todo:
        _score(cfg, todo, plan, prepared, committed)
    score_wall = time.perf_counter() - t
    return _commit(cfg, reader, plan, prepared, stages, start=start, prepare_s=prepare_s, score_wall=score_wall,
                   scored_now=len(todo))


def _prepare(cfg: RerankConfig, reader, files: dict, stages: list[Stage], plan: dict) -> dict:
    """The prepared partitions (``_work/prepared.json``), computed once per plan."""
    marker = fsio.join_url(cfg.out, runfolder.PREPARED_MARKER)
    if fsio.exists(marker, cfg.storage_options):
        prepared = fsio.read_json(marker, cfg.storage_options)
        if prepared.get("plan_id") == plan["plan_id"]:
            log.info("inputs already prepared (%d partitions, %d pairs to score); resuming", len(prepared["parts"]),
                     prepared["pairs_found"])
            return prepared
    from kalm_batch.pipelines.rerank_stages import count_prepared

    t = time.perf_counter()
    O.remove_prepared(cfg.out, cfg.storage_options)  # a killed earlier attempt may have left some files
    write_prepared(cfg, build_records_pipeline(cfg, files, top_k=stages[0].k, partitions=plan["partitions"],
                                               index_urls=reader.index_files()))
    prepared = {"plan_id": plan["plan_id"], **count_prepared(cfg.out, cfg.storage_options),
                "seconds": round(time.perf_counter() - t, 3)}
    fsio.write_json_atomic(marker, prepared, cfg.storage_options)
    log.info("prepared %d partitions: %d input pairs, %d in the store (%.1f s)", len(prepared["parts"]),
             prepared["input_pairs"], prepared["pairs_found"], prepared["seconds"])
    return prepared


def _score(cfg: RerankConfig, todo: list[int], plan: dict, prepared: dict, committed: set[int]) -> None:
    """Execute the score pipeline, logging one progress line per committed partition."""
    measures = None
    if cfg.qrels:
        from kalm_batch.metrics import DEFAULT_MEASURES

        measures = list(DEFAULT_MEASURES)
    total = prepared["pairs_found"]
    done_before = sum(c["pairs_scored"] for c in O.read_done(cfg.out, sorted(committed), plan["plan_id"],
                                                             cfg.storage_options)) if committed else 0
    scored, t0 = 0, time.perf_counter()
    for i, row in enumerate(build_score_pipeline(cfg, todo, plan, measures=measures).iter_rows(), start=1):
        c = json.loads(row["counters"])
        scored += c["pairs_scored"]
        rate = scored / max(time.perf_counter() - t0, 1e-9)
        left = max(0, total - done_before - scored)
        log.info("rerank progress: partition %d committed (%d/%d this run); pairs scored %d/%d (%.1f%%), %.1f pairs/s, "
                 "ETA %.0f s", c["part"], i, len(todo), done_before + scored, total,
                 100.0 * (done_before + scored) / max(total, 1), rate, left / rate if rate else float("nan"))


def _commit(cfg: RerankConfig, reader, plan: dict, prepared: dict, stages: list[Stage], *, start: float,
            prepare_s: float, score_wall: float, scored_now: int) -> RerankSummary:
    from kalm_batch.pipelines.rerank_stages import add_counters

    so = cfg.storage_options
    t_commit = time.perf_counter()
    parts = prepared["parts"]
    counters = O.read_done(cfg.out, parts, plan["plan_id"], so)
    total = add_counters(counters, stages, score_wall)
    if total["input_pairs"] != total["pairs_scored"] + sum(total["skipped"].values()):
        raise RuntimeError(f"pair accounting does not add up: {total['input_pairs']} input pairs != "
                           f"{total['pairs_scored']} scored + {sum(total['skipped'].values())} skipped; the outputs in "
                           f"{cfg.out} are left uncommitted")
    outputs = {name: fsio.join_url(cfg.out, name) for name in runfolder.DATASETS}
    if total["run_lines"] <= cfg.merge_limit:
        outputs["run.trec"] = O.merge_run(cfg.out, parts, so)
    metrics = _metrics(cfg, total.pop("metrics"))
    if metrics:
        outputs["metrics"] = fsio.join_url(cfg.out, "metrics.json")
        fsio.write_json_atomic(outputs["metrics"], metrics, so)
        log.info("metrics:\n%s", metrics["table"])
    outputs["summary"] = fsio.join_url(cfg.out, "summary.json")
    wall = time.perf_counter() - start
    fetch_s, score_s = total.pop("fetch_decode_s"), total.pop("score_s")
    summary = RerankSummary(
        out=cfg.out, store=reader.summary(), **total,
        pairs_per_s=round(total["pairs_scored"] / score_wall, 2) if score_wall and scored_now else 0.0,
        wall_s=round(wall, 3), prepare_s=round(prepare_s, 3), score_wall_s=round(score_wall, 3),
        fetch_decode_s=round(fetch_s, 4), score_s=round(score_s, 4),
        fetch_decode_share=round(fetch_s / (fetch_s + score_s), 4) if fetch_s + score_s else 0.0,
        commit_s=round(time.perf_counter() - t_commit, 3), partitions={"total": len(parts), "scored_now": scored_now, "already_committed": len(parts) - scored_now},
        metrics=metrics["runs"] if metrics else None, metrics_table=metrics["table"] if metrics else None,
        outputs=outputs)
    record = {**summary.model_dump(), "config": cfg.model_dump(exclude={"storage_options"}), "plan": plan}
    fsio.write_json_atomic(outputs["summary"], record, so)
    O.commit(cfg.out, {"plan_id": plan["plan_id"], "store": plan["store"], "partitions": len(parts),
                       "pairs_scored": summary.pairs_scored}, so)
    return summary


def _metrics(cfg: RerankConfig, sums: dict[str, list[dict]]) -> dict | None:
    if not cfg.qrels:
        return None
    from kalm_batch.metrics import DEFAULT_MEASURES, format_table, mean_of_sums

    runs = {name: mean_of_sums(parts) for name, parts in sums.items()}
    return {"measures": list(DEFAULT_MEASURES), "qrels": cfg.qrels, "runs": runs, "table": format_table(runs),
            "how": "per-query ir-measures values summed in the workers, divided by the judged queries here"}


def run_eval(run_url: str, qrels_url: str, storage_options: dict | None = None) -> dict:
    """``kalm-batch eval``: nDCG@10, RR@10 and R@100 of a TREC run against qrels (BEIR TSV or TREC), via ir-measures.
    A run file inside a rerank output folder that was never committed is refused."""
    from kalm_batch.metrics import eval_files

    if runfolder.is_run_folder(run_url, storage_options):
        runfolder.require_committed(run_url, storage_options)
        run_url = fsio.join_url(run_url, "run.trec")
    runfolder.check_run_file(run_url, storage_options)
    return eval_files(run_url, qrels_url, storage_options=storage_options)
