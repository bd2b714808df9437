"""Ray job entrypoint for the bulk rerank job (same flags as ``kalm-batch rerank``).

    ray job submit --working-dir . -- python jobs/rerank_queries.py --model M --store s3://b/store \\
        --queries s3://b/queries.jsonl --candidates s3://b/run.trec --out s3://b/reranked/ --address auto

Prints the run summary (and, with --qrels, the first-stage vs reranked metrics table); exits non-zero on errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, when run as a script

from kalm_batch.pipelines.rerank import add_rerank_arguments, config_from_args, run_rerank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rerank_queries.py", description=__doc__.split("\n", 1)[0])
    add_rerank_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_rerank(cfg)
    sys.stdout.write(summary.table() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
