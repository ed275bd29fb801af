"""Telemetry integrity: do the archived files say what readers expect? ("Telemetry logs parse without
errors", the seed's per-commit checklist.)

- traces (`traces/**/*.jsonl`): every line a JSON object with the SPEC §6 keys and types, steps
  increasing within a file; the runtime engine's extra keys, when present, with their types;
- Parquet tables under `deltas/`, each checked as its own kind (`table_kind`): counterfactual delta
  tables (`focus.delta_tables.validate_delta_table`) and the evaluation sweep (`eval_sweep.parquet`,
  the seed's path: `eval.sweep.SWEEP_SCHEMA`);
- action tables (`traces/run_NNN.jsonl`, one row per expand/collapse: `ACTION_TABLE_KEYS`), told
  apart from per-step traces by `trace_kind`;
- report JSONs (`reports/**/*.json`): parseable, and the known reports with their top-level keys.

Each problem names the file and, for line-oriented files, the 1-based line: `path:line: message`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcx_core.telemetry import metrics as M

SPAN_ID = re.compile(r"L\d+:\d{6}")
ACTION_KINDS = ("expand", "collapse")

# The SPEC §6 trace keys and their JSON types (bool is never accepted as a number).
TRACE_REQUIRED: dict[str, str] = {
    "step": "int",
    "expanded": "list",
    "collapsed": "list",
    "working_context": "dict",
    "latency_ms": "number",
    "budget_utilization": "number",
}
# What `focus.engine.run_engine` adds; checked when present (traces written by other tools may lack them).
TRACE_OPTIONAL: dict[str, str] = {
    "policy": "str",
    "position": "int",
    "lod1_nodes": "int",
    "entries": "int",
    "actions": "list",
    "residency": "list",
    "residency_histogram": "dict",
}
ACTION_KEYS: dict[str, str] = {"kind": "str", "level": "int", "index": "int", "start": "int", "end": "int"}

# Top-level keys that code reads back from reports (asset checks, `pipeline.read_*`).
REPORT_KEYS: dict[str, tuple[str, ...]] = {
    "runtime_eval.json": ("summary",),
    "gist_eval.json": ("summary", "stress"),
}


@dataclass(frozen=True)
class SchemaProblem:
    path: Path
    line: int | None  # 1-based; None for whole-file problems
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line is not None else f"{self.path}: {self.message}"


def _is(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "nullable_number":  # non-finite metrics are written as null
        return value is None or _is(value, "number")
    return isinstance(value, {"str": str, "list": list, "dict": dict}[kind])


def trace_record_problems(record: Any) -> list[str]:
    """What is wrong with one decoded trace line (empty when nothing is)."""
    if not isinstance(record, dict):
        return [f"not a JSON object ({type(record).__name__})"]
    out = [f"missing key {k!r}" for k in TRACE_REQUIRED if k not in record]
    for key, kind in {**TRACE_REQUIRED, **TRACE_OPTIONAL}.items():
        if key in record and not _is(record[key], kind):
            out.append(f"{key!r} is {type(record[key]).__name__} {json.dumps(record[key])[:40]}, expected {kind}")
    if out:
        return out
    if record["step"] < 0:
        out.append(f"'step' is {record['step']}, expected >= 0")
    for key in ("latency_ms", "budget_utilization"):
        if not math.isfinite(record[key]) or record[key] < 0:
            out.append(f"{key!r} is {record[key]}, expected a finite number >= 0")
    for key in ("expanded", "collapsed"):
        bad = [s for s in record[key] if not (isinstance(s, str) and SPAN_ID.fullmatch(s))]
        if bad:
            out.append(f"{key!r} holds {json.dumps(bad[:3])}, expected span ids like 'L1:000012'")
    # Entries per level: a count (the runtime engine) or the list of span ids (the seed's example).
    bad_wc = {k: v for k, v in record["working_context"].items() if not ((_is(v, "int") and v >= 0) or _is(v, "list"))}
    if bad_wc:
        out.append(f"'working_context' values {bad_wc} are neither counts >= 0 nor lists")
    for i, a in enumerate(record.get("actions", [])):
        if not isinstance(a, dict):
            out.append(f"actions[{i}] is not an object")
            continue
        wrong = [k for k, kind in ACTION_KEYS.items() if not _is(a.get(k), kind)]
        if wrong:
            out.append(f"actions[{i}]: {', '.join(wrong)} missing or of the wrong type")
        elif a["kind"] not in ACTION_KINDS or a["start"] >= a["end"]:
            out.append(f"actions[{i}]: kind {a['kind']!r}, span [{a['start']}, {a['end']})")
    for key, value in record.items():
        if "/" in key and not (isinstance(value, dict) or _is(value, "nullable_number")):
            out.append(f"metric {key!r} is {type(value).__name__}, expected a number or null")
    if M.SWAP_RATE in record and record[M.SWAP_RATE] is not None and record[M.SWAP_RATE] < 0:
        out.append(f"{M.SWAP_RATE!r} is negative")
    return out


def validate_trace_file(path: str | Path, max_problems: int = 20) -> list[SchemaProblem]:
    """Problems of one JSONL trace, each with its line number; at most `max_problems`."""
    path = Path(path)
    out: list[SchemaProblem] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return [SchemaProblem(path, None, f"unreadable ({err})")]
    previous = None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        return [SchemaProblem(path, None, "empty trace (no step records)")]
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            out.append(SchemaProblem(path, n, "blank line"))
        else:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                out.append(SchemaProblem(path, n, f"not valid JSON ({err.msg} at column {err.colno})"))
            else:
                out += [SchemaProblem(path, n, m) for m in trace_record_problems(record)]
                step = record.get("step") if isinstance(record, dict) else None
                if _is(step, "int"):
                    if previous is not None and step <= previous:
                        out.append(SchemaProblem(path, n, f"step {step} does not follow step {previous}"))
                    previous = step
        if len(out) >= max_problems:
            return out[:max_problems]
    return out


def validate_report_json(path: str | Path) -> list[SchemaProblem]:
    """A report JSON parses (NaN allowed: Python writes it for undefined means), and a known report has
    its top-level keys."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return [SchemaProblem(path, err.lineno, f"not valid JSON ({err.msg} at column {err.colno})")]
    except (OSError, UnicodeDecodeError) as err:
        return [SchemaProblem(path, None, f"unreadable ({err})")]
    need = REPORT_KEYS.get(path.name)
    if need is None:
        return []
    if not isinstance(data, dict):
        return [SchemaProblem(path, None, f"expected a JSON object with keys {list(need)}")]
    missing = [k for k in need if k not in data]
    return [SchemaProblem(path, None, f"missing key(s) {missing}")] if missing else []


