"""Tests for kalm_batch.corpus: validation of dirty rows, file formats, listing, joining and dedupe."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kalm_batch.corpus import (
    CorpusFormat,
    Passage,
    RejectedRow,
    build_passage_text,
    dedupe,
    list_corpus_files,
    passage_to_dict,
    read_corpus_file,
    rejected_to_dict,
)


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


# (line bytes, expected reject-reason substring or None for a good row)
DIRTY_LINES: list[tuple[bytes, str | None]] = [
    (_j({"_id": "d1", "title": "Title", "text": "hello world"}), None),
    (_j({"_id": 7, "text": "seven"}), None),
    (_j({"_id": "d3", "title": None, "text": "no title"}), None),
    (b'{"_id": "x", "text": ', "malformed JSON"),
    (b"[1, 2, 3]", "not a JSON object"),
    (_j({"text": "no id"}), "missing id field '_id'"),
    (_j({"_id": "   ", "text": "blank id"}), "id field '_id' is empty"),
    (_j({"_id": True, "text": "bool id"}), "id field '_id' must be a string or integer, got bool"),
    (_j({"_id": 1.5, "text": "float id"}), "id field '_id' must be a string or integer, got float"),
    (_j({"_id": None, "text": "null id"}), "id field '_id' must be a string or integer, got null"),
    (_j({"_id": ["a"], "text": "list id"}), "id field '_id' must be a string or integer, got list"),
    (_j({"_id": "d12", "title": "t"}), "missing text field 'text'"),
    (_j({"_id": "d13", "text": "  \n "}), "text field 'text' is empty"),
    (_j({"_id": "d14", "text": 5}), "text field 'text' must be a string"),
    (_j({"_id": "d15", "title": 3, "text": "int title"}), "title field 'title' must be a string or null"),
    (b'{"_id": "d16", "text": "caf\xe9 latin-1"}', "invalid UTF-8"),
    (_j({"_id": "x" * 513, "text": "long id"}), "longer than 512"),
    (_j({"_id": "a\nb", "text": "newline id"}), "id field '_id' contains a newline or NUL"),
    (_j({"_id": "a\x00b", "text": "nul id"}), "id field '_id' contains a newline or NUL"),
    (b'{"_id": "d20", "text": "lone \\ud800 surrogate"}', "text field 'text' contains invalid unicode"),
]
N_GOOD = sum(1 for _, r in DIRTY_LINES if r is None)


def _dirty_payload() -> bytes:
    lines = []
    for i, (line, _) in enumerate(DIRTY_LINES):
        lines.append(line)
        if i == 1:
            lines.extend([b"", b"   "])  # blank lines: skipped, not rows
    return b"\n".join(lines) + b"\n"


def _write(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload)
    elif path.name.endswith(".zst"):
        payload = zstandard.ZstdCompressor().compress(payload)
    path.write_bytes(payload)
    return path


def _split(items):
    items = list(items)
    passages = [x for x in items if isinstance(x, Passage)]
    rejected = [x for x in items if isinstance(x, RejectedRow)]
    assert len(passages) + len(rejected) == len(items)
    return passages, rejected


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.json"])
def test_dirty_jsonl_every_row_accounted(tmp_path, name):
    path = _write(tmp_path / name, _dirty_payload())
    passages, rejected = _split(read_corpus_file(str(path)))
    assert len(passages) + len(rejected) == len(DIRTY_LINES)
    assert len(passages) == N_GOOD
    assert [p.doc_id for p in passages] == ["d1", "7", "d3"]
    assert [p.text for p in passages] == ["Title hello world", "seven", "no title"]
    expected = [r for _, r in DIRTY_LINES if r is not None]
    assert len(rejected) == len(expected)
    for row, want in zip(rejected, expected):
        assert want in row.reason, (row, want)
        assert row.source == str(path) and row.line > 0
        assert row.raw is not None and len(row.raw) <= 500
    # physical line numbers: two blank lines follow line 2
    assert rejected[0].line == 6 and passages[2].line == 5
    assert "Expecting" in rejected[0].reason  # the json error text is included
    assert rejected[-1].doc_id == "d20"


def test_long_raw_is_truncated(tmp_path):
    path = _write(tmp_path / "c.jsonl", _j({"_id": "x", "text": 5, "pad": "y" * 2000}) + b"\n")
    (row,) = read_corpus_file(str(path))
    assert isinstance(row, RejectedRow) and len(row.raw) == 500


def test_crlf_and_bom(tmp_path):
    payload = b"\xef\xbb\xbf" + _j({"_id": "a", "text": "x"}) + b"\r\n" + _j({"_id": "b", "text": "y"})
    passages, rejected = _split(read_corpus_file(str(_write(tmp_path / "c.jsonl", payload))))
    assert [p.doc_id for p in passages] == ["a", "b"] and not rejected


def test_parquet_dirty_rows(tmp_path):
    table = pa.table({
        "_id": ["p1", "", None, "x" * 600, "p5", "p6"],
        "title": ["T", None, "t", "t", "t", None],
        "text": ["body", "b", "b", "b", "   ", "only text"],
    })
    path = tmp_path / "c.parquet"
    pq.write_table(table, path, row_group_size=2)
    passages, rejected = _split(read_corpus_file(str(path)))
    assert [(p.doc_id, p.text, p.line) for p in passages] == [("p1", "T body", 0), ("p6", "only text", 5)]
    assert [r.line for r in rejected] == [1, 2, 3, 4]
    assert "id field '_id' is empty" in rejected[0].reason
    assert "got null" in rejected[1].reason
    assert "longer than 512" in rejected[2].reason
    assert "text field 'text' is empty" in rejected[3].reason and rejected[3].doc_id == "p5"


def test_parquet_int_ids_and_custom_columns(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"pid": [1, 2], "body": ["a", "b"]}), path)
    fmt = CorpusFormat(id_field="pid", text_field="body", title_field=None)
    passages, rejected = _split(read_corpus_file(str(path), fmt))
    assert [p.doc_id for p in passages] == ["1", "2"] and not rejected


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["a"], "contents": ["b"]}), path)
    (row,) = read_corpus_file(str(path))
    assert isinstance(row, RejectedRow) and row.line == 0
    assert "'_id'" in row.reason and "'text'" in row.reason and "'contents'" in row.reason


@pytest.mark.parametrize("name,payload", [
    ("missing.jsonl", None),
    ("bad.jsonl.gz", b"this is not gzip data at all"),
    ("bad.jsonl.zst", b"this is not zstd data at all"),
    ("bad.parquet", b"PAR1 not really parquet"),
])
def test_unreadable_file_yields_one_rejected_row(tmp_path, name, payload):
    path = tmp_path / name
    if payload is not None:
        path.write_bytes(payload)
    (row,) = read_corpus_file(str(path))
    assert isinstance(row, RejectedRow)
    assert row.line == 0 and row.doc_id is None and "cannot read file" in row.reason


def test_truncated_gzip_keeps_rows_read_so_far(tmp_path):
    n = 20000  # ~2 MB decompressed: several read chunks, so rows before the damage come out
    rows = b"".join(_j({"_id": f"d{i}", "text": f"text number {i} " * 5}) + b"\n" for i in range(n))
    data = gzip.compress(rows)
    path = tmp_path / "trunc.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    passages, rejected = _split(read_corpus_file(str(path)))
    assert 0 < len(passages) < n
    assert [p.doc_id for p in passages] == [f"d{i}" for i in range(len(passages))]
    assert len(rejected) == 1 and rejected[0].line == 0 and "stopped after reading" in rejected[0].reason


def test_unsupported_suffix(tmp_path):
    path = _write(tmp_path / "c.txt", b"hello\n")
    (row,) = read_corpus_file(str(path))
    assert isinstance(row, RejectedRow) and "unsupported corpus file type" in row.reason


def test_list_directory_recursive_and_glob(tmp_path):
    good = _j({"_id": "a", "text": "x"}) + b"\n"
    for rel in ["b.jsonl", "sub/a.jsonl.gz", "sub/deeper/c.parquet", "notes.txt", ".hidden/x.jsonl"]:
        if rel.endswith(".parquet"):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"_id": ["p"], "text": ["t"]}), tmp_path / rel)
        else:
            _write(tmp_path / rel, good)
    root = f"file://{tmp_path}"
    assert list_corpus_files(str(tmp_path)) == [
        f"{root}/b.jsonl", f"{root}/sub/a.jsonl.gz", f"{root}/sub/deeper/c.parquet"]
    assert list_corpus_files(str(tmp_path / "sub" / "*")) == [
        f"{root}/sub/a.jsonl.gz", f"{root}/sub/deeper/c.parquet"]
    assert list_corpus_files(str(tmp_path / "*.jsonl")) == [f"{root}/b.jsonl"]
    assert list_corpus_files(str(tmp_path / "b.jsonl")) == [f"{root}/b.jsonl"]
    total = [x for url in list_corpus_files(str(tmp_path)) for x in read_corpus_file(url)]
    assert all(isinstance(x, Passage) for x in total) and len(total) == 3


def test_list_nothing_matches(tmp_path):
    with pytest.raises(FileNotFoundError, match="nomatch"):
        list_corpus_files(str(tmp_path / "nomatch-*.jsonl"))
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        list_corpus_files(str(tmp_path / "absent.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        list_corpus_files(str(tmp_path / "empty"))


def test_file_url_and_awkward_paths(tmp_path):
    d = tmp_path / "my corpus ü 数据"
    _write(d / "part one.jsonl", _j({"_id": "a", "text": "x"}) + b"\n")
    urls = list_corpus_files(f"file://{d}")
    assert urls == [f"file://{d}/part one.jsonl"]
    passages, rejected = _split(read_corpus_file(urls[0]))
    assert [p.doc_id for p in passages] == ["a"] and not rejected
    assert passages[0].source == urls[0]
    assert list_corpus_files(str(d / "part*")) == urls


def test_join_modes(tmp_path):
    assert build_passage_text("T", "body", "title_space_text") == "T body"
    assert build_passage_text("T", "body", "title_newline_text") == "T\nbody"
    assert build_passage_text("T", "body", "text_only") == "body"
    assert build_passage_text("", "body", "title_space_text") == "body"
    assert build_passage_text("  ", "body", "title_newline_text") == "body"
    assert build_passage_text(None, "body", "title_space_text") == "body"
    with pytest.raises(ValueError, match="join mode"):
        build_passage_text("T", "body", "concat")
    with pytest.raises(ValueError, match="join"):
        CorpusFormat(join="concat")
    path = _write(tmp_path / "c.jsonl", _j({"_id": "a", "title": "T", "text": "b"}) + b"\n"
                  + _j({"_id": "b", "title": 5, "text": "c"}) + b"\n")
    items = list(read_corpus_file(str(path), CorpusFormat(join="title_newline_text")))
    assert items[0].text == "T\nb" and isinstance(items[1], RejectedRow)
    items = list(read_corpus_file(str(path), CorpusFormat(join="text_only")))
    assert [x.text for x in items] == ["b", "c"]  # title is not used, so its type does not matter


def test_dedupe_keeps_first():
    items = [
        Passage("a", "x", "s1", 1),
        RejectedRow("s1", 2, None, "bad", "{"),
        Passage("b", "y", "s1", 3),
        Passage("a", "z", "s2", 4),
    ]
    out = list(dedupe(items))
    assert out[:3] == items[:3]
    assert isinstance(out[3], RejectedRow)
    assert out[3].reason == "duplicate doc_id 'a' (first seen at s1:1)"
    assert (out[3].source, out[3].line, out[3].doc_id) == ("s2", 4, "a")


def test_to_dict():
    assert passage_to_dict(Passage("a", "x", "s", 1)) == {
        "doc_id": "a", "text": "x", "source": "s", "line": 1}
    assert rejected_to_dict(RejectedRow("s", 0, None, "r", None)) == {
        "source": "s", "line": 0, "doc_id": None, "reason": "r", "raw": None}
