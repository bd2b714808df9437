"""Benchmark the bulk rerank job at scale on CPU with the tiny random model: driver memory and the cost of a resume.

    python benchmarks/rerank_scale.py rss --pairs 20000 200000 2000000 --score-up-to 20000 [--work-dir DIR]
    python benchmarks/rerank_scale.py resume --pairs 6000 --partitions 12 [--work-dir DIR]

``rss``: for each size, a synthetic log (queries x 100 candidates over a 2,000-passage store) is reranked by a fresh
driver process (``kalm-batch rerank``; ``--dry-run`` above ``--score-up-to`` pairs, which reads, validates, plans and
joins every pair but does not score), and that process's peak RSS (VmHWM) is reported.
``resume``: a run is SIGKILLed once half its partitions are committed, then the same command finishes it; reports
the pairs the resumed run scored against a full run's pairs (pairs scored twice = the in-flight partitions).
Prints a markdown block. Writes only under --work-dir (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

N_DOCS, PER_QUERY = 2000, 100


def _prepare_store(work: Path) -> tuple[str, str]:
    from kalm_batch import KaLMReranker
    from kalm_batch.bm25 import read_beir_corpus
    from kalm_batch.sample import write_sample_corpus
    from kalm_batch.store import build_store
    from kalm_batch.tiny import write_random_model

    model = work / "tiny"
    if not (model / "config.json").exists():
        write_random_model(model, shape="tiny", seed=0)
    store = work / "store"
    if not (store / "_delta_log").exists():
        info = write_sample_corpus(str(work / "data"), max_docs=N_DOCS, n_queries=10)
        corpus = read_beir_corpus(info.corpus_path)
        encoder = KaLMReranker(str(model), dtype="float32", chunk_size=4, max_length=128)
        build_store(f"file://{store}", encoder, corpus, dtype="bfloat16", overwrite=True)
    return str(model), f"file://{store}"


def _log(work: Path, n_pairs: int, doc_ids: list[str]) -> tuple[str, str]:
    """n_pairs / 100 queries, each with 100 candidates drawn round-robin from the store's docs; 4 TREC files."""
    folder = work / f"log-{n_pairs}"
    queries, cands = folder / "queries.tsv", folder / "cands"
    if not queries.exists():
        cands.mkdir(parents=True, exist_ok=True)
        n_queries = n_pairs // PER_QUERY
        with open(queries, "w") as f:
            f.writelines(f"q{q}\tsynthetic query number {q} about topic {q % 97}\n" for q in range(n_queries))
        for i in range(4):
            with open(cands / f"part-{i}.trec", "w") as out:
                for q in range(i, n_queries, 4):
                    out.writelines(f"q{q} Q0 {doc_ids[(q * 7 + r * 13) % len(doc_ids)]} {r + 1} {100.0 - r} bm25\n"
                                   for r in range(PER_QUERY))
    return str(queries), str(cands)


def _argv(model: str, store: str, queries: str, cands: str, out: str, **flags) -> list[str]:
    argv = [sys.executable, "-m", "kalm_batch.cli", "rerank", "--model", model, "--store", store, "--queries", queries,
            "--candidates", cands, "--out", out, "--dtype", "float32", "--workers", "1", "--overwrite"]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return argv


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


_RSS_SNIPPET = ("import atexit, sys; from kalm_batch.pipelines.cluster import process_peak_rss_mb; "
                "atexit.register(lambda: print('DRIVER_PEAK_RSS_MB', process_peak_rss_mb(), file=sys.stderr)); "
                "from kalm_batch.cli import main; sys.exit(main(sys.argv[1:]))")


