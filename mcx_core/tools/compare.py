"""Side-by-side comparison of two MLflow runs (the seed's "Comparative dashboards", offline): the config
(params) that differs, every metric's last value in each run, and the metrics both logged over steps
as overlaid curves. Runs are named by id or by run name (the newest run of that name wins).

The MLflow client comes from `telemetry.mlflow_sink`, the one module that imports mlflow.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mcx_core import artifacts, reports
from mcx_core.telemetry.mlflow_sink import mlflow_client

RUN_ID = re.compile(r"[0-9a-f]{32}")


class RunNotFound(LookupError):
    pass


@dataclass
class RunInfo:
    run_id: str
    name: str
    experiment: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]  # last value of each
    tags: dict[str, str]


def resolve_run(client, ref: str) -> tuple[Any, str]:
    """The run `ref` names (an id, else a run name in any experiment, newest first); (run, note)."""
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        raise RunNotFound(f"no experiment in {client.tracking_uri}")
    if RUN_ID.fullmatch(ref):
        by_id = list(client.search_runs(exps, f"attributes.run_id = '{ref}'", max_results=1))
        if by_id:
            return by_id[0], ""
    from mcx_core.telemetry.mlflow_sink import exact_matches, filter_equals

    runs = exact_matches(client.search_runs(exps, filter_equals("attributes.run_name", ref),
                                            order_by=["attributes.start_time DESC"], max_results=1000),
                         ref, run_name=True)[:50]
    if not runs:
        raise RunNotFound(f"no MLflow run with id or name {ref!r} in {client.tracking_uri}")
    note = f"{len(runs)} runs are named {ref!r}; using the newest ({runs[0].info.run_id})" if len(runs) > 1 else ""
    return runs[0], note


def run_info(client, run) -> RunInfo:
    exp = client.get_experiment(run.info.experiment_id)
    return RunInfo(run.info.run_id, run.info.run_name, exp.name if exp else run.info.experiment_id, run.info.status,
                   dict(run.data.params), dict(run.data.metrics), dict(run.data.tags))


def param_diff(a: dict[str, str], b: dict[str, str]) -> list[dict[str, str]]:
    """Params whose values differ, or that only one run has ("—")."""
    return [{"param": k, "a": a.get(k, "—"), "b": b.get(k, "—")} for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def metric_table(a: dict[str, float], b: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, math.nan), b.get(k, math.nan)
        rows.append({"metric": k, "a": va, "b": vb, "b − a": vb - va})
    return rows


def curves_plot(path: Path, curves: dict[str, dict[str, tuple[list[int], list[float]]]], title: str) -> Path:
    """One panel per metric, one line per run."""
    plt = reports._plt()
    n = len(curves)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, (metric, runs) in zip(axes.flat, curves.items()):
        for label, (xs, ys) in runs.items():
            ax.plot(xs, ys, label=label, linewidth=1.2)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return reports._save(fig, plt, path)


def compare_runs(tracking_uri: str, ref_a: str, ref_b: str, out_dir: Path, max_curves: int = 12) -> dict[str, Any]:
    """Compare two runs; write `compare.md`, `compare.json` and `compare_curves.png` into `out_dir`."""
    store = Path(tracking_uri.removeprefix("sqlite:///"))
    if tracking_uri.startswith("sqlite:///") and not store.is_file():
        raise RunNotFound(f"no MLflow store at {store} (nothing was tracked there yet)")
    client = mlflow_client(tracking_uri)
    (run_a, note_a), (run_b, note_b) = resolve_run(client, ref_a), resolve_run(client, ref_b)
    a, b = run_info(client, run_a), run_info(client, run_b)
    params = param_diff(a.params, b.params)
    metrics = metric_table(a.metrics, b.metrics)
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for key in sorted(set(a.metrics) & set(b.metrics)):
        hist = {}
        for label, info in (("A", a), ("B", b)):
            pts = sorted((m.step, m.value) for m in client.get_metric_history(info.run_id, key))
            hist[f"{label}: {info.name}"] = ([s for s, _ in pts], [v for _, v in pts])
        if all(len(xs) > 1 for xs, _ in hist.values()):
            curves[key] = hist
    shown = dict(list(curves.items())[:max_curves])
    out_dir = Path(out_dir)
    files: dict[str, Path] = {}
    if shown:
        files["plot"] = curves_plot(out_dir / "compare_curves.png", shown, f"A = {a.name}   vs   B = {b.name}")
    both = [r for r in metrics if np.isfinite(r["a"]) and np.isfinite(r["b"])]
    sections = [
        f"# Run comparison: A `{a.name}` vs B `{b.name}`",
        reports.markdown_table(
            [{"": "A", "run": a.name, "id": a.run_id, "experiment": a.experiment, "status": a.status,
              "params": len(a.params), "metrics": len(a.metrics)},
             {"": "B", "run": b.name, "id": b.run_id, "experiment": b.experiment, "status": b.status,
              "params": len(b.params), "metrics": len(b.metrics)}],
            ["", "run", "id", "experiment", "status", "params", "metrics"]),
        *(f"Note: {n}" for n in (note_a, note_b) if n),
        f"## Config differences ({len(params)} params)",
        reports.markdown_table(params, ["param", "a", "b"]) if params else "The two runs logged the same params.",
        f"## Metrics (last value; {len(both)} in both runs)",
        reports.markdown_table(metrics, ["metric", "a", "b", "b − a"]),
    ]
    if shown:
        more = f" ({len(curves) - len(shown)} more not drawn)" if len(curves) > len(shown) else ""
        sections += [f"## Curves of the metrics both runs logged over steps{more}", f"![curves]({files['plot'].name})"]
    files["markdown"] = artifacts.write_text(out_dir / "compare.md", "\n\n".join(sections) + "\n")
    result = {"a": a.__dict__, "b": b.__dict__, "params": params, "metrics": metrics, "curves": sorted(curves),
              "notes": [n for n in (note_a, note_b) if n]}
    files["json"] = artifacts.write_json(out_dir / "compare.json", result)
    return {**result, "files": files}
