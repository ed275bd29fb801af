"""`mcx query`: SQL over the artifacts (DuckDB views, locked to them)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mcx_cli._common import fail


@click.command()
@click.argument("sql")
@click.option("--param", "params", multiple=True, help="A value bound to the next `?` (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--artifacts", default="artifacts", show_default=True, type=click.Path(file_okay=False))
def query(sql: str, params: tuple[str, ...], as_json: bool, artifacts: str):
    """Query the artifacts with DuckDB (views: deltas, traces, eval tables, samples_*)."""
    import duckdb

    from mcx_core.tools.query import connect, run_query

    con = connect(Path(artifacts))
    try:
        columns, rows = run_query(con, sql, list(params))
    except duckdb.Error as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
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
