"""Read and validate passage corpora (JSONL / JSONL.gz / JSONL.zst / Parquet) from any fsspec URL.

Every input row becomes exactly one :class:`Passage` or one :class:`RejectedRow`; nothing here raises on
dirty data. A file that cannot be read at all (missing, corrupt gzip/zstd/parquet, missing columns) yields
one ``RejectedRow(line=0, doc_id=None, raw=None)`` after whatever rows it had already produced.

Line numbers: 1-based physical line for JSONL (blank lines are skipped and produce nothing, but still count
for numbering), 0-based row index for Parquet. Only fsspec APIs are used, so s3:// and gs:// work
like file://.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

JOIN_MODES = ("title_space_text", "text_only", "title_newline_text")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
CORPUS_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
MAX_ID_CHARS = 512
RAW_MAX_CHARS = 500
_CHUNK_BYTES = 1 << 18
_PARQUET_BATCH_ROWS = 1024
_GLOB_CHARS = "*?["

try:  # zstandard is a hard dependency, but keep the module importable without it
    from zstandard import ZstdError as _ZstdError
except ImportError:  # pragma: no cover
    _ZstdError = OSError

# Errors that mean "this file cannot be read"; anything else is a bug and propagates.
_FILE_ERRORS = (OSError, EOFError, ValueError, zlib.error, _ZstdError, pa.ArrowException)


@dataclass(frozen=True)
class CorpusFormat:
    """How to read rows: field (JSONL key / Parquet column) names and how title and text are joined."""

    id_field: str = "_id"
    text_field: str = "text"
    title_field: str | None = "title"
    join: str = "title_space_text"

    def __post_init__(self) -> None:
        if self.join not in JOIN_MODES:
            raise ValueError(f"CorpusFormat.join={self.join!r} is not one of {JOIN_MODES}")
        for name in ("id_field", "text_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"CorpusFormat.{name} must be a non-empty string")


@dataclass(frozen=True)
class Passage:
    doc_id: str
    text: str
    source: str
    line: int


@dataclass(frozen=True)
class RejectedRow:
    source: str
    line: int
    doc_id: str | None
    reason: str
    raw: str | None


def passage_to_dict(p: Passage) -> dict:
    return dataclasses.asdict(p)


def rejected_to_dict(r: RejectedRow) -> dict:
    return dataclasses.asdict(r)


def build_passage_text(title: Any, text: str, join: str) -> str:
    """Join title and text; a title that is not a non-empty string is ignored (BEIR/MTEB convention)."""
    if join not in JOIN_MODES:
        raise ValueError(f"join mode {join!r} is not one of {JOIN_MODES}")
    has_title = isinstance(title, str) and title.strip() != ""
    if join == "text_only" or not has_title:
        return text
    sep = " " if join == "title_space_text" else "\n"
    return f"{title}{sep}{text}"


# ----------------------------------------------------------------------------------------------- listing


def _is_corpus_name(path: str) -> bool:
    return path.lower().endswith(CORPUS_SUFFIXES)


def _is_hidden(path: str, root: str) -> bool:
    rel = path[len(root):] if path.startswith(root) else path.rsplit("/", 1)[-1]
    return any(part.startswith(".") for part in rel.split("/") if part)


def list_corpus_files(url: str, storage_options: dict | None = None) -> list[str]:
    """Resolve a file, a directory (recursive) or a glob to sorted full URLs of corpus files.

    Directories and globs keep only names ending in one of CORPUS_SUFFIXES (hidden entries are skipped);
    an explicitly named file is returned whatever its name. Raises FileNotFoundError if nothing matches.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.isfile(path):
        found = [path]
    elif fs.isdir(path):
        root = path.rstrip("/") + "/"
        found = [p for p in fs.find(path) if _is_corpus_name(p) and not _is_hidden(p, root)]
    elif any(c in path for c in _GLOB_CHARS):
        found = []
        for match in fs.glob(path):
            if fs.isdir(match):
                root = match.rstrip("/") + "/"
                found += [p for p in fs.find(match) if _is_corpus_name(p) and not _is_hidden(p, root)]
            elif _is_corpus_name(match):
                found.append(match)
    else:
        raise FileNotFoundError(f"corpus path {url!r} does not exist (expected a file, directory or glob)")
    if not found:
        raise FileNotFoundError(
            f"no corpus files under {url!r}: expected names ending in {', '.join(CORPUS_SUFFIXES)}"
        )
    return sorted({fs.unstrip_protocol(p) for p in found})


# ----------------------------------------------------------------------------------------------- rows


def _truncate(raw: str | None) -> str | None:
    return None if raw is None else raw[:RAW_MAX_CHARS]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _bad_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_id(row: dict, field: str) -> tuple[str | None, str | None]:
    """Return (doc_id, None) for a valid id, else (None, reason)."""
    if field not in row:
        return None, f"missing id field {field!r}"
    value = row[field]
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None, f"id field {field!r} must be a string or integer, got {_type_name(value)}"
    if value.strip() == "":
        return None, f"id field {field!r} is empty"
    if len(value) > MAX_ID_CHARS:
        return None, f"id field {field!r} is longer than {MAX_ID_CHARS} characters ({len(value)})"
    if any(c in value for c in "\n\r\x00"):
        return None, f"id field {field!r} contains a newline or NUL character"
    if _bad_unicode(value):
        return None, f"id field {field!r} contains invalid unicode (lone surrogate)"
    return value, None


