"""Test helper: end every process of a killed job's session (its driver and the local Ray it started)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Pids of the live processes whose session id is ``sid`` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name: state ppid pgrp session
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int) -> int:
    """SIGKILL the whole session ``sid``: a job started with ``start_new_session=True`` leads it, and the raylet,
    GCS and workers of the local Ray it starts stay in it (outside its process group). Returns how many were killed."""
    killed = 0
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed
