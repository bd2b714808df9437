"""Storage contract for kalm_batch.fsio, run against file:// (tmp_path) and s3:// (local moto server)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm_batch import fsio
from kalm_batch.fsio import StorageError, join_url, with_retries


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def base_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh, empty storage root: ``file://<tmp_path>/root`` or ``s3://kalm-test-<n>/root``."""
    if request.param == "file":
        return f"file://{tmp_path}/root"
    return join_url(request.getfixturevalue("s3_bucket"), "root")


def test_bytes_round_trip_and_overwrite(base_url: str) -> None:
    url = join_url(base_url, "a", "b", "blob.bin")
    payload = bytes(range(256)) * 10
    fsio.write_bytes_atomic(url, payload)
    assert fsio.read_bytes(url) == payload
    fsio.write_bytes_atomic(url, b"second")
    assert fsio.read_bytes(url) == b"second"


def test_json_round_trip_is_sorted_utf8(base_url: str) -> None:
    url = join_url(base_url, "manifest.json")
    obj = {"zeta": [1, 2.5, None], "alpha": {"name": "ü 文档"}, "ok": True}
    fsio.write_json_atomic(url, obj)
    assert fsio.read_json(url) == obj
    text = fsio.read_bytes(url).decode("utf-8")
    assert text.index('"alpha"') < text.index('"ok"') < text.index('"zeta"')
    assert "ü 文档" in text and '\n  "alpha"' in text


def test_read_json_rejects_garbage_naming_url(base_url: str) -> None:
    url = join_url(base_url, "bad.json")
    fsio.write_bytes_atomic(url, b"{not json")
    with pytest.raises(ValueError, match="bad.json"):
        fsio.read_json(url)


def test_exists_and_delete(base_url: str) -> None:
    url = join_url(base_url, "x.txt")
    assert not fsio.exists(url)
    fsio.write_bytes_atomic(url, b"x")
    assert fsio.exists(url)
    fsio.delete(url)
    assert not fsio.exists(url)
    fsio.delete(url)  # deleting a missing object is fine


def test_list_files_with_suffix_sorted_full_urls(base_url: str) -> None:
    d = join_url(base_url, "shards")
    for name in ["b.parquet", "a.parquet", "c.json", "sub/d.parquet"]:
        fsio.write_bytes_atomic(join_url(d, name), b"1")
    assert fsio.list_files(d, suffix=".parquet") == [join_url(d, "a.parquet"), join_url(d, "b.parquet")]
    assert fsio.list_files(d) == [join_url(d, n) for n in ["a.parquet", "b.parquet", "c.json"]]
    assert fsio.list_files(join_url(base_url, "missing")) == []


def test_read_missing_raises_file_not_found_naming_url(base_url: str) -> None:
    url = join_url(base_url, "nope", "missing.bin")
    with pytest.raises(FileNotFoundError) as info:
        fsio.read_bytes(url)
    assert info.value.filename == url and url in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        fsio.read_json(join_url(base_url, "missing.json"))
    with pytest.raises(FileNotFoundError, match="cannot open: no such file, object or bucket") as info:
        fsio.open_input(url)
    assert info.value.filename == url


@pytest.mark.s3
def test_missing_bucket_is_file_not_found_with_cause(s3_bucket: str) -> None:
    url = "s3://kalm-no-such-bucket/key.bin"
    with pytest.raises(FileNotFoundError) as info:
        fsio.read_bytes(url)
    assert url in str(info.value) and info.value.__cause__ is not None


@pytest.mark.parametrize("name", ["with space.txt", "ü 文档.txt", "hash#tag#.txt", "dir #1/ü 文档 #2.txt"])
def test_awkward_keys(base_url: str, name: str) -> None:
    url = join_url(base_url, "awkward", name)
    fsio.write_bytes_atomic(url, name.encode("utf-8"))
    assert fsio.exists(url)
    assert fsio.read_bytes(url) == name.encode("utf-8")
    parent = url.rsplit("/", 1)[0]
    assert fsio.list_files(parent) == [url]
    fsio.delete(url)
    assert not fsio.exists(url)


