"""Readers and writers for the bulk rerank job's inputs and outputs.

Inputs are queries, first-stage candidates and (optionally) qrels; the output is a TREC run. Every
URL goes through fsspec (``file://``, ``s3://``, plain paths; ``.gz``/``.bz2``/``.xz``/``.zst``
text files are decompressed by extension) and text is streamed line by line. Bad *records* never
crash a read: each one becomes a :class:`Problem` whose ``reason`` starts with ``source:line:``
(for Parquet, ``line`` is the 1-based row number). A file that cannot be read at all (missing, not
Parquet, required columns absent) raises. Qrels are the exception: they are small and hand-made,
so a broken line raises :class:`InputError` naming ``file:line``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from kalm_batch import fsio

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
_QUERY_HEADERS = ("query-id\ttext", "qid\ttext")
_QREL_HEADER = ["query-id", "corpus-id", "score"]


class InputError(ValueError):
    """An input file as a whole (or a qrels line) cannot be used; the message names file and line."""


@dataclass(frozen=True)
class Problem:
    """One bad input record (or query-level inconsistency) that was skipped or flagged."""

    source: str
    line: int
    kind: str
    reason: str


@dataclass
class Queries:
    """``texts`` maps qid -> query text in file order; ``lines`` maps qid -> the line it came from."""

    texts: dict[str, str]
    problems: list[Problem]
    source: str = ""
    lines: dict[str, int] = field(default_factory=dict)


@dataclass
class Candidates:
    """Rows ``(qid, doc_id, first_stage_rank, first_stage_score)``, grouped by qid in first-seen order,
    rank ascending within a qid. ``lines`` maps qid -> the first line that mentions it."""

    rows: list[tuple[str, str, int, float]]
    problems: list[Problem]
    source: str = ""
    lines: dict[str, int] = field(default_factory=dict)


def _problem(source: str, line: int, kind: str, message: str) -> Problem:
    return Problem(source, line, kind, f"{source}:{line}: {message}")


# ------------------------------------------------------------------------------------------ file access


def _is_parquet(url: str) -> bool:
    return url.lower().endswith((".parquet", ".pq"))


def _iter_lines(url: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[int, str | None]]:
    """Yield ``(1-based line number, line without terminator)``; ``None`` for a line that is not UTF-8."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    compression = "infer" if url.lower().endswith(_COMPRESSION_SUFFIXES) else None
    with fs.open(path, "rb", compression=compression) as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, None
                continue
            yield line_no, (line.lstrip("\ufeff") if line_no == 1 else line).rstrip("\r\n")


def _parquet_rows(
    url: str, storage_options: dict[str, Any] | None, required: dict[str, tuple[str, ...]], optional: tuple[str, ...]
) -> tuple[set[str], Iterator[tuple[int, dict[str, Any]]]]:
    """Return (optional columns present, iterator of ``(1-based row, {column: value})``), batch by batch.

    ``required`` maps the canonical column name to the accepted spellings, first found wins.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    handle = fs.open(path, "rb")
    try:
        names = set(pq.read_schema(handle).names)
    except (pa.ArrowException, ValueError) as exc:
        handle.close()
        raise InputError(f"{url}: cannot read as Parquet ({exc}); check the file and its extension") from exc
    columns: dict[str, str] = {}
    for canonical, spellings in required.items():
        found = next((name for name in spellings if name in names), None)
        if found is None:
            handle.close()
            raise InputError(f"{url}: needs a column named {' or '.join(spellings)}; found {sorted(names)}")
        columns[canonical] = found
    present = {name for name in optional if name in names}
    columns.update({name: name for name in present})
    return present, _iter_parquet(handle, columns)


def _iter_parquet(handle: Any, columns: dict[str, str]) -> Iterator[tuple[int, dict[str, Any]]]:
    with handle:
        row = 0
        for batch in pq.ParquetFile(handle).iter_batches(columns=list(columns.values()), batch_size=65536):
            values = {canonical: batch.column(actual).to_pylist() for canonical, actual in columns.items()}
            for i in range(batch.num_rows):
                row += 1
                yield row, {canonical: values[canonical][i] for canonical in columns}


def _as_id(value: Any) -> str | None:
    """Accept string or integer ids (Parquet/JSON often store qids as ints); anything else is invalid."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    return text or None


