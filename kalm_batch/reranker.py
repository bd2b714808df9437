"""KaLMReranker: the official KaLM-Reranker-V1 scoring, split at the encoder/decoder seam.

``encode`` turns passages into pooled *memories* (query-independent); ``score_memories`` runs only the decoder
against memories, however they were obtained (fresh, or decoded from a store). ``predict`` and ``rank`` — the
official API — are built from these two halves, so there is one scoring code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kalm_batch import model as M
from kalm_batch.batching import PaddingStats, round_up, token_budget_batches
from kalm_batch.memory import Memory  # re-exported: kalm_batch.reranker.Memory
from kalm_batch.pooling import check_ratio, mep_pool, n_vectors
from kalm_batch.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_INSTRUCTION, decoder_text, document_text
from kalm_batch.textlimits import tokenize_prefix

_UNSET = object()


@dataclass(frozen=True)
class Scores:
    """P(yes) (the score) and the yes-no logit margin, float32 arrays in input order."""

    p_yes: np.ndarray
    margin: np.ndarray


def _check_text(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__} ({value!r:.60})")
    return value


def _check_pairs(pairs) -> list[tuple[str, str]]:
    if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__len__"):
        raise TypeError("pairs must be a list of (query, document) pairs")
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise TypeError(f"pairs[{i}] must be a (query, document) pair, got {pair!r:.80}")
        out.append((_check_text(pair[0], f"pairs[{i}][0] (query)"), _check_text(pair[1], f"pairs[{i}][1] (document)")))
    return out


_ACCEPTED_KWARGS = ("attn_implementation", "torch_dtype", "trust_remote_code")


def _from_pretrained_kwargs(dtype, kwargs: dict) -> tuple[object, str | None]:
    """(dtype, attn_implementation) from the extra keyword arguments the official class passes to from_pretrained."""
    unknown = sorted(set(kwargs) - set(_ACCEPTED_KWARGS))
    if unknown:
        raise TypeError(f"KaLMReranker got unexpected keyword argument(s) {unknown}; of from_pretrained's arguments "
                        f"only {list(_ACCEPTED_KWARGS)} apply here")
    if "torch_dtype" in kwargs:
        if dtype is not None and kwargs["torch_dtype"] != dtype:
            raise TypeError(f"dtype={dtype!r} and torch_dtype={kwargs['torch_dtype']!r} disagree; pass only dtype")
        dtype = kwargs["torch_dtype"]
    attn = kwargs.get("attn_implementation")
    if attn is not None and not isinstance(attn, str):
        raise TypeError(f"attn_implementation must be a string such as 'sdpa' or 'eager', got {attn!r}")
    return dtype, attn


def _check_documents(documents) -> list[str]:
    if isinstance(documents, (str, bytes)) or not hasattr(documents, "__len__"):
        raise TypeError(f"documents must be a list of strings, got {type(documents).__name__}")
    return [_check_text(d, f"documents[{i}]") for i, d in enumerate(documents)]


def _check_batch_size(batch_size) -> int | None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


class KaLMReranker:
    """Drop-in for the official ``KaLMReranker``; loads each half of the model only when first used.

    Args mirror the official class. ``max_tokens_per_batch`` bounds padded tokens per forward (batches are sorted by
    length); ``revision`` pins a hub revision. Of the extra keyword arguments the official class hands to
    ``from_pretrained``, those that matter here are accepted: ``attn_implementation`` ("sdpa", "eager",
    "flash_attention_2"; reaches both half-model builds), ``torch_dtype`` (the old name of ``dtype``) and
    ``trust_remote_code`` (no effect: T5Gemma2 is part of transformers). Any other raises TypeError naming it.
    """

    def __init__(self, model_name_or_path: str = M.DEFAULT_MODEL, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, batch_size: int = 32, query_max_length: int = 512,
                 max_length: int = 1024, chunk_size: int | None = 4, instruction: str | None = None,
                 system_instruction: str | None = None, revision: str | None = None,
                 max_tokens_per_batch: int = 32768, **model_kwargs):
        check_ratio(chunk_size, warn=True)
        dtype, self.attn_implementation = _from_pretrained_kwargs(dtype, model_kwargs)
        for name, v in (("batch_size", batch_size), ("query_max_length", query_max_length),
                        ("max_length", max_length), ("max_tokens_per_batch", max_tokens_per_batch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.model_name_or_path = model_name_or_path
        self.device = M.resolve_device(device, check_available=True)
        self.dtype = M.resolve_dtype(dtype, self.device)
        self.batch_size, self.query_max_length, self.max_length = batch_size, query_max_length, max_length
        self.chunk_size = chunk_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.instruction = _check_text(instruction if instruction is not None else DEFAULT_INSTRUCTION, "instruction")
        self.system_instruction = _check_text(
            system_instruction if system_instruction is not None else DEFAULT_SYSTEM_INSTRUCTION, "system_instruction")
        self.model_dir, rev = M.resolve_model_dir(model_name_or_path, revision)
        self.config = M.load_config(self.model_dir)
        self.tokenizer = M.load_tokenizer(self.model_dir)
        self.yes_no = M.yes_no_ids(self.tokenizer)
        self.fingerprint = M.fingerprint(self.model_dir, model_name_or_path, rev)
        self.hidden_size = self.config.decoder.hidden_size
        self._encoder = None
        self._decoder = None

    # ----- halves, loaded on first use -------------------------------------------------------------------------
    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = M.load_encoder(self.model_dir, self.dtype, self.device, self.config,
                                           self.attn_implementation)
        return self._encoder

    @property
    def decoder_half(self) -> M.DecoderHalf:
        if self._decoder is None:
            self._decoder = M.load_decoder(self.model_dir, self.yes_no, self.dtype, self.device, self.config,
                                           self.attn_implementation)
        return self._decoder

    # ----- encode ------------------------------------------------------------------------------------------------
    def tokenize_documents(self, documents: Sequence[str]) -> list[list[int]]:
        """Encoder token ids: "<Document>: " + text, no special tokens, truncated to ``max_length`` (prefix included)."""
        texts = [document_text(_check_text(d, f"documents[{i}]")) for i, d in enumerate(documents)]
        if not texts:
            return []
        return tokenize_prefix(self.tokenizer, texts, self.max_length)  # a long text is cut by characters first

    def encode(self, documents: Sequence[str], *, ratio=_UNSET) -> list[Memory]:
        """Memories of ``documents`` at ``ratio`` (default: the constructor's ``chunk_size``), in input order."""
        return self.encode_ids(self.tokenize_documents(documents), ratio=ratio)

    @torch.inference_mode()
    def encode_ids(self, token_ids: Sequence[Sequence[int]], *, ratio=_UNSET,
                   stats: PaddingStats | None = None) -> list[Memory]:
        r = self.chunk_size if ratio is _UNSET else check_ratio(ratio)
        for i, ids in enumerate(token_ids):
            if len(ids) == 0:
                raise ValueError(f"token_ids[{i}] is empty; every passage has at least the document prefix")
        out: list[Memory | None] = [None] * len(token_ids)
        lengths = [len(ids) for ids in token_ids]
        for batch in token_budget_batches(lengths, self.batch_size, self.max_tokens_per_batch):
            longest = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), longest), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = torch.tensor(token_ids[i])
                mask[row, : lengths[i]] = 1
            if stats is not None:
                stats.add([lengths[i] for i in batch], longest)
            states = self.encoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            pooled, _ = mep_pool(states, mask.to(self.device), r)
            pooled = pooled.cpu()
            for row, i in enumerate(batch):
                out[i] = Memory(pooled[row, : n_vectors(lengths[i], r)].clone(), lengths[i], r)
        return out  # type: ignore[return-value]

    # ----- score -------------------------------------------------------------------------------------------------
    def truncate_query(self, query: str) -> str:
        ids = tokenize_prefix(self.tokenizer, [query], self.query_max_length)[0]
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def prompt(self, query: str, instruction: str | None = None) -> str:
        """The decoder text for ``query``, byte for byte as the reference builds it."""
        ins = self.instruction if instruction is None else _check_text(instruction, "instruction")
        return decoder_text(self.truncate_query(_check_text(query, "query")), ins, self.system_instruction)

    def prompt_ids(self, query: str, instruction: str | None = None) -> list[int]:
        return list(self.tokenizer(self.prompt(query, instruction), add_special_tokens=False)["input_ids"])

    def score(self, query: str, memories: Sequence[Memory], *, instruction: str | None = None) -> Scores:
        """One query against many memories."""
        ids = self.prompt_ids(query, instruction)
        return self.score_prompt_ids([ids] * len(memories), memories)

    def score_memories(self, queries: Sequence[str], memories: Sequence[Memory], *,
                       instruction: str | None = None) -> Scores:
        """Pair i = (queries[i], memories[i]); each distinct query is tokenized once."""
        if len(queries) != len(memories):
            raise ValueError(f"{len(queries)} queries but {len(memories)} memories; they are scored pairwise")
        cache: dict[str, list[int]] = {}
        prompts = [cache[q] if q in cache else cache.setdefault(q, self.prompt_ids(q, instruction)) for q in queries]
        return self.score_prompt_ids(prompts, memories)

    @torch.inference_mode()
    def score_prompt_ids(self, prompts: Sequence[Sequence[int]], memories: Sequence[Memory]) -> Scores:
        """The decoder half over token-budget batches (sorted by memory then prompt length)."""
        n = len(prompts)
        p_yes, margin = np.zeros(n, np.float32), np.zeros(n, np.float32)
        costs = [round_up(len(p), 8) + m.vectors.shape[0] for p, m in zip(prompts, memories)]
        for batch in token_budget_batches(costs, self.batch_size, self.max_tokens_per_batch):
            logits = self._yes_no_logits([prompts[i] for i in batch], [memories[i] for i in batch])
            probs = torch.softmax(logits, dim=-1)[:, 0]
            p_yes[batch] = probs.cpu().numpy()
            margin[batch] = (logits[:, 0] - logits[:, 1]).cpu().numpy()
        return Scores(p_yes, margin)

    def _collate_memories(self, memories: Sequence[Memory]) -> tuple[torch.Tensor, torch.Tensor]:
        for row, m in enumerate(memories):
            if m.vectors.ndim != 2 or m.vectors.shape[1] != self.hidden_size:
                raise ValueError(f"memory {row} has shape {tuple(m.vectors.shape)}; this model needs [*, {self.hidden_size}]")
        counts = torch.tensor([m.vectors.shape[0] for m in memories])
        # one C-level copy (pad_sequence) instead of a Python loop of slice assignments: this runs under the GIL
        # beside a serving event loop, so Python-level per-row work costs more than its own time
        mem = torch.nn.utils.rnn.pad_sequence([m.vectors.to(self.dtype) for m in memories], batch_first=True)
        mask = (torch.arange(mem.shape[1])[None, :] < counts[:, None]).long()
        return mem.to(self.device), mask.to(self.device)

    def _yes_no_logits(self, prompts: Sequence[Sequence[int]], memories: Sequence[Memory]) -> torch.Tensor:
        half = self.decoder_half
        lengths = torch.tensor([len(p) for p in prompts])
        width = round_up(int(lengths.max()), 8)  # the reference pads the decoder batch to a multiple of 8
        ids = np.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=np.int64)
        unique: dict[int, np.ndarray] = {}  # pairs of one query share one prompt list: convert it once
        for row, p in enumerate(prompts):
            arr = unique.get(id(p))
            if arr is None:
                arr = unique[id(p)] = np.asarray(p, dtype=np.int64)
            ids[row, : len(p)] = arr
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        ids = torch.from_numpy(ids)
        mem, mem_mask = self._collate_memories(memories)
        hidden = half.decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                              encoder_hidden_states=mem, encoder_attention_mask=mem_mask,
                              use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(prompts), device=self.device), (lengths - 1).to(self.device)]
        logits = torch.nn.functional.linear(last, half.yes_no_weight)  # only the two rows the score needs
        if half.softcap is not None:
            logits = torch.tanh(logits / half.softcap) * half.softcap
        logits = logits.float()
        if not torch.isfinite(logits).all():
            raise FloatingPointError(
                f"non-finite yes/no logits in {self.dtype}; float16 overflows in this model — use bfloat16 or float32")
        return logits

    # ----- the official API --------------------------------------------------------------------------------------
    def predict(self, pairs: Sequence[tuple[str, str]], *, instruction: str | None = None,
                batch_size: int | None = None, convert_to_numpy: bool = False) -> list[float] | np.ndarray:
        """P(yes) for each (query, document) pair, in input order: ``list[float]`` like the official class, or a
        float32 array with ``convert_to_numpy=True`` (sentence-transformers' name). ``[]`` gives ``[]``."""
        p_yes = self.predict_scores(pairs, instruction=instruction, batch_size=batch_size).p_yes
        return p_yes if convert_to_numpy else p_yes.tolist()

    def predict_scores(self, pairs: Sequence[tuple[str, str]], *, instruction: str | None = None,
                       batch_size: int | None = None) -> Scores:
        """Like ``predict`` but returns P(yes) and margins; each distinct document is encoded once."""
        pairs = _check_pairs(pairs)
        saved = self.batch_size
        self.batch_size = _check_batch_size(batch_size) or saved
        try:
            if not pairs:
                return Scores(np.zeros(0, np.float32), np.zeros(0, np.float32))
            docs = list(dict.fromkeys(d for _, d in pairs))
            memories = dict(zip(docs, self.encode(docs)))
            return self.score_memories([q for q, _ in pairs], [memories[d] for _, d in pairs],
                                       instruction=instruction)
        finally:
            self.batch_size = saved

    def rank(self, query: str, documents: Sequence[str], *, instruction: str | None = None,
             top_k: int | None = None, batch_size: int | None = None,
             return_documents: bool = False) -> list[dict]:
        """``[{"corpus_id", "score"(, "text")}]`` sorted by score, best first (ties keep input order)."""
        _check_text(query, "query")
        documents = _check_documents(documents)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer or None, got {top_k!r}")
        _check_batch_size(batch_size)
        if not documents:
            return []
        scores = self.predict([(query, d) for d in documents], instruction=instruction, batch_size=batch_size)
        order = sorted(range(len(documents)), key=lambda i: -scores[i])
        if top_k is not None:
            order = order[:top_k]
        return [{"corpus_id": i, "score": scores[i], **({"text": documents[i]} if return_documents else {})}
                for i in order]
