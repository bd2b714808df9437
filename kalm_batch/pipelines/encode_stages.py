"""The encode job's stages as plain callables (Ray Data runs them; tests can call them directly).

ids pass (one CPU task per file) -> plan (duplicates, already-stored ids)
read (CPU tasks) -> keep (waits for the plan) -> tokenize (CPU actors) -> encode + pool + codec (GPU/CPU actors,
encoder half only) -> write data files (CPU actors). Rows are dicts of numpy columns up to the encoder; from the
encoder to the data files batches stay Arrow tables.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kalm_batch.batching import PaddingStats
from kalm_batch.corpus import CorpusFormat, Passage, read_corpus_file
from kalm_batch.pipelines.cluster import process_peak_rss_mb
from kalm_batch.store.layout import as_data_table, write_data_file
from kalm_batch.store.writer import memory_table, text_hash
from kalm_batch.textlimits import tokenize_prefix

CHANGED_TEXT = "text changed since it was stored"

def read_file_rows(item: dict, fmt: CorpusFormat, storage_options: dict | None) -> list[dict]:
    """Every row of one corpus file, good or rejected (``reason`` non-empty), tagged with its file index.

    Good rows carry ``reason == ""`` rather than None: a block whose column is all None would lose its string type.
    """
    rows = []
    for x in read_corpus_file(item["url"], fmt, storage_options):
        good = isinstance(x, Passage)
        rows.append({
            "doc_id": x.doc_id, "text": x.text if good else None, "source": x.source, "line": x.line,
            "file_index": item["file_index"], "reason": "" if good else x.reason, "raw": "" if good else (x.raw or ""),
        })
    return rows


def read_file_ids(url: str, file_index: int, fmt: CorpusFormat, storage_options: dict | None) -> pa.Table:
    """The first pass over one file: every row's id, location and rejection reason, without the text."""
    rows = read_file_rows({"url": url, "file_index": file_index}, fmt, storage_options)
    return pa.table({
        "doc_id": pa.array([r["doc_id"] for r in rows], pa.string()),
        "source": pa.array([r["source"] for r in rows], pa.string()),
        "line": pa.array([r["line"] for r in rows], pa.int64()),
        "file_index": pa.array([r["file_index"] for r in rows], pa.int64()),
        "reason": pa.array([r["reason"] for r in rows], pa.string()),
        "raw": pa.array([r["raw"] for r in rows], pa.string()),
        "text_sha256": pa.array([text_hash(r["text"]) if r["text"] is not None else "" for r in rows], pa.string()),
    })


def rejected_rows(ids: pa.Table) -> list[dict]:
    """Rows the readers rejected (bad JSON, missing fields, unreadable files...), for errors/rejected.jsonl."""
    bad = ids.filter(pc.not_equal(ids.column("reason"), "")).to_pylist()
    return [{"source": r["source"], "line": r["line"], "doc_id": r["doc_id"], "reason": r["reason"],
             "raw": r["raw"] or None} for r in bad]


@dataclass
class EncodePlan:
    """Decisions made from the ids alone: duplicates, rows already stored (skipped), rows to refresh, ids to delete."""

    duplicates: dict[tuple[int, int], str] = field(default_factory=dict)  # (file_index, line) -> reason
    skip: set[tuple[int, int]] = field(default_factory=set)               # rows stored with this text (or no refresh)
    refresh: set[tuple[int, int]] = field(default_factory=set)            # stored rows whose text changed: re-encoded
    good_rows: int = 0
    input_rows: int = 0
    rejected: list[dict] = field(default_factory=list)                    # reader rejections, then duplicates
    changed: list[dict] = field(default_factory=list)                     # stale rows kept (--no-refresh)
    absent: list[str] = field(default_factory=list)                       # stored ids the corpus no longer has

    @property
    def drop(self) -> set[tuple[int, int]]:
        return set(self.duplicates) | self.skip

    @property
    def to_encode(self) -> int:
        return self.good_rows - len(self.duplicates) - len(self.skip)


def plan_encode(ids: pa.Table, committed: dict[str, str], files: list[str], refresh: bool = True) -> EncodePlan:
    """Keep the first occurrence of each doc id (by file, then line); later ones are rejected as duplicates.

    ``committed`` maps the ids already in the store to their text hash: rows with the same text are skipped; rows
    whose text changed are re-encoded (``plan.refresh``), or with ``refresh=False`` skipped and listed in
    ``plan.changed`` (their stored memory stays stale). Stored ids the corpus lacks are listed in ``plan.absent``.
    """
    good = ids.filter(pc.equal(ids.column("reason"), ""))
    good = good.sort_by([("file_index", "ascending"), ("line", "ascending")])
    plan = EncodePlan(good_rows=good.num_rows, input_rows=ids.num_rows, rejected=rejected_rows(ids))
    first: dict[str, tuple[str, int]] = {}
    for doc_id, fi, line, source, sha in zip(*(good.column(c).to_pylist() for c in (
            "doc_id", "file_index", "line", "source", "text_sha256"))):
        if doc_id in first:
            src, ln = first[doc_id]
            plan.duplicates[(fi, line)] = f"duplicate doc_id {doc_id!r} (first seen at {src}:{ln}); kept the first"
            continue
        first[doc_id] = (source, line)
        if doc_id in committed:
            stale = committed[doc_id] != sha
            if stale and refresh:
                plan.refresh.add((fi, line))
                continue
            plan.skip.add((fi, line))
            if stale:
                plan.changed.append({"source": source, "line": line, "doc_id": doc_id, "reason": CHANGED_TEXT})
    for (fi, line), reason in sorted(plan.duplicates.items()):
        plan.rejected.append({"source": files[fi], "line": line, "doc_id": None, "reason": reason, "raw": None})
    plan.absent = [d for d in committed if d not in first]
    return plan


