"""Plots of results people compare (leaderboards), written as PNG files."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def leaderboard_plot(
    rows: list[dict], tasks: list[str], out: str | Path, title: str = "Leaderboard"
) -> Path:
    """Grouped bars: one group per model (best mean first), one bar per task plus the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = [*tasks, "mean"]
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.0))
    for j, col in enumerate(columns):
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(rows))]
        ys = [r.get(col) or 0.0 for r in rows]
        ax.bar(xs, ys, width, label=col, edgecolor="black" if col == "mean" else None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(
        [f"{r['name']}\n({r['kind']})" if r.get("kind") != "model" else r["name"] for r in rows],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=len(columns), loc="upper right")
    fig.tight_layout()
    # a name of this process's own: two runs on one home never replace each other's file
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.{threading.get_ident()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