def test_parquet_through_fs_for_pyarrow_and_open_input(base_url: str) -> None:
    url = join_url(base_url, "tables", "part-0.parquet")
    table = pa.table({"doc_id": ["d1", "d2", "ü 文档"], "score": pa.array([0.5, -1.0, 2.0], pa.float32())})
    pafs, path = fsio.fs_for_pyarrow(url)
    pafs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=pafs)
    assert pq.read_table(path, filesystem=pafs).equals(table)
    with fsio.open_input(url) as fh:
        assert fh.seekable()
        assert pq.read_table(fh).equals(table)


def test_local_atomic_write_leaves_no_temp_files(tmp_path) -> None:
    target = tmp_path / "deep" / "dir" / "out.json"
    for i in range(3):
        fsio.write_json_atomic(str(target), {"i": i})
    assert sorted(os.listdir(target.parent)) == ["out.json"]
    assert json.loads(target.read_text("utf-8")) == {"i": 2}


def test_url_to_fs_local_paths_are_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, path = fsio.url_to_fs("rel/x.bin")
    assert path == str(tmp_path / "rel" / "x.bin")
    _, path = fsio.url_to_fs(f"file://{tmp_path}/a b#c")
    assert path == f"{tmp_path}/a b#c"


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://bkt/", ("a/", "/b.txt"), "s3://bkt/a/b.txt"),
        ("s3://bkt", ("a//b",), "s3://bkt/a/b"),
        ("file:///", ("x",), "file:///x"),
        ("/tmp/store/", ("shards", "p.parquet"), "/tmp/store/shards/p.parquet"),
        ("s3://bkt/p", ("",), "s3://bkt/p"),
    ],
)
def test_join_url(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert join_url(base, *parts) == expected


class _Flaky:
    """Raises ``exc`` for the first ``failures`` calls, then returns "ok"."""

    def __init__(self, failures: int, exc: Exception) -> None:
        self.failures, self.exc, self.calls = failures, exc, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


def test_with_retries_recovers_from_transient_errors() -> None:
    fn = _Flaky(2, ConnectionError("connection reset"))
    assert with_retries(fn, what="read s3://b/k", attempts=5, base_delay=0.001) == "ok"
    assert fn.calls == 3


def test_with_retries_gives_up_with_storage_error_and_cause() -> None:
    fn = _Flaky(10, TimeoutError("read timed out"))
    with pytest.raises(StorageError, match="read s3://b/k") as info:
        with_retries(fn, what="read s3://b/k", attempts=3, base_delay=0.001)
    assert fn.calls == 3
    assert isinstance(info.value.__cause__, TimeoutError)


@pytest.mark.parametrize("exc", [FileNotFoundError("gone"), PermissionError("denied"), ValueError("bad")])
def test_with_retries_does_not_retry_permanent_errors(exc: Exception) -> None:
    fn = _Flaky(10, exc)
    with pytest.raises(type(exc)) as info:
        with_retries(fn, what="read s3://b/k", attempts=5, base_delay=0.001)
    assert fn.calls == 1 and info.value is exc  # raised as it came, not wrapped


def test_with_retries_classifies_s3_client_errors() -> None:
    from botocore.exceptions import ClientError

    def client_error(code: str, status: int) -> ClientError:
        response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(response, "GetObject")

    slow = _Flaky(1, client_error("SlowDown", 503))
    assert with_retries(slow, what="read", base_delay=0.001) == "ok" and slow.calls == 2
    bad = _Flaky(1, client_error("InvalidArgument", 400))
    with pytest.raises(ClientError, match="InvalidArgument"):
        with_retries(bad, what="read", base_delay=0.001)
    assert bad.calls == 1


def test_is_transient_for_botocore_connection_errors() -> None:
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    assert fsio.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert fsio.is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:9"))
    wrapped = OSError("wrapped")
    wrapped.__cause__ = ConnectionResetError("reset")
    assert fsio.is_transient(wrapped)
    assert not fsio.is_transient(FileNotFoundError("s3://b/k"))
    assert not fsio.is_transient(OSError("disk full"))
