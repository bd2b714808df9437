"""The scorer deployment: store memories (or freshly encoded raw texts) through the decoder half, batched.

``ScorerCore`` is the Ray-free part: it opens the store, refuses a store whose fingerprint does not match the model
(``kalm_batch.store.check_compatible``), resolves a ``ScoreJob`` into (prompt ids, memory) pairs and runs the decoder. Only
the decoder half is loaded at start-up; the encoder is loaded the first time a raw-text request arrives, and raw-text
memories are cached by sha256 of the text (and the truncation length) in a bounded LRU.

``KaLMScorer`` wraps it in a Serve deployment. Requests are cut into chunks of at most ``max_pairs_per_batch``
pairs, and ``@serve.batch`` gathers chunks from concurrent requests. Ray 2.60's ``serve.batch`` supports
``batch_size_fn``: the queue's ``max_batch_size`` is set to the *pair* budget and ``_batch_size`` counts pairs, and
reports a batch with more than ``max_batch_size`` chunks as over budget, so both limits hold. (Ray warns when its
``max_batch_size`` — here the pair budget — exceeds ``max_ongoing_requests``; with pairs as the unit that warning is
a false alarm, since every request carries many pairs.) The knobs are the deployment's ``user_config``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch
from ray import serve

from kalm_batch.reranker import KaLMReranker, Memory, Scores
from kalm_batch.prompts import document_text
from kalm_batch.serve.schemas import BatchingConfig, ErrorInfo, ScoreJob, ScoreOutcome, ServeConfig
from kalm_batch.serve.follow import StoreFollower
from kalm_batch.store import check_compatible, open_store

logger = logging.getLogger("ray.serve")
_MAX_LISTED_IDS = 50


class TextMemoryCache:
    """Raw-text memories at the store's r0, keyed by (sha256 of the text, truncation length), bounded by bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._items: OrderedDict[tuple[str, int], tuple[Memory, int]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(text: str, max_length: int) -> tuple[str, int]:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(), max_length

    def get(self, key: tuple[str, int]) -> tuple[Memory, int] | None:
        with self._lock:
            item = self._items.get(key)
            self.hits, self.misses = self.hits + (item is not None), self.misses + (item is None)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[str, int], memory: Memory, full_tokens: int) -> None:
        size = memory.vectors.element_size() * memory.vectors.numel()
        with self._lock:
            if size > self.max_bytes or key in self._items:
                return
            self._items[key] = (memory, full_tokens)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (old, _) = self._items.popitem(last=False)
                self.bytes -= old.vectors.element_size() * old.vectors.numel()

    def info(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "bytes": self.bytes, "entries": len(self._items),
                "max_bytes": self.max_bytes}


@dataclass
class Resolved:
    """A job turned into decoder inputs, pair by pair."""

    prompts: list[list[int]]
    memories: list[Memory]
    ratio: int
    store_version: int | None = None  # the store version the memories came from


