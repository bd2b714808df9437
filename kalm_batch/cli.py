"""The ``kalm-batch`` command: parse flags -> typed config -> call a builder. No work happens at import."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from kalm_batch.cliutil import add_model_arguments, model_from_args


def _tiny_model(ns) -> int:
    import torch

    from kalm_batch.tiny import write_random_model

    out = write_random_model(ns.out_dir, shape=ns.shape, seed=ns.seed,
                             dtype=torch.bfloat16 if ns.shape == "nano" else torch.float32)
    print(f"wrote a random {ns.shape} T5Gemma2 checkpoint + tokenizer to {out}")
    return 0


def _info(ns) -> int:
    from kalm_batch.model import load_tokenizer, model_summary, resolve_model_dir, yes_no_ids

    model_dir, rev = resolve_model_dir(ns.model)
    info = model_summary(model_dir)
    tok = load_tokenizer(model_dir)
    info.update({"model": ns.model, "path": str(model_dir), "revision": rev, "yes_no_ids": list(yes_no_ids(tok)),
                 "default_dtype": "bfloat16 on CUDA, float32 on CPU"})
    print(json.dumps(info, indent=2))
    return 0


def _score(ns) -> int:
    from kalm_batch.reranker import KaLMReranker

    r = KaLMReranker(ns.model, dtype=ns.dtype, chunk_size=ns.ratio, max_length=ns.max_length)
    print(json.dumps(r.rank(ns.query, ns.documents, instruction=ns.instruction, top_k=ns.top_k,
                            return_documents=True), indent=2, ensure_ascii=False))
    return 0


def _sample_corpus(ns) -> int:
    from kalm_batch.sample import write_sample_corpus

    info = write_sample_corpus(ns.out_dir, max_docs=ns.max_docs, n_queries=ns.queries, seed=ns.seed)
    print(f"wrote {info.n_docs} passages and {info.n_queries} queries: {info.corpus_path}, {info.queries_path}, "
          f"{info.qrels_path}")
    return 0


def _encode(ns) -> int:
    from kalm_batch.pipelines.encode import EncodeConfig, run_encode

    summary = run_encode(model_from_args(EncodeConfig, ns))
    print("encode summary\n" + summary.table())
    if summary.rejected:
        print(f"rejected rows by reason: {summary.rejected_by_reason} (details: {summary.errors_file})")
    return 0


def _inspect(ns) -> int:
    from kalm_batch.store import open_store

    reader = open_store(ns.store, version=ns.version)
    out = {"store": ns.store, **reader.summary(), "ratios": reader.ratios}
    if ns.verify:
        out["verify"] = reader.verify()
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 1 if ns.verify and (out["verify"]["records_corrupt"] or out["verify"]["bad_files"]) else 0


def _history(ns) -> int:
    from kalm_batch.store import history

    rows = history(ns.store, limit=ns.limit)
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    keys = ["version", "time", "operation", "rows_added", "rows_removed", "new", "refreshed", "deleted"]
    print("  ".join(f"{k:>12}" if k != "time" else f"{k:<25}" for k in keys))
    for r in rows:
        print("  ".join(f"{r[k]!s:>12}" if k != "time" else f"{r[k]:<25}" for k in keys))
    return 0


def _compact(ns) -> int:
    from kalm_batch.store import compact

    print(json.dumps(compact(ns.store, target_rows=ns.target_rows), indent=2))
    return 0


def _vacuum(ns) -> int:
    from kalm_batch.store import vacuum

    print(json.dumps(vacuum(ns.store, retain_hours=ns.retain_hours, force=ns.force, dry_run=ns.dry_run), indent=2))
    return 0


def _rerank(ns) -> int:
    from kalm_batch.pipelines.rerank import config_from_args, run_rerank

    print(run_rerank(config_from_args(ns)).table())
    return 0


def _sweep(ns) -> int:
    from kalm_batch.sweep import config_from_args, run_sweep

    report = run_sweep(config_from_args(ns))
    print(f"sweep: best {report['ranked_by']} {report['best']}; table {report['outputs']['sweep.md']}")
    print(f"plot: {report['outputs']['plot']}" if "plot" in report["outputs"] else
          "plot: not drawn (matplotlib missing): pip install 'kalm-batch[plot]'")
    return 0


def _eval(ns) -> int:
    from kalm_batch.metrics import format_table
    from kalm_batch.pipelines.rerank import run_eval

    result = run_eval(ns.run, ns.qrels)
    print(format_table({ns.run: result}))
    return 0


def _serve(ns) -> int:
    from kalm_batch.serve.app import ServeConfig, ServeStartError, run_serve

    try:
        run_serve(model_from_args(ServeConfig, ns), blocking=True)
    except ServeStartError as e:
        print(f"kalm-batch serve: error: {e}", file=sys.stderr)
        return 2
    return 0


def _quickstart(ns) -> int:
    from kalm_batch.quickstart import run_quickstart

    run_quickstart(ns.out, s3=ns.s3, max_docs=ns.max_docs)
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands; the config-derived flags (and their heavy imports) only for ``command``."""
    p = argparse.ArgumentParser(prog="kalm-batch", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("tiny-model", help="write a random T5Gemma2 checkpoint + tokenizer (offline tests, demos)")
    s.add_argument("out_dir")
    s.add_argument("--shape", choices=["tiny", "nano"], default="tiny", help="tiny, or the real Nano shape")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_tiny_model)

    s = sub.add_parser("info", help="model type, sizes, yes/no ids")
    s.add_argument("model")
    s.set_defaults(fn=_info)

    s = sub.add_parser("score", help="rank documents for one query; prints JSON")
    s.add_argument("--model", required=True)
    s.add_argument("--query", required=True)
    s.add_argument("documents", nargs="+")
    s.add_argument("--instruction", default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--dtype", default=None)
    s.add_argument("--ratio", type=int, default=4)
    s.add_argument("--max-length", type=int, default=1024)
    s.set_defaults(fn=_score)

    s = sub.add_parser("sample-corpus", help="write a BEIR corpus + queries + qrels from stdlib docstrings")
    s.add_argument("out_dir")
    s.add_argument("--max-docs", type=int, default=2000)
    s.add_argument("--queries", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_sample_corpus)

    s = sub.add_parser("encode", help="encode a corpus into a memory store (Ray Data job)")
    if command == "encode":
        from kalm_batch.pipelines.encode import EncodeConfig

        add_model_arguments(s, EncodeConfig)
    s.set_defaults(fn=_encode)

    s = sub.add_parser("inspect", help="summary of a store version (settings, fingerprint, rows); --verify checks "
                                       "every checksum")
    s.add_argument("store")
    s.add_argument("--version", type=int, default=None, help="table version (default: the latest)")
    s.add_argument("--verify", action="store_true")
    s.set_defaults(fn=_inspect)

    s = sub.add_parser("history", help="a store's versions: time, operation, rows added / removed")
    s.add_argument("store")
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_history)

    s = sub.add_parser("compact", help="merge a store's small data files (one new version, same memories)")
    s.add_argument("store")
    s.add_argument("--target-rows", type=int, default=1024, help="passages per merged data file")
    s.set_defaults(fn=_compact)

    from kalm_batch.store.maintenance import DEFAULT_RETAIN_HOURS, MIN_RETAIN_HOURS

    s = sub.add_parser("vacuum", help="delete data files that no version of the last --retain-hours needs")
    s.add_argument("store")
    s.add_argument("--retain-hours", type=float, default=DEFAULT_RETAIN_HOURS,
                   help=f"keep what versions of the last H hours need (default {DEFAULT_RETAIN_HOURS}; less than "
                        f"{MIN_RETAIN_HOURS} needs --force)")
    s.add_argument("--force", action="store_true", help="allow a retention below the minimum")
    s.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    s.set_defaults(fn=_vacuum)

    s = sub.add_parser("rerank", help="rerank query logs against a memory store (Ray Data job)")
    if command == "rerank":
        from kalm_batch.pipelines.rerank import add_rerank_arguments

        add_rerank_arguments(s)
    s.set_defaults(fn=_rerank)

    s = sub.add_parser("sweep", help="rerank the same pairs at several ratios/cascades from one store; quality vs "
                                     "cost vs bytes table and plot")
    if command == "sweep":
        from kalm_batch.sweep import add_sweep_arguments

        add_sweep_arguments(s)
    s.set_defaults(fn=_sweep)

    s = sub.add_parser("eval", help="nDCG@10 / RR@10 / R@100 of a TREC run (ir-measures)")
    s.add_argument("--run", required=True, help="a TREC run file, or a committed rerank output folder (its run.trec)")
    s.add_argument("--qrels", required=True)
    s.set_defaults(fn=_eval)

    s = sub.add_parser("serve", help="Ray Serve rerank endpoint over a memory store")
    if command == "serve":
        from kalm_batch.serve.app import ServeConfig

        add_model_arguments(s, ServeConfig)
    s.set_defaults(fn=_serve)

    s = sub.add_parser("quickstart", help="end to end on the embedded default: tiny model, sample corpus, encode, "
                                          "BM25, rerank, metrics")
    s.add_argument("--out", default="quickstart-out")
    s.add_argument("--s3", action="store_true", help="put the corpus and store on an in-process S3 server (moto)")
    s.add_argument("--max-docs", type=int, default=300)
    s.set_defaults(fn=_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    ns = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kalm_batch.store.errors import StoreError

    try:  # (ValueError covers InputError, CascadeError, UncommittedOutputError and OutputInUseError)
        return ns.fn(ns)
    except (ValueError, TypeError, StoreError, OSError) as e:
        if ns.verbose:
            raise
        print(f"kalm-batch {ns.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
