"""The scorer deployment: store memories (or freshly encoded raw texts) through the decoder half, batched.

``ScorerCore`` is the Ray-free part: it opens the store, refuses a store whose fingerprint does not match the model
(``kalm_batch.store.check_compatible``), resolves a ``ScoreJob`` into (prompt ids, memory) pairs and runs the decoder. Only
the decoder half is loaded at start-up; the encoder is loaded the first time a raw-text request arrives, and raw-text
memories are cached by sha256 of the text (and the truncation length) in a bounded LRU.

``open_compatible_store`` is the one place the store is opened and checked against the model (start-up check and
replicas alike). The model lock is first-come first-served (``FairLock``) and a raw-text request encodes in steps of
``max_encode_tokens`` encoder tokens, so a small request's decode runs between a large request's encoder steps.

``KaLMScorer`` wraps it in a Serve deployment. Requests are cut into chunks of at most ``max_pairs_per_batch``
pairs and ``max_batch_tokens`` (prompt tokens + memory vectors), and ``@serve.batch`` gathers chunks from concurrent
requests. A request keeps one chunk in the batch queue at a time, so chunks of concurrent requests interleave
(round robin) and a small request waits for about one batch behind a large one, not for the whole of it. Ray 2.60's ``serve.batch`` supports
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

from kalm_batch.batching import round_up, token_budget_batches
from kalm_batch.prompts import document_text
from kalm_batch.reranker import KaLMReranker, Memory, Scores
from kalm_batch.serve.follow import StoreFollower
from kalm_batch.serve.schemas import BatchingConfig, ErrorInfo, ScoreJob, ScoreOutcome, ServeConfig
from kalm_batch.serve.startup import start_with_retries
from kalm_batch.store import check_compatible, open_store
from kalm_batch.textlimits import tokenize_prefix

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


class FairLock:
    """A first-come, first-served lock: a thread releasing it cannot barge back in ahead of the waiters (a plain
    ``threading.Lock`` lets a large request's encoder steps starve a small request's decode)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def locked(self) -> bool:
        with self._cond:
            return self._serving != self._next_ticket


def open_compatible_store(cfg: ServeConfig, reranker: KaLMReranker, cache_bytes: int | None = None):
    """The store reader for ``cfg.store`` (at ``cfg.store_version``, default the latest), refused unless
    ``reranker``'s model made it.

    Used by the start-up check (``app.preflight``); replicas open versions through ``StoreFollower`` with the same
    ``check_compatible``. Raises ``StoreError`` (missing/incomplete/unreadable store or version) or
    ``StoreMismatchError`` (another model or hidden size): errors no retry can fix.
    """
    reader = open_store(cfg.store, version=cfg.store_version, storage_options=cfg.storage_options,
                        cache_bytes=cfg.cache_bytes if cache_bytes is None else cache_bytes)
    check_compatible(reader, reranker, allow_mismatch=cfg.allow_mismatch)
    return reader