def _check_str_field(row: dict, field: str, kind: str, required: bool) -> str | None:
    """Return a reject reason for a text/title field, or None if it is acceptable."""
    if field not in row or row[field] is None:
        return f"missing {kind} field {field!r}" if required else None
    value = row[field]
    if not isinstance(value, str):
        nullable = "" if required else " or null"
        return f"{kind} field {field!r} must be a string{nullable}, got {_type_name(value)}"
    if required and value.strip() == "":
        return f"{kind} field {field!r} is empty"
    if _bad_unicode(value):
        return f"{kind} field {field!r} contains invalid unicode (lone surrogate)"
    return None


def _row_to_item(row: dict, fmt: CorpusFormat, source: str, line: int, raw: str) -> Passage | RejectedRow:
    doc_id, reason = _check_id(row, fmt.id_field)
    if reason is None:
        reason = _check_str_field(row, fmt.text_field, "text", required=True)
    use_title = fmt.title_field is not None and fmt.join != "text_only"
    if reason is None and use_title:
        reason = _check_str_field(row, fmt.title_field, "title", required=False)
    if reason is not None:
        return RejectedRow(source, line, doc_id, reason, _truncate(raw))
    title = row.get(fmt.title_field) if use_title else None
    return Passage(doc_id, build_passage_text(title, row[fmt.text_field], fmt.join), source, line)


def _parse_json_line(data: bytes, fmt: CorpusFormat, source: str, line: int) -> Passage | RejectedRow:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raw = data.decode("utf-8", errors="replace")
        return RejectedRow(source, line, None, f"invalid UTF-8 at byte {e.start}: {e.reason}", _truncate(raw))
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        return RejectedRow(source, line, None, f"malformed JSON: {e}", _truncate(text))
    if not isinstance(obj, dict):
        return RejectedRow(source, line, None, f"line is not a JSON object (got {_type_name(obj)})",
                           _truncate(text))
    return _row_to_item(obj, fmt, source, line, text)


def _iter_lines(f: BinaryIO) -> Iterator[bytes]:
    """Split a binary stream on b"\\n" reading fixed chunks (works for gzip/zstd readers without readline)."""
    pending = b""
    while True:
        chunk = f.read(_CHUNK_BYTES)
        if not chunk:
            break
        parts = (pending + chunk).split(b"\n")
        pending = parts.pop()
        yield from parts
    if pending:
        yield pending


def _iter_jsonl(f: BinaryIO, fmt: CorpusFormat, source: str, progress: list[int]) -> Iterator:
    for line_no, data in enumerate(_iter_lines(f), start=1):
        progress[0] = line_no
        if line_no == 1 and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        if data.strip() == b"":
            continue
        yield _parse_json_line(data.rstrip(b"\r"), fmt, source, line_no)


def _iter_parquet(f: BinaryIO, fmt: CorpusFormat, source: str, progress: list[int]) -> Iterator:
    pfile = pq.ParquetFile(f)
    names = pfile.schema_arrow.names
    required = [fmt.id_field, fmt.text_field]
    missing = [c for c in required if c not in names]
    if missing:
        yield RejectedRow(source, 0, None, f"parquet file is missing column(s) {missing}; "
                          f"columns present: {names}. Set CorpusFormat id_field/text_field.", None)
        return
    use_title = fmt.title_field is not None and fmt.join != "text_only" and fmt.title_field in names
    columns = required + ([fmt.title_field] if use_title else [])
    row_no = 0
    for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
        for row in batch.to_pylist():
            progress[0] = row_no + 1
            raw = json.dumps(row, ensure_ascii=False, default=str)
            yield _row_to_item(row, fmt, source, row_no, raw)
            row_no += 1


def read_corpus_file(url: str, fmt: CorpusFormat = CorpusFormat(),
                     storage_options: dict | None = None) -> Iterator[Passage | RejectedRow]:
    """Stream Passages and RejectedRows from one corpus file; never raises on unreadable input."""
    lower = url.lower()
    if not lower.endswith(CORPUS_SUFFIXES):
        yield RejectedRow(url, 0, None, f"unsupported corpus file type: expected a name ending in "
                          f"{', '.join(CORPUS_SUFFIXES)}", None)
        return
    progress = [0]
    is_parquet = lower.endswith(PARQUET_SUFFIXES)
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        compression = None if is_parquet else "infer"
        with fs.open(path, "rb", compression=compression) as f:
            reader = _iter_parquet if is_parquet else _iter_jsonl
            yield from reader(f, fmt, url, progress)
    except _FILE_ERRORS as e:
        where = "rows" if is_parquet else "lines"
        after = f" (stopped after reading {progress[0]} {where})" if progress[0] else ""
        yield RejectedRow(url, 0, None, f"cannot read file: {type(e).__name__}: {e}{after}", None)


def dedupe(items: Iterable[Passage | RejectedRow]) -> Iterator[Passage | RejectedRow]:
    """Keep the first Passage per doc_id; later ones become RejectedRows. RejectedRows pass through."""
    seen: dict[str, tuple[str, int]] = {}
    for item in items:
        if isinstance(item, Passage):
            first = seen.get(item.doc_id)
            if first is not None:
                reason = f"duplicate doc_id {item.doc_id!r} (first seen at {first[0]}:{first[1]})"
                yield RejectedRow(item.source, item.line, item.doc_id, reason, _truncate(item.text))
                continue
            seen[item.doc_id] = (item.source, item.line)
        yield item
