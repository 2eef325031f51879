"""The GPU suite (``facekernels-bench --suite gpu`` or ``bash bench/gpu_suite.sh``): one command that
builds the CUDA extension, runs the tests that touch a GPU (GPU_TESTS; the rest run on CPU in CI), runs the
GPU sweep and writes everything into bench/results/<gpu>-<date>/, ready to commit:

    build.log  tests.log  profile.txt (bench/gpu_step_profile.py, then bench/gpu_tile_sweep.py)
    env.txt (nvidia-smi, versions, commit, command)  run.txt  results.csv  table.md  plot.png

The sweep, in this order, so that a run cut by the deadline (default: everything within 10 minutes) loses the
least useful cases (those left are recorded as "skipped(deadline)"):
1. the comparisons: ArcFace and CurricularFace at B = 1024 and ArcFace at B = 256, d = 512, C = 1M, bf16, and
   the triplet loss at B = 1024, K = 4, each with every provider (fused, GEMM floor, torch.compile, eager;
   pml for the triplet). On the first H200 run (bench/results/h200-2026-12-04) a sweep by provider spent
   the whole budget on the fused scale sweep and timed no baseline at all.
2. the scale: heads at C = 10k doubling while any provider still fits (a provider that ran out of memory at
   some C is not tried above it), bf16 and fp32; AdaFace, MagFace, ElasticArcFace and Sub-center ArcFace
   (k = 3) at C = 1M in bf16; the triplet loss at B = 1k ... 16k with K = 4 and K = 40. Fused providers and
   the GEMM floor first, the baselines after and torch.compile last.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import torch

from . import measure, results
from .ops import HeadShape, TripletShape
from .runner import can_plot, sweep, write_outputs

HEADS_CLASSES_START = 10_000
GOAL_CLASSES = 30_000_000
SWEEP_RESERVE_S = 240  # of the suite's budget, kept for the sweep
# the test files whose tests run on the GPU when there is one (tests/kit.py's TRITON_DEVICE, gpu-marked cases;
# tests/test_benchmark.py checks that none is missing); the rest of the suite tests the CPU paths, which CI
# runs (six of these files took 62-78 s with 12 workers on the H200 machine)
GPU_TESTS = ("test_api.py", "test_extension.py", "test_fallback.py", "test_heads.py", "test_heads_lowp.py",
             "test_heads_more.py", "test_optim.py", "test_registry.py", "test_stats_rank.py", "test_target_rows.py",
             "test_triplet_fused.py", "test_triton_kernels.py")  # fmt: skip


def doubling(start: int, stop: int) -> list:
    values = []
    while start <= stop:
        values.append(start)
        start *= 2
    return values


def plan(device: torch.device, *, max_classes: int, quick: bool = False, providers=None) -> list:
    """[((op, provider), [(shape, mode), ...]), ...]: the comparisons (every provider on a few shapes), then
    the scale sweeps (by provider, most informative first)."""
    if quick:  # a few seconds anywhere: checks the suite's plumbing, not the GPU
        heads = [HeadShape("arcface", 16, 24, c, dt) for dt in ("float32",) for c in doubling(100, 400)]
        triplets = [TripletShape(b, 24, k, "semihard") for k in (4,) for b in (16, 32)]
        key_heads, key_triplets = heads[:1], triplets[:1]
    else:
        key_heads = [HeadShape(h, b, 512, 1_000_000, "bfloat16")
                     for h, b in (("arcface", 1024), ("curricular", 1024), ("arcface", 256))]  # fmt: skip
        key_triplets = [TripletShape(1024, 512, 4, "semihard")]
        # doubling, plus 30M: the project's goal for one 80 GB GPU at d = 512 in bf16
        classes = doubling(HEADS_CLASSES_START, max_classes)
        classes = sorted(set(classes + ([GOAL_CLASSES] if GOAL_CLASSES <= max_classes else [])))
        heads = [HeadShape("arcface", 1024, 512, c, dt) for dt in ("bfloat16", "float32") for c in classes]
        heads += [HeadShape(h, 1024, 512, 1_000_000, "bfloat16")
                  for h in ("adaface", "magface", "elastic_arcface", "subcenter_arcface")]  # fmt: skip
        triplets = [TripletShape(b, 512, k, "semihard") for k in (4, 40) for b in doubling(1024, 16384)]
    fused_heads = "triton" if device.type == "cuda" else "cpu"
    fused_triplet = "cuda" if device.type == "cuda" else "cpu"
    first = [("heads", p) for p in (fused_heads, "gemm", "compile", "eager")]
    first += [("triplet", p) for p in (fused_triplet, "gemm", "compile", "eager", "pml")]
    order = [("heads", fused_heads), ("triplet", fused_triplet), ("heads", "gemm"), ("triplet", "gemm"),
             ("heads", "eager"), ("triplet", "eager"), ("triplet", "pml"), ("heads", "compile"),
             ("triplet", "compile")]  # fmt: skip
    key = {"heads": key_heads, "triplet": key_triplets}
    rest = {op: [s for s in shapes if s not in key[op]] for op, shapes in (("heads", heads), ("triplet", triplets))}
    groups = [((op, p), [(s, "full") for s in key[op]]) for op, p in first]
    groups += [((op, p), [(s, "full") for s in rest[op]]) for op, p in order]
    return [(k, items) for k, items in groups if items and (providers is None or k[1] in providers)]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def result_dir(root: str, device: torch.device, today: datetime.date | None = None) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    name = re.sub(r"^nvidia[ -]", "", name, flags=re.I)
    return os.path.join(root, f"{slug(name)}-{(today or datetime.date.today()).isoformat()}")


def _run_logged(cmd: list, log_path: str, env: dict | None = None, timeout_s: float = 600, append: bool = False) -> int:
    """Run cmd with its output going to log_path (after what it holds, with ``append``; and a summary line to
    stderr); its exit code."""
    start = time.perf_counter()
    with open(log_path, "a" if append else "w") as log:
        log.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        log.flush()
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s,
                                  cwd=results.REPO_ROOT).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            code = 124
            log.write(f"\nTIMEOUT after {timeout_s:g} s\n")
        log.write(f"\nexit code {code} after {time.perf_counter() - start:.0f} s\n")
    print(f"[gpu-suite] {' '.join(cmd[:4])} ... -> exit {code} ({time.perf_counter() - start:.0f} s), "
          f"log {log_path}", file=sys.stderr)  # fmt: skip
    return code


def write_env(path: str, device: torch.device, command: str) -> None:
    env = results.environment(device)
    smi = shutil.which("nvidia-smi")
    smi_text = subprocess.run([smi], capture_output=True, text=True).stdout if smi else "nvidia-smi not found\n"
    lines = [
        f"command: {command}",
        f"commit: {env['facekernels_commit']}",
        f"date: {env['timestamp']}",
        f"device: {env['device']}",
        f"python: {sys.version.split()[0]}",
        f"torch: {torch.__version__} (CUDA {torch.version.cuda})",
        f"triton: {env['triton_version'] or '-'}",
        "",
        smi_text,
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facekernels-bench --suite gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--results-root", default=os.path.join(results.REPO_ROOT, "bench", "results"))
    p.add_argument("--out", default=None, help="the result folder (default <results-root>/<gpu>-<date>)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the suite's plumbing (--quick)")
    p.add_argument("--minutes", type=float, default=10.0, help="the whole suite's time budget")
    p.add_argument("--max-classes", type=int, default=HEADS_CLASSES_START * 2**12,
                   help="largest C tried for the heads (C doubles from 10k)")  # fmt: skip
    p.add_argument("--providers", nargs="+", default=None, help="default: all of them")
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-profile", action="store_true", help="no bench/gpu_step_profile.py run (profile.txt)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: check the plumbing in seconds")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds one measurement may take")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    """The suite's entry point (argv without "--suite gpu"); 0 when the build and the tests passed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    start = time.monotonic()
    deadline = start + args.minutes * 60 - 20  # keep 20 s to write the outputs
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--suite gpu needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    plot = can_plot()
    out = args.out or result_dir(args.results_root, device)
    os.makedirs(out, exist_ok=True)
    command = "facekernels-bench --suite gpu " + " ".join(shlex.quote(a) for a in argv)
    write_env(os.path.join(out, "env.txt"), device, command)
    codes = {}
    if not args.skip_build:
        env = {**os.environ, "FACEKERNELS_CUDA": "1"}
        # --no-deps: the machine's own torch stays (a resolver could otherwise try to replace it, with no network)
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
        timeout_s = max(60, deadline - time.monotonic() - 2 * SWEEP_RESERVE_S)
        codes["build"] = _run_logged(cmd, os.path.join(out, "build.log"), env, timeout_s=timeout_s)
    if not args.skip_tests:
        # a fresh interpreter: it imports the extension just built; pytest-xdist's workers where it is installed
        workers = ["-n", str(min(12, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []
        cmd = [sys.executable, "-m", "pytest", *(os.path.join("tests", f) for f in GPU_TESTS), "-q", "-rfEs",
               "--durations=15", *workers]  # fmt: skip
        # the sweep keeps at least SWEEP_RESERVE_S of the budget however long the tests would take
        timeout_s = max(60, deadline - time.monotonic() - SWEEP_RESERVE_S)
        codes["tests"] = _run_logged(cmd, os.path.join(out, "tests.log"), timeout_s=timeout_s)

    profile = os.path.join(results.REPO_ROOT, "bench", "gpu_step_profile.py")
    tiles = os.path.join(results.REPO_ROOT, "bench", "gpu_tile_sweep.py")
    if device.type == "cuda" and not args.skip_profile and os.path.exists(profile):
        # one step's kernels, launches and GPU time each, its CUDA-graph time and the floor: what the sweep's
        # step times alone cannot say (which kernel is slow); then the Triton tiles timed, into the same file
        # (the device tool brings back 8 files)
        timeout_s = max(30, min(150, deadline - time.monotonic() - SWEEP_RESERVE_S))
        _run_logged([sys.executable, profile], os.path.join(out, "profile.txt"), timeout_s=timeout_s)
        seconds = min(60, deadline - time.monotonic() - SWEEP_RESERVE_S - 20)
        if seconds > 20 and os.path.exists(tiles):
            _run_logged([sys.executable, tiles, "--seconds", f"{seconds:.0f}"], os.path.join(out, "profile.txt"),
                        timeout_s=seconds + 20, append=True)  # fmt: skip

    settings = measure.Settings()
    sweep_start = time.perf_counter()
    cases = plan(device, max_classes=args.max_classes, quick=args.quick, providers=args.providers)
    rows = sweep(cases, device, settings,
                 timeout_s=args.timeout, progress=not args.no_progress, deadline=deadline)  # fmt: skip
    write_outputs(rows, out, command, device, time.perf_counter() - sweep_start, plot=plot)
    summary = ", ".join(f"{k} exit {v}" for k, v in codes.items()) or "build and tests skipped"
    with open(os.path.join(out, "env.txt"), "a") as f:
        f.write(f"\nsuite: {summary}; sweep {time.perf_counter() - sweep_start:.0f} s; "
                f"total {time.monotonic() - start:.0f} s\n")  # fmt: skip
    print(f"[gpu-suite] {summary}; results in {out}", file=sys.stderr)
    return 0 if all(c == 0 for c in codes.values()) else 1
