"""Ray job entrypoint for the ratio/cascade sweep (same flags as ``kalm-batch sweep``).

    ray job submit --working-dir . -- python jobs/sweep.py --model M --store s3://b/store \\
        --queries s3://b/queries.jsonl --candidates s3://b/run.trec --qrels s3://b/qrels.tsv --out s3://b/sweep/ \\
        --ratios 4,8,16,32 --cascades 32:100,4:20 --sample-queries 500 --address auto

Prints where sweep.md and sweep.png were written; exits non-zero on errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, when run as a script

from kalm_batch.sweep import add_sweep_arguments, config_from_args, run_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n", 1)[0])
    add_sweep_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_sweep(cfg)
    sys.stdout.write(f"best {report['ranked_by']}: {report['best']}; outputs: {report['outputs']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
