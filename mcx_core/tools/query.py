"""DuckDB over the artifacts, sandboxed: views `deltas` (counterfactual delta tables only), `eval_sweep`
(the sweep table, its own kind), `traces` (per-step traces), `actions` (the per-action tables
`traces/run_NNN.jsonl`), one per evaluation table, and the block datasets, on a connection that can read only the artifacts root and the datasets folder.

- Views are a registry (`VIEWS`: name -> builder). A builder gets the connection and a `ViewContext`
  and creates its view(s) over an explicit list of files that it checked first; a file that does not
  read (a truncated Parquet footer, a garbage trace line) is skipped with one warning (`ctx.skip`), so
  one corrupt file never breaks every query. Add a view with `@register_view("name")`.
- Paths are absolute and glob-escaped (`glob_literal`): DuckDB treats every path as a glob, so an
  artifacts folder named `x*y` would otherwise read its sibling `xay`.
- After the views exist the connection is locked: external access off except `allowed_directories`,
  no extension install/autoload, configuration locked. Only read statements (SELECT, EXPLAIN) run,
  one per query: COPY / ATTACH / EXPORT / INSTALL / SET are refused before DuckDB sees them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

READ_STATEMENTS = ("SELECT", "EXPLAIN")


class QueryError(ValueError):
    """A query that is refused before it runs (empty, several statements, not a read)."""


def glob_literal(path: Path | str) -> str:
    """`path` as a DuckDB glob that matches only itself: `*`, `?` and `[` become `[*]`, `[?]`, `[[]`."""
    return re.sub(r"([*?\[])", r"[\1]", str(path))


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _file_list(paths: Iterable[Path]) -> str:
    return "[" + ", ".join(sql_string(glob_literal(p)) for p in paths) + "]"


def view_name(text: str) -> str:
    return re.sub(r"\W", "_", text)


@dataclass
class ViewContext:
    """What a view builder reads from, and where it reports a file it skipped."""

    artifacts: Path
    datasets: Path
    on_skip: Callable[[str], None] = field(default=lambda msg: log.warning(msg))
    skipped: list[str] = field(default_factory=list)

    def skip(self, path: Path, why: str) -> None:
        msg = f"skipped {path}: {why}"
        if msg in self.skipped:  # two views over one folder (deltas, eval_sweep): one warning per file
            return
        self.skipped.append(msg)
        self.on_skip(msg)


ViewBuilder = Callable[["object", ViewContext], None]
VIEWS: dict[str, ViewBuilder] = {}


def register_view(name: str) -> Callable[[ViewBuilder], ViewBuilder]:
    """Add a view builder under `name` (a builder may create several views, e.g. one per eval table)."""

    def deco(fn: ViewBuilder) -> ViewBuilder:
        VIEWS[name] = fn
        return fn

    return deco


def _files(root: Path, pattern: str) -> list[Path]:
    """Finished files under `root` (Python globbing: the root itself is literal); hidden temp files out."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith("."))