# ---------------------------------------------------------------------------------------------- kinds

TABLE_KIND_KEY = b"mcx.table_kind"  # Parquet schema metadata naming a table's kind
SWEEP_FILE = "eval_sweep.parquet"  # = eval.sweep.SWEEP_FILE (the seed's path, artifacts/deltas/)
ACTION_TABLE = re.compile(r"run_\d+\.jsonl")  # the seed's `artifacts/traces/run_001.jsonl`
# One row per expand/collapse (`telemetry.actions`); later allocator fields ride along unchecked.
ACTION_TABLE_KEYS: dict[str, str] = {
    "step": "int", "block_id": "str", "level": "int", "action": "int", "kind": "str", "start": "int",
    "end": "int", "trace": "str",
}


def table_kind(path: str | Path) -> str:
    """`"eval_sweep"` or `"delta"` for a Parquet file under `deltas/`: the kind the writer stored in the
    schema metadata, else the sweep's file name, else a delta table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        kind = (pq.read_schema(path).metadata or {}).get(TABLE_KIND_KEY)
    except (OSError, pa.ArrowException):  # unreadable: validated (and reported) as the kind its name says
        kind = None
    if kind is not None:
        return kind.decode()
    return "eval_sweep" if path.name == SWEEP_FILE else "delta"


def tables_of_kind(deltas_dir: str | Path, kind: str) -> list[Path]:
    return [p for p in sorted(Path(deltas_dir).glob("**/*.parquet")) if table_kind(p) == kind]


def trace_kind(path: str | Path) -> str:
    """`"actions"` for an action table (`run_NNN.jsonl`), else `"steps"` (one record per step)."""
    return "actions" if ACTION_TABLE.fullmatch(Path(path).name) else "steps"


def step_traces(traces_dir: str | Path) -> list[Path]:
    """Finished per-step traces under `traces_dir` (not the action tables, not in-progress `.tmp`)."""
    return [p for p in sorted(Path(traces_dir).glob("**/*.jsonl")) if trace_kind(p) == "steps"]


def action_tables(traces_dir: str | Path) -> list[Path]:
    return [p for p in sorted(Path(traces_dir).glob("**/*.jsonl")) if trace_kind(p) == "actions"]


def validate_sweep_table(path: str | Path) -> list[str]:
    """The sweep table has every `SWEEP_SCHEMA` column with its type."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mcx_core.eval.sweep import SWEEP_SCHEMA

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        return [f"unreadable Parquet ({err})"]
    out = []
    for field in SWEEP_SCHEMA:
        if field.name not in schema.names:
            out.append(f"column {field.name}: missing (an eval_sweep table)")
        elif not schema.field(field.name).type.equals(field.type):
            out.append(f"column {field.name}: {schema.field(field.name).type}, expected {field.type}")
    return out


