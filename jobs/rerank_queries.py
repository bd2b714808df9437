"""Ray job entrypoint for the bulk rerank job: ``kalm-batch rerank`` with the same flags.

    ray job submit --working-dir . -- python jobs/rerank_queries.py --model M --store s3://b/store \\
        --queries s3://b/queries.jsonl --candidates s3://b/run.trec --out s3://b/reranked/ --address auto

Prints the run summary (and, with --qrels, the first-stage vs reranked metrics table); exits non-zero on errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir holds kalm_batch/

from kalm_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["rerank", *sys.argv[1:]]))
