#!/usr/bin/env bash
# The GPU suite in one command, from a checkout on a CUDA machine (torch with CUDA, nvcc, triton):
# builds the CUDA extension (pip install --no-build-isolation -e . with FACEKERNELS_CUDA=1), runs every test
# (gpu ones included), runs the full GPU sweep, and writes build.log, tests.log, env.txt, results.csv,
# table.md and plot.png into bench/results/<gpu>-<date>/ within 10 minutes.
# Options go to `facekernels-bench --suite gpu` (--help lists them: --minutes, --max-classes, --skip-build...).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m facekernels.benchmark.cli --suite gpu "$@"