def _measure(argv: list[str], attempts: int = 3) -> tuple[float, float, str]:
    """Run the job in a fresh driver process; (peak RSS MB of that process, wall s, stdout). A run whose local Ray
    did not start (a 30 s timeout inside Ray, hit on a loaded host) is retried."""
    cmd = [sys.executable, "-c", _RSS_SNIPPET, *argv[3:]]
    for _ in range(attempts):
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(), cwd=str(REPO), capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t
        if "timed out during startup" not in proc.stderr:
            break
    if proc.returncode:
        raise SystemExit(f"job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = [float(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("DRIVER_PEAK_RSS_MB")]
    return rss[-1], wall, proc.stdout


def rss(args, work: Path, model: str, store: str, doc_ids: list[str]) -> list[str]:
    rows = ["| pairs | mode | driver peak RSS (MB) | wall (s) |", "|---|---|---|---|"]
    peaks = []
    runs = ([(args.pairs[0], "dry-run")] if args.dry_first else []) + [
        (n, "score" if n <= args.score_up_to else "dry-run") for n in args.pairs]
    for n, mode in runs:
        queries, cands = _log(work, n, doc_ids)
        flags = {"partitions": max(2, n // 20000)} | ({} if mode == "score" else {"dry_run": True})
        peak, wall, _ = _measure(_argv(model, store, queries, cands, str(work / f"out-{n}"), **flags))
        peaks.append(peak)
        rows.append(f"| {n:,} | {mode} | {peak:.0f} | {wall:.0f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    rows.append(f"\nlargest / smallest size, driver peak: {peaks[-1] / peaks[0]:.2f} x ({peaks[-1]:.0f} MB at "
                f"{args.pairs[-1]:,} pairs vs {peaks[0]:.0f} MB at {args.pairs[0]:,}, {runs[0][1]})")
    return rows


def resume(args, work: Path, model: str, store: str, doc_ids: list[str]) -> list[str]:
    from kalm_batch.pipelines.rerank_output import done_parts
    from tests.procs import kill_session

    queries, cands = _log(work, args.pairs[0], doc_ids)
    full_out, out = str(work / "out-full"), str(work / "out-resume")
    t = time.perf_counter()
    _, full_wall, _ = _measure(_argv(model, store, queries, cands, full_out, partitions=args.partitions))
    full = json.loads(Path(full_out, "summary.json").read_text())
    shutil.rmtree(out, ignore_errors=True)  # the killed run starts from an empty folder (no earlier markers)
    argv = _argv(model, store, queries, cands, out, partitions=args.partitions)
    proc = subprocess.Popen(argv, env=_env(), cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while proc.poll() is None and len(done_parts(out)) < args.partitions // 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_session(proc.pid)  # its local Ray: in the job's session, outside its process group
    killed_at = len(done_parts(out))
    _, resume_wall, _ = _measure([a for a in argv if a != "--overwrite"])
    resumed = json.loads(Path(out, "summary.json").read_text())
    again = sum(json.loads(p.read_text())["pairs_scored"] for p in Path(out, "_work", "done").glob("*.json"))
    scored_now = resumed["partitions"]["scored_now"]
    per_part = full["pairs_scored"] / args.partitions
    return ["| measure | value |", "|---|---|",
            f"| full run: pairs scored, wall | {full['pairs_scored']:,}, {full_wall:.0f} s |",
            f"| killed after | {killed_at}/{args.partitions} partitions committed |",
            (f"| resumed run: partitions scored / already committed | {scored_now} / "
            f"{resumed['partitions']['already_committed']} |"),
            (f"| resumed run: pairs scored (~{per_part:.0f} per partition) / full run's | "
            f"~{scored_now * per_part:.0f} / {full['pairs_scored']:,} = {scored_now / args.partitions:.2f} |"),
            (f"| resumed run wall (prepare skipped) vs full run wall | {resume_wall:.0f} s / {full_wall:.0f} s = "
            f"{resume_wall / full_wall:.2f} |"),
            (f"| final outputs: pairs (each once) | {resumed['pairs_scored']:,} (total in partition markers {again:,})"
            " |"), f"| benchmark wall | {time.perf_counter() - t:.0f} s |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("what", choices=["rss", "resume"])
    parser.add_argument("--pairs", type=int, nargs="+", default=[20000, 200000, 2000000])
    parser.add_argument("--score-up-to", type=int, default=20000)
    parser.add_argument("--dry-first", action="store_true", help="also a dry run of the smallest size, first")
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kalm-bench-rerank-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model, store = _prepare_store(work)
    import pyarrow.parquet as pq

    from kalm_batch.store import open_store

    index = open_store(store).index_files()  # the benchmark's own doc ids (read here, not by the job)
    doc_ids = sorted(d for url in index for d in pq.read_table(url.removeprefix("file://")).column("doc_id").to_pylist())
    rows = (rss if args.what == "rss" else resume)(args, work, model, store, doc_ids)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    cmd = "python benchmarks/rerank_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [f"- command: `{cmd}`", (f"- machine: {os.cpu_count()} CPUs ({cpu}), load average at the end {os.getloadavg()[1]:.1f} (5 min); "
            f"tiny random model, a {N_DOCS}-passage bf16 store at r0=4, {PER_QUERY} candidates per query"), ""]
    sys.stdout.write("\n".join(head + rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
