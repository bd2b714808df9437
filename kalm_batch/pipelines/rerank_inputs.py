"""Read stage of the rerank job: every input file -> Arrow tables of validated records, in the workers.

One Ray Data task per file (``read_file_records``, a generator of tables of at most ``CHUNK_ROWS`` rows) reads
queries (BEIR JSONL, ``qid<TAB>text`` TSV, Parquet), candidates (TREC run, Parquet) or qrels (BEIR TSV, TREC) from
any fsspec URL. Every value is checked before it becomes an Arrow value: a record that cannot be used becomes a
problem row (``role="p"``) with a kind and a reason naming ``source:line``, and the rest goes on. Refused values:

- ``malformed``: unparsable lines, missing fields, non-finite scores, bad ranks (as kalm_batch.querylog says);
- ``bad_id``: a qid or doc id that is empty, not a string/integer, not valid Unicode (a lone surrogate such as
  ``"\\ud800"`` in JSON), or holds whitespace (a TREC run cannot hold it: ``qid Q0 doc rank score tag``);
- ``bad_text``: a query text that is not a string or not valid Unicode (a lone surrogate);
- ``empty_file``: a file with no record at all.

Problem rows keep the qid where one was read (escaped with backslashes if it is not valid Unicode), so query-level
problems land in that query's partition. Qrels are hand-made and small: a bad qrels line raises InputError.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa

from kalm_batch import querylog as Q

CHUNK_ROWS = 65536
ROLE_QUERY, ROLE_CANDIDATE, ROLE_QREL, ROLE_PROBLEM = "q", "c", "r", "p"
RAW_SCHEMA = pa.schema([
    ("role", pa.string()), ("gkey", pa.string()), ("qid", pa.string()), ("text", pa.string()),
    ("doc_id", pa.string()), ("score", pa.float64()), ("rank", pa.int64()), ("rel", pa.int32()),
    ("order", pa.string()), ("file_index", pa.int32()), ("line", pa.int64()), ("source", pa.string()),
    ("file_role", pa.string()), ("kind", pa.string()), ("reason", pa.string()),
])
_HIDDEN = (".", "_")
_GLOB_CHARS = "*?["


# ----- files -----------------------------------------------------------------------------------------------------
def list_input_files(url: str, storage_options: dict | None = None, what: str = "input") -> list[str]:
    """A file, a directory (recursive; names starting with '.' or '_' skipped) or a glob -> sorted full URLs."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.isfile(path):
        found = [path]
    elif fs.isdir(path):
        found = _visible(fs, fs.find(path), path)
    elif any(c in path for c in _GLOB_CHARS):
        found = []
        for match in fs.glob(path):
            found += _visible(fs, fs.find(match), match) if fs.isdir(match) else [match]
    else:
        raise FileNotFoundError(f"{what} path {url!r} does not exist (expected a file, a directory or a glob)")
    if not found:
        raise FileNotFoundError(f"no {what} files under {url!r} (names starting with '.' or '_' are skipped)")
    return sorted({fs.unstrip_protocol(p) for p in found})


def _visible(fs, paths: list[str], root: str) -> list[str]:
    root = root.rstrip("/") + "/"
    return [p for p in paths if not any(part.startswith(_HIDDEN) for part in p[len(root):].split("/"))]


def file_items(queries: list[str], candidates: list[str], qrels: list[str]) -> list[dict]:
    """One work item per file: its role and a global file index (the tie-breaker of 'first seen')."""
    roles = [(ROLE_QUERY, queries), (ROLE_CANDIDATE, candidates), (ROLE_QREL, qrels)]
    items = [(role, url) for role, urls in roles for url in urls]
    return [{"role": role, "url": url, "file_index": i} for i, (role, url) in enumerate(items)]