def plan_from_id_tables(committed: dict[str, str], files: list[str], refresh: bool,
                        *tables: pa.Table) -> tuple[set, EncodePlan]:
    """The plan from the first pass's per-file tables; returns (rows to drop, plan) so the drop set can travel alone."""
    plan = plan_encode(pa.concat_tables(tables), committed, files, refresh)
    return plan.drop, plan


def keep_rows(batch: dict, drop: set[tuple[int, int]]) -> dict:
    """Good rows that are neither duplicates nor already stored."""
    mask = np.array([r == "" and (int(f), int(ln)) not in drop
                     for r, f, ln in zip(batch["reason"], batch["file_index"], batch["line"])], dtype=bool)
    return {k: np.asarray(batch[k])[mask] for k in ("doc_id", "text", "source", "line")}


class TokenizeRows:
    """Encoder token ids per passage ("<Document>: " + text, truncated like the reference)."""

    def __init__(self, model: str, max_length: int):
        from kalm_batch.model import load_tokenizer, resolve_model_dir
        from kalm_batch.prompts import document_text

        self._document_text = document_text
        self.tokenizer = load_tokenizer(resolve_model_dir(model)[0])
        self.max_length = max_length

    def __call__(self, batch: dict) -> dict:
        texts = [self._document_text(t) for t in batch["text"]]
        ids = tokenize_prefix(self.tokenizer, texts, self.max_length + 1)  # a long text is cut by characters first
        return {
            "doc_id": batch["doc_id"], "source": batch["source"], "line": batch["line"],
            "text_sha256": np.array([text_hash(t) for t in batch["text"]], dtype=object),
            "token_ids": np.array([np.asarray(x[: self.max_length], dtype=np.int32) for x in ids] + [None],
                                  dtype=object)[:-1],
            "truncated": np.array([len(x) > self.max_length for x in ids], dtype=bool),
        }


class EncodeRows:
    """Encoder half + MEP pooling + codec, on one GPU (or a CPU share). Sorts each batch by length under a budget."""

    def __init__(self, model: str, ratio: int, max_length: int, dtype: str | None, codec_dtype: str, level: int,
                 max_tokens_per_batch: int, batch_size: int, device: str | None = None,
                 cpu_threads: int | None = None):
        t0 = time.perf_counter()
        import torch

        from kalm_batch.reranker import KaLMReranker

        if cpu_threads and not torch.cuda.is_available():
            torch.set_num_threads(cpu_threads)  # Ray pins OMP threads to the actor's (fractional) CPU share
        self.reranker = KaLMReranker(model, device=device, dtype=dtype, chunk_size=ratio, max_length=max_length,
                                     max_tokens_per_batch=max_tokens_per_batch, batch_size=batch_size)
        self.codec_dtype, self.level = codec_dtype, level
        self.load_seconds = time.perf_counter() - t0  # imports + encoder load: the actor's fixed cost

    def __call__(self, batch: dict) -> pa.Table:
        t0 = time.perf_counter()
        stats = PaddingStats()
        memories = self.reranker.encode_ids([list(x) for x in batch["token_ids"]], stats=stats)
        table = memory_table(list(batch["doc_id"]), memories, list(batch["text_sha256"]), list(batch["source"]),
                             [int(x) for x in batch["line"]], self.codec_dtype, self.level)
        n = len(memories)
        busy = (time.perf_counter() - t0) / max(n, 1)
        # per-row accounting columns (padding, busy time spread over the rows; the load time is per actor: max)
        extra = {
            "truncated": pa.array(np.asarray(batch["truncated"], dtype=bool)),
            "padded_positions": pa.array(np.full(n, stats.total_tokens / max(n, 1), dtype=np.float64)),
            "worker_rss_mb": pa.array(np.full(n, process_peak_rss_mb(), dtype=np.float64)),
            "encode_seconds": pa.array(np.full(n, busy, dtype=np.float64)),
            "encoder_load_seconds": pa.array(np.full(n, self.load_seconds, dtype=np.float64)),
        }
        for name, col in extra.items():
            table = table.append_column(name, col)
        return table


class WriteShards:
    """The data-file writer as a small actor: it starts with the pipeline, so no process start-up sits at the job's
    tail. Each batch (an Arrow table of up to ``shard_rows`` encoded passages) becomes one data file + its index."""

    def __init__(self, store_url: str, storage_options: dict | None):
        self.store_url, self.storage_options = store_url, storage_options

    def __call__(self, batch: pa.Table) -> dict:
        return write_shard_batch(batch, self.store_url, self.storage_options)


def write_shard_batch(batch: pa.Table, store_url: str, storage_options: dict | None) -> dict:
    """One data file per batch (not yet committed); returns one row describing it (for the commit and the summary)."""
    info = write_data_file(store_url, as_data_table(batch), storage_options)

    def total(name: str) -> float:
        return float(pc.sum(batch.column(name)).as_py() or 0)

    def peak(name: str) -> float:
        return float(pc.max(batch.column(name)).as_py() or 0)

    return {
        "path": [info["path"]], "size": [info["size"]], "rows": [info["rows"]],
        "tokens": [int(total("n_tokens"))], "vectors": [int(total("n_vectors"))],
        "memory_bytes": [int(total("nbytes"))], "truncated": [int(pc.sum(pc.cast(batch.column("truncated"),
                                                                              pa.int64())).as_py() or 0)],
        "padded_positions": [total("padded_positions")], "worker_rss_mb": [peak("worker_rss_mb")],
        "encode_seconds": [total("encode_seconds")], "encoder_load_seconds": [peak("encoder_load_seconds")],
    }
