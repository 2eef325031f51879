"""facekernels-bench: time and peak memory of the fused heads and triplet loss against the eager reference,
torch.compile of it, pytorch-metric-learning and the GEMM floor.

With no argument: the default sweep on this machine's device (a few minutes on 2 CPU cores), a markdown
table on stdout, rows appended to <out>/results.csv, the plot in <out>/plot.png.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch

from .._head_params import head_names
from .._params import MINING_MODES
from . import gpu_suite, measure
from .ops import DTYPES, MODES, OPS, HeadShape, TripletShape
from .runner import can_plot, load_average, load_warning, sweep, write_outputs

DEFAULT_OUT = "facekernels-bench-out"

# printed under the table: what each column means
LEGEND = """\
Columns: "time ms p50 [p20, p80]": the median (20th, 80th percentiles) of one step in milliseconds ("full":
forward + backward); "speedup vs eager": eager's time / this provider's; "time / gemm": this provider's time
over that of the bare matrix products of the same shapes (the floor: 1.00 would be GEMM speed); "peak MiB":
the most memory one step adds over what is held before it (its inputs and the previous step's gradients), so
it excludes weight.grad (CPU: resident set; CUDA: the caching allocator); "memory / eager": peak MiB over
eager's. OOM(...): the case did not fit (skipped from the harness's estimate, or killed)."""


def _total_ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 16.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facekernels-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--suite", choices=("cpu", "gpu"), default=None,
                   help="gpu: build the CUDA extension, run the GPU tests and the GPU sweep into "
                        "bench/results/<gpu>-<date>/ (see bench/gpu_suite.sh); default: the sweep below")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu or cuda")
    p.add_argument("--ops", nargs="+", choices=tuple(OPS), default=list(OPS))
    names = sorted({name for op in OPS.values() for name in op.providers})
    p.add_argument("--providers", nargs="+", default=None, choices=names, metavar="PROVIDER",
                   help=f"any of {', '.join(names)} (cpu, triton: the fused heads; cuda: the fused triplet "
                        "kernel; eager: the reference; compile: torch.compile of it; gemm: the matrix products "
                        "alone; pml: pytorch-metric-learning, triplet only); default: the device's fused "
                        "backend, eager, compile, gemm (and pml for triplet); a provider that is not an op's is "
                        "ignored for that op")  # fmt: skip
    p.add_argument("--heads", nargs="+", choices=head_names(), default=["arcface"])  # the registry's heads
    p.add_argument("--batch", type=int, default=256, help="heads: B")
    p.add_argument("--features", type=int, default=512, help="d (heads and triplet)")
    p.add_argument("--classes", type=int, nargs="+", default=[10_000, 30_000, 100_000], help="heads: C values")
    p.add_argument("--double-to", type=int, default=None, metavar="C_MAX",
                   help="heads: also C doubling from the smallest --classes up to C_MAX; a provider stops at its "
                        "first OOM (the scale question: the largest C each provider reaches on this machine)")
    p.add_argument("--triplet-batch", type=int, nargs="+", default=[256, 512, 1024], help="triplet: B values")
    p.add_argument("--triplet-k", type=int, nargs="+", default=[4], help="triplet: samples per identity")
    p.add_argument("--mining", nargs="+", choices=MINING_MODES, default=["semihard"])
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["float32"])
    p.add_argument("--mode", nargs="+", choices=MODES, default=["full"],
                   help="forward, backward, full (forward + backward) or optim (heads: forward + backward + "
                        "the head's SGD step: torch.optim.SGD after the fused / eager head, and fused_sgd: "
                        "facekernels.optim.SGD inside the backward)")  # fmt: skip
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--repeats", type=int, default=100, help="CPU: the most timed samples per case (1: one sample, for steps of minutes)")
    p.add_argument("--budget", type=float, default=0.5,
                   help="CPU: seconds of timed samples per case (at least 5 samples, or --repeats if fewer)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads of the measuring process (default: torch's, one per core); "
                        "1 gives steadier numbers on a machine busy with other work")  # fmt: skip
    p.add_argument("--mem-limit", type=float, default=round(min(16.0, 0.6 * _total_ram_gib()), 1),
                   help="CPU: GiB; a case estimated to need more is recorded as OOM(skipped), not run")  # fmt: skip
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one measurement (compilation included) may take before it is recorded "
                        "as TIMEOUT")  # fmt: skip
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (no fresh process per provider: CPU memory is then "
                        "unreliable); for debugging")  # fmt: skip
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (for logs and CI; the table is printed either way)")
    return p


def build_cases(args, device: torch.device) -> dict:
    """{(op name, provider): [(shape, mode), ...]} in ascending swept size within each configuration."""
    cases = {}
    for op_name in args.ops:
        op = OPS[op_name]
        providers = args.providers or op.default_providers(device)
        if args.providers is None and "optim" in args.mode and op_name == "heads":
            providers = providers + ["fused_sgd"]  # the fused update: the optim mode's point
        providers = [p for p in providers if p in op.providers]
        if op_name == "heads":
            classes = set(args.classes)
            if args.double_to:
                c = min(args.classes)
                while c <= args.double_to:
                    classes.add(c)
                    c *= 2
            shapes = [HeadShape(h, args.batch, args.features, c, dt)
                      for dt in args.dtype for h in args.heads for c in sorted(classes)]  # fmt: skip
        else:
            shapes = [TripletShape(b, args.features, k, mining, dt)
                      for dt in args.dtype for mining in args.mining for k in args.triplet_k
                      for b in sorted(args.triplet_batch)]  # fmt: skip
        for provider in providers:
            items = [(s, m) for m in args.mode for s in shapes if op.supports(provider, m)]
            if items:
                cases[(op_name, provider)] = items
    return cases


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    return device


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    suite = argparse.ArgumentParser(add_help=False)
    suite.add_argument("--suite", choices=("cpu", "gpu"))
    known, rest = suite.parse_known_args(argv)
    if known.suite == "gpu":  # the suite has its own options (facekernels-bench --suite gpu --help)
        return gpu_suite.main(rest)
    args = parser().parse_args(argv)
    device = pick_device(args.device)
    settings = measure.Settings(repeats=args.repeats, budget_s=args.budget, mem_limit_gib=args.mem_limit,
                                threads=args.threads)  # fmt: skip
    command = "facekernels-bench " + " ".join(shlex.quote(a) for a in argv)
    plot = can_plot()
    warning = load_warning()
    if warning:
        print(warning, file=sys.stderr)
    start, load_at_start = time.perf_counter(), load_average()
    torch.manual_seed(0)
    rows = sweep(build_cases(args, device), device, settings, in_process=args.in_process,
                 timeout_s=args.timeout, progress=not args.no_progress)  # fmt: skip
    elapsed = time.perf_counter() - start
    table = write_outputs(rows, args.out, command, device, elapsed, load_at_start, plot=plot)
    print(table)
    print(LEGEND)
    plotted = f", plot in {os.path.join(args.out, 'plot.png')}" if plot else ""
    print(f"{len(rows) // 2} cases in {elapsed:.0f} s; rows appended to {os.path.join(args.out, 'results.csv')}"
          f"{plotted}")  # fmt: skip
    errors = [r for r in rows if r["y_p50"] in ("error", "TIMEOUT")]
    if errors:
        print(f"{len(errors)} measurement(s) failed; see the notes above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
