"""Storage boundary for kalm-batch: every store and job reads and writes through these helpers.

URLs may be plain local paths (made absolute), ``file://`` URLs, or object-store URLs such as
``s3://bucket/key`` (via fsspec/s3fs). For S3, the endpoint is taken from ``storage_options``
(``endpoint_url`` or ``client_kwargs.endpoint_url``), else from ``KALM_S3_ENDPOINT_URL``, else
botocore resolves ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` itself (verified with botocore 1.43).

Errors are translated here: a missing bucket/key raises ``FileNotFoundError`` naming the URL,
access denied raises ``PermissionError``, and transient failures (connection errors, timeouts,
5xx / SlowDown / Throttling) are retried with capped exponential backoff and then raise
``StorageError``. The original exception is always kept as ``__cause__``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")

_PROTOCOL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_NON_TRANSIENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequestsException",
}
_NOT_FOUND_CODES = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


class StorageError(OSError):
    """An object-store operation failed (after retries for transient errors); ``__cause__`` holds the reason."""


# --------------------------------------------------------------------------- URLs and filesystems


def _protocol(url: str) -> str | None:
    m = _PROTOCOL_RE.match(url)
    return m.group(1).lower() if m else None


def _s3_options(storage_options: dict | None) -> dict:
    opts = dict(storage_options or {})
    has_endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    env_endpoint = os.environ.get("KALM_S3_ENDPOINT_URL")
    if not has_endpoint and env_endpoint:
        opts["endpoint_url"] = env_endpoint
    return opts


def url_to_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``url``; local paths come back absolute."""
    if not url:
        raise ValueError("empty storage URL: pass a local path, file://..., or s3://bucket/prefix")
    proto = _protocol(url)
    if proto is None or proto in ("file", "local"):
        local = url.split("://", 1)[1] if proto else url
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(local))
    opts = _s3_options(storage_options) if proto in ("s3", "s3a") else dict(storage_options or {})
    return fsspec.core.url_to_fs(url, **opts)


def join_url(base: str, *parts: str) -> str:
    """Join ``parts`` onto ``base`` with single slashes, keeping the ``proto://`` prefix."""
    m = _PROTOCOL_RE.match(base)
    prefix, rest = (m.group(0), base[m.end():]) if m else ("", base)
    rest = re.sub(r"/{2,}", "/", rest)
    pieces = [p for p in (re.sub(r"/{2,}", "/", part).strip("/") for part in parts) if p]
    if not pieces:
        return prefix + rest
    head = rest.rstrip("/")
    if not head:  # filesystem root ("/") keeps its slash; "s3://" + parts has none
        head = "/" if rest.startswith("/") else ""
        return prefix + head + "/".join(pieces)
    return prefix + head + "/" + "/".join(pieces)