# ---------------------------------------------------------------------------------------------- queries


def read_queries(url: str, storage_options: dict[str, Any] | None = None) -> Queries:
    """Read BEIR ``queries.jsonl`` (``_id``/``qid`` + ``text``/``query``), ``qid<TAB>text`` TSV (an optional
    ``query-id<TAB>text`` / ``qid<TAB>text`` header is skipped) or Parquet (``qid``/``_id`` + ``text``).

    The format is taken from a ``.parquet`` extension, else from the first non-blank line (``{`` means
    JSONL). Empty query text is kept as given and flagged ``empty_query``; a repeated qid keeps the
    first text and is flagged ``duplicate_qid``; unparsable records are flagged ``malformed``.
    """
    out = Queries(texts={}, problems=[], source=url)
    if _is_parquet(url):
        _, rows = _parquet_rows(url, storage_options, {"qid": ("qid", "_id"), "text": ("text", "query")}, ())
        for row, values in rows:
            _add_query(out, row, _as_id(values["qid"]), values["text"])
        return out
    jsonl: bool | None = None
    for line_no, line in _iter_lines(url, storage_options):
        if line is None:
            out.problems.append(_problem(url, line_no, "malformed", "line is not valid UTF-8"))
            continue
        if not line.strip():
            continue
        if jsonl is None:
            jsonl = line.lstrip().startswith("{")
            if not jsonl and line.strip().lower() in _QUERY_HEADERS:
                continue
        parsed = _query_from_json(line) if jsonl else _query_from_tsv(line)
        if isinstance(parsed, str):
            out.problems.append(_problem(url, line_no, "malformed", parsed))
        else:
            _add_query(out, line_no, *parsed)
    return out


def _query_from_json(line: str) -> tuple[str | None, Any] | str:
    parsed = query_fields_json(line)
    return parsed if isinstance(parsed, str) else (_as_id(parsed[0]), parsed[1])


