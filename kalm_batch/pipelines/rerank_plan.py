"""Plan stage of the rerank job: per query (a Ray Data ``groupby("gkey").map_groups``), in the workers.

All records of one qid meet in one group (its query rows, candidate rows, qrels rows and problem rows, from any
number of files), so every cross-file check is local to the group:

- the query text: the first valid row (by file, then line) is kept; a repeated qid is flagged ``duplicate_qid``
  (saying whether the text differs); an empty text is scored and flagged ``empty_query``;
- the candidates: a repeated (qid, doc_id) keeps the first (``duplicate_pair``); first-stage ranks are the given
  ``rank`` when every row has one, else by descending score, else by file order (ties by file, then line); the
  top ``k`` (rank <= k) are kept;
- pairs with a query become ``role="pair"`` records, which carry the query text; the top-k pairs of a qid without a
  usable query become ``role="skip"`` records (kind ``no_query``), so ``input pairs = scored + skipped``;
- qrels rows travel as ``role="qrel"`` records, so per-query metrics can run in the workers later;
- each usable query also gets one ``role="query"`` record (its text; ``first_stage_rank`` holds its number of
  top-k pairs), which the dry run counts.

Each record gets its partition, ``crc32(qid) % partitions`` (problems without a qid: by file and line), the unit
of resumption. Groups of problems without a qid have keys starting with NUL and pass through.
"""

from __future__ import annotations

import zlib

import pyarrow as pa

from kalm_batch.pipelines.rerank_inputs import ROLE_CANDIDATE, ROLE_PROBLEM, ROLE_QREL, ROLE_QUERY
from kalm_batch.querylog import InputError

RECORD_SCHEMA = pa.schema([
    ("part", pa.int32()), ("role", pa.string()), ("kind", pa.string()), ("qid", pa.string()),
    ("query", pa.string()), ("doc_id", pa.string()), ("first_stage_rank", pa.int32()),
    ("first_stage_score", pa.float64()), ("rel", pa.int32()), ("source", pa.string()), ("line", pa.int64()),
    ("reason", pa.string()),
])
PAIR, SKIP, PROBLEM, QREL, QUERY = "pair", "skip", "problem", "qrel", "query"


def partition_of(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode("utf-8", "backslashreplace")) % partitions


def plan_group(group: pa.Table, *, top_k: int, partitions: int) -> pa.Table:
    """All raw records of one group key -> the group's RECORD_SCHEMA records (see the module docstring)."""
    rows = sorted(group.to_pylist(), key=lambda r: (r["file_index"], r["line"]))
    key = rows[0]["gkey"]
    out = _Out(partition_of(key, partitions))
    for r in rows:
        if r["role"] == ROLE_PROBLEM:
            out.problem(r["kind"], r["qid"], None, r["source"], r["line"], r["reason"])
    if key.startswith("\x00"):
        return out.table()
    text = _query_text(key, [r for r in rows if r["role"] == ROLE_QUERY], out)
    refused = [r for r in rows if r["role"] == ROLE_PROBLEM and r["file_role"] == ROLE_QUERY]
    candidates = _dedupe(key, [r for r in rows if r["role"] == ROLE_CANDIDATE], out)
    ranked = [c for c in _ranked(candidates) if c[0] <= top_k]
    if text is not None:
        q = next(r for r in rows if r["role"] == ROLE_QUERY)
        out.add(QUERY, QUERY, key, text, None, len(ranked), None, None, q["source"], q["line"], None)
    for rank, score, r in ranked:
        if text is not None:
            out.add(PAIR, PAIR, key, text, r["doc_id"], rank, score, None, r["source"], r["line"], None)
        else:
            out.add(SKIP, "no_query", key, None, r["doc_id"], rank, score, None, r["source"], r["line"],
                    f"candidate ({key!r}, {r['doc_id']!r}) skipped: qid {key!r} has no usable query")
    if text is None and candidates:
        why = f"its query was refused ({refused[0]['reason']})" if refused else "no query file holds it"
        first = candidates[0]
        out.problem("no_query", key, None, first["source"], first["line"],
                    f"{first['source']}:{first['line']}: qid {key!r} has {len(candidates)} candidates but {why}; "
                    f"its {len(ranked)} top-k candidates are skipped")
    if text is not None and not candidates:
        q = next(r for r in rows if r["role"] == ROLE_QUERY)
        out.problem("no_candidates", key, None, q["source"], q["line"],
                    f"{q['source']}:{q['line']}: query {key!r} has no candidates")
    _qrels(key, [r for r in rows if r["role"] == ROLE_QREL], out)
    return out.table()


class _Out:
    def __init__(self, part: int):
        self.part = part
        self.cols: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}

    def add(self, role, kind, qid, query, doc_id, rank, score, rel, source, line, reason) -> None:
        values = (self.part, role, kind, qid, query, doc_id, rank, score, rel, source, line, reason)
        for name, value in zip(RECORD_SCHEMA.names, values):
            self.cols[name].append(value)

    def problem(self, kind, qid, doc_id, source, line, reason) -> None:
        self.add(PROBLEM, kind, qid, None, doc_id, None, None, None, source, line, reason)

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=RECORD_SCHEMA)


def _query_text(qid: str, queries: list[dict], out: _Out) -> str | None:
    if not queries:
        return None
    first = queries[0]
    for r in queries[1:]:
        same = "the same text" if r["text"] == first["text"] else "a different text"
        out.problem("duplicate_qid", qid, None, r["source"], r["line"],
                    f"{r['source']}:{r['line']}: qid {qid!r} already read at {first['source']}:{first['line']} "
                    f"(this row has {same}); kept the first")
    if not first["text"].strip():
        out.problem("empty_query", qid, None, first["source"], first["line"],
                    f"{first['source']}:{first['line']}: query {qid!r} has empty text (kept)")
    return first["text"]


def _dedupe(qid: str, candidates: list[dict], out: _Out) -> list[dict]:
    seen: dict[str, dict] = {}
    for r in candidates:
        if r["doc_id"] in seen:
            f = seen[r["doc_id"]]
            out.problem("duplicate_pair", qid, r["doc_id"], r["source"], r["line"],
                        f"{r['source']}:{r['line']}: ({qid!r}, {r['doc_id']!r}) already read at "
                        f"{f['source']}:{f['line']}; kept the first")
        else:
            seen[r["doc_id"]] = r
    return list(seen.values())


def _ranked(candidates: list[dict]) -> list[tuple[int, float, dict]]:
    """(first-stage rank, score, row): given ranks if every row has one, else by score desc, else file order."""
    if candidates and all(r["order"] == "rank" for r in candidates):
        ordered = sorted(candidates, key=lambda r: (r["rank"], r["file_index"], r["line"]))
        return [(int(r["rank"]), float(r["score"]), r) for r in ordered]
    if any(r["order"] == "score" for r in candidates):
        candidates = sorted(candidates, key=lambda r: (-r["score"], r["file_index"], r["line"]))
    return [(i, float(r["score"]), r) for i, r in enumerate(candidates, start=1)]


def _qrels(qid: str, qrels: list[dict], out: _Out) -> None:
    labels: dict[str, dict] = {}
    for r in qrels:
        previous = labels.setdefault(r["doc_id"], r)
        if previous["rel"] != r["rel"]:
            raise InputError(f"{r['source']}:{r['line']}: ({qid}, {r['doc_id']}) judged {previous['rel']} at "
                             f"{previous['source']}:{previous['line']} and {r['rel']} here; fix the qrels")
        if previous is r:
            out.add(QREL, QREL, qid, None, r["doc_id"], None, None, r["rel"], r["source"], r["line"], None)
