"""End every process of a killed job's session: its driver and the local Ray it started (tests and benchmarks).

A job started with ``start_new_session=True`` leads its own session; SIGKILL of its process group leaves the raylet,
GCS and workers of the local Ray it started alive (they are in the session, outside the process group).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def session_processes(sid: int) -> dict[int, str]:
    """The live processes whose session id is ``sid`` (Linux /proc): pid -> command name."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 1:].split()
        if len(rest) > 3 and int(rest[3]) == sid and rest[0] != "Z":  # state ppid pgrp session
            found[int(stat.parent.name)] = name
    return found


def kill_session(sid: int) -> dict[int, str]:
    """SIGKILL every live process of session ``sid``; returns those it killed (pid -> command name)."""
    killed = {}
    for pid, name in session_processes(sid).items():
        try:
            os.kill(pid, signal.SIGKILL)
            killed[pid] = name
        except ProcessLookupError:
            pass
    return killed