def query_fields_json(line: str) -> tuple[Any, Any] | str:
    """(raw qid value, text) of a BEIR queries.jsonl line, or the reason it is malformed."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(record, dict):
        return "expected a JSON object with '_id' and 'text'"
    qid = record.get("_id", record.get("qid"))
    text = record.get("text", record.get("query"))
    if qid is None or text is None:
        return "needs '_id' (or 'qid') and 'text' (or 'query') fields"
    return qid, text


def _query_from_tsv(line: str) -> tuple[str | None, str] | str:
    if "\t" not in line:
        return "expected 'qid<TAB>text'"
    qid, text = line.split("\t", 1)
    return _as_id(qid), text


def _add_query(out: Queries, line: int, qid: str | None, text: Any) -> None:
    if qid is None or not isinstance(text, str):
        out.problems.append(_problem(out.source, line, "malformed", "query id must be a non-empty string or "
                                     "integer and text must be a string"))
    elif qid in out.texts:
        message = f"qid {qid!r} already read at line {out.lines[qid]}; kept the first"
        out.problems.append(_problem(out.source, line, "duplicate_qid", message))
    else:
        out.texts[qid] = text
        out.lines[qid] = line
        if not text.strip():
            out.problems.append(_problem(out.source, line, "empty_query", f"query {qid!r} has empty text (kept)"))


# ------------------------------------------------------------------------------------------- candidates


def read_candidates(url: str, storage_options: dict[str, Any] | None = None) -> Candidates:
    """Read a TREC run (``qid Q0 docid rank score tag``) or Parquet (``qid, doc_id[, score][, rank]``).

    TREC ranks are re-derived per query by descending score, ties in file order (the rank column is
    only checked to be an integer). Parquet uses its ``rank`` column when present (positive integers,
    kept as given), else descending score, else row order; without a score column the score is 0.0.
    A repeated ``(qid, doc_id)`` keeps the first (``duplicate_pair``); bad records are ``malformed``.
    """
    out = Candidates(rows=[], problems=[], source=url)
    groups: dict[str, list[tuple[int, str, float, int | None]]] = {}  # qid -> (line, doc, score, rank)
    seen: dict[tuple[str, str], int] = {}
    records, order_by = _candidate_records(url, storage_options)
    for line_no, parsed in records:
        if isinstance(parsed, str):
            out.problems.append(_problem(url, line_no, "malformed", parsed))
            continue
        qid, doc_id, score, rank = parsed
        if (qid, doc_id) in seen:
            message = f"({qid!r}, {doc_id!r}) already read at line {seen[(qid, doc_id)]}; kept the first"
            out.problems.append(_problem(url, line_no, "duplicate_pair", message))
            continue
        seen[(qid, doc_id)] = line_no
        out.lines.setdefault(qid, line_no)
        groups.setdefault(qid, []).append((line_no, doc_id, score, rank))
    for qid, items in groups.items():
        out.rows.extend(_rank_group(qid, items, order_by))
    return out


def _rank_group(
    qid: str, items: list[tuple[int, str, float, int | None]], order_by: str
) -> list[tuple[str, str, int, float]]:
    if order_by == "rank":
        items = sorted(items, key=lambda item: (item[3], item[0]))
        return [(qid, doc_id, int(rank or 0), score) for _, doc_id, score, rank in items]
    if order_by == "score":
        items = sorted(items, key=lambda item: (-item[2], item[0]))
    return [(qid, doc_id, position, score) for position, (_, doc_id, score, _) in enumerate(items, start=1)]


def _candidate_records(url: str, storage_options: dict[str, Any] | None) -> tuple[Iterator[tuple[int, Any]], str]:
    """Return (records, how to order them: "rank" | "score" | "order")."""
    if not _is_parquet(url):
        return _trec_records(url, storage_options), "score"
    present, rows = _parquet_rows(url, storage_options, {"qid": ("qid",), "doc_id": ("doc_id",)}, ("score", "rank"))
    order_by = "rank" if "rank" in present else "score" if "score" in present else "order"
    records = ((row, _parquet_candidate(values, present)) for row, values in rows)
    return records, order_by


def _trec_records(url: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[int, Any]]:
    for line_no, line in _iter_lines(url, storage_options):
        if line is None:
            yield line_no, "line is not valid UTF-8"
        elif line.strip():
            yield line_no, _trec_candidate(line)


def _trec_candidate(line: str) -> tuple[str, str, float, None] | str:
    fields = line.split()
    if len(fields) != 6:
        return f"expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}"
    try:
        int(fields[3])
    except ValueError:
        return f"rank {fields[3]!r} is not an integer"
    try:
        score = float(fields[4])
    except ValueError:
        return f"score {fields[4]!r} is not a number"
    if not math.isfinite(score):
        return f"score {fields[4]!r} is not a finite number"
    return fields[0], fields[2], score, None


def _parquet_candidate(values: dict[str, Any], present: set[str]) -> tuple[str, str, float, int | None] | str:
    qid, doc_id = _as_id(values["qid"]), _as_id(values["doc_id"])
    if qid is None or doc_id is None:
        return "qid and doc_id must be non-empty strings or integers"
    score, rank = values.get("score", 0.0), values.get("rank")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return f"score {score!r} is not a finite number"
    if "rank" in present and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        return f"rank {rank!r} is not a positive integer"
    return qid, doc_id, float(score), rank


def top_k(c: Candidates, k: int) -> Candidates:
    """Keep candidates with first-stage rank <= ``k`` (ranks are not renumbered)."""
    if k < 1:
        raise ValueError(f"top_k: k must be >= 1, got {k}")
    rows = [row for row in c.rows if row[2] <= k]
    return Candidates(rows=rows, problems=list(c.problems), source=c.source, lines=dict(c.lines))


def join_queries(q: Queries, c: Candidates) -> tuple[list[tuple[str, str, str, int, float]], list[Problem]]:
    """Attach query text: rows ``(qid, query_text, doc_id, rank, score)`` in candidate order.

    Candidate qids without a query give one ``no_query`` Problem each (with the number of candidates
    dropped); queries without any candidate give ``no_candidates``.
    """
    joined: list[tuple[str, str, str, int, float]] = []
    dropped: Counter[str] = Counter()
    for qid, doc_id, rank, score in c.rows:
        if qid in q.texts:
            joined.append((qid, q.texts[qid], doc_id, rank, score))
        else:
            dropped[qid] += 1
    problems = [
        _problem(c.source, c.lines.get(qid, 0), "no_query", f"qid {qid!r} has no query; dropped {n} candidates")
        for qid, n in dropped.items()
    ]
    with_candidates = {row[0] for row in c.rows}
    problems += [
        _problem(q.source, q.lines.get(qid, 0), "no_candidates", f"query {qid!r} has no candidates")
        for qid in q.texts
        if qid not in with_candidates
    ]
    return joined, problems


def problems_summary(problems: list[Problem]) -> dict[str, int]:
    """Count problems by kind (kinds sorted alphabetically)."""
    return dict(sorted(Counter(p.kind for p in problems).items()))


# ------------------------------------------------------------------------------------------------ qrels


def read_qrels(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, int]]:
    """Read BEIR TSV qrels (``query-id<TAB>corpus-id<TAB>score``, header optional) or TREC qrels
    (``qid iter docid rel``). Any malformed line, or a pair repeated with a different label, raises
    :class:`InputError` naming ``file:line``."""
    qrels: dict[str, dict[str, int]] = {}
    width: int | None = None  # 3 (BEIR) or 4 (TREC), fixed by the first data line
    for line_no, line in _iter_lines(url, storage_options):
        if line is not None and not line.strip():
            continue
        fields = line.split() if line is not None else []
        if line_no == 1 and [f.lower() for f in fields] == _QREL_HEADER:
            continue
        if len(fields) != (width or len(fields)) or len(fields) not in (3, 4):
            expected = {3: "'query-id<TAB>corpus-id<TAB>score'", 4: "'qid 0 docid rel'"}
            raise InputError(f"{url}:{line_no}: expected {expected.get(width or 0, ' or '.join(expected.values()))} "
                             f"(got {line!r}); fix the qrels file")
        width = len(fields)
        qid, doc_id, label = fields[0], fields[-2], fields[-1]
        try:
            rel = int(label)
        except ValueError:
            raise InputError(f"{url}:{line_no}: relevance {label!r} is not an integer; fix the qrels file") from None
        previous = qrels.setdefault(qid, {}).setdefault(doc_id, rel)
        if previous != rel:
            raise InputError(f"{url}:{line_no}: ({qid}, {doc_id}) judged {previous} earlier and {rel} here")
    return qrels


# ----------------------------------------------------------------------------------------------- output


def write_trec_run(
    rows: Iterable[tuple[str, str, int, float]],
    url: str,
    tag: str = "kalm",
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write ``(qid, doc_id, rank, score)`` rows as ``qid Q0 doc rank score tag`` lines, sorted by qid then
    rank, atomically: locally via a temp file in the target directory + ``os.replace``; on object
    stores as one PUT of the whole body. Scores are written at full (round-trip) precision.

    Raises ValueError for ids/tag containing whitespace, non-finite scores, or a query whose scores
    increase with rank (TREC tools order by score, so such a file would mean a different ranking).
    """
    if not tag or any(ch.isspace() for ch in tag):
        raise ValueError(f"write_trec_run({url}): tag {tag!r} must be non-empty without whitespace")
    ordered = sorted(rows, key=lambda row: (row[0], row[2]))
    lines = [_trec_line(row, tag, url, previous) for row, previous in zip(ordered, [None, *ordered])]
    fsio.write_bytes_atomic(url, "".join(lines).encode("utf-8"), storage_options)


def _trec_line(row: tuple[str, str, int, float], tag: str, url: str, previous: Any) -> str:
    qid, doc_id, rank, score = row
    for name, value in (("qid", qid), ("doc_id", doc_id)):
        if not value or any(ch.isspace() for ch in str(value)):
            raise ValueError(f"write_trec_run({url}): {name} {value!r} (qid {qid!r}) is empty or has whitespace")
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"write_trec_run({url}): score {score} for ({qid!r}, {doc_id!r}) is not finite")
    if previous is not None and previous[0] == qid and float(previous[3]) < score:
        raise ValueError(f"write_trec_run({url}): query {qid!r} rank {rank} scores higher than rank {previous[2]}; "
                         "ranks must follow descending score")
    return f"{qid} Q0 {doc_id} {int(rank)} {score!r} {tag}\n"
