#!/usr/bin/env bash
# The GPU suite in one command, from a checkout on a CUDA machine (torch with CUDA, nvcc, triton):
# builds the CUDA extension (pip install --no-build-isolation -e . with FACEKERNELS_CUDA=1), runs the GPU tests
# (gpu_suite.GPU_TESTS), profiles one step, runs the GPU sweep, and writes build.log, tests.log, profile.txt,
# env.txt, run.txt, results.csv, table.md and plot.png (8 files: what the device tool brings back) into
# bench/results/<gpu>-<date>/ within 10 minutes.
# Options go to `facekernels-bench --suite gpu` (--help lists them: --minutes, --max-classes, --skip-build...).
# Through the workplace's device tool (only $OUT comes back, 8 files at most, 10 minutes a command):
#   bash bench/gpu_suite.sh --out $OUT/r --minutes 9 --no-progress
# then copy the 8 files into bench/results/<gpu>-<date>/ and add a NOTES.md (bench/results/h200-2026-12-04).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m facekernels.benchmark.cli --suite gpu "$@"
