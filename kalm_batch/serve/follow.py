"""Serve follows the store: one object owns the replica's current store reader and swaps it for newer versions.

A request takes ``follower.current()`` once and resolves all its memories on that reader, so it finishes on the
version it started with; a newer version is opened in the background (never on a request's path) after a poll finds
it, checked against the model, and swapped in between requests. ``store_version`` pins one version (no polling).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kalm_batch.store import StoreError, open_store

log = logging.getLogger("ray.serve")


class StoreFollower:
    def __init__(self, url: str, *, version: int | None = None, poll_s: float = 10.0,
                 storage_options: dict | None = None, cache_bytes: int = 256 * 2**20,
                 check: Callable[[object], None] | None = None):
        self.url, self.pinned, self.poll_s = url, version, poll_s
        self.storage_options, self.cache_bytes, self.check = storage_options, cache_bytes, check
        self._reader = self._open(version)
        self._lock = threading.Lock()
        self._last_poll = time.monotonic()
        self._switching: threading.Thread | None = None
        self.switches = 0
        self.last_error: str | None = None

    def _open(self, version: int | None):
        reader = open_store(self.url, version=version, storage_options=self.storage_options,
                            cache_bytes=self.cache_bytes)
        if self.check is not None:
            self.check(reader)
        return reader

    def current(self):
        """The reader a request uses for its whole life; starts a background poll when one is due."""
        self.maybe_refresh()
        return self._reader

    @property
    def version(self) -> int:
        return self._reader.version

    def latest_version(self) -> int:
        from kalm_batch.store.reader import _open_table

        dt, _ = _open_table(self.url, None, self.storage_options)
        return dt.version()

    def maybe_refresh(self, *, wait: bool = False) -> None:
        """Poll (at most every ``poll_s``) and switch to a newer version in a background thread."""
        if self.pinned is not None:
            return
        with self._lock:
            due = time.monotonic() - self._last_poll >= self.poll_s
            busy = self._switching is not None and self._switching.is_alive()
            if due and not busy:
                self._last_poll = time.monotonic()
                self._switching = threading.Thread(target=self._switch, name="kalm-store-follow", daemon=True)
                self._switching.start()
            thread = self._switching
        if wait and thread is not None:
            thread.join()

    def _switch(self) -> None:
        try:
            latest = self.latest_version()
            if latest <= self._reader.version:
                return
            reader = self._open(latest)
        except (StoreError, OSError, ValueError) as e:  # keep serving the current version; say why
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("store %s: staying on version %d, the newer version cannot be served: %s", self.url,
                      self._reader.version, self.last_error)
            return
        old, self._reader = self._reader, reader  # one reference swap: requests hold their own reference
        self.switches += 1
        self.last_error = None
        log.info("store %s: switched from version %d to %d", self.url, old.version, reader.version)

    def info(self) -> dict:
        return {"version": self.version, "pinned": self.pinned, "poll_s": self.poll_s, "switches": self.switches,
                "last_error": self.last_error}
