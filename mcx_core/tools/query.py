"""DuckDB over the artifacts: views `deltas`, `traces`, one per evaluation table, and the block
datasets. Paths in views are absolute (DuckDB keeps globs as written)."""

from __future__ import annotations

import re
from pathlib import Path


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def trace_view(con, traces_dir: Path) -> bool:
    """Create the view `traces` over every finished trace under `traces_dir` (one row per step, with its
    `filename`); False when there is no trace to view."""
    root = Path(traces_dir).resolve()
    if not list(root.glob("**/*.jsonl")):
        return False
    con.execute(
        f"CREATE VIEW traces AS SELECT * FROM read_json_auto({_quote(root / '**' / '*.jsonl')}, "
        "union_by_name = true, filename = true, format = 'newline_delimited')"
    )
    return True


def connect(artifacts_root: Path, datasets_dir: Path | None = None):
    """An in-memory connection with a view for every artifact family that has files."""
    import duckdb

    root = Path(artifacts_root).resolve()
    con = duckdb.connect(":memory:")
    if list(root.glob("deltas/**/*.parquet")):
        con.execute(
            f"CREATE VIEW deltas AS SELECT * FROM read_parquet({_quote(root / 'deltas' / '**' / '*.parquet')}, "
            "union_by_name = true, filename = true)"
        )
    trace_view(con, root / "traces")
    for parquet in sorted(root.glob("eval/*.parquet")):
        name = re.sub(r"\W", "_", parquet.stem)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_quote(parquet.resolve())})")
    ds = Path(datasets_dir) if datasets_dir else root / "datasets"
    for arrow in sorted(ds.glob("*/*.arrow")):
        import pyarrow as pa

        with pa.memory_map(str(arrow)) as source:
            table = pa.ipc.open_file(source).read_all()
        name = re.sub(r"\W", "_", f"samples_{arrow.parent.name}_{arrow.stem}")
        con.register(name, table.drop_columns(["input_ids"]))
    return con


def views(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]


def run_query(con, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
    """Run one query with `?` parameters bound; return (column names, rows)."""
    rel = con.execute(sql, params or [])
    columns = [d[0] for d in rel.description] if rel.description else []
    return columns, rel.fetchall()