def readable_parquet(paths: Iterable[Path], ctx: ViewContext) -> list[Path]:
    """The Parquet files whose footer and schema read (cheap: no data pages)."""
    import pyarrow.parquet as pq

    ok = []
    for p in paths:
        try:
            pq.read_metadata(p)
            ok.append(p)
        except Exception as err:  # noqa: BLE001 (any reader error means: not a usable file)
            ctx.skip(p, f"not a readable Parquet file ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    return ok


def readable_jsonl(paths: Iterable[Path], ctx: ViewContext) -> list[Path]:
    """The JSONL files whose every non-empty line is a JSON object (and that hold one at least)."""
    ok = []
    for p in paths:
        try:
            n = 0
            with open(p, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError as err:
                        raise ValueError(f"line {i} is not JSON ({err.msg})") from None
                    if not isinstance(rec, dict):
                        raise ValueError(f"line {i} is not a JSON object")  # noqa: TRY004 (reported, not raised on)
                    n += 1
            if not n:
                raise ValueError("no records")
            ok.append(p)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            ctx.skip(p, str(err))
    return ok


def jsonl_view(con, name: str, files: list[Path]) -> bool:
    """A view `name` over JSONL `files` (union of their columns, with `filename`); False when empty."""
    if not files:
        return False
    con.execute(
        f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_json_auto({_file_list(files)}, "
        "union_by_name = true, filename = true, format = 'newline_delimited')"
    )
    return True


def parquet_view(con, name: str, files: list[Path], filename: bool = True) -> bool:
    if not files:
        return False
    con.execute(
        f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({_file_list(files)}, "
        f"union_by_name = true, filename = {'true' if filename else 'false'})"
    )
    return True


def trace_view(con, traces_dir: Path, on_skip: Callable[[str], None] | None = None) -> bool:
    """Create the view `traces` over every finished, readable trace under `traces_dir` (one row per step,
    with its `filename`); False when there is no trace to view."""
    root = Path(traces_dir).resolve()
    ctx = ViewContext(root.parent, root.parent / "datasets", **({"on_skip": on_skip} if on_skip else {}))
    return jsonl_view(con, "traces", readable_jsonl(_of_trace_kind(_files(root, "**/*.jsonl"), "steps"), ctx))


def _of_table_kind(paths: list[Path], kind: str) -> list[Path]:
    from mcx_core.telemetry.schemas import table_kind

    return [p for p in paths if table_kind(p) == kind]


def _of_trace_kind(paths: list[Path], kind: str) -> list[Path]:
    from mcx_core.telemetry.schemas import trace_kind

    return [p for p in paths if trace_kind(p) == kind]


@register_view("deltas")
def _deltas(con, ctx: ViewContext) -> None:
    """The counterfactual delta tables (not the sweep table that shares `deltas/`)."""
    files = readable_parquet(_files(ctx.artifacts / "deltas", "**/*.parquet"), ctx)
    parquet_view(con, "deltas", _of_table_kind(files, "delta"))


@register_view("eval_sweep")
def _eval_sweep(con, ctx: ViewContext) -> None:
    files = readable_parquet(_files(ctx.artifacts / "deltas", "**/*.parquet"), ctx)
    parquet_view(con, "eval_sweep", _of_table_kind(files, "eval_sweep"))


@register_view("traces")
def _traces(con, ctx: ViewContext) -> None:
    """The per-step traces (one row per step)."""
    files = _of_trace_kind(_files(ctx.artifacts / "traces", "**/*.jsonl"), "steps")
    jsonl_view(con, "traces", readable_jsonl(files, ctx))


@register_view("actions")
def _actions(con, ctx: ViewContext) -> None:
    """The per-action tables (`traces/run_NNN.jsonl`: one row per expand/collapse)."""
    files = _of_trace_kind(_files(ctx.artifacts / "traces", "**/*.jsonl"), "actions")
    jsonl_view(con, "actions", readable_jsonl(files, ctx))


@register_view("eval")
def _eval_tables(con, ctx: ViewContext) -> None:
    """One view per evaluation table (`eval/<name>.parquet` -> `<name>`)."""
    for p in readable_parquet(_files(ctx.artifacts / "eval", "*.parquet"), ctx):
        parquet_view(con, view_name(p.stem), [p], filename=False)


@register_view("samples")
def _samples(con, ctx: ViewContext) -> None:
    """The block datasets (`samples_<corpus>_<split>`), token ids left out."""
    import pyarrow as pa

    for arrow in _files(ctx.datasets, "*/*.arrow"):
        try:
            with pa.memory_map(str(arrow)) as source:
                table = pa.ipc.open_file(source).read_all()
            if "input_ids" in table.column_names:
                table = table.drop_columns(["input_ids"])
        except Exception as err:  # noqa: BLE001
            ctx.skip(arrow, f"not a readable Arrow file ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
            continue
        con.register(view_name(f"samples_{arrow.parent.name}_{arrow.stem}"), table)


def lock_down(con, allowed: Iterable[Path]) -> None:
    """No file outside `allowed` (directories), no extension install or autoload, configuration locked."""
    # DuckDB checks both the path as written in a view (glob-escaped) and the file it names.
    names = {form for d in allowed for form in (str(Path(d).resolve()), glob_literal(Path(d).resolve()))}
    dirs = ", ".join(sql_string(n.rstrip("/") + "/") for n in sorted(names))
    con.execute(f"SET allowed_directories = [{dirs}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET allow_community_extensions = false")
    con.execute("SET lock_configuration = true")


def connect(artifacts_root: Path, datasets_dir: Path | None = None,
            on_skip: Callable[[str], None] | None = None, views_to_build: Iterable[str] | None = None):
    """An in-memory, locked-down connection with the registry's views over the readable files.
    `on_skip(message)` hears about each file left out (default: a logging warning)."""
    import duckdb

    root = Path(artifacts_root).resolve()
    ds = (Path(datasets_dir) if datasets_dir else root / "datasets").resolve()
    ctx = ViewContext(root, ds, **({"on_skip": on_skip} if on_skip else {}))
    con = duckdb.connect(":memory:")
    for name in views_to_build if views_to_build is not None else list(VIEWS):
        try:
            VIEWS[name](con, ctx)
        except duckdb.Error as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            ctx.on_skip(f"view {name} left out: {msg}")
    lock_down(con, [root, ds])
    return con


def views(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]


def check_read_only(con, sql: str) -> str:
    """The one read statement in `sql` (QueryError otherwise)."""
    if not sql or not sql.strip().strip(";").strip():
        raise QueryError("empty query: give one SELECT statement (views: see `SHOW TABLES`)")
    statements = con.extract_statements(sql)
    if len(statements) != 1:
        raise QueryError(f"give one statement per query (got {len(statements)})")
    kind = statements[0].type.name
    if kind not in READ_STATEMENTS:
        raise QueryError(f"only read queries run here (SELECT, EXPLAIN), not {'INSTALL/LOAD' if kind == 'LOAD' else kind}")
    return sql


def run_query(con, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
    """Run one read query with `?` parameters bound; return (column names, rows)."""
    check_read_only(con, sql)
    rel = con.execute(sql, params or [])
    columns = [d[0] for d in rel.description] if rel.description else []
    return columns, rel.fetchall()