class ScorerCore:
    """Store reader + decoder-only reranker (encoder on demand); no Ray in here."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        first = open_store(cfg.store, version=cfg.store_version, storage_options=cfg.storage_options, cache_bytes=0)
        self.reranker = KaLMReranker(cfg.model, device=cfg.device, dtype=cfg.dtype, chunk_size=first.ratio,
                                     max_length=first.summary()["max_length"], batch_size=cfg.max_pairs_per_batch,
                                     max_tokens_per_batch=cfg.max_tokens_per_batch)
        self.follower = StoreFollower(  # owns the current reader; a newer version must pass the same check
            cfg.store, version=cfg.store_version, poll_s=cfg.store_poll_s, storage_options=cfg.storage_options,
            cache_bytes=cfg.cache_bytes,
            check=lambda r: check_compatible(r, self.reranker, allow_mismatch=cfg.allow_mismatch))
        self.texts = TextMemoryCache(cfg.text_cache_bytes)
        self.model_lock = threading.Lock()  # one forward at a time: encode and decode share the cores
        self.reranker.decoder_half  # noqa: B018 - load the decoder now, so the first request is not slow

    @property
    def reader(self):
        """The store version requests now start on (``resolve`` takes it once per request)."""
        return self.follower.current()

    # ----- resolving a job ---------------------------------------------------------------------------------------
    def resolve(self, job: ScoreJob) -> Resolved | ErrorInfo:
        reader = self.reader  # one version for the whole request, even if the follower switches meanwhile
        resolved = self._resolve(job, reader)
        if isinstance(resolved, Resolved):
            resolved.store_version = reader.version
        return resolved

    def _resolve(self, job: ScoreJob, reader) -> Resolved | ErrorInfo:
        ratio = reader.ratio if job.ratio is None else job.ratio
        if ratio not in reader.ratios:
            return ErrorInfo(422, "invalid_ratio", f"ratio {job.ratio} cannot be served by this store (stored at "
                             f"r0={reader.ratio}); valid ratios: {reader.ratios}",
                             {"valid_ratios": reader.ratios})
        if job.reject_overlong and (err := self._overlong_query(job.queries)) is not None:
            return err
        by_id = self._store_memories([d.value for d in job.docs if d.kind == "id"], ratio, job.request_id, reader)
        if isinstance(by_id, ErrorInfo):
            return by_id
        by_text = self._text_memories(job, ratio)
        if isinstance(by_text, ErrorInfo):
            return by_text
        prompts: dict[str, list[int]] = {}
        for q in dict.fromkeys(job.queries):
            prompts[q] = self.reranker.prompt_ids(q, job.instruction)
        mems = [by_id[d.value] if d.kind == "id" else by_text[d.value] for d in job.docs]
        return Resolved([prompts[q] for q in job.queries], mems, ratio)

    def _overlong_query(self, queries: list[str]) -> ErrorInfo | None:
        limit = self.reranker.query_max_length
        for q in dict.fromkeys(queries):
            n = len(self.reranker.tokenizer(q, add_special_tokens=False)["input_ids"])
            if n > limit:
                return ErrorInfo(413, "query_too_long", f"the query has {n} tokens, more than the model's "
                                 f"query_max_length of {limit}; send truncate=true to truncate it",
                                 {"tokens": n, "query_max_length": limit})
        return None

    def _store_memories(self, ids: list[str], ratio: int, request_id: str | None,
                        reader=None) -> dict[str, Memory] | ErrorInfo:
        if not ids:
            return {}
        reader = reader or self.reader
        got = reader.fetch(ids, ratio)
        if got.missing:
            shown = got.missing[:_MAX_LISTED_IDS]
            more = f" (and {len(got.missing) - len(shown)} more)" if len(got.missing) > len(shown) else ""
            return ErrorInfo(404, "unknown_document_ids", f"{len(got.missing)} document id(s) are not in the "
                             f"store (version {reader.version}): {shown}{more}",
                             {"unknown_document_ids": shown, "store_version": reader.version})
        if got.corrupt:
            logger.error("request %s: corrupt store records: %s", request_id, got.corrupt)
            return ErrorInfo(500, "corrupt_record", "corrupt store record(s): " + "; ".join(got.corrupt.values()),
                             {"corrupt_document_ids": sorted(got.corrupt)})
        return got.memories

    def _text_memories(self, job: ScoreJob, ratio: int) -> dict[str, Memory] | ErrorInfo:
        texts = list(dict.fromkeys(d.value for d in job.docs if d.kind == "text"))
        limit = self.reranker.max_length
        if job.max_doc_tokens is not None:
            limit = min(limit, job.max_doc_tokens)
        found = {t: hit for t in texts if (hit := self.texts.get(TextMemoryCache.key(t, limit))) is not None}
        todo = [t for t in texts if t not in found]
        token_ids = self.reranker.tokenizer([document_text(t) for t in todo], add_special_tokens=False)[
            "input_ids"] if todo else []
        if job.reject_overlong:
            lengths = {t: n for t, (_, n) in found.items()} | {t: len(ids) for t, ids in zip(todo, token_ids)}
            if (err := self._overlong_text(job, lengths)) is not None:
                return err
        found.update(self._encode(todo, token_ids, limit))
        return {t: mem.at_ratio(ratio) for t, (mem, _) in found.items()}

    def _overlong_text(self, job: ScoreJob, lengths: dict[str, int]) -> ErrorInfo | None:
        limit = self.reranker.max_length
        for i, d in enumerate(job.docs):
            n = lengths.get(d.value, 0) if d.kind == "text" else 0
            if n > limit:
                return ErrorInfo(413, "document_too_long", f"texts[{i}] has {n} tokens, more than the model's "
                                 f"max_length of {limit}; send truncate=true to truncate it",
                                 {"index": i, "tokens": n, "max_length": limit})
        return None

    def _encode(self, texts: list[str], token_ids: list[list[int]], limit: int) -> dict[str, tuple[Memory, int]]:
        """Encode (on first use this loads the encoder) and cache; values are (memory at r0, untruncated length)."""
        if not texts:
            return {}
        with self.model_lock:
            mems = self.reranker.encode_ids([list(ids[:limit]) for ids in token_ids], ratio=self.reader.ratio)
        out = {}
        for t, ids, mem in zip(texts, token_ids, mems):
            self.texts.put(TextMemoryCache.key(t, limit), mem, len(ids))
            out[t] = (mem, len(ids))
        return out

    # ----- scoring -----------------------------------------------------------------------------------------------
    def decode(self, prompts: list[list[int]], memories: list[Memory]) -> Scores:
        with self.model_lock:
            return self.reranker.score_prompt_ids(prompts, memories)

    @property
    def encoder_loaded(self) -> bool:
        return getattr(self.reranker, "_encoder", None) is not None

    def info(self) -> dict:
        r = self.reranker
        return {
            "model": {"id": self.cfg.model, "fingerprint": r.fingerprint.to_dict(), "dtype": str(r.dtype).replace(
                "torch.", ""), "device": str(r.device), "hidden_size": r.hidden_size, "max_length": r.max_length,
                "query_max_length": r.query_max_length, "decoder_loaded": r._decoder is not None,
                "encoder_loaded": self.encoder_loaded},
            "store": {"url": self.cfg.store, "documents": len(self.reader), **self.reader.summary(),
                      "follow": self.follower.info()},
            "ratios": self.reader.ratios,
            "cache": self.reader.cache_info(),
            "text_cache": self.texts.info(),
        }


@dataclass
class BatchLimits:
    """The live batching knobs, shared by every chunk so that ``_batch_size`` can read them."""

    max_batch_size: int
    max_pairs_per_batch: int

    def size(self, chunks: list["_Chunk"]) -> int:
        pairs = sum(len(c.prompts) for c in chunks)
        if len(chunks) == 1:
            return min(pairs, self.max_pairs_per_batch)  # a lone chunk always fits, even after a reconfigure
        if len(chunks) > self.max_batch_size:
            return self.max_pairs_per_batch + 1  # over budget: serve.batch defers the last chunk
        return pairs


@dataclass
class _Chunk:
    job_key: int
    prompts: list[list[int]]
    memories: list[Memory]
    limits: BatchLimits


def _batch_size(chunks: list[_Chunk]) -> int:
    return chunks[0].limits.size(chunks) if chunks else 0


class BatchStats:
    """Sizes of the last batches, to observe that concurrent requests were batched together."""

    def __init__(self, keep: int = 256):
        self.recent: deque[dict] = deque(maxlen=keep)
        self.batches = self.pairs = self.max_requests = self.max_pairs = 0
        self.multi_request_batches = self.decoded_pairs = 0
        self.decode_seconds = 0.0

    def record(self, chunks: list[_Chunk]) -> None:
        requests, pairs = len({c.job_key for c in chunks}), sum(len(c.prompts) for c in chunks)
        self.recent.append({"requests": requests, "chunks": len(chunks), "pairs": pairs})
        self.batches, self.pairs = self.batches + 1, self.pairs + pairs
        self.max_requests, self.max_pairs = max(self.max_requests, requests), max(self.max_pairs, pairs)
        self.multi_request_batches += requests > 1

    def done(self, pairs: int, seconds: float) -> None:
        self.decoded_pairs, self.decode_seconds = self.decoded_pairs + pairs, self.decode_seconds + seconds

    def as_dict(self) -> dict:
        return {"batches": self.batches, "pairs": self.pairs, "decoded_pairs": self.decoded_pairs,
                "decode_seconds": round(self.decode_seconds, 3), "max_requests_per_batch": self.max_requests,
                "max_pairs_per_batch_seen": self.max_pairs, "multi_request_batches": self.multi_request_batches,
                "recent": list(self.recent)[-32:]}


@serve.deployment(name="KaLMScorer", max_ongoing_requests=64)
class KaLMScorer:
    """Scorer replica: decoder half + store reader (+ encoder on demand), batching chunks of concurrent requests."""

    def __init__(self, config: dict):
        cfg = ServeConfig.model_validate(config)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.core = ScorerCore(cfg)
        self.stats = BatchStats()
        self.limits = BatchLimits(cfg.max_batch_size, cfg.max_pairs_per_batch)
        self._jobs = self._ongoing = 0
        self.reconfigure(cfg.batching())

    def reconfigure(self, user_config: dict) -> None:
        b = BatchingConfig.model_validate(user_config or {})
        self.limits.max_batch_size, self.limits.max_pairs_per_batch = b.max_batch_size, b.max_pairs_per_batch
        self.batching = b
        self.core.reranker.batch_size = b.max_pairs_per_batch
        self._score_batch.set_max_batch_size(b.max_pairs_per_batch)
        self._score_batch.set_batch_wait_timeout_s(b.batch_wait_timeout_s)

    async def score(self, job: ScoreJob) -> ScoreOutcome:
        self._ongoing += 1
        try:
            return await self._score(job)
        finally:
            self._ongoing -= 1

    async def _score(self, job: ScoreJob) -> ScoreOutcome:
        resolved = await asyncio.to_thread(self.core.resolve, job)
        out = ScoreOutcome(model_id=self.core.cfg.model)
        if isinstance(resolved, ErrorInfo):
            out.error = resolved
            return out
        self._jobs += 1
        step = self.limits.max_pairs_per_batch
        chunks = [_Chunk(self._jobs, resolved.prompts[i: i + step], resolved.memories[i: i + step], self.limits)
                  for i in range(0, len(resolved.prompts), step)]
        parts = await asyncio.gather(*(self._score_batch(c) for c in chunks))
        for s in parts:
            out.p_yes += s.p_yes.tolist()
            out.margin += s.margin.tolist()
        out.doc_tokens = [m.n_tokens for m in resolved.memories]
        out.prompt_tokens = [len(p) for p in resolved.prompts]
        out.ratio = resolved.ratio
        out.store_version = resolved.store_version
        return out

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.01, batch_size_fn=_batch_size)
    async def _score_batch(self, chunks: list[_Chunk]) -> list[Scores]:
        self.stats.record(chunks)
        prompts = [p for c in chunks for p in c.prompts]
        memories = [m for c in chunks for m in c.memories]
        t0 = time.perf_counter()
        scores = await asyncio.to_thread(self.core.decode, prompts, memories)
        self.stats.done(len(prompts), time.perf_counter() - t0)
        out, start = [], 0
        for c in chunks:
            end = start + len(c.prompts)
            out.append(Scores(scores.p_yes[start:end], scores.margin[start:end]))
            start = end
        return out

    def info(self) -> dict:
        return {**self.core.info(), "batching": self.batching.model_dump()}

    def batch_stats(self) -> dict:
        """Recent batch sizes, plus what is in progress (``model_busy``: an encode or decode is running)."""
        return {**self.stats.as_dict(), "ongoing_requests": self._ongoing,
                "model_busy": self.core.model_lock.locked()}

    def ping(self) -> bool:
        return True