# ----- validation ------------------------------------------------------------------------------------------------
def escaped(value: Any) -> str:
    """A string that is always valid UTF-8 (lone surrogates and other unencodable code points as backslash escapes)."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def id_problem(value: Any, what: str) -> str | None:
    """Why ``value`` cannot be a qid/doc id in a TREC run, or None if it can."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"{what} must be a string or an integer, got {type(value).__name__}"
    text = str(value)
    if not text.strip():
        return f"{what} is empty"
    if not _valid_unicode(text):
        return f"{what} {escaped(text)!r} is not valid Unicode (lone surrogate); fix the input"
    if any(ch.isspace() for ch in text):
        return f"{what} {text!r} holds whitespace, which a TREC run cannot hold; rename it"
    return None


def text_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"query text must be a string, got {type(value).__name__}"
    if not _valid_unicode(value):
        return f"query text {escaped(value)[:80]!r} is not valid Unicode (lone surrogate); fix the input"
    return None


# ----- record builders -------------------------------------------------------------------------------------------
class _Chunks:
    """Collect rows (dicts) and hand them out as RAW_SCHEMA tables of at most CHUNK_ROWS rows."""

    def __init__(self, item: dict):
        self.item, self.rows, self.count = item, [], 0

    def add(self, **row) -> pa.Table | None:
        self.rows.append(row)
        self.count += 1
        return self.flush() if len(self.rows) >= CHUNK_ROWS else None

    def problem(self, line: int, kind: str, message: str, qid: Any = None) -> pa.Table | None:
        source = self.item["url"]
        q = escaped(qid) if isinstance(qid, (str, int)) and not isinstance(qid, bool) and str(qid).strip() else None
        gkey = q if q is not None else f"\x00{self.item['file_index']}:{line // 8192}"
        return self.add(role=ROLE_PROBLEM, gkey=gkey, qid=q, line=line, kind=kind,
                        reason=f"{source}:{line}: {escaped(message)}")

    def flush(self) -> pa.Table | None:
        if not self.rows:
            return None
        base = {"file_index": self.item["file_index"], "source": self.item["url"], "file_role": self.item["role"]}
        cols = {name: [] for name in RAW_SCHEMA.names}
        for row in self.rows:
            for name in RAW_SCHEMA.names:
                cols[name].append(row.get(name, base.get(name)))
        self.rows = []
        return pa.table(cols, schema=RAW_SCHEMA)


