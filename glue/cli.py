"""The ``glue`` command line: build the demo zoo, run the recipe, query lineage.

Heavy imports (torch, transformers, Prefect) happen inside the commands, so ``glue --help``
and ``glue sql`` stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from model_glue.env import configure_environment, glue_home

app = typer.Typer(
    help="Model-GLUE: turn a zoo of LLM checkpoints into one stronger model.", no_args_is_help=True
)
zoo_app = typer.Typer(help="The embedded demo zoo.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
# piped output (CI logs, `| tee`) gets wide tables instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160, soft_wrap=True)

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="Lineage DuckDB file (default: <GLUE_HOME>/lineage.duckdb)."),
]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def print_frame(df, title: str | None = None, float_digits: int = 3) -> None:
    """Print a polars DataFrame as a table."""
    table = Table(title=title, show_lines=False)
    for c in df.columns:
        table.add_column(str(c), justify="right" if df[c].dtype.is_numeric() else "left")
    for row in df.iter_rows():
        table.add_row(
            *[
                ""
                if v is None
                else f"{v:.{float_digits}f}"
                if isinstance(v, float)
                else escape(str(v))
                for v in row
            ]
        )
    console.print(table)


def print_leaderboard(board, title: str) -> list[str]:
    """Print a leaderboard frame without its id columns; return its task columns."""
    import polars as pl

    shown = board.drop("artifact_id", "n_tasks", strict=False)
    if "final" in shown.columns and shown.schema["final"] == pl.Boolean:
        shown = shown.with_columns(
            pl.when(pl.col("final")).then(pl.lit("final")).otherwise(pl.lit("")).alias("final")
        )
    print_frame(shown, title=title)
    return [c for c in shown.columns if c not in ("name", "kind", "mean", "final")]


@app.callback()
def _main() -> None:
    configure_environment()


@zoo_app.command("build")
def zoo_build(
    out: Annotated[
        Path | None, typer.Option(help="Where to build the zoo (default: <GLUE_HOME>/zoo).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the recipe is unchanged.")] = False,
) -> None:
    """Train the demo zoo of tiny Llama checkpoints (cached: rebuilt only when its recipe changes)."""
    from model_glue.zoo import build_demo_zoo

    out = out or glue_home() / "zoo"
    path = build_demo_zoo(
        out, progress=lambda msg: console.print(f"  {msg}", highlight=False), force=force
    )
    console.print(f"demo zoo ready: {path}  (run config: {Path(path) / 'glue.yaml'})")


@app.command("run")
def run(
    config: Annotated[Path, typer.Argument(help="Run configuration YAML.")],
    store: Annotated[
        str | None, typer.Option(help="Artifact store URL (overrides the config).")
    ] = None,
    db: DbOption = None,
    runner: Annotated[
        str | None,
        typer.Option(help="threads or dask (overrides the config's runner.kind)."),
    ] = None,
) -> None:
    """Run the whole Model-GLUE recipe on the zoo in CONFIG and print the leaderboard.

    Exit codes: 0 the run completed (unreadable zoo models may have been left out, as
    listed); 1 some stage failed (what could run still ran and was recorded); 2 the config
    is invalid (nothing ran)."""
    from model_glue.config import (
        ConfigError,
        load_config,
        validate_mixture_families,
        validate_tasks,
    )

    try:  # fail fast, before starting Prefect
        cfg = load_config(config)
        validate_tasks(cfg, str(config))
        validate_mixture_families(cfg, str(config))
    except ConfigError as e:
        _fail(str(e))
    from flows._logging import RunFailed
    from flows.glue_recipe import run_config
    from storage import LineageLockedError

    try:
        summary, failed = run_config(config, store=store, lineage_db=db, runner=runner), None
    except RunFailed as e:
        summary, failed = e.summary, e
    except LineageLockedError as e:  # held before the flow could record anything
        _fail(str(e), 1)
    except ConfigError as e:  # the runner: no prefect-dask, a store workers cannot see
        _fail(str(e))
    if summary.get("excluded"):
        err.print(
            f"[yellow]left out (unreadable, see above):[/] {', '.join(summary['excluded'])}",
            highlight=False,
        )
    _print_summary(summary)
    if failed is not None:
        for line in summary.get("failures") or [str(failed)]:
            err.print(f"[bold red]failed:[/] {escape(line)}", highlight=False)
        if "flow_run_id" in summary:
            err.print(f"flow run {summary['flow_run_id']} failed", highlight=False)
        raise typer.Exit(1)
    console.print(
        f"flow run {summary['flow_run_id']} finished in {summary['seconds']:.1f} s ({_counts(summary)})"
    )


def _counts(summary: dict) -> str:
    return ", ".join(
        f"{s}: " + "/".join(f"{n} {k}" for k, n in sorted(c.items()))
        for s, c in summary.get("counts", {}).items()
    )


def _print_summary(summary: dict) -> None:
    import polars as pl

    board = pl.DataFrame(summary.get("leaderboard") or [])
    if board.height:
        from model_glue.report import leaderboard_plot

        tasks = print_leaderboard(board, title=f"Leaderboard ({summary['config']})")
        png = leaderboard_plot(
            board.to_dicts(),
            tasks,
            glue_home() / "reports" / f"leaderboard-{summary['config']}.png",
            title=f"Model-GLUE leaderboard ({summary['config']})",
        )
        console.print(f"plot: {png}")
    if f := summary.get("final"):
        console.print(final_line(f), highlight=False)


def final_line(f: dict) -> str:
    """The run's headline: the final model against the best single one, on the test split."""
    line = f"final model: {f['name']} ({f['kind']}), chosen on the proxy split"
    if f.get("best_single") is None or f.get("test_mean") is None:
        return line
    rel = f" ({f['relative_gain']:+.1%})" if f.get("relative_gain") is not None else ""
    # every zoo model at 0 on every task: no fraction of the per-task best to give
    of = f"{f['of_oracle']:.2f}" if f.get("of_oracle") is not None else "n/a"
    return (
        f"{line}; test mean {f['test_mean']:.3f}: {f['gain']:+.3f}{rel} over the best single "
        f"model {f['best_single']} ({f['best_single_test_mean']:.3f}), "
        f"{of} of the per-task best of the zoo ({f['oracle_mean']:.3f})"
    )