def _to_url(template: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a filesystem path back into a URL in the same style as ``template``."""
    proto = _protocol(template)
    if isinstance(fs, LocalFileSystem):
        return f"{template.split('://', 1)[0]}://{path}" if proto else path
    return f"{proto}://{path}" if proto else path


# --------------------------------------------------------------------------- errors and retries


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__  # explicit causes only: an error raised *while handling* another is not that error
    return seen


def _client_error_info(exc: BaseException) -> tuple[str, int] | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
        from botocore.parsers import ResponseParserError

        types += [BotoConnectionError, HTTPClientError, ResponseParserError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT_TYPES = _transient_types()


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection problems, timeouts, 5xx and throttling responses."""
    if isinstance(exc, _NON_TRANSIENT):
        return False
    for err in _chain(exc):
        if isinstance(err, _NON_TRANSIENT):
            return False
        info = _client_error_info(err)
        if info is not None:
            code, status = info
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        if isinstance(err, _TRANSIENT_TYPES):
            return True
    return False


def with_retries(
    fn: Callable[[], T], *, what: str, attempts: int = 5, base_delay: float = 0.2, max_delay: float = 5.0
) -> T:
    """Call ``fn()``; retry transient errors with capped exponential backoff, then raise ``StorageError``.

    Non-transient errors (``FileNotFoundError``, ``PermissionError``, 4xx, ...) propagate unchanged
    on the first failure.
    """
    if attempts < 1:
        raise ValueError(f"with_retries({what!r}): attempts must be >= 1, got {attempts}")
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts - 1:
                raise StorageError(
                    f"{what} failed after {attempts} attempts (transient error: {exc!r}); "
                    "check the object-store endpoint and network"
                ) from exc
            delay = min(max_delay, base_delay * (2**attempt))
            time.sleep(delay + random.uniform(0, delay * 0.1))
    raise AssertionError("unreachable")  # pragma: no cover


def _translate(exc: Exception, url: str, op: str) -> Exception:
    """Map a non-transient failure to a clear exception naming ``url``; returns ``exc`` if unmapped."""
    info = None
    for err in _chain(exc):
        info = info or _client_error_info(err)
    code = info[0] if info else ""
    if isinstance(exc, FileNotFoundError) or code in _NOT_FOUND_CODES:
        return FileNotFoundError(errno.ENOENT, f"cannot {op}: no such file, object or bucket", url)
    if isinstance(exc, PermissionError) or code in _DENIED_CODES:
        return PermissionError(errno.EACCES, f"cannot {op}: access denied (check credentials/policy)", url)
    if info is not None or type(exc).__module__.startswith(("botocore", "aiobotocore", "s3fs")):
        return StorageError(f"cannot {op} {url}: {exc}")
    return exc


def _run(op: str, url: str, fn: Callable[[], T]) -> T:
    try:
        return with_retries(fn, what=f"{op} {url}")
    except StorageError:
        raise
    except Exception as exc:
        translated = _translate(exc, url, op)
        if translated is exc:
            raise
        raise translated from exc


# --------------------------------------------------------------------------- operations


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """Return the whole object at ``url``."""
    fs, path = url_to_fs(url, storage_options)
    return _run("read", url, lambda: fs.cat_file(path))


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask alone must set it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_local_atomic(path: str, data: bytes) -> None:
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would give what the umask allows
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)


def _fsync_dir(directory: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):
        return
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories; the rename itself is atomic
    finally:
        os.close(dir_fd)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` so readers see either the old or the new object, never a partial one."""
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        _run("write", url, lambda: _write_local_atomic(path, bytes(data)))
    else:
        _run("write", url, lambda: fs.pipe_file(path, bytes(data)))


def write_json_atomic(url: str, obj: Any, storage_options: dict | None = None) -> None:
    """Write ``obj`` as UTF-8 JSON (sorted keys, indent 2) atomically."""
    text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    write_bytes_atomic(url, text.encode("utf-8"), storage_options)


def read_json(url: str, storage_options: dict | None = None) -> Any:
    """Read and parse a UTF-8 JSON object; a parse failure raises ``ValueError`` naming the URL."""
    raw = read_bytes(url, storage_options)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{url} is not valid UTF-8 JSON ({exc}); rewrite or delete the file") from exc


def exists(url: str, storage_options: dict | None = None) -> bool:
    """True if a file/object (or directory/prefix) exists at ``url``."""
    fs, path = url_to_fs(url, storage_options)
    fs.invalidate_cache(path)
    return _run("check existence of", url, lambda: bool(fs.exists(path)))


def list_files(url_dir: str, suffix: str = "", storage_options: dict | None = None) -> list[str]:
    """Full URLs of the files directly under ``url_dir`` ending with ``suffix``, sorted; missing dir -> []."""
    fs, path = url_to_fs(url_dir, storage_options)
    fs.invalidate_cache(path)

    def _ls() -> list[dict]:
        try:
            return fs.ls(path, detail=True)
        except FileNotFoundError:
            return []

    entries = _run("list", url_dir, _ls)
    names = [e["name"] for e in entries if e.get("type") == "file" and e["name"].endswith(suffix)]
    return sorted(_to_url(url_dir, fs, n) for n in names)


def delete(url: str, storage_options: dict | None = None) -> None:
    """Delete the file/object at ``url``; a missing one is not an error."""
    fs, path = url_to_fs(url, storage_options)

    def _rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    _run("delete", url, _rm)
    fs.invalidate_cache(path)


def open_input(url: str, storage_options: dict | None = None) -> IO[bytes]:
    """Open ``url`` for binary, seekable reading (e.g. for ``pyarrow.parquet``); the caller closes it."""
    fs, path = url_to_fs(url, storage_options)
    return _run("open", url, lambda: fs.open(path, "rb"))


def fs_for_pyarrow(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """Return ``(pyarrow.fs.FileSystem, path)`` wrapping the fsspec filesystem for ``url``."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = url_to_fs(url, storage_options)
    return PyFileSystem(FSSpecHandler(fs)), path
