"""`mcx` — the command line. It lives beside the Dagster definitions because `mcx materialize` runs
them; every other command calls `mcx_core` directly. Errors a user can fix print one line, no traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click


def _fail(message: str, code: int = 2):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _load(config_path: str, check: bool = True):
    from mcx_core.config import ConfigError, check_files, load_config

    try:
        cfg = load_config(config_path)
    except ConfigError as err:
        for p in err.problems:
            click.echo(f"error: {err.source}: {p}", err=True)
        sys.exit(2)
    if check:
        problems = check_files(cfg)
        for p in problems:
            click.echo(f"error: {config_path}: {p}", err=True)
        if problems:
            sys.exit(2)
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """MegaContext: learned context compression and dynamic focus for frozen LLMs."""
    os.environ.setdefault("MCX_HOME", os.getcwd())


@main.command("validate-config")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--no-file-checks", is_flag=True, help="Only check the shape, not the files it names.")
def validate_config(path: str, no_file_checks: bool):
    """Validate a config; print the resolved config, or one line per problem (exit 2)."""
    cfg = _load(path, check=not no_file_checks)
    click.echo(f"# {path}: valid")
    click.echo(cfg.to_yaml(), nl=False)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Experiment YAML.")
@click.option(
    "--select", "selection", default=None,
    help="Dagster asset selection, e.g. 'baseline_eval' or '+baseline_eval' (default: everything).",
)
def materialize(config_path: str, selection: str | None):
    """Materialize the asset graph in-process, with the same definitions the Dagster UI loads."""
    _load(config_path)
    root = Path(os.environ["MCX_HOME"]).resolve()
    os.environ["MCX_CONFIG"] = str(Path(config_path).resolve())
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(root / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and (root / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text((root / "dagster.yaml").read_text())

    import dagster as dg

    from mcx_dagster.definitions import defs

    result = run_materialize(defs(), selection, dg.DagsterInstance.get())
    _print_outcome(result)
    sys.exit(0 if result.success and not _failed_checks(result) else 1)


def run_materialize(definitions, selection: str | None, instance, resources: dict | None = None):
    """Materialize `selection` (all assets when None) of `definitions`; never raises on step failure.
    `resources` replaces bound resources by key (tests point them at temporary stores)."""
    import dagster as dg

    assets = list(definitions.assets or []) + list(definitions.asset_checks or [])
    return dg.materialize(
        assets,
        instance=instance,
        resources={**(definitions.resources or {}), **(resources or {})},
        selection=selection,
        raise_on_error=False,
    )


def _failed_checks(result) -> list:
    return [e for e in result.get_asset_check_evaluations() if not e.passed]


def _print_outcome(result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"dagster run {result.run_id}")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("result")
    for mat in result.get_asset_materialization_events():
        table.add_row("asset", mat.asset_key.to_user_string(), "[green]materialized[/]")
    for ev in result.get_asset_check_evaluations():
        status = "[green]passed[/]" if ev.passed else "[red]FAILED[/]"
        table.add_row("check", f"{ev.asset_key.to_user_string()}:{ev.check_name}", status)
    for ev in result.all_events:
        if ev.is_step_failure:
            table.add_row("step", ev.step_key, "[red]failed[/]")
        elif ev.is_step_skipped:
            table.add_row("step", ev.step_key, "[yellow]skipped[/]")
    console.print(table)


@main.command()
@click.argument("sql")
@click.option("--param", "params", multiple=True, help="A value bound to the next `?` (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--artifacts", default="artifacts", show_default=True, type=click.Path(file_okay=False))
def query(sql: str, params: tuple[str, ...], as_json: bool, artifacts: str):
    """Query the artifacts with DuckDB (views: deltas, traces, eval tables, samples_*)."""
    import duckdb

    from mcx_core.query import connect, run_query

    con = connect(Path(artifacts))
    try:
        columns, rows = run_query(con, sql, list(params))
    except duckdb.Error as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    if as_json:
        click.echo(json.dumps([dict(zip(columns, r)) for r in rows], default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r))
    Console().print(table)


if __name__ == "__main__":
    main()
