"""``glue report``: one self-contained HTML page about a flow run, readable offline.

Everything comes from the lineage database: the leaderboard, the similarity heatmap with
the clusters and their threshold, every search's trajectory, the mixture's experts and
routing, and what changed since the previous flow run. Plots are PNGs embedded as data
URIs; the page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from storage import Headline, LineageDB


def build_report(db: LineageDB, flow_run_id: str | None = None) -> str:
    """The HTML page for ``flow_run_id`` (default: the latest finished flow run)."""
    run = db.latest_flow_run(flow_run_id)
    fid = run["flow_run_id"]
    runs = db.stage_runs_of(fid)
    board = db.leaderboard(flow_run_id=fid)
    sections = [
        _header(run, runs),
        _leaderboard(board, _headline(db, fid, board)),
        _clusters(db, runs),
        _searches(db, runs),
        _mixtures(db, runs),
        _changes(db, run, runs, board),
        _stage_table(runs),
    ]
    return _PAGE.format(title=html.escape(f"Model-GLUE run {fid}"), body="\n".join(sections))


def write_report(db: LineageDB, out: str | Path, flow_run_id: str | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(build_report(db, flow_run_id), encoding="utf-8")
    tmp.replace(out)
    return out


# ---- sections ---------------------------------------------------------------------------
def _headline(db: LineageDB, fid: str, board: pl.DataFrame) -> Headline | None:
    """The final model's headline; without a final model, the best one's by test mean."""
    if board.height == 0:
        return None
    if board["final"].any():
        return db.headline(fid, board=board)
    return db.headline(fid, board["artifact_id"][0], board)


def _header(run: dict, runs: pl.DataFrame) -> str:
    counts = runs.group_by("status").len().sort("status")
    done = ", ".join(f"{n} {s}" for s, n in counts.iter_rows())
    errors = "".join(
        f"<li>{html.escape(line)}</li>" for line in (run.get("error") or "").splitlines()
    )
    return (
        f"<h1>Model-GLUE run <code>{html.escape(run['flow_run_id'])}</code></h1>"
        f"<p class=status-{run['status']}>{run['status']}: started {_t(run['started_at'])}, "
        f"finished {_t(run['finished_at'])}; stage calls: {done or 'none'}</p>"
        + (f"<ul class=errors>{errors}</ul>" if errors else "")
    )


def _leaderboard(board: pl.DataFrame, h: Headline | None) -> str:
    if board.height == 0:
        return "<h2>Leaderboard</h2><p>No scores were recorded in this run.</p>"
    from model_glue.report import leaderboard_plot

    shown = board.drop("artifact_id", "n_tasks", strict=False)
    tasks = [c for c in shown.columns if c not in ("name", "kind", "mean", "final")]
    with tempfile.TemporaryDirectory() as tmp:
        path = leaderboard_plot(shown.to_dicts(), tasks, Path(tmp) / "board.png")
        png = path.read_bytes()
    note = ""
    if h is not None and h.best_single is not None:
        note = (
            f"<p>{'Final model' if board['final'].any() else 'Best'}: "
            f"<b>{html.escape(h.name)}</b> ({h.kind}, chosen on the proxy split), test mean "
            f"{h.test_mean:.3f}; best single zoo model {html.escape(h.best_single)} "
            f"{h.best_single_test_mean:.3f} ({h.gain:+.3f}); per-task best of the zoo "
            f"{h.oracle_mean:.3f}.</p>"
        )
    return "<h2>Leaderboard</h2>" + note + _table(shown) + _img(png, "leaderboard")


def _clusters(db: LineageDB, runs: pl.DataFrame) -> str:
    cluster_runs = runs.filter((pl.col("stage") == "cluster") & pl.col("cache_key").is_not_null())
    if cluster_runs.height == 0:
        return "<h2>Similarity and clusters</h2><p>No clustering in this run.</p>"
    cid = cluster_runs["cache_key"][-1]
    members = db.clusters_of(cid)
    thresholds = db.thresholds_of(cid)
    metric = thresholds["metric"][0] if thresholds.height else "sim_all"
    fps = members["fp"].to_list()
    names = {fp: n or fp[:8] for fp, n in zip(fps, members["name"], strict=True)}
    sims = db.similarities_among(fps, metric)
    out = ["<h2>Similarity and clusters</h2>"]
    for t in thresholds.iter_rows(named=True):
        rule = (
            f"auto: the widest gap, {t['gap_low']:.3f}..{t['gap_high']:.3f}"
            if t["gap_low"] is not None
            else t["rule"]
        )
        out.append(
            f"<p>Threshold <b>{t['threshold']:.3f}</b> on {t['metric']} ({rule}, "
            f"{t['n_pairs']} pairs, architecture {t['arch_signature'][:8]})</p>"
        )
    items = []
    for c in sorted(set(members["cluster"].to_list())):
        group = members.filter(pl.col("cluster") == c)["fp"].to_list()
        items.append(f"<li>cluster {c}: {html.escape(', '.join(names[f] for f in group))}</li>")
    out.append("<ul>" + "".join(items) + "</ul>")
    if sims.height:
        out.append(_img(_heatmap(fps, names, sims, metric), "similarity heatmap"))
    return "\n".join(out)


def _searches(db: LineageDB, runs: pl.DataFrame) -> str:
    searches = runs.filter((pl.col("stage") == "filter") & pl.col("cache_key").is_not_null())
    if searches.height == 0:
        return "<h2>Searches</h2><p>No search in this run.</p>"
    out = ["<h2>Searches</h2>"]
    for label, key in searches.select("label", "cache_key").iter_rows():
        trials = db.trials_of(key)
        info = db.artifact_meta(key)
        out.append(f"<h3>{html.escape(label or key[:12])}</h3>")
        if info:
            rejected = "; ".join(f"{k}: {v}" for k, v in sorted(info.get("rejected", {}).items()))
            out.append(
                f"<p>accepted: {html.escape(', '.join(info.get('accepted', [])) or 'none')}"
                + (f"; rejected: {html.escape(rejected)}" if rejected else "")
                + "</p>"
            )
        if trials.height:
            out.append(_img(_trajectory(trials, label or key[:12]), f"search {label}"))
    return "\n".join(out)


def _mixtures(db: LineageDB, runs: pl.DataFrame) -> str:
    mix = runs.filter((pl.col("stage") == "mixture") & pl.col("cache_key").is_not_null())
    if mix.height == 0:
        return "<h2>Mixture</h2><p>No mixture in this run.</p>"
    out = ["<h2>Mixture</h2>"]
    for label, key in mix.select("label", "cache_key").iter_rows():
        meta = db.artifact_meta(key)
        parents = db.parents_of(key)
        experts = [n for n, r in parents.iter_rows() if r == "expert"]
        out.append(
            f"<h3>{html.escape(label)}</h3><p>variant {meta.get('variant')}, router "
            f"{meta.get('router')} (layer {meta.get('layer')}), backbone "
            f"{html.escape(str(meta.get('backbone')))}; experts: "
            f"{html.escape(', '.join(str(e) for e in experts))}</p>"
        )
        selection = runs.filter((pl.col("stage") == "select") & pl.col("cache_key").is_not_null())
        if selection.height:
            steps = db.trials_of(selection["cache_key"][-1]).select(
                "trial", pl.col("coefficients").alias("experts"), "proxy_score", "accepted",
                "reason",
            )  # fmt: skip
            out.append(
                "<p>Expert selection on the proxy split: each set tried, its cross-validated "
                "proxy score, and the sets kept.</p>" + _table(steps)
            )
        accuracy = meta.get("router_accuracy") or []
        if accuracy:
            frame = pl.DataFrame(accuracy).select(
                [c for c in ("task", "value", "n_samples", "coverage") if c in accuracy[0]]
            )
            out.append(
                "<p>Routing: how often the router sends a document to an expert "
                "that answers it correctly (router accuracy).</p>" + _table(frame)
            )
            out.append(_img(_bars(frame["task"].to_list(), frame["value"].to_list(),
                                  "router accuracy"), "router accuracy"))  # fmt: skip
    return "\n".join(out)


def _changes(db: LineageDB, run: dict, runs: pl.DataFrame, board: pl.DataFrame) -> str:
    pid = db.previous_flow_run(run)
    out = ["<h2>What changed since the previous run</h2>"]
    if pid is None:
        return out[0] + "<p>This is the first recorded run.</p>"
    before = db.stage_runs_of(pid).filter(pl.col("stage") == "fingerprint")
    now = runs.filter(pl.col("stage") == "fingerprint").select("label", "cache_key")
    b, n = dict(before.select("label", "cache_key").iter_rows()), dict(now.iter_rows())
    lines = [f"new model {x}" for x in sorted(n.keys() - b.keys())]
    lines += [f"removed model {x}" for x in sorted(b.keys() - n.keys())]
    lines += [f"changed weights of {x}" for x in sorted(n.keys() & b.keys()) if n[x] != b[x]]
    computed = runs.filter(pl.col("status") == "completed")
    for stage, labels in computed.group_by("stage", maintain_order=True).agg("label").iter_rows():
        shown = ", ".join(str(x) for x in labels[:6]) + (" ..." if len(labels) > 6 else "")
        lines.append(f"computed {len(labels)} {stage} call(s): {shown}")
    if computed.height == 0:
        lines.append("nothing was computed: every stage call was reused")
    out.append(f"<p>Compared with flow run <code>{html.escape(pid)}</code>.</p>")
    out.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")
    old = db.leaderboard(flow_run_id=pid)
    if board.height and old.height:
        joined = board.select("name", "kind", pl.col("mean").alias("mean_now")).join(
            old.select("name", pl.col("mean").alias("mean_before")), on="name", how="full",
            coalesce=True,
        )  # fmt: skip
        joined = joined.with_columns((pl.col("mean_now") - pl.col("mean_before")).alias("change"))
        out.append(_table(joined.sort("name")))
    return "\n".join(out)


def _stage_table(runs: pl.DataFrame) -> str:
    shown = runs.select("stage", "label", "status", "seconds", "error")
    return "<h2>Stage calls</h2>" + _table(shown)


# ---- plots and html helpers ---------------------------------------------------------------
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _figure()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _heatmap(fps: list[str], names: dict[str, str], sims: pl.DataFrame, metric: str) -> bytes:
    plt = _figure()
    idx = {fp: i for i, fp in enumerate(fps)}
    grid = [[1.0 if i == j else float("nan") for j in range(len(fps))] for i in range(len(fps))]
    for a, b, v in sims.iter_rows():
        if v is not None:
            grid[idx[a]][idx[b]] = grid[idx[b]][idx[a]] = v
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(fps), 0.8 + 0.6 * len(fps)))
    im = ax.imshow(grid, vmin=-1 if metric.endswith("cosine") else 0, vmax=1, cmap="viridis")
    labels = [names[f] for f in fps]
    ax.set_xticks(range(len(fps)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(fps)), labels, fontsize=8)
    for i in range(len(fps)):
        for j in range(len(fps)):
            if grid[i][j] == grid[i][j]:  # not NaN
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i][j] < 0.6 else "black")  # fmt: skip
    ax.set_title(f"{metric} (clusters in order)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


def _trajectory(trials: pl.DataFrame, title: str) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    xs, ys = trials["trial"].to_list(), trials["proxy_score"].to_list()
    best, running = [], float("-inf")
    for y in ys:
        running = max(running, y if y is not None else running)
        best.append(running)
    accepted = trials["accepted"].to_list()
    ax.scatter(xs, ys, s=18, c=["tab:green" if a else "tab:gray" for a in accepted],
               label="trial (green: accepted)")  # fmt: skip
    ax.step(xs, best, where="post", color="tab:blue", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("proxy score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def _bars(labels: Sequence[str], values: Sequence[float], title: str) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(labels), 2.6))
    ax.bar(range(len(labels)), [v or 0.0 for v in values], color="tab:orange")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(df: pl.DataFrame) -> str:
    numeric = [df.schema[c].is_numeric() for c in df.columns]
    head = "".join(
        f"<th{' class=n' if n else ''}>{html.escape(str(c))}</th>"
        for c, n in zip(df.columns, numeric, strict=True)
    )
    rows = []
    for row in df.iter_rows():
        cells = "".join(
            f"<td{' class=n' if n else ''}>{html.escape(_cell(v))}</td>"
            for v, n in zip(row, numeric, strict=True)
        )
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _cell(v: Any) -> str:
    if v is None or v is False:
        return ""
    if v is True:
        return "yes"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _t(v: datetime | None) -> str:
    return "-" if v is None else f"{v:%Y-%m-%d %H:%M:%S} UTC"


# images report whether they loaded (data-images="loaded/total" on <body>), so a headless
# browser can check the page as a reader would see it
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
.n {{ text-align: right; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0 1.5em; }}
.status-failed {{ color: #b00; font-weight: bold; }} .errors {{ color: #b00; }}
</style></head>
<body>
{body}
<script>
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.images = ok + "/" + imgs.length;
}});
</script>
</body></html>
"""
