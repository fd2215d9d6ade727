"""What a flow run shows in Prefect's UI besides its task runs: artifacts with stable keys.

``leaderboard`` (a table), ``final-model`` (the choice, its gain over the best single model
and the fraction of the zoo's per-task best), ``clusters`` (members, the threshold of each
architecture group and how it was chosen) and, when the store is local, ``report`` (a link to
``glue report``'s page for the run). The same keys every night, so the UI shows their history.
"""

from __future__ import annotations

from pathlib import Path

from storage import LineageDB

_LEADERBOARD_COLUMNS_OUT = ("artifact_id",)


def publish(summary: dict, db: LineageDB, flow_run_id: str, report: Path | None) -> None:
    """Create the run's artifacts (inside its flow run); a failure here never fails a run."""
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    name = summary.get("config", "run")
    board = [
        {k: _rounded(v) for k, v in row.items() if k not in _LEADERBOARD_COLUMNS_OUT}
        for row in summary.get("leaderboard") or []
    ]
    if board:
        create_table_artifact(
            key="leaderboard",
            table=board,
            description=f"Leaderboard of {name} on the test split (best mean first)",
        )
    create_markdown_artifact(
        key="final-model", markdown=final_markdown(summary), description="The run's output"
    )
    create_markdown_artifact(
        key="clusters",
        markdown=clusters_markdown(summary, db.run_thresholds(flow_run_id).to_dicts()),
        description="Mergeable families and the similarity threshold of each group",
    )
    if report is not None:
        create_link_artifact(
            key="report",
            link=report.absolute().as_uri(),
            link_text=f"glue report of {name}",
            description="Lineage, similarities, searches and mixture of this run",
        )


def final_markdown(summary: dict) -> str:
    f = summary.get("final")
    if not f:
        failures = summary.get("failures") or []
        why = f" ({len(failures)} stage(s) failed)" if failures else ""
        return f"# No final model{why}\n"
    lines = [f"# Final model: `{f['name']}` ({f['kind']})", "", "Chosen on the proxy split."]
    if f.get("best_single") is not None and f.get("test_mean") is not None:
        rel = f" ({f['relative_gain']:+.1%})" if f.get("relative_gain") is not None else ""
        of = f"{f['of_oracle']:.2f}" if f.get("of_oracle") is not None else "n/a"
        lines += [
            "",
            "| | test mean |",
            "|---|---|",
            f"| final model | {f['test_mean']:.3f} |",
            f"| best single model (`{f['best_single']}`) | {f['best_single_test_mean']:.3f} |",
            f"| per-task best of the zoo | {f['oracle_mean']:.3f} |",
            "",
            f"Gain over the best single model: **{f['gain']:+.3f}**{rel}; "
            f"**{of}** of the per-task best of the zoo.",
        ]
    return "\n".join(lines) + "\n"


def clusters_markdown(summary: dict, thresholds: list[dict]) -> str:
    lines = ["# Clusters", ""]
    for i, members in enumerate(summary.get("clusters") or []):
        lines.append(f"{i}. {', '.join(f'`{m}`' for m in members)}")
    if thresholds:
        lines += [
            "",
            "| architecture group | metric | threshold | chosen by | gap | pairs |",
            "|---|---|---|---|---|---|",
        ]
        for t in thresholds:
            gap = f"{t['gap_low']:.3f}..{t['gap_high']:.3f}" if t.get("gap_low") is not None else ""
            lines.append(
                f"| {t['arch_signature'][:8]} | {t['metric']} | {t['threshold']:.3f} | "
                f"{t['rule']} | {gap} | {t['n_pairs']} |"
            )
    return "\n".join(lines) + "\n"


def _rounded(v):
    return round(v, 4) if isinstance(v, float) else v
