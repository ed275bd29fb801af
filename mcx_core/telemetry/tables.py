"""Telemetry as MLflow tables: samples of the per-sample ΔNLL distributions, the counterfactual
utilities, the focus actions and the residency histogram (the full data stays in the Parquet/JSONL artifacts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mcx_core.eval.nll import rows_from_table
from mcx_core.focus import engine as runtime
from mcx_core.telemetry.sinks import TelemetrySink

TABLE_ROWS_MAX = 2000  # rows per MLflow table (a sample: the full data is in the Parquet/JSONL artifacts)

def columns(rows: list[dict]) -> dict[str, list]:
    """Row dicts -> the column dict `log_table` takes (keys of the first row)."""
    return {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}

def log_focus_tables(sink: TelemetrySink, records: list[dict], residencies: list[int]) -> None:
    """Focus actions and the residency distribution as MLflow tables."""
    actions = [
        {"step": r["step"], **{k: a[k] for k in ("kind", "level", "start", "end", "score", "forced", "residency")}}
        for r in records for a in r.get("actions", [])
    ][:TABLE_ROWS_MAX]
    if actions:
        sink.log_table(columns(actions), "runtime/focus_actions.json")
    hist = runtime.residency_histogram(residencies)
    sink.log_table({"residency_steps": list(hist), "blocks": list(hist.values())}, "runtime/residency_histogram.json")

def log_delta_tables(sink: TelemetrySink, table_path: Path) -> None:
    """Counterfactual utility samples (a seeded sample of the delta table) as an MLflow table."""
    import pyarrow.parquet as pq

    table = pq.read_table(table_path)
    if table.num_rows > TABLE_ROWS_MAX:
        keep = np.sort(np.random.default_rng(0).choice(table.num_rows, TABLE_ROWS_MAX, replace=False))
        table = table.take(keep)
    cols = [c for c in ("sample_id", "block_id", "level", "action", "delta_nll", "token_cost", "distance_to_cursor") if c in table.column_names]
    sink.log_table({c: table.column(c).to_pylist() for c in cols}, "deltas/utility_samples.json")

def log_eval_distribution(sink: TelemetrySink, table_path: Path, name: str) -> None:
    """Per-sample ΔNLL of every condition vs the full history (the distribution behind mean/p95)."""
    import pyarrow.parquet as pq


    rows = rows_from_table(pq.read_table(table_path))
    full = {(r.dataset, r.sample_id): r.nll for r in rows if r.condition == "full"}
    out = [
        {"dataset": r.dataset, "w_max": r.w_max, "condition": r.condition, "sample_id": r.sample_id,
         "delta_nll": r.nll - full[(r.dataset, r.sample_id)]}
        for r in rows if r.condition != "full" and (r.dataset, r.sample_id) in full
    ][:TABLE_ROWS_MAX]
    if out:
        sink.log_table(columns(out), f"eval/{name}_delta_nll_samples.json")
