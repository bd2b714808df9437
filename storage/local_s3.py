"""Local S3 for developers, tests and the quickstart: a moto server on 127.0.0.1.

Usage from the repo root::

    python -m storage.local_s3 --port 9000 --bucket kalm
    # prints `export AWS_ENDPOINT_URL=...` etc.; paste them into another shell, then use s3://kalm/...

From Python (tests, notebooks)::

    with LocalS3() as s3:
        s3.apply_env()
        ...  # kalm_batch.fsio now talks to s3://kalm/ on the local server
"""

from __future__ import annotations

import argparse
import shlex
import signal
import logging
import os
import threading
import urllib.request
from typing import Any

_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe the EC2 metadata service for credentials
}


class LocalS3:
    """A moto S3 server on 127.0.0.1 (free port by default), optionally with one bucket created."""

    def __init__(self, port: int = 0, bucket: str | None = "kalm") -> None:
        self.port = port
        self.bucket = bucket
        self.endpoint_url = ""
        self._server: Any = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> LocalS3:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        try:
            server.start()
        except OSError as exc:
            raise OSError(f"cannot start local S3 on 127.0.0.1:{self.port}: {exc}; pick another --port") from exc
        self._server = server
        host, port = server.get_host_and_port()
        self.port = port
        self.endpoint_url = f"http://{host}:{port}"
        if self.bucket:
            self.create_bucket(self.bucket)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- configuration
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3/s3fs (and kalm-batch) at this server."""
        if not self.endpoint_url:
            raise RuntimeError("LocalS3.env(): the server is not started; call start() or use `with LocalS3()`")
        no_proxy = ",".join(
            x for x in [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"] if x
        )
        return {"AWS_ENDPOINT_URL": self.endpoint_url, **_CREDENTIALS, "NO_PROXY": no_proxy}

    def apply_env(self) -> None:
        """Set :meth:`env` in ``os.environ`` and drop s3fs's cached filesystems (they hold old endpoints)."""
        os.environ.update(self.env())
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        _clear_s3fs_cache()

    # ---------------------------------------------------------------- state
    def _client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=_CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 chars, lowercase) and return ``s3://name``."""
        self._client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def reset(self) -> None:
        """Delete everything on the server, then recreate :attr:`bucket` (if any)."""
        if not self.endpoint_url:
            raise RuntimeError("LocalS3.reset(): the server is not started")
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST", data=b"")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never via a proxy
        with opener.open(req, timeout=30) as resp:
            resp.read()
        _clear_s3fs_cache()
        if self.bucket:
            self.create_bucket(self.bucket)


def _clear_s3fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def main(argv: list[str] | None = None) -> None:
    """``python -m storage.local_s3 [--port 9000] [--bucket kalm]``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(description="Run a local S3 (moto) server on 127.0.0.1 for kalm-batch.")
    parser.add_argument("--port", type=int, default=9000, help="TCP port (0 = any free port; default 9000)")
    parser.add_argument("--bucket", default="kalm", help="bucket to create at start ('' for none; default kalm)")
    args = parser.parse_args(argv)
    with LocalS3(port=args.port, bucket=args.bucket or None) as s3:
        for key, value in s3.env().items():
            print(f"export {key}={shlex.quote(value)}")
        if s3.bucket:
            print(f"# bucket ready: s3://{s3.bucket}/   (Ctrl-C to stop; all data is in memory)", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(timeout=1.0):
            pass


if __name__ == "__main__":
    main()
