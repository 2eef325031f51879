"""PNG plot of result rows: time and peak memory against the swept size, one line per provider."""

from __future__ import annotations

import json
from collections import defaultdict

from .results import PROVIDER_ORDER, number, provider_order


def _color(provider: str) -> str:
    """One colour per provider in every panel."""
    return f"C{provider_order(provider) % 10}" if provider in PROVIDER_ORDER else "C9"


def matplotlib_available() -> bool:
    """matplotlib is an optional (bench) dependency: the CLI asks before measuring, not after."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_plot(rows: list, path: str) -> str | None:
    """One row of two panels (time, memory) per (kernel, mode, dtype, config); None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        value = number(r["y_p50"])
        if value is None or value <= 0:  # statuses (OOM, unavailable) and zeros have no place on a log axis
            continue
        key = (r["kernel"], r["mode"], r["dtype"], r["config"], r["x_name"])
        groups[key][r["metric"]][r["provider"]].append((int(r["x_value"]), value))
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    for (kernel, mode, dtype, config, x_name), (ax_t, ax_m) in zip(groups, axes):
        cfg = ", ".join(f"{k}={v}" for k, v in json.loads(config).items())
        by_metric = groups[(kernel, mode, dtype, config, x_name)]
        for ax, metric, unit in ((ax_t, "time", "ms"), (ax_m, "memory", "MiB")):
            for provider in sorted(by_metric[metric], key=provider_order):
                points = sorted(by_metric[metric][provider])
                style = "--" if provider == "gemm" else "-"
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=provider,
                        color=_color(provider))  # fmt: skip
            ax.set_xscale("log")
            ax.set_yscale("log")
            xs = sorted({p[0] for lines in by_metric.values() for pts in lines.values() for p in pts})
            ax.set_xticks(xs, [f"{x / 1e6:g}M" if x >= 10**6 else f"{x / 1e3:g}k" if x >= 10**4 else str(x)
                               for x in xs])  # fmt: skip
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel(x_name)
            ax.set_ylabel(f"{metric} ({unit}, median)" if metric == "time" else f"peak {metric} ({unit})")
            ax.set_title(f"{kernel} {mode} {dtype}, {cfg}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
