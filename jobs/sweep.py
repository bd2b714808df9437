"""Ray job entrypoint for the ratio/cascade sweep: ``kalm-batch sweep`` with the same flags.

    ray job submit --working-dir . -- python jobs/sweep.py --model M --store s3://b/store \\
        --queries s3://b/queries.jsonl --candidates s3://b/run.trec --qrels s3://b/qrels.tsv --out s3://b/sweep/ \\
        --ratios 4,8,16,32 --cascades 32:100,4:20 --sample-queries 500 --address auto

Prints the best setting and where sweep.md and sweep.png were written; exits non-zero on errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir holds kalm_batch/

from kalm_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
