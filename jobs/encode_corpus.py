"""Ray job entrypoint for the corpus encode job.

    ray job submit --working-dir . -- python jobs/encode_corpus.py --model M --corpus s3://b/corpus/ \
        --store s3://b/stores/nano-r4 --address auto --workers 4 --gpus-per-worker 1

Same flags as ``kalm-batch encode``. Without --address it starts a local Ray (the embedded default).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir holds kalm_batch/

from kalm_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