def scorer_reranker(cfg: ServeConfig) -> KaLMReranker:
    """The scorer's reranker (tokenizer and config only: each half loads on first use)."""
    return KaLMReranker(cfg.model, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.max_pairs_per_batch,
                        max_tokens_per_batch=cfg.max_tokens_per_batch)


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
        self.reranker = scorer_reranker(cfg)
        self.follower = StoreFollower(  # owns the current reader; a newer version must pass the same check
            cfg.store, version=cfg.store_version, poll_s=cfg.store_poll_s, storage_options=cfg.storage_options,
            cache_bytes=cfg.cache_bytes,
            check=lambda r: check_compatible(r, self.reranker, allow_mismatch=cfg.allow_mismatch))
        first = self.follower.current()
        # raw texts are encoded as the store's passages were
        self.reranker.chunk_size, self.reranker.max_length = first.ratio, first.summary()["max_length"]
        self.texts = TextMemoryCache(cfg.text_cache_bytes)
        self.model_lock = FairLock()  # one forward at a time (encode and decode share the cores), first come first
        self.encode_step_tokens = cfg.max_encode_tokens  # encoder tokens per locked step (user_config)
        self.reranker.decoder_half  # noqa: B018 - load the decoder now, so the first request is not slow

    @property
    def ready(self) -> bool:
        """The store is open and the decoder loaded (what ``/health`` waits for)."""
        return self.follower is not None and self.reranker._decoder is not None

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
        try:
            ratio = reader.check_ratio(job.ratio)  # any positive multiple of the store's r0
        except ValueError as e:
            return ErrorInfo(422, "invalid_ratio", f"ratio {job.ratio} cannot be served by this store: {e}",
                             {"valid_ratios": reader.ratios})
        if job.reject_overlong and (err := self._overlong_query(job.queries)) is not None:
            return err
        if job.instruction is not None and (err := self._long_instruction(job.instruction)) is not None:
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
            if len(tokenize_prefix(self.reranker.tokenizer, [q], limit + 1)[0]) > limit:
                return ErrorInfo(413, "query_too_long", f"the query has more than {limit} tokens, the model's "
                                 f"query_max_length; send truncate=true to truncate it",
                                 {"field": "query", "query_max_length": limit})
        return None

    def _long_instruction(self, instruction: str) -> ErrorInfo | None:
        limit = self.cfg.max_instruction_tokens
        if len(tokenize_prefix(self.reranker.tokenizer, [instruction], limit + 1)[0]) > limit:
            return ErrorInfo(413, "instruction_too_long", f"instruction has more than {limit} tokens; the limit is "
                             f"{limit} (max_instruction_tokens)", {"field": "instruction", "limit": limit})
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
        # cut by characters first: ids up to limit + 1 (one more tells TEI truncate=false that a text is too long)
        token_ids = tokenize_prefix(self.reranker.tokenizer, [document_text(t) for t in todo], limit + 1)
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
                return ErrorInfo(413, "document_too_long", f"texts[{i}] has more than {limit} tokens, the model's "
                                 f"max_length; send truncate=true to truncate it",
                                 {"field": f"texts[{i}]", "index": i, "max_length": limit})
        return None

    def _encode(self, texts: list[str], token_ids: list[list[int]], limit: int) -> dict[str, tuple[Memory, int]]:
        """Encode (on first use this loads the encoder) and cache; values are (memory at r0, untruncated length)."""
        kept = [list(ids[:limit]) for ids in token_ids]
        out = {}
        # in steps of at most encode_step_tokens, taking the model lock per step: decodes of other requests run
        # between a large request's steps
        for step in token_budget_batches([len(k) for k in kept], self.reranker.batch_size, self.encode_step_tokens):
            with self.model_lock:
                mems = self.reranker.encode_ids([kept[i] for i in step], ratio=self.reader.ratio)
            for i, mem in zip(step, mems):
                self.texts.put(TextMemoryCache.key(texts[i], limit), mem, len(token_ids[i]))
                out[texts[i]] = (mem, len(token_ids[i]))
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
    max_batch_tokens: int = 2048

    def size(self, chunks: list[_Chunk]) -> int:
        pairs = sum(len(c.prompts) for c in chunks)
        if len(chunks) == 1:
            return min(pairs, self.max_pairs_per_batch)  # a lone chunk always fits, even after a reconfigure
        if len(chunks) > self.max_batch_size or sum(c.tokens for c in chunks) > self.max_batch_tokens:
            return self.max_pairs_per_batch + 1  # over budget: serve.batch defers the last chunk
        return pairs

    def chunks(self, job_key: int, prompts: list[list[int]], memories: list[Memory]) -> list[_Chunk]:
        """Consecutive pairs cut into chunks of at most ``max_pairs_per_batch`` pairs and ``max_batch_tokens``
        (prompt tokens, padded to 8 as the decoder pads them, + memory vectors); a lone oversized pair still forms
        a chunk of its own."""
        out: list[_Chunk] = []
        start, tokens = 0, 0
        for i, (p, m) in enumerate(zip(prompts, memories)):
            cost = pair_cost(p, m)
            if i > start and (i - start >= self.max_pairs_per_batch or tokens + cost > self.max_batch_tokens):
                out.append(_Chunk(job_key, prompts[start:i], memories[start:i], self, tokens))
                start, tokens = i, 0
            tokens += cost
        if start < len(prompts):
            out.append(_Chunk(job_key, prompts[start:], memories[start:], self, tokens))
        return out


def pair_cost(prompt: list[int], memory: Memory) -> int:
    """A pair's share of a decoder batch: its prompt tokens (padded to 8) + its memory vectors."""
    return round_up(len(prompt), 8) + memory.vectors.shape[0]


@dataclass
class _Chunk:
    job_key: int
    prompts: list[list[int]]
    memories: list[Memory]
    limits: BatchLimits
    tokens: int = 0


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
        self.recent.append({"requests": requests, "chunks": len(chunks), "pairs": pairs,
                            "tokens": sum(c.tokens for c in chunks)})
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
        # one clear error, at once, for what no retry fixes (Serve is set to allow one failed start); see startup.py
        self.core = start_with_retries(lambda: ScorerCore(cfg), attempts=cfg.startup_attempts,
                                       what="the scorer replica")
        self.ready_since = time.time()  # unix time the replica became ready (its store open, decoder loaded)
        self.stats = BatchStats()
        self.limits = BatchLimits(cfg.max_batch_size, cfg.max_pairs_per_batch, cfg.max_batch_tokens)
        self._jobs = self._ongoing = 0
        self.reconfigure(cfg.batching())

    def reconfigure(self, user_config: dict) -> None:
        b = BatchingConfig.model_validate(user_config or {})
        self.limits.max_batch_size, self.limits.max_pairs_per_batch = b.max_batch_size, b.max_pairs_per_batch
        self.limits.max_batch_tokens, self.core.encode_step_tokens = b.max_batch_tokens, b.max_encode_tokens
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
        # one chunk of a request in the batch queue at a time: the queue then holds at most one chunk per request,
        # so a small request sent while a large one runs waits for one batch, not for all of the large one's
        parts = [await self._score_batch(c) for c in self.limits.chunks(self._jobs, resolved.prompts,
                                                                         resolved.memories)]
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
        return {**self.core.info(), "batching": self.batching.model_dump(), "ready_since": self.ready_since}

    def batch_stats(self) -> dict:
        """Recent batch sizes, plus what is in progress (``model_busy``: an encode or decode is running)."""
        return {**self.stats.as_dict(), "ongoing_requests": self._ongoing,
                "model_busy": self.core.model_lock.locked()}

    def ping(self) -> bool:
        return True

    def ready(self) -> bool:
        """True once the store is open and the decoder loaded (the constructor does both before Serve routes here)."""
        return self.core.ready
