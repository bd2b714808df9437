"""Benchmark: the encode job SIGKILLed at ~50% of its rows committed, then the same command again (issue 11).

    python benchmarks/encode_resume.py [--docs 400] [--files 25] [--shard-rows 8] [--commit-every-files 2]
                                       [--kill-at 0.5] [--work-dir DIR]

The tiny random model and a sample corpus of --docs stdlib passages, split into --files JSONL files (Ray Data reads
each file as one block, and with the tiny model's small memories the encoder's output of a block reaches the driver
when the block is done: one file means no progress commit before the end; see BENCHMARKS.md).
``jobs/encode_corpus.py`` (the same flags as ``kalm-batch encode``, its own local Ray on 2 CPUs) runs three times:
(1) a full run into its own store, for its wall time;
(2) a run into a fresh store, SIGKILLed (its whole process group: driver and local Ray) once the Delta table, polled
    with ``deltalake`` alone, shows >= --kill-at of the corpus rows committed (progress commits every
    --commit-every-files data files of --shard-rows passages);
(3) the same command again: its summary says how many passages it encoded (stored_new + refreshed) and how many it
    found committed (skipped_existing). Target: encoded <= 0.6 of the corpus. The final version must hold each
    corpus id once.
Prints a markdown block. Writes only under --work-dir (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, tiny_model_dir

from tests.procs import kill_session


def _command(model: str, corpus: str, store: str, ns) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "encode_corpus.py"), "--model", model, "--corpus", corpus,
            "--store", store, "--max-length", str(ns.max_length), "--dtype", "bfloat16", "--workers", "1",
            "--num-cpus", "2", "--shard-rows", str(ns.shard_rows), "--rows-per-task", str(ns.shard_rows),
            "--commit-every-files", str(ns.commit_every_files)]


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "RAY_ADDRESS": ""}  # always the job's own local Ray


def _summary(stdout: str) -> dict[str, str]:
    """The ``encode summary`` table the command prints (``key  value`` lines)."""
    lines = stdout.split("encode summary\n", 1)[-1].splitlines()
    return dict(line.split(None, 1) for line in lines if len(line.split(None, 1)) == 2)


def _run(cmd: list[str]) -> tuple[dict[str, str], float]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"the job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return _summary(proc.stdout), wall


def _committed_rows(store: str) -> tuple[int, int]:
    """(rows, version) of the store's latest version as deltalake alone sees it; (0, -1) before the first commit."""
    import deltalake

    try:
        dt = deltalake.DeltaTable(store)
    except deltalake.exceptions.TableNotFoundError:
        return 0, -1
    rows = dt.get_add_actions(flatten=True).column("num_records").to_pylist()
    return int(sum(rows)), dt.version()


def _kill_midway(cmd: list[str], store: str, target_rows: int, log: Path) -> dict:
    t = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    rows, version = 0, -1
    try:
        while proc.poll() is None and rows < target_rows:
            time.sleep(0.05)
            rows, version = _committed_rows(store)
    finally:
        finished = proc.poll() is not None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wall = time.perf_counter() - t
    if finished:
        raise SystemExit(f"the job ended before it was killed (rows committed: {rows}); use more --docs. Its log: "
                         f"{log.read_text()[-2000:]}")
    time.sleep(1.0)
    leftover = kill_session(proc.pid)  # its local Ray: in the job's session, outside its process group
    rows, version = _committed_rows(store)  # a commit may have landed between the last poll and the kill
    written = len(list(Path(store).glob("part-*.parquet")))  # data files written, committed or not
    names = sorted(set(leftover.values()))
    return {"rows": rows, "version": version, "wall": wall, "leftover": f"{len(leftover)} ({', '.join(names)})",
            "written": written}


def _final_ids(store: str) -> list[str]:
    import deltalake

    return deltalake.DeltaTable(store).to_pyarrow_table(columns=["doc_id"]).column("doc_id").to_pylist()


def _host() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return f"{name}, {os.cpu_count()} CPUs"


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--files", type=int, default=25, help="corpus files the passages are split into")
    ap.add_argument("--shard-rows", type=int, default=8)
    ap.add_argument("--commit-every-files", type=int, default=2)
    ap.add_argument("--kill-at", type=float, default=0.5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--work-dir", default=None)
    ns = ap.parse_args(argv)
    work = Path(ns.work_dir or tempfile.mkdtemp(prefix="kalm-bench-encode-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    from kalm_batch.sample import write_sample_corpus

    info = write_sample_corpus(str(work / "data"), max_docs=ns.docs, n_queries=1)
    lines = Path(info.corpus_path).read_text().splitlines(keepends=True)
    corpus_ids = [json.loads(line)["_id"] for line in lines]
    corpus = work / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(ns.files):
        (corpus / f"part-{i:03d}.jsonl").write_text("".join(lines[i::ns.files]))
    model = str(tiny_model_dir())
    load_before, t0 = _loadavg(), time.perf_counter()

    full, full_wall = _run(_command(model, str(corpus), str(work / "full"), ns))
    store = str(work / "store")
    cmd = _command(model, str(corpus), store, ns)
    killed = _kill_midway(cmd, store, int(ns.kill_at * len(corpus_ids) + 0.999), work / "killed.log")
    load_mid = _loadavg()
    rerun, rerun_wall = _run(cmd)
    encoded = int(rerun["stored_new"]) + int(rerun["refreshed"])
    ids = _final_ids(store)
    once = len(ids) == len(set(ids)) and sorted(ids) == sorted(corpus_ids)
    n = len(corpus_ids)
    rows = [
        "| measure | value |", "|---|---|",
        f"| corpus passages | {n} ({int(full['stored_new'])} stored by the full run, {full['commits']} commits) |",
        f"| full run wall | {full_wall:.1f} s (job's own seconds {full['seconds']}) |",
        (f"| killed run: committed at the kill | {killed['rows']} rows = {killed['rows'] / n:.2f} of the corpus "
        f"(version {killed['version']}), after {killed['wall']:.1f} s; {killed['written']} data files on disk "
        f"(committed or not) |"),
        (f"| processes of the killed job's session alive 1 s after SIGKILL of its group (then killed) | "
        f"{killed['leftover']} |"),
        (f"| rerun: skipped_existing / stored_new / refreshed | {rerun['skipped_existing']} / {rerun['stored_new']} "
        f"/ {rerun['refreshed']} |"),
        f"| **rerun encoded / corpus** (target <= 0.6) | **{encoded} / {n} = {encoded / n:.2f}** |",
        f"| rerun wall vs full run wall | {rerun_wall:.1f} s / {full_wall:.1f} s = {rerun_wall / full_wall:.2f} |",
        f"| final version {rerun['version']}: each corpus id once | {'yes' if once else 'NO'} ({len(ids)} rows) |",
        f"| benchmark wall | {time.perf_counter() - t0:.0f} s |",
    ]
    cmd_line = "python benchmarks/encode_resume.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [f"- command: `{cmd_line.strip()}`",
            (f"- host: {_host()}; load average (1/5/15 min) before {load_before}, after the kill {load_mid}, at the "
            f"end {_loadavg()}"),
            (f"- job: tiny random model, {ns.files} corpus files, bf16 store at r0=4, max_length {ns.max_length}, "
            f"{ns.shard_rows} passages per "
            f"data file, a progress commit every {ns.commit_every_files} data files, one encoder actor, local Ray "
            "on 2 CPUs"), ""]
    sys.stdout.write("\n".join(head + rows) + "\n")
    return 0 if once else 1


if __name__ == "__main__":
    sys.exit(main())
