"""`mcx query`: SQL over the artifacts (DuckDB views, sandboxed to the artifacts and datasets folders)."""

from __future__ import annotations

from pathlib import Path

import click

from mcx_cli._common import fail


@click.command()
@click.argument("sql")
@click.option("--param", "params", multiple=True, help="A value bound to the next `?` (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--artifacts", default="artifacts", show_default=True, type=click.Path(file_okay=False))
@click.option("--datasets", default=None, type=click.Path(file_okay=False),
              help="Block datasets folder (default: <artifacts>/datasets).")
def query(sql: str, params: tuple[str, ...], as_json: bool, artifacts: str, datasets: str | None):
    """Query the artifacts with DuckDB (views: deltas, traces, eval tables, samples_*). One read statement
    (SELECT / EXPLAIN); files outside the artifacts and datasets folders cannot be read or written."""
    import duckdb

    from mcx_core.jsonutil import dumps_strict
    from mcx_core.tools.query import QueryError, check_read_only, connect, run_query

    if not sql.strip().strip(";").strip():
        fail("empty query: give one SELECT statement (views: see `mcx query 'SHOW TABLES'`)")
    root = Path(artifacts)
    if not root.is_dir():
        fail(f"--artifacts {root}: no such directory")
    con = connect(root, Path(datasets) if datasets else None,
                  on_skip=lambda msg: click.echo(f"warning: {msg}", err=True))
    try:
        check_read_only(con, sql)
        columns, rows = run_query(con, sql, list(params))
    except QueryError as err:
        fail(str(err))
    except duckdb.Error as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    if as_json:
        click.echo(dumps_strict([dict(zip(columns, r)) for r in rows], default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r))
    Console().print(table)
