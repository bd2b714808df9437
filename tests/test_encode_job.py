"""The corpus encode job on a real local Ray, to file:// and to the moto S3 server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from kalm_batch import KaLMReranker, fsio
from kalm_batch.pipelines import encode_stages as S
from kalm_batch.pipelines.encode import EncodeConfig, NoGoodRowsError, default_rows_per_task, run_encode
from kalm_batch.pooling import n_vectors
from kalm_batch.sample import write_sample_corpus
from kalm_batch.store import IncompleteStoreError, StoreMismatchError, history, open_store
from kalm_batch.store.settings import delta_options, table_uri
from tests.procs import kill_session

pytestmark = [pytest.mark.ray]
MAX_LEN = 64
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    import ray

    from kalm_batch.pipelines.cluster import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_corpus(str(tmp_path_factory.mktemp("sample")), max_docs=60, n_queries=5)


def _cfg(model, corpus, store, **kw) -> EncodeConfig:
    base = {"model": str(model), "corpus": corpus, "store": store, "max_length": MAX_LEN, "dtype": "float32",
                "shard_rows": 16, "rows_per_task": 16}
    base.update(kw)
    return EncodeConfig(**base)


def _table(store: str, version: int | None = None):
    """The store's rows as deltalake alone reads them (every copy of every id)."""
    import deltalake

    return deltalake.DeltaTable(table_uri(store), version=version, storage_options=delta_options(store)
                                ).to_pyarrow_table()


def _corpus_texts(path) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        out[row["_id"]] = (row["title"] + " " + row["text"]) if row.get("title") else row["text"]
    return out


def _assert_store_matches_core(store_url, model_dir, texts: dict[str, str], ratio=4, max_length=MAX_LEN):
    reader = open_store(store_url)
    assert len(reader) == len(texts)
    core = KaLMReranker(str(model_dir), dtype="float32", max_length=max_length, chunk_size=ratio)
    ids = sorted(texts)
    fetched = reader.fetch(ids)
    assert not fetched.missing and not fetched.corrupt
    for doc_id, mem in zip(ids, core.encode([texts[i] for i in ids])):
        got = fetched.memories[doc_id]
        assert got.n_tokens == mem.n_tokens and got.vectors.shape == mem.vectors.shape
        assert torch.max(torch.abs(got.vectors - mem.vectors)).item() <= 1e-6, doc_id


def test_encode_sample_corpus_to_local_store(tiny_model_dir, sample, tmp_path):
    store = f"file://{tmp_path}/store dir"
    summary = run_encode(_cfg(tiny_model_dir, sample.corpus_path, store, workers=1))
    texts = _corpus_texts(sample.corpus_path)
    assert summary.input_rows == summary.stored_new == len(texts) and summary.rejected == 0
    assert summary.truncated > 0 and 0 <= summary.padding_ratio < 0.5
    # the one encoder actor's load and busy times are disjoint parts of the job's time; the summary rounds seconds
    # (busy to 0.01 s, which a fast machine may read as 0.0), so: bounds, and the share agreeing with the seconds
    busy, load, wall = summary.encoder_seconds, summary.encoder_load_seconds, summary.seconds
    assert busy >= 0 and 0 < load and busy + load <= wall + 0.011  # a checkpoint does not load in under 5 ms
    assert 0 <= summary.encoder_busy_share <= 1
    assert summary.encoder_busy_share == pytest.approx(busy / wall, abs=0.0006 + 0.006 / wall)
    reader = open_store(store)
    s = reader.summary()
    assert s["rows"] == len(texts) == summary.store_rows and s["files"] >= 3 and s["version"] == summary.version
    assert (s["ratio"], s["dtype"], s["max_length"]) == (4, "float32", MAX_LEN)
    assert sorted(_table(store).column("doc_id").to_pylist()) == sorted(texts)  # each id once
    _assert_store_matches_core(store, tiny_model_dir, texts)
    assert reader.verify()["records_corrupt"] == 0

    again = run_encode(_cfg(tiny_model_dir, sample.corpus_path, store))  # same command: nothing new, no new version
    assert again.stored_new == again.refreshed == again.commits == 0 and again.skipped_existing == len(texts)
    assert again.version == summary.version == open_store(store).version


