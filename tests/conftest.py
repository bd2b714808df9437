"""Shared pytest fixtures for kalm-batch.

Sections: S3 (local moto server). Other fixture sections are appended below by the project lead.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from storage.local_s3 import LocalS3

# =============================================================================== S3 fixtures
# A session-wide moto server on 127.0.0.1 (the pattern s3fs's own test-suite uses), with the
# AWS_* variables pointing at it for the session; each test gets a fresh, empty bucket.

_S3_BUCKET_IDS = itertools.count()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3]:
    """Start LocalS3 on 127.0.0.1 for the session and point AWS_* env vars at it (restored afterwards)."""
    server = LocalS3(port=0, bucket=None).start()
    touched = list(server.env()) + ["AWS_SESSION_TOKEN", "AWS_PROFILE"]
    saved = {key: os.environ.get(key) for key in touched}
    server.apply_env()
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_server: LocalS3) -> str:
    """Reset moto and return the base URL of a fresh, empty bucket, e.g. ``s3://kalm-test-3``."""
    s3_server.reset()
    return s3_server.create_bucket(f"kalm-test-{next(_S3_BUCKET_IDS)}")



# A module-scoped local Ray (2 CPUs) started after the S3 server; shared by the rerank job and sweep tests.


@pytest.fixture(scope="module")
def ray_session(s3_server):
    """Started after the S3 server so the workers inherit its AWS_* endpoint; shut down after the module."""
    import ray

    from kalm_batch.pipelines.cluster import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


# =============================================================================== end of S3 fixtures


# =============================================================================== model fixtures
# The tiny random T5Gemma2 + byte-level tokenizer, written once per session and loaded by every test through the
# same code path a real checkpoint uses.


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from kalm_batch.tiny import write_random_model

    return write_random_model(tmp_path_factory.mktemp("tiny-model") / "model", shape="tiny", seed=0)


# =============================================================================== hypothesis
# Keep hypothesis's example database and constants out of the working tree (tests never write to the cwd).


def pytest_configure(config):
    import tempfile

    from hypothesis import configuration

    configuration.set_hypothesis_home_dir(tempfile.mkdtemp(prefix="kalm-hypothesis-"))
