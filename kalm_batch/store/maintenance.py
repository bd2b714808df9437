"""Store maintenance: history, compaction (fewer, larger data files; same memories) and vacuum (old files gone)."""

from __future__ import annotations

import datetime as _dt
import logging

import pyarrow as pa

from kalm_batch import fsio
from kalm_batch.store.errors import StoreError
from kalm_batch.store.layout import as_data_table, read_data_file, write_data_file
from kalm_batch.store.settings import INDEX_DIR

log = logging.getLogger(__name__)
DEFAULT_RETAIN_HOURS = 168
MIN_RETAIN_HOURS = 168  # Delta's default delta.deletedFileRetentionDuration (7 days)


def history(url: str, storage_options: dict | None = None, limit: int | None = None) -> list[dict]:
    """One row per table version, newest first: version, time, operation, rows added / removed."""
    from kalm_batch.store.reader import _open_table

    dt, _ = _open_table(url, None, storage_options)
    out = []
    for h in dt.history(limit):
        ts = _dt.datetime.fromtimestamp(h.get("timestamp", 0) / 1000, _dt.timezone.utc)
        out.append({
            "version": h.get("version"), "time": ts.isoformat(timespec="seconds"),
            "operation": h.get("kalm.operation") or h.get("operation"),
            "rows_added": int(h.get("kalm.rows_added", 0)), "rows_removed": int(h.get("kalm.rows_removed", 0)),
            "new": int(h.get("kalm.new", 0)), "refreshed": int(h.get("kalm.refreshed", 0)),
            "deleted": int(h.get("kalm.deleted", 0)), "errors": h.get("kalm.errors"),
        })
    return out


def compact(url: str, *, target_rows: int = 1024, storage_options: dict | None = None) -> dict:
    """Merge data files smaller than ``target_rows`` into files of about ``target_rows``: one table version whose
    memories are byte-for-byte those of the previous one (no re-encoding, so scores cannot change)."""
    from kalm_batch.store.writer import StoreWriter

    writer = StoreWriter.open_existing(url, storage_options=storage_options)
    actions = writer._dt.get_add_actions(flatten=True)
    small = [p for p, n in zip(actions.column("path").to_pylist(), actions.column("num_records").to_pylist())
             if (n or 0) < target_rows]
    if len(small) < 2:
        return {"version": writer.version, "files_removed": 0, "files_added": 0, "note": "nothing to compact"}
    table = pa.concat_tables([as_data_table(read_data_file(url, f, None, storage_options)) for f in small])
    adds = [write_data_file(url, table.slice(i, target_rows), storage_options)
            for i in range(0, table.num_rows, target_rows)]
    version = writer.commit_files(adds, small, operation="compact", data_change=False)
    return {"version": version, "files_removed": len(small), "files_added": len(adds), "rows": table.num_rows}


def vacuum(url: str, *, retain_hours: float = DEFAULT_RETAIN_HOURS, force: bool = False, dry_run: bool = False,
           storage_options: dict | None = None) -> dict:
    """Delete data files no version newer than ``retain_hours`` needs (removed ones, and orphans of killed runs)
    and their indexes. Versions older than that can no longer be read afterwards."""
    from kalm_batch.store.reader import _open_table

    if retain_hours < MIN_RETAIN_HOURS and not force:
        raise StoreError(f"refusing to vacuum {url} with --retain-hours {retain_hours}: the minimum is "
                         f"{MIN_RETAIN_HOURS} hours (readers pinned to older versions, and running encode jobs, "
                         "still need those files). Pass --force to vacuum anyway.")
    dt, _ = _open_table(url, None, storage_options)
    removed = dt.vacuum(retention_hours=int(retain_hours), dry_run=dry_run, enforce_retention_duration=False,
                        full=True)
    live = set(dt.get_add_actions(flatten=True).column("path").to_pylist())
    indexes = []
    for u in fsio.list_files(fsio.join_url(url, INDEX_DIR), ".parquet", storage_options):
        name = u.rsplit("/", 1)[-1]
        if name not in live and not fsio.exists(fsio.join_url(url, name), storage_options):
            indexes.append(u)
            if not dry_run:
                fsio.delete(u, storage_options)
    return {"version": dt.version(), "dry_run": dry_run, "files_removed": sorted(removed),
            "indexes_removed": len(indexes), "retain_hours": retain_hours}

