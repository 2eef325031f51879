"""Result rows (Liger-Kernel's CSV schema, appended), the environment they came from, and markdown tables."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from collections import defaultdict

import torch

SCHEMA = (
    "kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "y_p50", "y_p20", "y_p80",
    "config", "dtype", "device", "torch_version", "triton_version", "facekernels_commit", "timestamp", "note",
)  # fmt: skip
UNITS = {"time": "ms", "memory": "MiB"}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit() -> str:
    """The checkout's commit (with "-dirty" when it has uncommitted changes), or "unknown"."""
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = run("rev-parse", "--short=12", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """The columns every row of a run shares."""
    return {
        "device": device_name(device),
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
        "facekernels_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def outcome_rows(op, provider: str, shape, mode: str, outcome, env: dict) -> list:
    """The time row and the memory row of one measured case."""
    rows = []
    for metric, value in (("time", outcome.time_ms), ("memory", outcome.memory_mib)):
        ys = value if isinstance(value, tuple) else (value, "", "")
        rows.append({
            "kernel": op.kernel(shape), "provider": provider, "mode": mode, "metric": metric,
            "unit": UNITS[metric], "x_name": op.x_name, "x_value": op.x_value(shape),
            "y_p50": _cell(ys[0]), "y_p20": _cell(ys[1]), "y_p80": _cell(ys[2]),
            "config": json.dumps(op.config(shape), sort_keys=True), "dtype": shape.dtype,
            **env, "note": outcome.note,
        })  # fmt: skip
    return rows


def append_csv(path: str, rows: list) -> None:
    """Append rows, writing the header only when the file is new (refuses a file of another schema)."""
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if tuple(header or ()) != SCHEMA:
            raise ValueError(f"{path} has columns {header}, not the facekernels-bench schema {list(SCHEMA)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SCHEMA)
        if not exists:
            writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(text: str):
    """A y cell as a float, or None for a status (OOM, unavailable, ...)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# ---- markdown -------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _ratio(num, den) -> str:
    return f"{num / den:.2f}" if num is not None and den not in (None, 0.0) else ""


def tables(rows: list, with_env: bool = True) -> str:
    """Markdown: one table per (kernel, mode, dtype, config, device, commit), a line per (x, provider),
    with time p50 [p20, p80], peak memory, and the ratios to the eager baseline and the gemm floor."""
    groups = defaultdict(list)
    for r in rows:
        key = (r["kernel"], r["mode"], r["dtype"], r["config"], r["device"], r["facekernels_commit"])
        groups[key].append(r)
    out = []
    for (kernel, mode, dtype, config, device, commit), grp in groups.items():
        cells = {}  # (x, provider) -> {metric: row}
        for r in grp:
            cells.setdefault((int(r["x_value"]), r["provider"]), {})[r["metric"]] = r
        x_name = grp[0]["x_name"]
        cfg = ", ".join(f"{k}={v}" for k, v in json.loads(config).items())
        title = f"**{kernel}**, {mode}, {dtype}, {cfg}"
        if with_env:
            dates = sorted({r["timestamp"][:10] for r in grp})
            title += (f" — {device}; torch {grp[0]['torch_version']}"
                      + (f", triton {grp[0]['triton_version']}" if grp[0]["triton_version"] else "")
                      + f"; commit `{commit}`; {', '.join(dates)}")  # fmt: skip
        out += [title, "", f"| {x_name} | provider | time ms p50 [p20, p80] | speedup vs eager | time / gemm "
                "| peak MiB | memory / eager |", "|---:|---|---|---:|---:|---:|---:|"]
        for x, provider in sorted(cells, key=lambda k: (k[0], provider_order(k[1]))):
            t, m = cells[(x, provider)].get("time"), cells[(x, provider)].get("memory")
            t50 = number(t["y_p50"]) if t else None
            m50 = number(m["y_p50"]) if m else None
            eager_t = _lookup(cells, x, "eager", "time")
            gemm_t = _lookup(cells, x, "gemm", "time")
            eager_m = _lookup(cells, x, "eager", "memory")
            if t50 is None:
                time_cell = t["y_p50"] if t else ""
            else:
                time_cell = f"{_fmt(t50)} [{_fmt(float(t['y_p20']))}, {_fmt(float(t['y_p80']))}]"
            mem_cell = _fmt(m50) if m50 is not None else (m["y_p50"] if m else "")
            speedup = _ratio(eager_t, t50) if provider != "eager" else ""
            to_gemm = _ratio(t50, gemm_t) if provider != "gemm" else ""
            mem_ratio = _ratio(m50, eager_m) if provider != "eager" else ""
            out.append(f"| {x:,} | {provider} | {time_cell} | {speedup} | {to_gemm} | {mem_cell} | {mem_ratio} |")
        where = defaultdict(list)  # (provider, note) -> sizes, so a note shared by every size is said once
        for r in grp:
            if r["note"] and r["metric"] == "time":
                where[(r["provider"], r["note"])].append(int(r["x_value"]))
        notes = sorted(f"{p} at {x_name}={', '.join(f'{x:,}' for x in sorted(xs))}: {note}"
                       for (p, note), xs in where.items())  # fmt: skip
        if notes:
            out += ["", "<details><summary>notes</summary>", "", *[f"- {n}" for n in notes], "", "</details>"]
        out.append("")
    return "\n".join(out)


PROVIDER_ORDER = ("triton", "cuda", "cpu", "compile", "eager", "pml", "gemm")


def provider_order(provider: str) -> int:
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)


def _lookup(cells, x, provider, metric):
    row = cells.get((x, provider), {}).get(metric)
    return number(row["y_p50"]) if row else None
