"""The rerank job's output folder on the driver: claim it for a plan (resume or refuse), and commit it at the end.

The layout is in kalm_batch/runfolder.py. Everything here touches a bounded amount of data on the driver: the plan,
one small counters JSON per partition, and a streamed copy of the run parts into ``run.trec`` when it is small.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

from kalm_batch import fsio, runfolder

log = logging.getLogger(__name__)
_OWNED = (runfolder.COMMIT_MARKER, *runfolder.FINAL_FILES, *runfolder.DATASETS, runfolder.WORK_DIR)


class OutputInUseError(ValueError):
    """``--out`` holds another run's outputs (another plan, or files this job did not write)."""


def plan_id(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def plan_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two plans (nested keys joined with '.')."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += plan_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} (committed partitions) vs {b!r} (this run)")
    return diffs


def _remove(out: str, name: str, storage_options) -> None:
    fs, path = fsio.url_to_fs(fsio.join_url(out, name), storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
        fs.invalidate_cache(path)


def _entries(out: str, storage_options) -> list[str]:
    fs, path = fsio.url_to_fs(out, storage_options)
    fs.invalidate_cache(path)
    try:
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def claim_output(out: str, plan: dict, *, overwrite: bool, storage_options: dict | None = None) -> str:
    """Make ``out`` this plan's folder; returns 'fresh' or 'resume'.

    The commit marker goes first (the folder is uncommitted from now on). With ``overwrite`` the job's own entries
    are deleted. Without it, a folder holding another plan's run (other inputs, model, store or store version,
    stages, partitions...) or files this job did not write is refused, naming the differences.
    """
    plan_url = fsio.join_url(out, runfolder.PLAN_FILE)
    if overwrite:
        for name in _OWNED:
            _remove(out, name, storage_options)
    elif fsio.exists(plan_url, storage_options):
        old = fsio.read_json(plan_url, storage_options)
        if old.get("plan_id") != plan["plan_id"]:
            diffs = plan_differences({k: v for k, v in old.items() if k != "plan_id"},
                                     {k: v for k, v in plan.items() if k != "plan_id"})
            raise OutputInUseError(f"--out {out} holds (parts of) another run: {'; '.join(diffs) or 'another plan'}. "
                                   "Its partitions cannot be mixed with this run's: pass --overwrite to start over, "
                                   "or write to another --out.")
        _remove(out, runfolder.COMMIT_MARKER, storage_options)
        return "resume"
    else:
        foreign = _entries(out, storage_options)
        if foreign:
            raise OutputInUseError(f"--out {out} is not empty ({', '.join(foreign[:5])}) and holds no run of this "
                                   "job's plan: pass --overwrite to replace the job's outputs there, or use an empty "
                                   "--out.")
    fsio.write_json_atomic(plan_url, plan, storage_options)
    return "fresh"


def remove_prepared(out: str, storage_options: dict | None = None) -> None:
    _remove(out, runfolder.PREPARED_DIR, storage_options)
    _remove(out, runfolder.PREPARED_MARKER, storage_options)


def done_parts(out: str, storage_options: dict | None = None) -> list[int]:
    urls = fsio.list_files(fsio.join_url(out, runfolder.DONE_DIR), ".json", storage_options)
    return sorted(int(u.rsplit("part-", 1)[1].split(".")[0]) for u in urls)


def read_done(out: str, parts: list[int], plan: str, storage_options: dict | None = None) -> list[dict]:
    """Every committed partition's counters (read in parallel); refuses a marker of another plan."""
    def one(part: int) -> dict:
        c = fsio.read_json(runfolder.part_url(out, runfolder.DONE_DIR, part, ".json"), storage_options)
        if c.get("plan_id") != plan:
            raise OutputInUseError(f"{out}: partition {part} was committed by plan {c.get('plan_id')}, not {plan}; "
                                   "pass --overwrite to start over")
        return c

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, parts))


def merge_run(out: str, parts: list[int], storage_options: dict | None = None) -> str:
    """Stream the run parts, in partition order, into ``run.trec`` (temp name, then moved into place)."""
    dest = fsio.join_url(out, "run.trec")
    fs, dest_path = fsio.url_to_fs(dest, storage_options)
    tmp = f"{dest_path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as w:
        for part in parts:
            src = runfolder.part_url(out, "run", part, ".trec")
            with fsio.open_input(src, storage_options) as r:
                while chunk := r.read(1 << 20):
                    w.write(chunk)
    fs.mv(tmp, dest_path)
    fs.invalidate_cache(dest_path)
    return dest


def commit(out: str, record: dict, storage_options: dict | None = None) -> None:
    """Write the commit marker: the LAST write of a run."""
    fsio.write_json_atomic(fsio.join_url(out, runfolder.COMMIT_MARKER), record, storage_options)