def _edit_corpus(src, dst: Path, *, edit: int, drop: int, new: list[dict]) -> list[dict]:
    rows = [json.loads(line) for line in Path(src).read_text().splitlines()]
    rows[edit]["text"] += " (edited)"
    del rows[drop]
    rows += new
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_refresh_replaces_changed_adds_new_and_deletes_missing_only_when_asked(tiny_model_dir, sample, tmp_path):
    store = str(tmp_path / "store")
    first = run_encode(_cfg(tiny_model_dir, sample.corpus_path, store))
    old_texts = _corpus_texts(sample.corpus_path)
    edited = tmp_path / "edited.jsonl"
    rows = _edit_corpus(sample.corpus_path, edited, edit=3, drop=5,
                        new=[{"_id": "new-1", "title": "", "text": "a passage added today"}])
    removed = json.loads(Path(sample.corpus_path).read_text().splitlines()[5])["_id"]
    s = run_encode(_cfg(tiny_model_dir, str(edited), store))  # default: refresh, keep ids the corpus lacks
    assert (s.stored_new, s.refreshed, s.deleted, s.skipped_existing, s.rejected) == (1, 1, 0, len(rows) - 2, 0)
    assert s.input_rows == s.stored_new + s.refreshed + s.skipped_existing + s.rejected
    assert s.version == first.version + 1 and s.store_rows == len(old_texts) + 1
    texts = {**old_texts, **_corpus_texts(edited)}
    _assert_store_matches_core(store, tiny_model_dir, texts)  # the edited passage has its new memory
    s2 = run_encode(_cfg(tiny_model_dir, str(edited), store, delete_missing=True))
    assert (s2.stored_new, s2.refreshed, s2.deleted) == (0, 0, 1) and s2.version == s.version + 1
    texts.pop(removed)
    _assert_store_matches_core(store, tiny_model_dir, texts)
    assert sorted(_table(store).column("doc_id").to_pylist()) == sorted(texts)
    old = open_store(store, version=first.version)  # time travel: the first version is untouched
    assert sorted(_table(store, first.version).column("doc_id").to_pylist()) == sorted(old_texts) == sorted(
        old.fetch(list(old_texts)).memories)
    edited_id = rows[3]["_id"]
    core = KaLMReranker(str(tiny_model_dir), dtype="float32", max_length=MAX_LEN)
    (was,) = core.encode([old_texts[edited_id]])
    assert torch.max(torch.abs(old.get(edited_id).vectors - was.vectors)).item() <= 1e-6  # the old text's memory
    ops = [(h["version"], h["operation"], h["new"], h["refreshed"], h["deleted"]) for h in history(store)]
    assert ops[:2] == [(s2.version, "encode", 0, 0, 1), (s.version, "encode", 1, 1, 0)]


def test_no_refresh_keeps_and_reports_stale_memories(tiny_model_dir, sample, tmp_path):
    store = str(tmp_path / "store")
    run_encode(_cfg(tiny_model_dir, sample.corpus_path, store))
    edited = tmp_path / "edited.jsonl"
    rows = _edit_corpus(sample.corpus_path, edited, edit=3, drop=len(_corpus_texts(sample.corpus_path)) - 1, new=[])
    s = run_encode(_cfg(tiny_model_dir, str(edited), store, refresh=False, delete_missing=False))
    assert (s.stored_new, s.refreshed, s.skipped_existing, s.changed_since_stored, s.commits) == (0, 0, len(rows),
                                                                                                   1, 0)
    changed = [json.loads(x) for x in (Path(s.errors_file).parent / "changed.jsonl").read_text().splitlines()]
    assert [(c["doc_id"], c["line"], c["reason"]) for c in changed] == [(rows[3]["_id"], 4, S.CHANGED_TEXT)]
    _assert_store_matches_core(store, tiny_model_dir, _corpus_texts(sample.corpus_path))  # store unchanged


@pytest.mark.s3
def test_encode_from_s3_corpus_to_s3_store(tiny_model_dir, sample, s3_bucket):
    corpus = f"{s3_bucket}/corpus/part-0.jsonl"
    fsio.write_bytes_atomic(corpus, Path(sample.corpus_path).read_bytes())
    store = f"{s3_bucket}/stores/tiny r4"
    summary = run_encode(_cfg(tiny_model_dir, f"{s3_bucket}/corpus/", store, dtype="bfloat16"))
    assert summary.stored_new == len(_corpus_texts(sample.corpus_path))
    reader = open_store(store)
    assert reader.dtype == "bfloat16" and reader.verify()["records_corrupt"] == 0
    # bf16 memories equal the core's memories rounded to bf16
    core = KaLMReranker(str(tiny_model_dir), dtype="float32", max_length=MAX_LEN)
    texts = _corpus_texts(sample.corpus_path)
    some = sorted(texts)[:10]
    got = reader.fetch(some).memories
    for d, mem in zip(some, core.encode([texts[i] for i in some])):
        want = mem.vectors.to(torch.bfloat16).float()
        assert torch.max(torch.abs(got[d].vectors - want)).item() <= 1e-2 * max(1.0, want.abs().max().item())


def _write_dirty_corpus(root: Path) -> dict:
    root.mkdir(parents=True)
    good = [{"_id": f"g{i}", "title": f"T{i}", "text": f"good passage {i} about things"} for i in range(6)]
    lines = [json.dumps(r) for r in good]
    lines += [
        '{"_id": "bad-json", "text": ',                       # malformed JSON
        json.dumps({"title": "no id", "text": "x"}),           # missing id
        json.dumps({"_id": "", "text": "x"}),                  # empty id
        json.dumps({"_id": "empty-text", "text": "   "}),      # empty text
        json.dumps({"_id": "int-text", "text": 42}),           # non-string text
        json.dumps({"_id": "g0", "text": "a duplicate of g0"}),  # duplicate id (first kept)
        json.dumps({"_id": "long", "text": "word " * 500}),    # longer than max_length: truncated, stored
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"_id": "bad-utf8", "text": "\xff\xfe"}\n'
    (root / "a.jsonl").write_bytes(data)
    (root / "b.jsonl.gz").write_bytes(b"this is not gzip")  # unreadable file
    (root / "c.jsonl").write_text(json.dumps({"_id": "g0", "text": "another duplicate"}) + "\n")
    return {"input_rows": len(lines) + 1 + 1 + 1, "stored": 7, "rejected": 9}


def test_bad_rows_are_recorded_and_the_rest_is_stored(tiny_model_dir, tmp_path):
    expect = _write_dirty_corpus(tmp_path / "dirty")
    store = str(tmp_path / "store")
    summary = run_encode(_cfg(tiny_model_dir, str(tmp_path / "dirty"), store))
    assert summary.stored_new == expect["stored"] and summary.rejected == expect["rejected"]
    assert summary.input_rows == expect["input_rows"] == summary.stored_new + summary.rejected
    assert summary.truncated == 1
    errors = [json.loads(x) for x in Path(summary.errors_file).read_text().splitlines()]
    assert summary.errors_file.startswith(str(tmp_path / "store/_kalm/errors/"))
    assert history(store)[0]["errors"] == str(Path(summary.errors_file).parent)  # the version names its report
    reasons = " | ".join(e["reason"] for e in errors)
    for needle in ("JSON", "id", "text", "UTF-8", "duplicate doc_id 'g0'", "b.jsonl.gz"):
        assert needle in reasons or any(needle in e["source"] for e in errors), needle
    assert sum("duplicate" in e["reason"] for e in errors) == 2
    from kalm_batch.store.writer import text_hash

    table = _table(store)
    assert sorted(table.column("doc_id").to_pylist()) == sorted([f"g{i}" for i in range(6)] + ["long"])
    rows = [r for r in table.to_pylist() if r["doc_id"] == "g0"]  # the first g0 was kept
    assert len(rows) == 1 and rows[0]["text_sha256"] == text_hash("T0 good passage 0 about things")


