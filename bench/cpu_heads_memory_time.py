"""Time and extra peak memory of one head's forward+backward on CPU: the compiled ``cpu`` backend against
the eager ``reference`` head (issue 4, item 5).

Time: both providers in the same process, alternating (the order flips every repetition), after one warm-up
each; median and 0.2 / 0.8 quantiles of the wall time of ``loss.backward()`` including the forward.
Memory: for each provider a fresh subprocess builds the inputs, warms up on a tiny problem, resets its RSS
high-water mark and reports its growth (``VmHWM`` - ``VmRSS`` before) over one forward+backward, gradients starting from None
(as after ``optimizer.zero_grad()``). That growth includes the gradient of the weight (C x d), which both
providers must produce; it is also reported net of it.

    python bench/cpu_heads_memory_time.py                      # B=256, d=512, C=100000, float32, ArcFace
    python bench/cpu_heads_memory_time.py --classes 20000 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import facekernels as fk  # noqa: E402
from facekernels.ops import cpu_heads  # noqa: E402
from facekernels.reference import margin_cross_entropy as reference_loss  # noqa: E402

PROVIDERS = {"cpu": cpu_heads.margin_cross_entropy, "reference": reference_loss}


def setup(provider: str, batch: int, features: int, classes: int, head: str, class_tile: int):
    """Inputs and a closure running one forward+backward of ``provider``."""
    torch.manual_seed(0)
    cpu_heads.CLASS_TILE = class_tile
    x = torch.randn(batch, features, requires_grad=True)
    w = torch.randn(classes, features, requires_grad=True)
    y = torch.randint(0, classes, (batch,))
    params = fk.head_params(head)
    t = torch.zeros(()) if params.uses_t else None
    fn = PROVIDERS[provider]

    def step():
        x.grad = w.grad = None
        fn(x, w, y, params, t, True).backward()

    return step, w


def quantiles(values):
    q = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "q20": q[1], "q80": q[7]}


def measure_time(args):
    steps = {p: setup(p, args.batch, args.features, args.classes, args.head, args.class_tile)[0] for p in PROVIDERS}
    for step in steps.values():
        step()  # warm-up
    times = {p: [] for p in PROVIDERS}
    order = list(PROVIDERS)
    for _ in range(args.reps):
        for p in order:
            start = time.perf_counter()
            steps[p]()
            times[p].append(time.perf_counter() - start)
        order.reverse()
    return {p: quantiles(v) for p, v in times.items()}


def peak_rss_growth_mib(args, provider):
    """Run in a fresh process (see --child): RSS high-water mark growth over one forward+backward."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", provider, "--batch", str(args.batch),
           "--features", str(args.features), "--classes", str(args.classes), "--head", args.head,
           "--class-tile", str(args.class_tile)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Set this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0). ru_maxrss cannot be
    used: a child inherits its parent's high-water mark across fork and exec."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args):
    step, w = setup(args.child, 2, args.features, 64, args.head, args.class_tile)
    step()  # load the extension, the BLAS, the allocator
    step, w = setup(args.child, args.batch, args.features, args.classes, args.head, args.class_tile)
    reset_peak_rss()
    before = _status_kib("VmRSS")
    step()
    print((_status_kib("VmHWM") - before) / 1024)  # KiB -> MiB


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--head", default="arcface")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--class-tile", type=int, default=0, help="classes per tile of the cpu op (0: its default)")
    ap.add_argument("--child", choices=list(PROVIDERS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    timing = measure_time(args)
    memory = {p: peak_rss_growth_mib(args, p) for p in PROVIDERS}
    grad_mib = args.classes * args.features * 4 / 2**20
    result = {
        "shape": dict(B=args.batch, d=args.features, C=args.classes, dtype="float32", head=args.head),
        "class_tile": args.class_tile,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "time_s": timing,
        "speedup_median": timing["reference"]["median"] / timing["cpu"]["median"],
        "peak_rss_growth_mib": memory,
        "memory_ratio": memory["cpu"] / memory["reference"],
        "weight_grad_mib": grad_mib,
        "memory_ratio_net_of_weight_grad": (memory["cpu"] - grad_mib) / (memory["reference"] - grad_mib),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
