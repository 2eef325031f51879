"""facekernels-bench: time forward+backward of the heads and the triplet loss on small CPU defaults.

This first version measures the eager reference (the baseline every fused backend is compared with);
the full harness (providers, peak memory, CSV, plot, GPU suite) grows from it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .. import functional as fkf
from ..heads import HEAD_DEFAULTS


def _median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _head_step(head, batch, classes, features, backend):
    x = torch.randn(batch, features, requires_grad=True)
    w = (torch.randn(classes, features) * 0.01).requires_grad_()
    y = torch.randint(0, classes, (batch,))
    t = torch.zeros(()) if head == "curricular" else None

    def step():
        x.grad = w.grad = None
        fkf.margin_cross_entropy(x, w, y, head, t=t, backend=backend).backward()

    return step


def _triplet_step(batch, features, mining, backend):
    e = torch.randn(batch, features, requires_grad=True)
    y = torch.randint(0, max(1, batch // 4), (batch,))

    def step():
        e.grad = None
        fkf.triplet_margin_loss(e, y, mining=mining, backend=backend).backward()

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backend", default="reference")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, forward+backward, median ms")
    print("\n| op | B | d | C | ms |\n|---|---|---|---|---|")
    for head in HEAD_DEFAULTS:
        for classes in args.classes:
            ms = _median_ms(_head_step(head, args.batch, classes, args.features, args.backend), 2, args.repeats)
            print(f"| {head} | {args.batch} | {args.features} | {classes} | {ms:.2f} |")
    for mining in ("semihard", "hard", "all"):
        ms = _median_ms(_triplet_step(args.batch, args.features, mining, args.backend), 2, args.repeats)
        print(f"| triplet {mining} | {args.batch} | {args.features} | - | {ms:.2f} |")


if __name__ == "__main__":
    main()
