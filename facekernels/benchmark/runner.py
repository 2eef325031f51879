"""The sweep and its outputs, shared by the two entry points: the default sweep (cli.py) and the GPU suite
(gpu_suite.py), which cli.py dispatches to (so neither imports the other back)."""

from __future__ import annotations

import os
import sys
import time

import torch

from . import measure, results
from .ops import OPS
from .plot import matplotlib_available


def sweep(cases, device: torch.device, settings: measure.Settings, *, ops=OPS, in_process=False,
          timeout_s=300.0, progress=True, on_row=None, deadline=None) -> list:  # fmt: skip
    """Measure every case, in order; returns the result rows (two per case: time and memory). ``cases``:
    {(op, provider): [(shape, mode), ...]}, or a list of such pairs (one provider may come back later)."""
    cases = list(cases.items()) if isinstance(cases, dict) else list(cases)
    from tqdm import tqdm

    threads = torch.get_num_threads()
    if settings.threads and device.type == "cpu":
        torch.set_num_threads(settings.threads)  # also what the device name reports
    env = results.environment(device)
    rows = []
    total = sum(len(v) for _, v in cases)
    bar = tqdm(total=total, disable=not progress, unit="case", file=sys.stderr, dynamic_ncols=True)
    try:
        for (op_name, provider), items in cases:
            op = ops[op_name]
            bar.set_description(f"{op_name}/{provider}")
            late = deadline is not None and time.monotonic() >= deadline
            reason = None if late else op.probe(provider, device)
            if late:
                outcomes = ((i, measure.Outcome(measure.DEADLINE, measure.DEADLINE)) for i in range(len(items)))
            elif reason is not None:
                outcomes = ((i, measure.Outcome("unavailable", "unavailable", reason)) for i in range(len(items)))
            elif in_process:
                outcomes = measure.run_shapes(op, provider, items, device, settings, deadline)
            else:
                outcomes = measure.run_in_child(op, provider, items, device, settings, timeout_s, deadline)
            for index, outcome in outcomes:
                shape, mode = items[index]
                new = results.outcome_rows(op, provider, shape, mode, outcome, env)
                rows += new
                if on_row is not None:
                    on_row(new)
                bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return rows


def write_outputs(rows: list, out: str, command: str, device: torch.device, elapsed_s: float,
                  load_at_start: str = "", plot: bool = True) -> str:  # fmt: skip
    """Append to <out>/results.csv; (re)write this run's table.md, plot.png (unless plot=False) and run.txt."""
    from .plot import save_plot

    os.makedirs(out, exist_ok=True)
    results.append_csv(os.path.join(out, "results.csv"), rows)
    table = results.tables(rows)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    if plot:
        save_plot(rows, os.path.join(out, "plot.png"))
    env = rows[0] if rows else results.environment(device)  # the commit and device the rows were taken on
    with open(os.path.join(out, "run.txt"), "w") as f:
        f.write(f"command: {command}\ncommit: {env['facekernels_commit']}\ndevice: {env['device']}\n"
                f"torch: {env['torch_version']}\ntriton: {env['triton_version'] or '-'}\n"
                f"python: {sys.version.split()[0]}\nstarted: {env['timestamp']}\n"
                f"load average (1, 5, 15 min) at the start: {load_at_start or '-'}; at the end: {load_average()}\n"
                f"wall time: {elapsed_s:.0f} s\n")  # fmt: skip
    return table


def load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def can_plot() -> bool:
    """Whether plot.png can be drawn; without matplotlib, says so before measuring (not minutes later)."""
    if matplotlib_available():
        return True
    print("facekernels-bench: warning: matplotlib is not installed: no plot.png (the table and results.csv are "
          "written); pip install matplotlib, or the [bench] extra, for the plot", file=sys.stderr)  # fmt: skip
    return False


def load_warning() -> str | None:
    """A warning when the 1-minute load average is above half the cores: other work then slows and
    scatters the timings (and a memory measurement can meet another process's peak)."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on this platform
        return None
    cores = os.cpu_count() or 1
    if load <= cores / 2:
        return None
    return (f"facekernels-bench: warning: load average {load:.2f} on {cores} cores: other work is running, "
            "timings will be slower and noisier than on an idle machine")  # fmt: skip
