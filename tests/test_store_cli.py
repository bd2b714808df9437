"""The store's maintenance commands through ``kalm-batch`` (history, inspect --version, compact, vacuum)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from kalm_batch import KaLMReranker
from kalm_batch.cli import main
from kalm_batch.store import StoreVersionError, build_store, open_store

DOCS = {f"d{i}": f"passage {i}: " + "alpha beta gamma " * (1 + i % 4) for i in range(9)}


@pytest.fixture(scope="module")
def rr(tiny_model_dir):
    return KaLMReranker(str(tiny_model_dir), chunk_size=4, max_length=64, dtype="float32")


@pytest.fixture
def store(tmp_path, rr) -> str:
    """Three versions: 0 = 9 docs in 3 files, 1 = d1 edited, 2 = d8 deleted (small files, old ones removed)."""
    url = str(tmp_path / "store")
    build_store(url, rr, DOCS, shard_rows=3)
    build_store(url, rr, {**DOCS, "d1": "d1 was edited"}, shard_rows=3)
    build_store(url, rr, {**{k: v for k, v in DOCS.items() if k != "d8"}, "d1": "d1 was edited"}, shard_rows=3,
                delete_missing=True)
    return url


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_history_and_inspect_at_a_version(store, capsys, rr):
    code, out = run(capsys, "history", store, "--json")
    rows = json.loads(out)
    assert code == 0 and [r["version"] for r in rows] == [2, 1, 0]
    assert [(r["new"], r["refreshed"], r["deleted"]) for r in rows] == [(0, 0, 1), (0, 1, 0), (9, 0, 0)]
    assert [(r["rows_added"], r["rows_removed"]) for r in rows] == [(0, 1), (1, 1), (9, 0)]
    code, table = run(capsys, "history", store)
    assert code == 0 and "refreshed" in table.splitlines()[0] and len(table.splitlines()) == 4
    code, out = run(capsys, "inspect", store, "--version", "0", "--verify")
    info = json.loads(out)
    assert code == 0 and (info["version"], info["rows"], info["verify"]["records_ok"]) == (0, 9, 9)
    assert info["fingerprint"] == rr.fingerprint.to_dict() and info["settings"]["ratio"] == 4
    assert info["settings"]["fingerprint"]["weights_sha256"] == rr.fingerprint.weights_sha256
    code, out = run(capsys, "inspect", store)
    assert json.loads(out)["version"] == 2 and json.loads(out)["rows"] == 8


def test_a_missing_version_is_a_clear_cli_error(store, capsys):
    code = main(["inspect", store, "--version", "7"])
    err = capsys.readouterr().err
    assert code == 2 and "StoreVersionError" in err and "no version 7" in err and store in err


def test_compact_merges_files_and_scores_do_not_change(store, capsys, rr):
    before = open_store(store)
    ids = sorted(DOCS)[:-1]
    want = before.fetch(ids).memories
    scores_before = rr.score_memories(["alpha?"] * len(ids), [want[d] for d in ids]).p_yes
    code, out = run(capsys, "compact", store, "--target-rows", "100")
    result = json.loads(out)
    assert code == 0 and result["version"] == 3 and result["files_removed"] >= 3 and result["files_added"] == 1
    after = open_store(store)
    assert after.version == 3 and len(after) == len(before) == 8 and len(after.index_files()) == 1
    got = after.fetch(ids).memories
    for d in ids:
        assert np.array_equal(got[d].to_numpy(), want[d].to_numpy())  # bit-identical memories
    scores_after = rr.score_memories(["alpha?"] * len(ids), [got[d] for d in ids]).p_yes
    assert np.array_equal(scores_before, scores_after)
    assert json.loads(run(capsys, "history", store, "--json")[1])[0]["operation"] == "compact"


def test_vacuum_keeps_its_minimum_unless_forced(store, capsys, tmp_path):
    code = main(["vacuum", store, "--retain-hours", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "minimum is 168 hours" in err and "--force" in err
    code, out = run(capsys, "vacuum", store)  # the default (168 h): everything is younger, nothing goes
    assert code == 0 and json.loads(out)["files_removed"] == []
    orphan = os.path.join(store, "part-orphan-of-a-killed-run.parquet")
    with open(orphan, "wb") as f:
        f.write(b"not committed")
    past = time.time() - 3600
    os.utime(orphan, (past, past))
    old_files = set(open_store(store, version=0).index_files())
    code, out = run(capsys, "vacuum", store, "--retain-hours", "0", "--force")
    result = json.loads(out)
    assert code == 0 and "part-orphan-of-a-killed-run.parquet" in result["files_removed"]
    assert not os.path.exists(orphan) and result["indexes_removed"] >= 1
    latest = open_store(store)
    assert latest.verify()["records_corrupt"] == 0 and len(latest) == 8  # the latest version is intact
    assert not all(os.path.exists(u) for u in old_files)  # version 0's removed files are gone
    with pytest.raises(StoreVersionError, match="version 0 can no longer be read.*vacuum"):
        open_store(store, version=0)