def test_all_bad_corpus_is_an_error_not_an_empty_store(tiny_model_dir, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n{broken\n')
    with pytest.raises(NoGoodRowsError, match="every one of the 2 input rows") as err:
        run_encode(_cfg(tiny_model_dir, str(tmp_path / "bad.jsonl"), str(tmp_path / "store")))
    with pytest.raises(IncompleteStoreError, match="holds no memory store .*Encode a corpus into it first"):
        open_store(str(tmp_path / "store"))
    (report,) = (tmp_path / "store/_kalm/errors").glob("run-*/rejected.jsonl")
    assert str(report) in str(err.value) and len(report.read_text().splitlines()) == 2


def test_other_settings_are_refused_unless_overwrite(tiny_model_dir, sample, tmp_path):
    store = str(tmp_path / "store")
    run_encode(_cfg(tiny_model_dir, sample.corpus_path, store))
    with pytest.raises(StoreMismatchError, match="ratio: 4 .store. != 8"):
        run_encode(_cfg(tiny_model_dir, sample.corpus_path, store, ratio=8))
    with pytest.raises(StoreMismatchError, match="max_length"):
        run_encode(_cfg(tiny_model_dir, sample.corpus_path, store, max_length=32))
    summary = run_encode(_cfg(tiny_model_dir, sample.corpus_path, store, ratio=8, overwrite=True))
    assert summary.skipped_existing == 0 and open_store(store).ratio == 8 and open_store(store, version=0).ratio == 4


def test_a_refresh_killed_midway_then_rerun_commits_each_id_once_with_current_text(tiny_model_dir, tmp_path):
    """SIGKILL the job (driver + its local Ray) during a refresh, after a progress commit; earlier versions are
    untouched, the partial version holds each id once, and the same command then completes it exactly once."""
    from kalm_batch.store import build_store

    info = write_sample_corpus(str(tmp_path / "corpus"), max_docs=240, n_queries=1)
    old_texts = _corpus_texts(info.corpus_path)
    store = tmp_path / "store"
    core = KaLMReranker(str(tiny_model_dir), dtype="float32", max_length=96, chunk_size=4)
    base = build_store(str(store), core, old_texts, dtype="float32", text_join="title_space_text", shard_rows=64)
    rows = [json.loads(line) for line in Path(info.corpus_path).read_text().splitlines()]
    for r in rows:
        r["text"] += " (revised)"
    removed = rows.pop(7)["_id"]
    rows += [{"_id": f"new-{i}", "title": "", "text": f"a passage added later, number {i}"} for i in range(5)]
    corpus = tmp_path / "revised.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    new_texts = _corpus_texts(corpus)
    cmd = [sys.executable, str(REPO / "jobs/encode_corpus.py"), "--model", str(tiny_model_dir), "--corpus",
           str(corpus), "--store", str(store), "--max-length", "96", "--dtype", "float32", "--shard-rows", "8",
           "--rows-per-task", "8", "--num-cpus", "2", "--commit-every-files", "1", "--delete-missing"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    job_log = tmp_path / "job.log"
    with open(job_log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    log_dir, deadline = store / "_delta_log", time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list(log_dir.glob("*.json"))) >= 2:  # a progress commit on top of version 0
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kill_session(proc.pid)  # the local Ray the job started is in its session, not its process group
    partial = open_store(str(store))
    assert partial.version >= 1, f"no commit before the deadline; the job said: {job_log.read_text()[-3000:]}"
    ids = _table(str(store)).column("doc_id").to_pylist()
    assert len(ids) == len(set(ids)) and removed in ids  # each id once; deletions come with the final commit
    if len(set(ids) & {f"new-{i}" for i in range(5)}) == 5 and removed not in ids:
        pytest.fail("the job finished before it could be killed; make the corpus bigger")
    assert sorted(_table(str(store), base.version).column("doc_id").to_pylist()) == sorted(old_texts)
    from kalm_batch.store.writer import text_hash

    table = _table(str(store))  # every row of the partial version is the old or the new text of its id, intact
    for d, sha in zip(table.column("doc_id").to_pylist(), table.column("text_sha256").to_pylist()):
        assert sha in {text_hash(t) for t in (old_texts.get(d), new_texts.get(d)) if t is not None}, d
    assert partial.verify()["records_corrupt"] == 0

    summary = run_encode(_cfg(tiny_model_dir, str(corpus), str(store), max_length=96, shard_rows=8, rows_per_task=8,
                              delete_missing=True))
    assert summary.deleted == 1 and summary.skipped_existing >= 8  # the refreshes committed before the kill stay
    assert summary.input_rows == summary.stored_new + summary.refreshed + summary.skipped_existing
    assert sorted(_table(str(store)).column("doc_id").to_pylist()) == sorted(new_texts)  # exactly once each
    _assert_store_matches_core(str(store), tiny_model_dir, new_texts, max_length=96)  # memories of the current text
    old = open_store(str(store), version=base.version)  # the first version is untouched
    assert len(old) == len(old_texts) and old.verify()["records_corrupt"] == 0


def _refresh_and_prune_corpora(src, folder: Path) -> dict[str, tuple[Path, dict[str, str]]]:
    """"refresh": passages 0-9 edited and 3 new ones; "prune": the last 2 passages gone (nothing to encode)."""
    rows = [json.loads(line) for line in Path(src).read_text().splitlines()]
    refresh = [dict(r, text=r["text"] + " (edited)") if i < 10 else r for i, r in enumerate(rows)]
    refresh += [{"_id": f"new-{i}", "title": "", "text": f"passage {i} added today"} for i in range(3)]
    out = {}
    for name, kept in (("refresh", refresh), ("prune", rows[:-2])):
        path = folder / f"corpus-{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        out[name] = (path, _corpus_texts(path))
    return out


def test_two_encode_jobs_on_one_store_one_commits_the_other_fails_clearly(tiny_model_dir, sample, tmp_path,
                                                                           monkeypatch, capsys):
    """Two encode jobs on one existing store at once, end to end on the module's Ray: "refresh" (the ``kalm-batch
    encode`` CLI: 10 edited and 3 new passages to encode) and "prune" (``run_encode --delete-missing``: 2 passages
    gone, nothing to encode). Both prepare on version 0 before either commits; prune commits version 1 first while
    refresh encodes. The order is made certain by wrapping the real ``StoreWriter.prepare``/``commit_files`` with a
    barrier and an event (no sleeps). Refresh's commit on top of version 0 is refused: exit code 2 and one message
    saying what to do; its data files stay on disk, invisible. Every version holds each id once, reads, verifies."""
    from kalm_batch.cli import main
    from kalm_batch.store import build_store
    from kalm_batch.store.writer import StoreWriter, text_hash

    wait_s = 300
    store = str(tmp_path / "store")
    core = KaLMReranker(str(tiny_model_dir), dtype="float32", max_length=MAX_LEN, chunk_size=4)
    old = _corpus_texts(sample.corpus_path)
    base = build_store(store, core, old, dtype="float32", text_join="title_space_text", shard_rows=16).version
    corpora = _refresh_and_prune_corpora(sample.corpus_path, tmp_path)
    prepared, pruned = threading.Barrier(2, timeout=wait_s), threading.Event()
    real_prepare, real_commit = StoreWriter.prepare, StoreWriter.commit_files

    def job() -> str:
        return threading.current_thread().name.split("_")[0]  # ThreadPoolExecutor names threads "<prefix>_<n>"

    def prepare(self, *args, **kw):
        out = real_prepare(self, *args, **kw)
        if job() in ("refresh", "prune"):
            prepared.wait()  # neither job goes on before both have read version 0
        return out

    def commit_files(self, *args, **kw):
        if job() == "refresh" and not pruned.wait(wait_s):
            raise RuntimeError("the prune job did not commit in time")
        return real_commit(self, *args, **kw)

    monkeypatch.setattr(StoreWriter, "prepare", prepare)
    monkeypatch.setattr(StoreWriter, "commit_files", commit_files)
    refresh_argv = ["encode", "--model", str(tiny_model_dir), "--corpus", str(corpora["refresh"][0]), "--store",
                    store, "--max-length", str(MAX_LEN), "--dtype", "float32", "--shard-rows", "16",
                    "--rows-per-task", "16"]

    def prune():
        try:
            return run_encode(_cfg(tiny_model_dir, str(corpora["prune"][0]), store, delete_missing=True))
        finally:
            pruned.set()  # also when it fails: the refresh job stops waiting

    with ThreadPoolExecutor(1, thread_name_prefix="refresh") as pool_r, \
            ThreadPoolExecutor(1, thread_name_prefix="prune") as pool_p:
        refresh_future, prune_future = pool_r.submit(main, refresh_argv), pool_p.submit(prune)
        refresh_exit, pruned_summary = refresh_future.result(2 * wait_s), prune_future.result(2 * wait_s)
    assert (pruned_summary.version, pruned_summary.deleted, pruned_summary.stored_new) == (base + 1, 2, 0)
    assert refresh_exit == 2
    messages = [line for line in capsys.readouterr().err.splitlines() if "kalm-batch encode: error:" in line]
    assert len(messages) == 1, messages
    assert f"ConcurrentWriterError: another writer committed version {base + 1} of {store}" in messages[0]
    assert "nothing of it is visible" in messages[0] and "re-running the same command resumes" in messages[0]

    assert open_store(store).version == base + 1  # the refused job left no version behind
    for version, texts in {base: old, base + 1: corpora["prune"][1]}.items():
        table = _table(store, version)  # every version: each id once, with its text's hash, all records intact
        ids = table.column("doc_id").to_pylist()
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(texts), version
        shas = dict(zip(ids, table.column("text_sha256").to_pylist()))
        assert all(shas[d] == text_hash(t) for d, t in texts.items()), version
        check = open_store(store, version=version).verify()
        assert (check["records_ok"], check["records_corrupt"], check["bad_files"]) == (len(texts), 0, {}), version
    import deltalake
    import pyarrow.parquet as pq

    live = {u.removeprefix("file://") for u in deltalake.DeltaTable(table_uri(store)).file_uris()}
    unused = {str(p) for p in Path(store).glob("part-*.parquet")} - live
    unused_ids = {d for f in unused for d in pq.read_table(f, columns=["doc_id"]).column("doc_id").to_pylist()}
    assert {"new-0", "new-1", "new-2"} <= unused_ids  # the refused job's encoded files: on disk, in no version


def test_default_sort_window_bounds_a_calls_memories():
    # 1024 passages per encoder call unless their memories could exceed 2^18 vectors (max_length / ratio each)
    assert default_rows_per_task(4, 512) == default_rows_per_task(4, 1024) == 1024
    assert default_rows_per_task(1, 1024) == 256 and default_rows_per_task(2, 1024) == 512
    assert default_rows_per_task(1, 32768) == 64  # never below 64: very long passages still batch
    for ratio in (1, 2, 4, 8, 16, 32):
        for max_length in (128, 512, 1024, 8192):
            n = default_rows_per_task(ratio, max_length)
            assert 64 <= n <= 1024 and (n == 64 or n * n_vectors(max_length, ratio) <= 1 << 18)
