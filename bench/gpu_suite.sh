#!/usr/bin/env bash
# The GPU suite in one command, from a checkout on a CUDA machine (torch with CUDA, nvcc, triton):
# builds the CUDA extension (pip install --no-build-isolation -e . with FACEKERNELS_CUDA=1), runs the GPU tests
# (gpu_suite.GPU_TESTS), profiles one step, runs the GPU sweep, and writes build.log, tests.log, profile.txt,
# env.txt, run.txt, results.csv, table.md and plot.png (8 files: what the device tool brings back) into
# bench/results/<gpu>-<date>/ within 10 minutes.
# Options go to `facekernels-bench --suite gpu` (--help lists them: --minutes, --max-classes, --skip-build...).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m facekernels.benchmark.cli --suite gpu "$@"
