"""The corpus encode job: a corpus into a memory store (a Delta table), refreshing what changed, resumable.

Ray Data does the distribution (read tasks, actor pools for tokenizing and encoding, data-file writers, progress
bars, retries). Two things are ours, on purpose:
- The store is its own checkpoint. Committed versions carry their doc ids and text hashes; a re-run reads them and
  skips the rows whose text is unchanged, re-encodes the changed ones (refresh) and adds the new ones.
- Data files are written by our actors (not ``write_delta``) in the layout point lookups need, and committed by the
  driver through ``StoreWriter`` every ``commit_every_files`` files or ``commit_every_minutes`` (one table version
  each): a killed job loses at most the work since its last commit, and no version ever holds an id twice.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

from pydantic import BaseModel, Field

from kalm_batch.corpus import JOIN_MODES, CorpusFormat, list_corpus_files
from kalm_batch.model import DEFAULT_MODEL
from kalm_batch.pipelines import encode_stages as S
from kalm_batch.pipelines.cluster import init_ray, parse_workers, stage_remote_args, worker_pool
from kalm_batch.store.errors import StoreError
from kalm_batch.store.writer import CommitResult, StoreWriter, settings_for

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
    workers: int | str = Field("auto", description="encoder actors: auto (one per GPU, else one per 8 CPUs), N, or "
                               "MIN:MAX (a pool that grows on an autoscaling cluster)")
    gpus_per_worker: float | None = Field(None, description="GPUs per encoder actor (default: 1 if the cluster has GPUs)")
    max_tokens_per_batch: int = Field(16384, ge=1, description="padded-token budget per encoder forward")
    batch_size: int = Field(64, ge=1, description="max passages per encoder forward")
    rows_per_task: int | None = Field(None, ge=1, description="passages handed to an encoder actor at once: its "
                                      "length-sort window (a larger window pads less; see BENCHMARKS.md). Default: "
                                      "1024, fewer when long passages at a small ratio would make a call's memories "
                                      "large (at most 2^18 vectors per call)")
    shard_rows: int = Field(1024, ge=1, description="passages per data file")
    refresh: bool = Field(True, description="re-encode stored passages whose text changed (--no-refresh keeps their "
                                            "stale memories and lists them in the run's changed.jsonl)")
    delete_missing: bool = Field(False, description="also delete stored passages whose id the corpus no longer has")
    commit_every_files: int = Field(64, ge=1, description="commit progress (one table version) every N data files")
    commit_every_minutes: float = Field(10.0, gt=0, description="... or every M minutes, whichever comes first")
    overwrite: bool = Field(False, description="replace a store made with other settings (a new version)")
    storage_options: dict | None = Field(None, description="fsspec options for the corpus and store URLs")
    num_cpus: int | None = Field(None, description="CPUs for a local Ray (default: all)")
    cpu_threads: int | None = Field(None, description="torch threads per encoder actor on CPU (default: the "
                                                      "node's CPUs / workers)")


class EncodeSummary(BaseModel):
    store: str
    version: int                   # the table version holding this run's result
    input_rows: int                # = stored_new + refreshed + skipped_existing + rejected
    stored_new: int
    refreshed: int = 0             # stored ids whose text changed: re-encoded and replaced
    deleted: int = 0               # stored ids absent from the corpus, deleted (--delete-missing)
    skipped_existing: int
    changed_since_stored: int = 0  # skipped ids whose text changed (--no-refresh; the run's changed.jsonl)
    commits: int = 0               # table versions this run committed
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
        keys = ["version", "input_rows", "stored_new", "refreshed", "deleted", "skipped_existing",
                "changed_since_stored", "commits", "rejected", "truncated",
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
    from kalm_batch.pooling import (
        n_vectors,  # torch: the driver has it by now (run_encode loads the tokenizer first)
    )

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
    return plan.remote(ray.put(committed), files, cfg.refresh, *id_refs)


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
        fn_constructor_kwargs={"model": cfg.model, "ratio": cfg.ratio, "max_length": cfg.max_length,
                                   "dtype": cfg.model_dtype, "codec_dtype": cfg.dtype, "level": cfg.level,
                                   "max_tokens_per_batch": cfg.max_tokens_per_batch, "batch_size": cfg.batch_size,
                                   "cpu_threads": cfg.cpu_threads or max(1, (os.cpu_count() or 1) // max_workers)})
    return encoded.map_batches(
        S.WriteShards, batch_size=cfg.shard_rows, batch_format="pyarrow", num_cpus=0.25,
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

    The corpus is read twice: an ids pass that plans duplicates, refreshes and deletions, and the streaming pass that
    encodes. On a fresh store both start at once (the keep stage waits for the plan while the encoder actors load);
    on an existing store the plan comes first so that a run with nothing to encode starts no encoder at all.
    """
    import ray

    from kalm_batch.reranker import KaLMReranker

    start = time.perf_counter()
    files = list_corpus_files(cfg.corpus, cfg.storage_options)
    probe = KaLMReranker(cfg.model, chunk_size=cfg.ratio, max_length=cfg.max_length)  # tokenizer + config only
    writer = StoreWriter(cfg.store, settings_for(probe, dtype=cfg.dtype, text_join=cfg.join), level=cfg.level,
                         storage_options=cfg.storage_options)
    committed = writer.prepare(overwrite=cfg.overwrite)
    init_ray(cfg.address, num_cpus=cfg.num_cpus)
    drop_ref, plan_ref = _launch_plan(cfg, files, committed)
    plan: S.EncodePlan | None = None if not committed else ray.get(plan_ref)
    progress = _Progress(writer, cfg)
    if plan is None or plan.to_encode > 0:
        for row in build_encode_pipeline(cfg, files, drop_ref).iter_rows():
            progress.add(row)
    plan = plan or ray.get(plan_ref)
    if plan.good_rows == 0:
        errors_url = writer.record_errors(plan.rejected)
        raise NoGoodRowsError(f"every one of the {plan.input_rows} input rows of {cfg.corpus} was rejected; nothing "
                              f"was stored. See {errors_url} for the reasons.")
    errors_url = writer.record_errors(plan.rejected, plan.changed)
    _report_changed(plan, errors_url)
    stats = {"corpus": cfg.corpus, "files": len(files), "input_rows": plan.input_rows, "text_join": cfg.join}
    progress.commit(delete_ids=plan.absent if cfg.delete_missing else (), stats=stats, final=True)
    return _finish(cfg, writer, start, plan, progress, errors_url)