def validate_action_table(path: str | Path, max_problems: int = 20) -> list[SchemaProblem]:
    """Every line of an action table a JSON object with `ACTION_TABLE_KEYS`; steps never decrease."""
    path = Path(path)
    out: list[SchemaProblem] = []
    previous, prev_trace = None, None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        return [SchemaProblem(path, None, f"unreadable ({err})")]
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            out.append(SchemaProblem(path, n, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(row, dict):
            out.append(SchemaProblem(path, n, "not a JSON object"))
            continue
        wrong = [k for k, kind in ACTION_TABLE_KEYS.items() if not _is(row.get(k), kind)]
        if wrong:
            out.append(SchemaProblem(path, n, f"{', '.join(wrong)} missing or of the wrong type"))
        elif row["kind"] not in ACTION_KINDS or row["action"] not in (1, -1):
            out.append(SchemaProblem(path, n, f"kind {row['kind']!r} / action {row['action']!r}"))
        elif previous is not None and row["step"] < previous and row["trace"] == prev_trace:
            out.append(SchemaProblem(path, n, f"step {row['step']} after step {previous}"))
        else:
            previous, prev_trace = row["step"], row["trace"]
        if len(out) >= max_problems:
            break
    return out


def validate_delta_tables(deltas_dir: str | Path) -> list[SchemaProblem]:
    """Every Parquet table under `deltas/`, by its kind."""
    from mcx_core.focus.delta_tables import validate_delta_table

    out = []
    for p in sorted(Path(deltas_dir).glob("**/*.parquet")):
        check = validate_sweep_table if table_kind(p) == "eval_sweep" else validate_delta_table
        out += [SchemaProblem(p, None, m) for m in check(p)]
    return out


def validate_traces(traces_dir: str | Path, max_problems_per_file: int = 20) -> list[SchemaProblem]:
    """Every finished trace (`**/*.jsonl`; hidden in-progress `.tmp` files are not finished), by kind."""
    return [q for p in sorted(Path(traces_dir).glob("**/*.jsonl"))
            for q in (validate_action_table(p, max_problems_per_file) if trace_kind(p) == "actions"
                      else validate_trace_file(p, max_problems_per_file))]


def validate_artifacts(root: str | Path) -> tuple[list[SchemaProblem], dict[str, int]]:
    """Every trace, action table, delta table, sweep table and report JSON under an artifacts folder:
    (problems, files checked per kind)."""
    root = Path(root)
    reports = sorted((root / "reports").glob("**/*.json"))
    problems = validate_traces(root / "traces") + validate_delta_tables(root / "deltas")
    problems += [q for p in reports for q in validate_report_json(p)]
    counts = {
        "traces": len(step_traces(root / "traces")),
        "action_tables": len(action_tables(root / "traces")),
        "delta_tables": len(tables_of_kind(root / "deltas", "delta")),
        "sweep_tables": len(tables_of_kind(root / "deltas", "eval_sweep")),
        "reports": len(reports),
    }
    return problems, counts
