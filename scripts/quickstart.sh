#!/usr/bin/env bash
# Set up on a fresh machine and run the main flow end to end on the embedded default:
# tiny random model, stdlib sample corpus, local Ray, local files (QUICKSTART_S3=1: a moto S3 server on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # the CPU build (an unpinned torch pulls a multi-GB CUDA build)
python3 -m pip install -q -e ".[test]"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"  # a local, single-user Ray
args=(--out "${QUICKSTART_OUT:-quickstart-out}")
if [ "${QUICKSTART_S3:-0}" = "1" ]; then args+=(--s3); fi
exec kalm-batch quickstart "${args[@]}"