class _Progress:
    """The driver's side of the stream: written data files, committed every N files or M minutes."""

    def __init__(self, writer: StoreWriter, cfg: EncodeConfig):
        self.writer, self.cfg = writer, cfg
        self.rows: list[dict] = []
        self.pending: list[dict] = []
        self.commits: list[CommitResult] = []
        self.last = time.monotonic()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.pending.append({"path": row["path"], "size": int(row["size"]), "rows": int(row["rows"])})
        if (len(self.pending) >= self.cfg.commit_every_files
                or time.monotonic() - self.last >= 60 * self.cfg.commit_every_minutes):
            self.commit()

    def commit(self, delete_ids=(), stats: dict | None = None, final: bool = False) -> None:
        result = self.writer.commit(self.pending, delete_ids=delete_ids, stats=stats,
                                    operation="encode" if final else "encode (progress)")
        if result is not None:
            self.commits.append(result)
            log.info("committed version %d of %s: %d new, %d refreshed, %d deleted", result.version,
                     self.cfg.store, result.new, result.refreshed, result.deleted)
        self.pending, self.last = [], time.monotonic()


def _report_changed(plan: S.EncodePlan, errors_url: str) -> None:
    """Skipped ids whose text is not the text that was encoded (--no-refresh): say so, never silently."""
    if plan.changed:
        log.warning("%d passages are already stored under their id but their text has changed since (e.g. %r); their "
                    "stored memories are stale and were NOT re-encoded (--no-refresh). Listed in %s. Run without "
                    "--no-refresh to refresh them.", len(plan.changed), plan.changed[0]["doc_id"],
                    errors_url.replace("rejected.jsonl", "changed.jsonl"))


def _finish(cfg, writer: StoreWriter, start, plan: S.EncodePlan, progress: _Progress, errors_url) -> EncodeSummary:
    input_rows, rejected, rows = plan.input_rows, plan.rejected, progress.rows
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[_reason_kind(r["reason"])] = by_reason.get(_reason_kind(r["reason"]), 0) + 1
    stored_new = sum(c.new for c in progress.commits)
    refreshed = sum(c.refreshed for c in progress.commits)
    if input_rows != stored_new + refreshed + len(plan.skip) + len(rejected):
        raise StoreError(f"row accounting does not add up: {input_rows} input rows != {stored_new} new + {refreshed} "
                         f"refreshed + {len(plan.skip)} already stored + {len(rejected)} rejected")
    tokens = sum(r["tokens"] for r in rows)
    padded = sum(r["padded_positions"] for r in rows)
    secs = time.perf_counter() - start
    encoded = sum(r["rows"] for r in rows)
    mem_bytes = sum(r["memory_bytes"] for r in rows)
    busy = sum(r["encode_seconds"] for r in rows)
    return EncodeSummary(
        store=cfg.store, version=writer.version, input_rows=input_rows, stored_new=stored_new, refreshed=refreshed,
        deleted=sum(c.deleted for c in progress.commits), skipped_existing=len(plan.skip),
        changed_since_stored=len(plan.changed), commits=len(progress.commits),
        rejected=len(rejected), rejected_by_reason=by_reason, truncated=sum(r["truncated"] for r in rows),
        tokens=tokens, seconds=round(secs, 3), docs_per_s=round(encoded / secs, 2),
        tokens_per_s=round(tokens / secs, 1), padding_ratio=round(1 - tokens / padded, 4) if padded else 0.0,
        bytes_written=sum(r["size"] for r in rows), bytes_per_doc=round(mem_bytes / encoded, 1) if encoded else 0.0,
        store_rows=writer.rows, worker_peak_rss_mb=max([r["worker_rss_mb"] for r in rows], default=0.0),
        encoder_seconds=round(busy, 2), encoder_busy_share=round(busy / (secs * _pool_size(cfg)), 3) if secs else 0.0,
        encoder_load_seconds=round(max([r["encoder_load_seconds"] for r in rows], default=0.0), 2),
        errors_file=errors_url)
