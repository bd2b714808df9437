"""BM25 first-stage retrieval for the quickstart, built on ``bm25s``.

Documents and queries go through bm25s's own regex tokenizer (lowercase, English stopwords removed,
no stemmer, nothing downloaded). Only documents sharing at least one term with the query are
returned (a BM25 score of 0 carries no ranking information), so a query may get fewer than ``k``
candidates; queries that are empty after tokenization get none.
"""

from __future__ import annotations

import json
from typing import Any

import bm25s
import fsspec

from kalm_batch.querylog import read_queries, write_trec_run

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def bm25_candidates(
    corpus: list[tuple[str, str]], queries: dict[str, str], k: int = 100
) -> list[tuple[str, str, int, float]]:
    """Return ``(qid, doc_id, rank, score)`` rows, rank 1..k per query (k capped at the corpus size).

    A doc id repeated in ``corpus`` keeps its first text.
    """
    if k < 1:
        raise ValueError(f"bm25_candidates: k must be >= 1, got {k}")
    first_text: dict[str, str] = {}
    for doc_id, text in corpus:
        first_text.setdefault(doc_id, text)
    docs = list(first_text.items())
    if not docs or not queries:
        return []
    doc_ids = [doc_id for doc_id, _ in docs]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([text for _, text in docs], stopwords="en", show_progress=False),
                    show_progress=False)
    qids, query_tokens = _query_tokens(queries, retriever.vocab_dict)
    if not qids:
        return []
    results, scores = retriever.retrieve(query_tokens, k=min(k, len(docs)), show_progress=False)
    rows: list[tuple[str, str, int, float]] = []
    for qid, doc_indices, doc_scores in zip(qids, results, scores):
        matched = [(int(i), float(s)) for i, s in zip(doc_indices, doc_scores) if s > 0]
        rows.extend((qid, doc_ids[i], rank, s) for rank, (i, s) in enumerate(matched, start=1))
    return rows


def _query_tokens(queries: dict[str, str], vocab: dict[str, int]) -> tuple[list[str], list[list[str]]]:
    """Tokenize queries, keep only terms the corpus knows; drop queries left with no term."""
    qids = list(queries)
    tokenized = bm25s.tokenize([queries[q] or "" for q in qids], stopwords="en", return_ids=False,
                               show_progress=False)
    kept_qids, kept_tokens = [], []
    for qid, tokens in zip(qids, tokenized):
        known = [token for token in tokens if token and token in vocab]
        if known:
            kept_qids.append(qid)
            kept_tokens.append(known)
    return kept_qids, kept_tokens


def read_beir_corpus(url: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Read a BEIR ``corpus.jsonl`` into ``[(doc_id, "title text")]`` (title prepended when non-empty).

    Raises ValueError naming ``file:line`` for a line that is not a JSON object with an ``_id``.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    compression = "infer" if url.lower().endswith(_COMPRESSION_SUFFIXES) else None
    corpus: list[tuple[str, str]] = []
    with fs.open(path, "rt", encoding="utf-8", compression=compression) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{url}:{line_no}: not valid JSON ({exc.msg}); fix the corpus file") from None
            if not isinstance(record, dict) or record.get("_id") is None:
                raise ValueError(f"{url}:{line_no}: expected a JSON object with '_id'; fix the corpus file")
            title, text = record.get("title") or "", record.get("text") or ""
            corpus.append((str(record["_id"]), f"{title} {text}" if title else text))
    return corpus


def write_bm25_run(
    corpus_url: str,
    queries_url: str,
    out_url: str,
    k: int = 100,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Retrieve top-``k`` BM25 candidates for every query and write them as a TREC run (tag ``bm25``).

    Returns the number of rows written.
    """
    corpus = read_beir_corpus(corpus_url, storage_options)
    queries = read_queries(queries_url, storage_options)
    rows = bm25_candidates(corpus, queries.texts, k=k)
    write_trec_run(rows, out_url, tag="bm25", storage_options=storage_options)
    return len(rows)
