"""The corpus encode job: shard a corpus across workers into a memory store (resumable, exactly once).

Ray Data does the distribution (read tasks, actor pools for tokenizing and encoding, shard-writing tasks, progress
bars, retries). Two things are ours, on purpose:
- The store is its own checkpoint. Committed shards carry their doc ids; a re-run reads them and skips those rows.
  Ray Data's CheckpointConfig would keep a second id log beside the store, needs a Ray Data write sink, and names
  output files per task rather than by content — a retried task could then add duplicate rows.
- Shards are written by our task (not ``write_parquet``) so each file is named by its doc ids (a retry rewrites the
  same file), committed atomically, and reported back (rows, bytes, sha256) for the manifest.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

from pydantic import BaseModel, Field

from kalm_batch import fsio
from kalm_batch.corpus import JOIN_MODES, CorpusFormat, list_corpus_files
from kalm_batch.model import DEFAULT_MODEL
from kalm_batch.pipelines import encode_stages as S
from kalm_batch.pipelines.cluster import init_ray, parse_workers, stage_remote_args, worker_pool
from kalm_batch.store.manifest import Manifest, ShardInfo, StoreError
from kalm_batch.store.writer import CHANGED_FILE, finalize_store, prepare_store, settings_for, write_errors

log = logging.getLogger(__name__)


class EncodeConfig(BaseModel):
    """Settings of one encode run (the CLI and jobs/encode_corpus.py build this from flags)."""

    model: str = Field(DEFAULT_MODEL, description="checkpoint directory or hub id")
    corpus: str = Field(description="corpus file, directory or glob (JSONL/Parquet; any fsspec URL)")
    store: str = Field(description="store URL to create or resume (file://, s3://, gs://, local path)")
    ratio: int = Field(4, description="MEP chunk size r0 the memories are pooled at (1, 2, 4, 8, 16, 32)")
    dtype: Literal["bfloat16", "float16", "float32", "int8"] = Field("bfloat16", description="codec dtype")
    level: int = Field(3, ge=1, le=22, description="zstd level of the memory codec")
    model_dtype: str | None = Field(None, description="compute dtype (default bf16 on GPU, fp32 on CPU)")
    max_length: int = Field(1024, ge=2, description="encoder truncation length in tokens (prefix included)")
    id_field: str = Field("_id", description="id column/key")
    text_field: str = Field("text", description="text column/key")
    title_field: str | None = Field("title", description="title column/key (None: no title)")
    join: str = Field("title_space_text", description=f"how title and text are joined: {', '.join(JOIN_MODES)}")
    address: str | None = Field(None, description="Ray address: None/'local' starts a local Ray, 'auto' joins one")
    workers: int | str = Field("auto", description="encoder actors: auto (one per GPU, else one per 8 CPUs), N, or MIN:MAX "
                         "(a pool that grows on an autoscaling cluster)")
    gpus_per_worker: float | None = Field(None, description="GPUs per encoder actor (default: 1 if the cluster has GPUs)")
    max_tokens_per_batch: int = Field(16384, ge=1, description="padded-token budget per encoder forward")
    batch_size: int = Field(64, ge=1, description="max passages per encoder forward")
    rows_per_task: int | None = Field(None, ge=1, description="passages handed to an encoder actor at once: its "
                                      "length-sort window (a larger window pads less; see BENCHMARKS.md). Default: "
                                      "1024, fewer when long passages at a small ratio would make a call's memories "
                                      "large (at most 2^18 vectors per call)")
    shard_rows: int = Field(1024, ge=1, description="passages per Parquet shard")
    overwrite: bool = Field(False, description="delete an existing store made with other settings")
    storage_options: dict | None = Field(None, description="fsspec options for the corpus and store URLs")
    num_cpus: int | None = Field(None, description="CPUs for a local Ray (default: all)")
    cpu_threads: int | None = Field(None, description="torch threads per encoder actor on CPU (default: the "
                                                      "node's CPUs / workers)")


class EncodeSummary(BaseModel):
    store: str
    input_rows: int
    stored_new: int
    skipped_existing: int
    changed_since_stored: int = 0  # skipped ids whose text changed since they were stored (errors/changed.jsonl)
    rejected: int
    rejected_by_reason: dict[str, int]
    truncated: int
    tokens: int
    seconds: float
    docs_per_s: float
    tokens_per_s: float
    padding_ratio: float
    bytes_written: int
    bytes_per_doc: float
    store_rows: int
    worker_peak_rss_mb: float
    encoder_seconds: float = 0.0      # encoder actors' busy time (encode + pool + codec), summed over actors
    encoder_busy_share: float = 0.0   # encoder_seconds / (workers x seconds): how much of the job the encoders worked
    encoder_load_seconds: float = 0.0  # slowest actor's start (imports + encoder load)
    errors_file: str

    def table(self) -> str:
        keys = ["input_rows", "stored_new", "skipped_existing", "changed_since_stored", "rejected", "truncated",
                "tokens", "seconds", "docs_per_s", "tokens_per_s", "padding_ratio", "bytes_written", "bytes_per_doc", "store_rows",
                "worker_peak_rss_mb", "encoder_seconds", "encoder_busy_share", "encoder_load_seconds"]
        width = max(map(len, keys))
        return "\n".join(f"{k:<{width}}  {getattr(self, k)}" for k in keys)


class NoGoodRowsError(StoreError):
    """Every input row was rejected: nothing to store."""


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].split("(", 1)[0].strip()[:60]


MAX_SORT_WINDOW = 1024          # passages per encoder call: padding vs a global sort 1.036x over the stdlib sample
MAX_VECTORS_PER_CALL = 1 << 18  # worst case ~335 MB of bf16 memories at hidden 640 before the codec


def default_rows_per_task(ratio: int, max_length: int) -> int:
    """The encoder actor's sort window: 1024 passages, or fewer so that one call's memories stay bounded even if every
    passage reaches max_length (max_length / ratio vectors each)."""
    from kalm_batch.pooling import n_vectors  # torch: the driver has it by now (run_encode loads the tokenizer first)

    return max(64, min(MAX_SORT_WINDOW, MAX_VECTORS_PER_CALL // n_vectors(max_length, ratio)))


def _pool_size(cfg: EncodeConfig) -> int:
    """The encoder actors a run sized its pool to (the largest, for MIN:MAX)."""
    from kalm_batch.pipelines.cluster import auto_workers

    sizes = parse_workers(cfg.workers)
    return sizes[1] if sizes else auto_workers(cfg.gpus_per_worker)


def _format(cfg: EncodeConfig) -> CorpusFormat:
    return CorpusFormat(id_field=cfg.id_field, text_field=cfg.text_field, title_field=cfg.title_field, join=cfg.join)


def _launch_plan(cfg: EncodeConfig, files: list[str], committed: dict[str, str]):
    """The ids pass (one task per file) and the plan built from it, launched without waiting: (drop_ref, plan_ref).

    Plain Ray tasks rather than a Ray Data execution on purpose: a Ray Data execution blocks the driver, and this pass
    must run while the streaming pipeline below starts its encoder actors (process start, imports and model load are
    the job's largest fixed cost on small corpora).
    """
    import ray

    remote = {"num_cpus": 0.25, **stage_remote_args()}
    read_ids = ray.remote(S.read_file_ids).options(**remote)
    id_refs = [read_ids.remote(url, i, _format(cfg), cfg.storage_options) for i, url in enumerate(files)]
    plan = ray.remote(S.plan_from_id_tables).options(num_returns=2, **remote)
    return plan.remote(ray.put(committed), files, *id_refs)


def build_encode_pipeline(cfg: EncodeConfig, files: list[str], drop_ref):
    """read -> keep (waits for the plan) -> tokenize -> encode -> write: one streaming Ray Data execution."""
    import ray

    pool, res, (_, max_workers) = worker_pool(cfg.workers, cfg.gpus_per_worker)
    remote = stage_remote_args()
    items = [{"url": u, "file_index": i} for i, u in enumerate(files)]
    rows = ray.data.from_items(items, override_num_blocks=max(1, len(items))).flat_map(
        S.read_file_rows, fn_kwargs={"fmt": _format(cfg), "storage_options": cfg.storage_options},
        num_cpus=0.25, **remote)
    keep = rows.map_batches(_keep_rows, fn_kwargs={"drop_ref": drop_ref}, batch_format="numpy", num_cpus=0.25)
    tokens = keep.map_batches(
        S.TokenizeRows, fn_constructor_kwargs={"model": cfg.model, "max_length": cfg.max_length},
        batch_size=256, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25, **remote)
    encoded = tokens.map_batches(
        S.EncodeRows, batch_size=cfg.rows_per_task or default_rows_per_task(cfg.ratio, cfg.max_length),
        batch_format="numpy",
        compute=pool, **res, **remote,
        fn_constructor_kwargs=dict(model=cfg.model, ratio=cfg.ratio, max_length=cfg.max_length,
                                   dtype=cfg.model_dtype, codec_dtype=cfg.dtype, level=cfg.level,
                                   max_tokens_per_batch=cfg.max_tokens_per_batch, batch_size=cfg.batch_size,
                                   cpu_threads=cfg.cpu_threads or max(1, (os.cpu_count() or 1) // max_workers)))
    return encoded.map_batches(
        S.WriteShards, batch_size=cfg.shard_rows, batch_format="numpy", num_cpus=0.25,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_workers),
        fn_constructor_kwargs={"store_url": cfg.store, "storage_options": cfg.storage_options}, **remote)


_DROP_CACHE: dict = {}


def _keep_rows(batch: dict, drop_ref) -> dict:
    import ray

    key = drop_ref.hex()
    if key not in _DROP_CACHE:
        _DROP_CACHE.clear()
        _DROP_CACHE[key] = ray.get(drop_ref)
    return S.keep_rows(batch, _DROP_CACHE[key])


def run_encode(cfg: EncodeConfig) -> EncodeSummary:
    """Run the whole job (local Ray unless ``cfg.address``); returns the summary, the store is committed.

    The corpus is read twice: an ids pass that plans duplicates and resumption, and the streaming pass that encodes.
    On a fresh store both start at once (the keep stage waits for the plan while the encoder actors load); when
    resuming, the plan comes first so that a run with nothing left to do starts no encoder at all.
    """
    import ray

    from kalm_batch.reranker import KaLMReranker

    start = time.perf_counter()
    files = list_corpus_files(cfg.corpus, cfg.storage_options)
    probe = KaLMReranker(cfg.model, chunk_size=cfg.ratio, max_length=cfg.max_length)  # tokenizer + config only
    settings = settings_for(probe, dtype=cfg.dtype, text_join=cfg.join)
    committed = prepare_store(cfg.store, settings, overwrite=cfg.overwrite, storage_options=cfg.storage_options)
    init_ray(cfg.address, num_cpus=cfg.num_cpus)
    drop_ref, plan_ref = _launch_plan(cfg, files, committed)
    plan: S.EncodePlan | None = None if not committed else ray.get(plan_ref)
    shard_rows = []
    if plan is None or plan.to_encode > 0:
        shard_rows = build_encode_pipeline(cfg, files, drop_ref).take_all()
    plan = plan or ray.get(plan_ref)
    if plan.good_rows == 0:
        write_errors(cfg.store, plan.rejected, cfg.storage_options)
        raise NoGoodRowsError(f"every one of the {plan.input_rows} input rows of {cfg.corpus} was rejected; nothing "
                              f"was stored. See {fsio.join_url(cfg.store, 'errors/rejected.jsonl')} for the reasons.")
    errors_url = write_errors(cfg.store, plan.rejected, cfg.storage_options)
    _report_changed(cfg, plan)
    return _finish(cfg, settings, start, len(files), plan, shard_rows, errors_url)


def _report_changed(cfg: EncodeConfig, plan: S.EncodePlan) -> None:
    """Skipped ids whose text is not the text that was encoded: their stored memory is stale. Say so, never silently."""
    url = write_errors(cfg.store, plan.changed, cfg.storage_options, name=CHANGED_FILE)
    if plan.changed:
        log.warning("%d passages are already stored under their id but their text has changed since (e.g. %r); their "
                    "stored memories are stale and were NOT re-encoded. Listed in %s. Encode the corpus into a new "
                    "store to refresh them.", len(plan.changed), plan.changed[0]["doc_id"], url)


def _finish(cfg, settings, start, n_files, plan: S.EncodePlan, shard_rows, errors_url) -> EncodeSummary:
    input_rows, rejected = plan.input_rows, plan.rejected
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[_reason_kind(r["reason"])] = by_reason.get(_reason_kind(r["reason"]), 0) + 1
    new = [ShardInfo(name=r["name"], rows=r["rows"], bytes=r["bytes"], sha256=r["sha256"]) for r in shard_rows]
    stored_new = sum(r["rows"] for r in shard_rows)
    tokens = sum(r["tokens"] for r in shard_rows)
    padded = sum(r["padded_positions"] for r in shard_rows)
    stats = {"corpus": cfg.corpus, "files": n_files, "input_rows": input_rows, "stored_new": stored_new,
             "skipped_existing": len(plan.skip), "changed_since_stored": len(plan.changed),
             "rejected": len(rejected), "rejected_by_reason": by_reason,
             "truncated": sum(r["truncated"] for r in shard_rows), "text_join": cfg.join,
             "errors_file": errors_url}
    manifest: Manifest = finalize_store(cfg.store, settings, level=cfg.level, new_shards=new, input_stats=stats,
                                        storage_options=cfg.storage_options)
    if input_rows != stored_new + len(plan.skip) + len(rejected):
        raise StoreError(f"row accounting does not add up: {input_rows} input rows != {stored_new} stored + "
                         f"{len(plan.skip)} already stored + {len(rejected)} rejected")
    secs = time.perf_counter() - start
    mem_bytes = sum(r["memory_bytes"] for r in shard_rows)
    busy = sum(r["encode_seconds"] for r in shard_rows)
    return EncodeSummary(
        store=cfg.store, input_rows=input_rows, stored_new=stored_new, skipped_existing=len(plan.skip),
        changed_since_stored=len(plan.changed),
        rejected=len(rejected), rejected_by_reason=by_reason, truncated=stats["truncated"], tokens=tokens,
        seconds=round(secs, 3), docs_per_s=round(stored_new / secs, 2), tokens_per_s=round(tokens / secs, 1),
        padding_ratio=round(1 - tokens / padded, 4) if padded else 0.0,
        bytes_written=sum(r["bytes"] for r in shard_rows),
        bytes_per_doc=round(mem_bytes / stored_new, 1) if stored_new else 0.0, store_rows=manifest.rows,
        worker_peak_rss_mb=max([r["worker_rss_mb"] for r in shard_rows], default=0.0),
        encoder_seconds=round(busy, 2), encoder_busy_share=round(busy / (secs * _pool_size(cfg)), 3) if secs else 0.0,
        encoder_load_seconds=round(max([r["encoder_load_seconds"] for r in shard_rows], default=0.0), 2),
        errors_file=errors_url)
