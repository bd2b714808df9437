"""Starting a scorer replica: fail at once on what no retry fixes, retry (in the replica) what a retry may fix.

Ray Serve counts every failed replica start against ``max_constructor_retry_count`` and cannot be told that an error
is final, so the scorer deployment allows one failed start (``ServeConfig.max_constructor_retries=1``) and the replica
sorts errors itself:

* errors no retry can fix (``FINAL``: a store that is missing, incomplete, of the old layout, of another model, a
  store version that does not exist, a bad setting, a model directory that is not there) raise ``ScorerStartError``
  with one clear line at the first attempt;
* other I/O errors (a transient object-store read error that outlived ``fsio``'s own retries, a connection reset)
  are retried ``attempts`` times with capped backoff, then raise ``ScorerStartError`` naming the last one;
* anything else is raised as it is (a bug: its traceback matters).

``app.run_serve`` finds the ``ScorerStartError`` line in Serve's status and reports only that line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from kalm_batch.store import StoreError

T = TypeVar("T")
logger = logging.getLogger("ray.serve")

FINAL = (StoreError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
         ImportError)


class ScorerStartError(RuntimeError):
    """A scorer replica cannot start; the message is one line, the one ``kalm-batch serve`` prints."""


def start_with_retries(make: Callable[[], T], *, attempts: int, what: str = "the scorer",
                       sleep: Callable[[float], None] = time.sleep, max_delay_s: float = 8.0) -> T:
    """``make()``, retried on errors a retry may fix; ``ScorerStartError`` for the rest (see the module)."""
    for attempt in range(1, attempts + 1):
        try:
            return make()
        except FINAL as exc:
            raise ScorerStartError(f"{what} cannot start (a retry will not help): {_one_line(exc)}") from None
        except OSError as exc:
            if attempt == attempts:
                raise ScorerStartError(f"{what} failed to start {attempts} times; the last error: "
                                       f"{_one_line(exc)}") from None
            delay = min(max_delay_s, 2.0 ** (attempt - 1))
            logger.warning("%s failed to start (attempt %d of %d, retrying in %g s): %s", what, attempt, attempts,
                           delay, _one_line(exc))
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())
