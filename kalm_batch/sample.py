"""Build a small BEIR-format sample dataset from the running Python's standard-library docstrings.

The stdlib is parsed with :mod:`ast` (modules are never imported). Documents are module, class and function
docstrings (``inspect.cleandoc``-ed, >= 40 characters) titled with their dotted qualified name. Known-item
queries are the first sentence of a docstring with the qualified and bare names removed; qrels point each
query at its document with score 1. Output is deterministic for a given Python installation and arguments.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import sysconfig
from collections import Counter
from dataclasses import dataclass

from kalm_batch import fsio

MIN_DOC_CHARS = 40
MIN_QUERY_WORDS = 4
MAX_QUERY_WORDS = 64
SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "tkinter", "site-packages", "dist-packages", "__pycache__"}
)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_DEF_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass(frozen=True)
class SampleCorpusInfo:
    corpus_path: str
    queries_path: str
    qrels_path: str
    n_docs: int
    n_queries: int


@dataclass(frozen=True)
class StdlibDoc:
    title: str
    text: str


def _stdlib_files(root: str) -> list[tuple[str, str]]:
    """(path, dotted module name) for every stdlib .py file outside SKIP_DIRS, sorted by relative path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            parts = rel[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and all(p.isidentifier() for p in parts):
                out.append((rel, ".".join(parts)))
    out.sort()
    return [(os.path.join(root, rel), module) for rel, module in out]


def _usable(text: str | None) -> bool:
    if text is None or len(text) < MIN_DOC_CHARS:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from escapes in the source
        return False
    return True


def _docs_from_body(body: list[ast.stmt], prefix: str) -> list[StdlibDoc]:
    docs = []
    for node in body:
        if isinstance(node, _DEF_NODES):
            qualname = f"{prefix}.{node.name}"
            text = ast.get_docstring(node, clean=True)
            if _usable(text):
                docs.append(StdlibDoc(qualname, text))
            if isinstance(node, ast.ClassDef):
                docs.extend(_docs_from_body(node.body, qualname))
    return docs


def _docs_from_file(path: str, module: str) -> list[StdlibDoc]:
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError, RecursionError):
        return []  # unreadable or not valid for this interpreter: the sample simply has no docs from it
    docs = []
    text = ast.get_docstring(tree, clean=True)
    if _usable(text):
        docs.append(StdlibDoc(module, text))
    return docs + _docs_from_body(tree.body, module)


def collect_stdlib_docs(stdlib_dir: str | None = None) -> list[StdlibDoc]:
    """All usable docstrings in deterministic order: sorted files, then source order."""
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    docs: list[StdlibDoc] = []
    for path, module in _stdlib_files(root):
        docs.extend(_docs_from_file(path, module))
    return docs


def _spread(docs: list[StdlibDoc], max_docs: int | None) -> list[StdlibDoc]:
    if max_docs is None or len(docs) <= max_docs:
        return docs
    return [docs[i * len(docs) // max_docs] for i in range(max_docs)]


def _name_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(?<![\w.]){re.escape(name)}(?!\w)", re.IGNORECASE)


def make_query(doc_title: str, doc_text: str) -> str | None:
    """First sentence of the docstring without the qualified/bare name, or None if unusable."""
    paragraph = " ".join(doc_text.split("\n\n", 1)[0].split())
    end = _SENTENCE_END.search(paragraph)
    sentence = paragraph[: end.end()] if end else paragraph
    bare = doc_title.rsplit(".", 1)[-1]
    for name in (doc_title, bare):
        sentence = _name_pattern(name).sub(" ", sentence)
    words = sentence.split()[:MAX_QUERY_WORDS]
    query = " ".join(words)
    lowered = query.lower()
    if len(words) < MIN_QUERY_WORDS or doc_title.lower() in lowered or bare.lower() in lowered:
        return None
    return query


def _pick_queries(doc_ids: list[str], docs: list[StdlibDoc], n_queries: int, seed: int) -> list[tuple[str, str]]:
    """[(doc_id, query_text)] for up to n_queries docs with a unique text, chosen by a seeded shuffle."""
    text_counts = Counter(d.text for d in docs)
    order = [i for i in range(len(docs)) if text_counts[docs[i].text] == 1]  # unambiguous known items only
    random.Random(seed).shuffle(order)
    picked: dict[int, str] = {}
    seen_texts: set[str] = set()
    for i in order:
        if len(picked) >= n_queries:
            break
        query = make_query(docs[i].title, docs[i].text)
        if query is not None and query not in seen_texts:
            picked[i] = query
            seen_texts.add(query)
    return [(doc_ids[i], picked[i]) for i in sorted(picked)]


def _atomic_write(path: str, data: str) -> None:
    fsio.write_bytes_atomic(path, data.encode("utf-8"))


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_sample_corpus(out_dir: str, max_docs: int | None = 2000, n_queries: int = 100,
                        seed: int = 0) -> SampleCorpusInfo:
    """Write corpus.jsonl, queries.jsonl and qrels/test.tsv under out_dir (a local directory).

    Returns fewer than n_queries queries only if the corpus has too few docs with a usable first sentence.
    """
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1 or None, got {max_docs}")
    if n_queries < 0:
        raise ValueError(f"n_queries must be >= 0, got {n_queries}")
    docs = _spread(collect_stdlib_docs(), max_docs)
    if not docs:
        raise FileNotFoundError(f"no docstrings found under stdlib {sysconfig.get_paths()['stdlib']!r}")
    doc_ids = [f"stdlib-{i:06d}" for i in range(1, len(docs) + 1)]
    queries = _pick_queries(doc_ids, docs, n_queries, seed)
    query_ids = [f"q-{i:06d}" for i in range(1, len(queries) + 1)]
    corpus_path = os.path.join(out_dir, "corpus.jsonl")
    queries_path = os.path.join(out_dir, "queries.jsonl")
    qrels_path = os.path.join(out_dir, "qrels", "test.tsv")
    _atomic_write(corpus_path, _jsonl([{"_id": i, "title": d.title, "text": d.text}
                                       for i, d in zip(doc_ids, docs)]))
    _atomic_write(queries_path, _jsonl([{"_id": q, "text": t} for q, (_, t) in zip(query_ids, queries)]))
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t1\n" for q, (d, _) in zip(query_ids, queries))
    _atomic_write(qrels_path, qrels)
    return SampleCorpusInfo(corpus_path, queries_path, qrels_path, len(docs), len(queries))