@app.command("plan")
def plan_command(
    config: Annotated[Path, typer.Argument(help="Run configuration YAML.")],
    store: Annotated[
        str | None, typer.Option(help="Artifact store URL (overrides the config).")
    ] = None,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Say what `glue run CONFIG` would reuse and what it would compute, and why, without
    running anything (no model is loaded).

    Each stage call is fresh (its artifact is complete in the store) or stale, with the
    reason: a new model, changed weights, a changed parameter, input or task file, a code
    version, a missing or corrupt artifact, or an input that is itself stale."""
    import json

    from flows.glue_recipe import default_db_path, default_store_url
    from flows.plan import plan
    from model_glue.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as e:
        _fail(str(e))
    entries = plan(cfg, store or default_store_url(cfg), db or default_db_path(cfg))
    if as_json:
        print(json.dumps([e.to_dict() for e in entries], indent=1))
        return
    table = Table(title=f"Plan for {config}", show_lines=False)
    for c in ("stage", "call", "status", "reason"):
        table.add_column(c)
    for e in entries:
        style = "cyan" if e.status == "fresh" else "yellow"
        table.add_row(e.stage, escape(e.label), f"[{style}]{e.status}[/]", escape(e.reason))
    console.print(table)
    stale = sum(e.status == "stale" for e in entries)
    console.print(f"{stale} stale, {len(entries) - stale} fresh")


@app.command("report")
def report(
    db: DbOption = None,
    flow_run: Annotated[str | None, typer.Option(help="A flow run id (default: latest).")] = None,
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
) -> None:
    """Write one self-contained HTML report of a flow run: leaderboard, similarity heatmap
    and clusters, search trajectories, the mixture's experts and routing, and what changed
    since the previous run (images embedded: it opens offline)."""
    from glue.report import write_report
    from storage import LineageDB, LineageError

    try:
        path = write_report(LineageDB(db, read_only=True), out, flow_run)
    except LineageError as e:
        _fail(str(e))
    console.print(f"report written to {path}")


@app.command("leaderboard")
def leaderboard(
    db: DbOption = None,
    flow_run: Annotated[str | None, typer.Option(help="A flow run id (default: latest).")] = None,
) -> None:
    """Print the leaderboard of a flow run (default: the latest finished one) and, for a
    failed run, which stages failed."""
    from storage import LineageDB, LineageError

    ldb = LineageDB(db, read_only=True)
    try:
        run = ldb.latest_flow_run(flow_run)
    except LineageError as e:
        _fail(str(e))
    flow_run, status, error = run["flow_run_id"], run["status"], run["error"]
    board = ldb.leaderboard(flow_run_id=flow_run)
    if board.height:
        print_leaderboard(board, title=f"Leaderboard (flow run {flow_run}, {status})")
    else:
        console.print(f"flow run {flow_run} ({status}) recorded no scores")
    for line in (error or "").splitlines():
        style = "bold red" if status == "failed" and not line.startswith("left out") else "yellow"
        console.print(f"  [{style}]{escape(line)}[/]", highlight=False)


@app.command("lineage")
def lineage(
    model: Annotated[str, typer.Argument(help="A model or artifact name, or an id prefix.")],
    db: DbOption = None,
) -> None:
    """Print the ancestors and descendants of a model or artifact."""
    from storage import LineageDB, LineageError

    ldb = LineageDB(db, read_only=True)
    try:
        artifact_id = ldb.resolve(model)
    except LineageError as e:
        _fail(str(e))
    import polars as pl

    def brief(df):
        return df.select(
            pl.col("name"),
            pl.col("kind"),
            pl.col("stage"),
            pl.col("created_at").dt.strftime("%Y-%m-%d %H:%M:%S").alias("created (UTC)"),
            pl.col("artifact_id").str.slice(0, 12).alias("id"),
        )

    print_frame(
        brief(ldb.ancestors(artifact_id)), title=f"Ancestors of {model} ({artifact_id[:12]})"
    )
    print_frame(
        brief(ldb.descendants(artifact_id)), title=f"Descendants of {model} ({artifact_id[:12]})"
    )


@app.command("sql")
def sql(
    query: Annotated[
        str, typer.Argument(help="A read-only SQL query (SELECT/WITH/DESCRIBE/SHOW).")
    ],
    db: DbOption = None,
    allow_files: Annotated[
        bool,
        typer.Option(
            "--allow-files",
            help="Let the query read files, globs and URLs too (read_csv, glob, ...).",
        ),
    ] = False,
) -> None:
    """Run a read-only SQL query against the lineage database and print the result.

    The query reads the lineage database only, unless --allow-files is given."""
    from storage import LineageDB, LineageError

    try:
        df = LineageDB(db, read_only=True, external_access=allow_files).query(query)
    except LineageError as e:
        _fail(str(e))
    except Exception as e:  # DuckDB parser/binder errors: show them plainly
        _fail(f"{type(e).__name__}: {e}")
    print_frame(df)


@app.command("merge")
def merge(
    config: Annotated[Path, typer.Argument(help="Merge YAML (ours or mergekit-style).")],
    out: Annotated[Path, typer.Argument(help="Output directory (must not exist).")],
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Tensors merged at once (default 2, or 1 when memory is short; each one "
            "in flight multiplies the working set).",
        ),
    ] = None,
) -> None:
    """Merge checkpoints as described by CONFIG into a Hugging Face directory OUT.

    See `glue methods` for the merge methods and their parameters."""
    from model_glue.checkpoint import CheckpointError
    from model_glue.merge import MergeConfigError, MergeInputError, run_merge_file
    from model_glue.merge.run import freeze_imported_objects

    freeze_imported_objects()  # this process does one merge: skip GC walks over torch's objects
    try:
        path = run_merge_file(str(config), str(out), progress=True, workers=workers)
    except (
        MergeConfigError,
        MergeInputError,
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
    ) as e:
        _fail(str(e))
    console.print(f"merged model written to {path}")


@app.command("mix")
def mix(
    config: Annotated[Path, typer.Argument(help="Mixture YAML (variant, experts, router...).")],
    out: Annotated[Path, typer.Argument(help="Output directory (must not exist).")],
) -> None:
    """Build one mixture (model-level, block-level, FFN-level or hybrid) as CONFIG describes.

    See model_glue/mixture/mix_file.py for the keys; FFN-level and hybrid outputs are MoE
    directories of the experts' family (Mixtral for Llama and Mistral, Qwen2-MoE, Qwen3-MoE)
    that AutoModelForCausalLM loads."""
    from model_glue.checkpoint import CheckpointError
    from model_glue.mixture import MixtureError
    from model_glue.mixture.mix_file import build_from_file

    try:
        path = build_from_file(config, out)
    except (MixtureError, CheckpointError, FileNotFoundError) as e:
        _fail(" ".join(str(e).split()))
    console.print(f"mixture written to {path}")


@app.command("architectures")
def architectures(
    markdown: Annotated[bool, typer.Option(help="The README's Markdown table.")] = False,
) -> None:
    """List the declared architectures: where their layers are, their tensor roles, and
    which FFN-level MoE their experts make. Others get a layout inferred from tensor names."""
    from model_glue.architectures import ARCHITECTURES, MOE_BUILDERS, markdown_table

    if markdown:
        print(markdown_table())
        return
    for a in ARCHITECTURES:
        moe = f"; FFN-level MoE as {MOE_BUILDERS[a.moe_builder]}" if a.moe_builder else ""
        console.print(f"{a.name:<24} {a.layers:<20} {a.describe()}{moe}", highlight=False)


@app.command("methods")
def methods() -> None:
    """List the merge methods and their parameters (per model or global, defaults)."""
    from model_glue.merge import methods_help

    console.print(methods_help(), highlight=False)


@app.command("schedule")
def schedule(
    config: Annotated[Path, typer.Argument(help="Run configuration YAML.")],
    cron: Annotated[str, typer.Option(help="Cron schedule (UTC).")] = "0 2 * * *",
) -> None:
    """Serve the recipe as a nightly deployment (needs a Prefect server: PREFECT_API_URL)."""
    import os

    if not os.environ.get("PREFECT_API_URL"):
        _fail(
            "scheduling needs a running Prefect server: start `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (the temporary server runs no schedules)"
        )
    from deployments.nightly import serve

    serve(config, cron=cron)


def main() -> None:  # pragma: no cover
    sys.exit(app())
