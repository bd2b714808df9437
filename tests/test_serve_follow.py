"""Serve follows the store: the replica's reader moves to newer versions between requests (no Ray Serve needed:
``StoreFollower`` and the scorer core that uses it are Ray-free; the HTTP layer only carries ``store_version``)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kalm_batch import KaLMReranker
from kalm_batch.serve.follow import StoreFollower
from kalm_batch.store import StoreMismatchError, build_store

DOCS = {f"d{i}": f"passage {i} about " + "alpha beta gamma " * (1 + i % 3) for i in range(6)}


@pytest.fixture(scope="module")
def rr(tiny_model_dir):
    return KaLMReranker(str(tiny_model_dir), chunk_size=4, dtype="float32")


def test_the_follower_switches_between_requests_and_old_readers_keep_their_version(tmp_path, rr):
    url = str(tmp_path / "store")
    build_store(url, rr, DOCS, dtype="float32")
    follower = StoreFollower(url, poll_s=0.0)
    in_flight = follower.current()
    assert in_flight.version == 0
    build_store(url, rr, {**DOCS, "d1": "d1 rewritten"}, dtype="float32")
    follower.maybe_refresh(wait=True)
    now = follower.current()
    assert (now.version, in_flight.version, follower.switches) == (1, 0, 1)
    (fresh,) = rr.encode(["d1 rewritten"])
    np.testing.assert_array_equal(now.get("d1").to_numpy(), fresh.to_numpy())
    (old,) = rr.encode([DOCS["d1"]])  # the request that started on version 0 still reads version 0
    np.testing.assert_allclose(in_flight.get("d1").to_numpy(), old.to_numpy(), atol=1e-6)
    pinned = StoreFollower(url, version=0, poll_s=0.0)
    build_store(url, rr, {**DOCS, "d2": "d2 rewritten"}, dtype="float32")
    pinned.maybe_refresh(wait=True)
    assert pinned.current().version == 0 and pinned.info()["pinned"] == 0


def test_a_newer_version_that_fails_the_check_is_not_served(tmp_path, rr, caplog):
    url = str(tmp_path / "store")
    build_store(url, rr, DOCS, dtype="float32")

    def check(reader):
        if reader.version > 0:
            raise StoreMismatchError(f"store {reader.url} version {reader.version} was made by another model")

    follower = StoreFollower(url, poll_s=0.0, check=check)
    build_store(url, rr, {**DOCS, "d9": "new"}, dtype="float32")
    logger = logging.getLogger("ray.serve")
    logger.addHandler(caplog.handler)  # Ray's logging set-up stops "ray.*" records from reaching the root logger
    try:
        with caplog.at_level(logging.ERROR, logger="ray.serve"):
            follower.maybe_refresh(wait=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert follower.current().version == 0 and "version 1 was made by another model" in follower.last_error
    assert "staying on version 0" in caplog.text


def test_the_scorer_core_scores_on_the_new_version_and_404s_deleted_ids(tmp_path, rr, tiny_model_dir):
    from kalm_batch.serve.schemas import DocRef, ErrorInfo, ScoreJob, ServeConfig
    from kalm_batch.serve.scorer import ScorerCore

    url = str(tmp_path / "store")
    build_store(url, rr, DOCS, dtype="float32")
    core = ScorerCore(ServeConfig(model=str(tiny_model_dir), store=url, store_poll_s=0.01, dtype="float32"))
    job = ScoreJob(["alpha?", "alpha?"], [DocRef("id", "d1"), DocRef("id", "d2")])
    before = core.resolve(job)
    assert before.store_version == 0
    build_store(url, rr, {**{k: v for k, v in DOCS.items() if k != "d2"}, "d1": "d1 rewritten"}, dtype="float32",
                delete_missing=True)
    core.follower.maybe_refresh(wait=True)
    core.follower._last_poll = float("inf")  # no further polls during the assertions
    gone = core.resolve(job)
    assert isinstance(gone, ErrorInfo) and gone.status == 404 and gone.details["store_version"] == 1
    assert "d2" in gone.message and "version 1" in gone.message
    after = core.resolve(ScoreJob(["alpha?"], [DocRef("id", "d1")]))
    assert after.store_version == 1
    (fresh,) = rr.encode(["d1 rewritten"])
    got = core.decode(after.prompts, after.memories).p_yes
    want = rr.score_prompt_ids(after.prompts, [fresh]).p_yes
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # scores of the refreshed id = a fresh encode's
    assert core.info()["store"]["version"] == 1 and core.info()["store"]["follow"]["switches"] == 1
