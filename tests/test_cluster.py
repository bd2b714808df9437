"""Cheap worker start-up: light stages must not import torch, and stages only carry env vars the workers lack."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kalm_batch.pipelines import cluster


@pytest.mark.parametrize("module", ["kalm_batch.corpus", "kalm_batch.store.writer", "kalm_batch.store.settings",
                                    "kalm_batch.store.layout",
                                    "kalm_batch.pipelines.encode_stages", "kalm_batch.codec", "kalm_batch.fsio"])
def test_light_modules_do_not_import_torch_or_transformers(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", f"{module} pulled in {out.stdout.strip()} (every read/write worker would pay it)"


def test_package_facade_still_exports_the_public_names():
    import kalm_batch
    from kalm_batch import store

    for name in kalm_batch.__all__:
        assert getattr(kalm_batch, name) is not None
    for name in store.__all__:
        assert getattr(store, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        kalm_batch.no_such_name  # noqa: B018


def test_stage_env_only_carries_what_the_cluster_lacks(monkeypatch):
    monkeypatch.setattr(cluster, "_CLUSTER_ENV", {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    for k in [k for k in cluster.forwarded_env() if k != "AWS_ENDPOINT_URL"]:
        monkeypatch.delenv(k)
    assert cluster.stage_remote_args() == {}  # workers already have it: no runtime_env, pre-started workers reused
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    monkeypatch.setenv("KALM_X", "1")
    assert cluster.stage_remote_args() == {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:2",
                                                                          "KALM_X": "1"}}}
    monkeypatch.setattr(cluster, "_CLUSTER_ENV", None)  # Ray started elsewhere: forward everything
    assert cluster.stage_remote_args()["runtime_env"]["env_vars"]["KALM_X"] == "1"
