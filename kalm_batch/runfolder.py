"""The rerank job's output folder: its layout, its commit marker, and readers that refuse an uncommitted folder.

```
OUT/
  scores/part-NNNNN.parquet     one file per partition: qid, doc_id, score, margin, rank, first_stage_rank,
                                first_stage_score, stage, ratio (a Parquet dataset: pyarrow.dataset.dataset(...))
  run/part-NNNNN.trec           the TREC run, one part per partition (score = (stage - 1) + P(yes))
  run.trec                      the parts merged into one file, when the run has at most ``merge_limit`` lines
  skipped/part-NNNNN.parquet    every input pair that was not scored: qid, doc_id, kind, reason, stage
  problems/part-NNNNN.parquet   every bad or flagged input: kind, qid, doc_id, source, line, reason
  metrics.json                  with --qrels: per-query ir-measures in the workers, averaged here
  summary.json                  counts, costs, actors, store version read, the config
  _work/plan.json               what this folder is being filled with (inputs, model, store version, stages,
                                partitions); a resume must match it
  _work/prepared/part=N/*.parquet + _work/prepared.json  the validated inputs per partition (resume skips them)
  _work/done/part-NNNNN.json    partition NNNNN committed (its counters), written after its outputs
  _COMMITTED                    written LAST: the folder holds one whole run. Readers refuse a folder without it.
```
Partition files are written whole and atomically under fixed names, so a re-run rewrites rather than duplicates.
"""

from __future__ import annotations

from typing import Any

from kalm_batch import fsio

COMMIT_MARKER = "_COMMITTED"
WORK_DIR = "_work"
PLAN_FILE = f"{WORK_DIR}/plan.json"
PREPARED_DIR = f"{WORK_DIR}/prepared"
PREPARED_MARKER = f"{WORK_DIR}/prepared.json"
DONE_DIR = f"{WORK_DIR}/done"
DATASETS = ("scores", "run", "skipped", "problems")
FINAL_FILES = ("run.trec", "metrics.json", "summary.json")


class UncommittedOutputError(ValueError):
    """A rerank output folder (or a file in one) that no finished run has committed."""


def part_name(part: int, suffix: str) -> str:
    return f"part-{part:05d}{suffix}"


def part_url(out: str, dataset: str, part: int, suffix: str) -> str:
    return fsio.join_url(out, dataset, part_name(part, suffix))


def is_committed(out: str, storage_options: dict | None = None) -> bool:
    return fsio.exists(fsio.join_url(out, COMMIT_MARKER), storage_options)


def is_run_folder(out: str, storage_options: dict | None = None) -> bool:
    """True if ``out`` was (or is being) filled by the rerank job."""
    return is_committed(out, storage_options) or fsio.exists(fsio.join_url(out, PLAN_FILE), storage_options)


def require_committed(out: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The commit record of ``out``; raises UncommittedOutputError if the job never finished writing it."""
    marker = fsio.join_url(out, COMMIT_MARKER)
    if not fsio.exists(marker, storage_options):
        raise UncommittedOutputError(
            f"{out} holds no committed rerank run (no {COMMIT_MARKER}): the job that writes it has not finished or "
            "was killed. Re-run the same `kalm-batch rerank` command to resume it, then read the outputs.")
    return fsio.read_json(marker, storage_options)


def check_run_file(run_url: str, storage_options: dict | None = None) -> None:
    """Refuse a TREC run file that sits in (or under ``run/`` of) an uncommitted rerank output folder."""
    base = run_url.rstrip("/").rsplit("/", 1)[0]
    for folder in (base, base.rsplit("/", 1)[0] if base.endswith("/run") else None):
        if folder and fsio.exists(fsio.join_url(folder, PLAN_FILE), storage_options):
            require_committed(folder, storage_options)


def read_scores(out: str, storage_options: dict | None = None):
    """The committed ``scores/`` dataset of ``out`` as one Arrow table (small runs; use pyarrow.dataset for large)."""
    import pyarrow.dataset as ds

    require_committed(out, storage_options)
    fs, path = fsio.fs_for_pyarrow(fsio.join_url(out, "scores"), storage_options)
    return ds.dataset(path, filesystem=fs, format="parquet").to_table()