def read_file_records(batch: dict, *, storage_options: dict | None = None) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` function over file items (one per batch): yield the file's records as tables."""
    for role, url, file_index in zip(batch["role"], batch["url"], batch["file_index"]):
        item = {"role": str(role), "url": str(url), "file_index": int(file_index)}
        chunks = _Chunks(item)
        reader = {ROLE_QUERY: _query_rows, ROLE_CANDIDATE: _candidate_rows, ROLE_QREL: _qrel_rows}[item["role"]]
        for table in reader(chunks, storage_options):
            if table is not None:
                yield table
        if chunks.count == 0:
            chunks.problem(0, "empty_file", "the file holds no record")
        last = chunks.flush()
        if last is not None:
            yield last


def _query_rows(chunks: _Chunks, storage_options) -> Iterator[pa.Table | None]:
    url = chunks.item["url"]
    if Q._is_parquet(url):
        _, rows = Q._parquet_rows(url, storage_options, {"qid": ("qid", "_id"), "text": ("text", "query")}, ())
        for line, values in rows:
            yield _query(chunks, line, values["qid"], values["text"])
        return
    jsonl = None
    for line, text in Q._iter_lines(url, storage_options):
        if text is None:
            yield chunks.problem(line, "malformed", "line is not valid UTF-8")
            continue
        if not text.strip():
            continue
        if jsonl is None:
            jsonl = text.lstrip().startswith("{")
            if not jsonl and text.strip().lower() in Q._QUERY_HEADERS:
                continue
        parsed = _query_fields_json(text) if jsonl else Q._query_from_tsv(text)
        if isinstance(parsed, str):
            yield chunks.problem(line, "malformed", parsed)
        else:
            yield _query(chunks, line, *parsed)


def _query_fields_json(line: str):
    """querylog's JSON query parser, keeping the raw qid value (validated by _query)."""
    from kalm_batch.querylog import query_fields_json

    return query_fields_json(line)


def _query(chunks: _Chunks, line: int, qid: Any, text: Any) -> pa.Table | None:
    if isinstance(qid, str):
        qid = qid.strip()
    bad = id_problem(qid, "qid")
    if bad:
        return chunks.problem(line, "bad_id", bad, qid)
    bad = text_problem(text)
    if bad:
        return chunks.problem(line, "bad_text", f"query {str(qid)!r}: {bad}", qid)
    return chunks.add(role=ROLE_QUERY, gkey=str(qid), qid=str(qid), text=text, line=line)


def _candidate_rows(chunks: _Chunks, storage_options) -> Iterator[pa.Table | None]:
    url = chunks.item["url"]
    if not Q._is_parquet(url):
        for line, text in Q._iter_lines(url, storage_options):
            if text is None:
                yield chunks.problem(line, "malformed", "line is not valid UTF-8")
            elif text.strip():
                parsed = Q._trec_candidate(text)
                if isinstance(parsed, str):
                    yield chunks.problem(line, "malformed", parsed, text.split()[0] if text.split() else None)
                else:
                    yield _candidate(chunks, line, parsed[0], parsed[1], parsed[2], None, "score")
        return
    present, rows = Q._parquet_rows(url, storage_options, {"qid": ("qid",), "doc_id": ("doc_id",)}, ("score", "rank"))
    order = "rank" if "rank" in present else "score" if "score" in present else "order"
    for line, values in rows:
        score, rank = values.get("score", 0.0), values.get("rank")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            yield chunks.problem(line, "malformed", f"score {score!r} is not a finite number", values["qid"])
        elif "rank" in present and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            yield chunks.problem(line, "malformed", f"rank {rank!r} is not a positive integer", values["qid"])
        else:
            yield _candidate(chunks, line, values["qid"], values["doc_id"], float(score), rank, order)


def _candidate(chunks: _Chunks, line: int, qid: Any, doc_id: Any, score: float, rank, order: str):
    for value, what in ((qid, "qid"), (doc_id, "doc_id")):
        bad = id_problem(value.strip() if isinstance(value, str) else value, what)
        if bad:
            return chunks.problem(line, "bad_id", bad, qid)
    qid, doc_id = str(qid).strip(), str(doc_id).strip()
    return chunks.add(role=ROLE_CANDIDATE, gkey=qid, qid=qid, doc_id=doc_id, score=score, rank=rank, order=order,
                      line=line)


def _qrel_rows(chunks: _Chunks, storage_options) -> Iterator[pa.Table | None]:
    """Strict, like kalm_batch.querylog.read_qrels: a bad line raises InputError naming file:line."""
    url, width = chunks.item["url"], None
    for line, text in Q._iter_lines(url, storage_options):
        if text is not None and not text.strip():
            continue
        fields = text.split() if text is not None else []
        if line == 1 and [f.lower() for f in fields] == Q._QREL_HEADER:
            continue
        if len(fields) != (width or len(fields)) or len(fields) not in (3, 4):
            raise Q.InputError(f"{url}:{line}: expected 'query-id<TAB>corpus-id<TAB>score' or 'qid 0 docid rel' "
                               f"(got {text!r}); fix the qrels file")
        width = len(fields)
        try:
            rel = int(fields[-1])
        except ValueError:
            raise Q.InputError(f"{url}:{line}: relevance {fields[-1]!r} is not an integer; fix the qrels file") from None
        yield chunks.add(role=ROLE_QREL, gkey=fields[0], qid=fields[0], doc_id=fields[-2], rel=rel, line=line)
