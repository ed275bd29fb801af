"""The runtime traces read through DuckDB, the same way `mcx query` sees them (view `traces`): the
rows the post-hoc analyses plot — residency per swap, ping-pong spans, busiest spans, latency by stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mcx_core.telemetry import metrics as M
from mcx_core.tools.findings import MissingInput
from mcx_core.tools.query import trace_view


def connect_traces(traces_dir: Path):
    """DuckDB with a view `traces` over every finished trace under `traces_dir` (with `filename`)."""
    import duckdb

    con = duckdb.connect(":memory:")
    if not trace_view(con, traces_dir):
        con.close()
        raise MissingInput(f"no trace (*.jsonl) under {Path(traces_dir).resolve()}: materialize runtime_eval or run `mcx run` first")
    return con


def _columns(con) -> dict[str, str]:
    return {r[0]: r[1] for r in con.execute("DESCRIBE traces").fetchall()}


def _has_actions(con) -> bool:
    """Whether the traces carry the engine's `actions` structs (an all-empty column has no fields)."""
    kind = _columns(con).get("actions", "")
    return "STRUCT" in kind and "kind" in kind and '"start"' in kind


ACTIONS_SQL = """
SELECT filename AS trace, step, a.kind AS kind, a."level" AS level, a."start" AS span_start,
       a."end" AS span_end, a.residency AS residency, a.forced AS forced
FROM (SELECT filename, step, unnest(actions) AS a FROM traces)
"""


# Three consecutive actions on the same token span, expand → collapse → expand, the third at most
# `?` steps after the first. A span is the action's [start, end): an L1 gist expanded into 32 tokens
# and those tokens collapsed back are the same span.
PING_PONG_SQL = f"""
WITH acts AS ({ACTIONS_SQL}),
seq AS (
  SELECT *,
         lead(kind) OVER w AS kind2, lead(step) OVER w AS step2,
         lead(kind, 2) OVER w AS kind3, lead(step, 2) OVER w AS step3
  FROM acts
  WINDOW w AS (PARTITION BY trace, span_start, span_end ORDER BY step, kind DESC)
)
SELECT trace, span_start, span_end, level, step AS step1, step2, step3
FROM seq
WHERE kind = 'expand' AND kind2 = 'collapse' AND kind3 = 'expand' AND step3 - step <= ?
ORDER BY trace, span_start, step1
"""


def residency_rows(con) -> list[dict]:
    """One row per swap: the allocator's residency, whether the budget forced it, its kind."""
    if _has_actions(con):
        rows = con.execute(f"SELECT residency, forced, kind FROM ({ACTIONS_SQL})").fetchall()
        return [{"residency": int(r), "forced": bool(f), "kind": k} for r, f, k in rows if r is not None]
    if "residency" in _columns(con):  # no action detail: every swap counts as chosen
        rows = con.execute("SELECT unnest(residency) FROM traces").fetchall()
        return [{"residency": int(r), "forced": False, "kind": "?"} for (r,) in rows if r is not None]
    raise MissingInput("the traces carry neither `actions` nor `residency`")


def find_ping_pongs(con, window: int) -> list[dict]:
    """Every expand → collapse → expand of one span within `window` steps, per trace."""
    if not _has_actions(con):
        return []
    cols = ["trace", "span_start", "span_end", "level", "step1", "step2", "step3"]
    return [dict(zip(cols, r)) for r in con.execute(PING_PONG_SQL, [window]).fetchall()]


def busiest_spans(con, limit: int = 12, include: Sequence[tuple[str, int, int]] = ()) -> list[dict]:
    """Actions of the `limit` spans with the most actions (plus the `include` spans), for a timeline."""
    if not _has_actions(con):
        return []
    top = con.execute(
        f"SELECT trace, span_start, span_end, count(*) AS n FROM ({ACTIONS_SQL}) "
        "GROUP BY ALL ORDER BY n DESC, trace, span_start LIMIT ?", [limit]
    ).fetchall()
    keys = list(dict.fromkeys([*include, *((t, s, e) for t, s, e, _ in top)]))[: max(limit, len(include))]
    rows = con.execute(f"SELECT trace, step, kind, span_start, span_end, forced FROM ({ACTIONS_SQL}) ORDER BY step").fetchall()
    wanted = set(keys)
    return [
        {"trace": t, "step": s, "kind": k, "span_start": a, "span_end": b, "forced": f}
        for t, s, k, a, b, f in rows if (t, a, b) in wanted
    ]


def stage_latency(con) -> dict[str, dict[str, float]]:
    """Per engine stage: mean, p50, p95 ms over every traced step."""
    stages = [c for c in _columns(con) if c.startswith(M.LATENCY_STAGE_PREFIX)]
    if not stages:
        raise MissingInput(f"the traces carry no per-stage latency ({M.LATENCY_STAGE_PREFIX}*)")
    out = {}
    for c in stages:
        q = f'SELECT avg("{c}"), quantile_cont("{c}", 0.5), quantile_cont("{c}", 0.95) FROM traces'
        mean, p50, p95 = con.execute(q).fetchall()[0]
        out[c.removeprefix(M.LATENCY_STAGE_PREFIX)] = {"mean_ms": mean, "p50_ms": p50, "p95_ms": p95}
    return out


def step_latencies(con) -> list[dict]:
    """Per step: latency, its trace's median, and the number of allocator actions."""
    rows = con.execute(
        "SELECT filename, step, latency_ms, len(expanded) + len(collapsed) AS actions, "
        "median(latency_ms) OVER (PARTITION BY filename) AS median_ms FROM traces ORDER BY filename, step"
    ).fetchall()
    return [
        {"trace": t, "step": s, "latency_ms": lat, "actions": n, "median_ms": med}
        for t, s, lat, n, med in rows if lat is not None
    ]


