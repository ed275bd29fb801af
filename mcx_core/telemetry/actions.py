"""The per-action trace table (the seed's `artifacts/traces/run_001.jsonl`): a finished per-step trace
exploded into one row per expand/collapse, so the seed's post-hoc snippets (Workflow 1, Scenarios 2
and 4) run unchanged: `groupby("block_id")`, `g["action"].diff()`, `traces["expanded"].apply(len)`.

Columns: `step`, `block_id` (the span id, `L1:000012`), `level`, `action` (+1 expand, −1 collapse, so
a ping-pong block's `diff()` is ±2), `kind`, `start`, `end`, every other field the allocator records on
the action (score, forced, residency, cause, …, kept as they come), then the step's own `expanded`,
`collapsed`, `latency_ms`, `budget_utilization`, `policy`, and `trace` (the source file, relative to the
traces folder). A run is one document stream of the runtime evaluation (`traces/runtime_eval/*.jsonl`,
sorted): run_001 is the first. The 8-step policy-comparison traces are not runs and get no table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mcx_core.telemetry.schemas import ACTION_TABLE

ACTION_SIGN = {"expand": 1, "collapse": -1}
STEP_COLUMNS = ("expanded", "collapsed", "latency_ms", "budget_utilization", "policy")
RUN_TRACES = "runtime_eval"  # the folder (under traces/) whose traces are runs


def explode_records(records: list[dict[str, Any]], trace: str) -> list[dict[str, Any]]:
    """One row per action of every step record (records without `actions` give none)."""
    rows = []
    for r in records:
        step_cols = {k: r[k] for k in STEP_COLUMNS if k in r}
        for a in r.get("actions") or []:
            span = a.get("span_id") or f"L{a['level']}:{a['index']:06d}"
            row = {"step": r["step"], "block_id": span, "level": a["level"], "action": ACTION_SIGN[a["kind"]]}
            row.update({k: v for k, v in a.items() if k not in row and k != "span_id"})
            row.update({k: v for k, v in step_cols.items() if k not in row})
            row["trace"] = trace
            rows.append(row)
    return rows


def explode_trace(path: str | os.PathLike, traces_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The action rows of one finished per-step JSONL trace."""
    path = Path(path)
    name = str(path.relative_to(traces_dir)) if traces_dir is not None else path.name
    with path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return explode_records(records, name)


def write_action_table(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """JSONL, written to a hidden temporary file and renamed over `path` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_run_action_tables(traces_dir: str | os.PathLike) -> list[Path]:
    """`traces/run_NNN.jsonl` for each finished run trace (`traces/runtime_eval/*.jsonl`, sorted); stale
    `run_NNN.jsonl` beyond the current runs are removed. Returns the tables written."""
    traces_dir = Path(traces_dir)
    runs = sorted((traces_dir / RUN_TRACES).glob("*.jsonl"))
    written = [
        write_action_table(explode_trace(p, traces_dir), traces_dir / f"run_{i:03d}.jsonl")
        for i, p in enumerate(runs, start=1)
    ]
    for old in traces_dir.glob("run_*.jsonl"):
        if old not in written and ACTION_TABLE.fullmatch(old.name):
            old.unlink()
    return written
