"""Post-hoc analysis (the seed's Post-Hoc Analysis and Debugging with Telemetry), each a PNG next to a
markdown report and a JSON of its numbers under `artifacts/.../reports/analysis/`, optionally logged to
a telemetry sink:

    residency    histogram of the allocator's residency per swap, policy-chosen vs budget-forced
    compression  ΔNLL vs compression scatter of every scored sample, with the acceptance line
    boundary     ΔNLL heatmap by token position within the 32-token block (gist evaluation rows), and a
                 synthetic boundary test: stdlib function definitions placed on block boundaries vs
                 half a block later, scored full history vs gists
    latency      step latency by stage vs the seed's target split
    oscillation  ping-pong spans (expand → collapse → expand of one span within `alerts.oscillation_window`
                 steps), found with DuckDB SQL over the traces
    spikes       latency spikes (a step slower than `alerts.latency_spike_ratio` × its trace's median)
                 and how they go with the number of allocator actions
    drift        gist drift across JT1 checkpoints: mean cosine of the gists of fixed probe blocks

Each analysis is a pure function of its inputs (`*_analysis(...)`); `run_analysis(cfg, name)` reads
them from the artifacts of a config. Traces are read through DuckDB (`connect_traces`), the same way
`mcx query` sees them.
"""

from __future__ import annotations

import ast
import math
import re
import sysconfig
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mcx_core import artifacts, reports
from mcx_core.config import MegaContextConfig
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import NullSink, TelemetrySink

ANALYSES = ("residency", "compression", "boundary", "latency", "oscillation", "spikes", "drift")

# The seed's "Latency Breakdown → Target allocation" (shares of one block's time), and which engine
# stage (`runtime.MegaContextEngine.step`) belongs to which part. Invariant checks are debugging cost
# the seed's split has no share for.
TARGET_SPLIT = {
    "LensNet scoring": 0.30,
    "Focus allocator": 0.10,
    "Base model forward": 0.50,
    "Context reconstruction": 0.10,
    "Invariant checks": 0.0,
}
STAGE_CATEGORY = {
    "lensnet": "LensNet scoring",
    "fit": "Focus allocator",
    "allocator": "Focus allocator",
    "forward": "Base model forward",
    "ingest": "Context reconstruction",
    "assemble": "Context reconstruction",
    "checks": "Invariant checks",
}

# Stdlib modules the synthetic boundary test takes function definitions from (any Python has them).
BOUNDARY_MODULES = ("textwrap.py", "shlex.py", "fnmatch.py", "posixpath.py", "glob.py", "string.py",
                    "bisect.py", "heapq.py", "colorsys.py", "difflib.py", "ntpath.py", "copy.py")


class MissingInput(FileNotFoundError):
    """An analysis's input artifact does not exist yet; the message names what to materialize."""


@dataclass
class AnalysisResult:
    name: str
    summary: str  # one line
    metrics: dict[str, float]
    files: dict[str, Path]
    data: dict[str, Any] = field(default_factory=dict)  # the rows behind the plot (also in the JSON)


def output_dir(cfg: MegaContextConfig) -> Path:
    from mcx_core.artifacts import ArtifactPaths

    return ArtifactPaths.from_config(cfg).reports / "analysis"


def _finish(name: str, out: Path, summary: str, metrics: dict[str, float], plots: dict[str, Path],
            sections: list[str], data: dict[str, Any], sink: TelemetrySink | None) -> AnalysisResult:
    """Write `<name>.md` and `<name>.json` next to the plots; log finite metrics and the files."""
    md = artifacts.write_text(out / f"{name}.md", "\n\n".join(sections) + "\n")
    js = artifacts.write_json(out / f"{name}.json", {"summary": summary, "metrics": metrics, **data})
    files = {"markdown": md, "json": js, **plots}
    sink = sink or NullSink()
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
    if finite:
        sink.log_metrics(finite)
    for p in files.values():
        sink.log_artifact(p, "analysis")
    return AnalysisResult(name, summary, metrics, files, data)


def _nanmean(values) -> float:
    a = np.asarray(list(values), dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def _pearson(x, y) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------------------------------------- plots


def histogram_plot(path: Path, bins: Sequence[int], stacks: dict[str, Sequence[int]], xlabel: str, title: str,
                   vline: float | None = None, vline_label: str | None = None) -> Path:
    """Stacked bars of counts per integer bin; optional vertical threshold line."""
    plt = reports._plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(bins))
    for name, counts in stacks.items():
        ax.bar(bins, counts, bottom=bottom, width=0.85, label=name)
        bottom += np.asarray(counts, dtype=np.float64)
    if vline is not None:
        ax.axvline(vline - 0.5, color="red", linestyle="--", label=vline_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return reports._save(fig, plt, path)


def heatmap_plot(path: Path, matrix: np.ndarray, row_labels: Sequence[str], xlabel: str, title: str,
                 colorbar: str) -> Path:
    """One row per label, one column per position; a diverging scale centred on 0."""
    plt = reports._plt()
    m = np.asarray(matrix, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(max(7, 0.28 * m.shape[1] + 3), max(2.5, 0.45 * m.shape[0] + 1.5)))
    lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
    im = ax.imshow(m, aspect="auto", cmap="coolwarm", vmin=-lim or -1, vmax=lim or 1, interpolation="nearest")
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    step = max(1, m.shape[1] // 16)
    ax.set_xticks(range(0, m.shape[1], step))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=colorbar)
    return reports._save(fig, plt, path)


def timeline_plot(path: Path, rows: Sequence[dict], labels: Sequence[str], title: str) -> Path:
    """Actions over steps, one row per (trace, span): ▲ expand, ▼ collapse (hollow: forced)."""
    plt = reports._plt()
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * len(labels) + 1.5)))
    y_of = {lab: i for i, lab in enumerate(labels)}
    for kind, marker, color in (("expand", "^", "tab:green"), ("collapse", "v", "tab:red")):
        for forced in (False, True):
            pts = [(r["step"], y_of[r["label"]]) for r in rows if r["kind"] == kind and bool(r["forced"]) == forced]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, marker=marker, s=40, label=f"{kind}{' (forced)' if forced else ''}",
                           facecolors="none" if forced else color, edgecolors=color)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("allocator step")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return reports._save(fig, plt, path)


# ---------------------------------------------------------------------------------------------- traces


def connect_traces(traces_dir: Path):
    """DuckDB with a view `traces` over every finished trace under `traces_dir` (with `filename`)."""
    import duckdb

    root = Path(traces_dir).resolve()
    if not list(root.glob("**/*.jsonl")):
        raise MissingInput(f"no trace (*.jsonl) under {root}: materialize runtime_eval or run `mcx run` first")
    con = duckdb.connect(":memory:")
    glob = str(root / "**" / "*.jsonl").replace("'", "''")
    con.execute(
        f"CREATE VIEW traces AS SELECT * FROM read_json_auto('{glob}', union_by_name = true, "
        "filename = true, format = 'newline_delimited')"
    )
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


def _short(trace: str) -> str:
    p = Path(trace)
    return f"{p.parent.name}/{p.name}"


# ---------------------------------------------------------------------------------------------- analyses


def residency_analysis(rows: list[dict], out: Path, min_residency: float,
                       sink: TelemetrySink | None = None) -> AnalysisResult:
    """Residency per swap (steps the replaced span had stayed at its level), chosen vs forced."""
    chosen = [r["residency"] for r in rows if not r["forced"]]
    forced = [r["residency"] for r in rows if r["forced"]]
    top = max([r["residency"] for r in rows], default=0)
    bins = list(range(top + 1))
    count = lambda vals: [sum(1 for v in vals if v == b) for b in bins]
    plot = histogram_plot(
        out / "residency.png", bins, {"chosen by the policy": count(chosen), "forced by the budget": count(forced)},
        xlabel="residency (allocator steps at one level before the swap)",
        title=f"Focus stability: {len(rows)} swaps", vline=min_residency, vline_label=f"min residency {min_residency:g}",
    )
    metrics = {
        M.ANALYSIS_RESIDENCY_MEAN: _nanmean(chosen),
        M.ANALYSIS_RESIDENCY_BELOW_MIN: (sum(v < min_residency for v in chosen) / len(chosen)) if chosen else math.nan,
        M.ANALYSIS_FORCED_RESIDENCY_MEAN: _nanmean(forced),
    }
    table = [{"residency": b, "chosen": c, "forced": f} for b, c, f in zip(bins, count(chosen), count(forced))]
    summary = (
        f"{len(chosen)} policy-chosen swaps, mean residency {metrics[M.ANALYSIS_RESIDENCY_MEAN]:.2f}; "
        f"{len(forced)} forced collapses"
    )
    sections = [
        "# Residency histogram",
        ("Residency = allocator steps a span stayed at one level before it was swapped (SPEC §7). Forced "
        "collapses (the budget making room as history grows) are shown apart: their residency is set by "
        "`recent_tokens / refocus_every`, not by the focus policy."),
        reports.markdown_table([{"swaps": "chosen", "n": len(chosen), "mean": metrics[M.ANALYSIS_RESIDENCY_MEAN],
                                 f"share < {min_residency:g}": metrics[M.ANALYSIS_RESIDENCY_BELOW_MIN]},
                                {"swaps": "forced", "n": len(forced), "mean": metrics[M.ANALYSIS_FORCED_RESIDENCY_MEAN]}],
                               ["swaps", "n", "mean", f"share < {min_residency:g}"]),
        f"![residency]({plot.name})",
        reports.markdown_table(table, ["residency", "chosen", "forced"]),
    ]
    return _finish("residency", out, summary, metrics, {"plot": plot}, sections, {"histogram": table}, sink)


def compression_analysis(rows, out: Path, threshold: float, horizon: int,
                         sink: TelemetrySink | None = None) -> AnalysisResult:
    """ΔNLL vs compression ratio for every scored (sample, condition), with the acceptance line."""
    from mcx_core.eval.gists import compression_points

    points = compression_points(rows)
    if not points:
        raise MissingInput("the evaluation table holds no condition besides the full history")
    plot = reports.scatter_plot(
        out / "compression.png", points, xlabel="compression (history tokens per position read, log)",
        ylabel=f"ΔNLL@{horizon}", title="ΔNLL vs compression", hline=threshold,
        hline_label=f"acceptance ≤ {threshold:g}", logx=True,
    )
    table = []
    for name, (xs, ys) in sorted(points.items()):
        y = np.asarray(ys)
        table.append({"series": name, "n": len(ys), "compression_median": float(np.median(xs)),
                      "delta_nll_mean": float(y.mean()), "delta_nll_p95": float(np.percentile(y, 95)),
                      "within_acceptance": float((y <= threshold).mean())})
    gist = [y for name, (_, ys) in points.items() if name.startswith("gist (") for y in ys]
    within = float(np.mean(np.asarray(gist) <= threshold)) if gist else math.nan
    metrics = {M.ANALYSIS_COMPRESSION_WITHIN: within}
    summary = f"{sum(r['n'] for r in table)} points in {len(table)} series; learned gists within acceptance: " + (
        f"{within:.0%}" if gist else "no learned-gist rows")
    sections = [
        f"# ΔNLL vs compression (acceptance ΔNLL ≤ {threshold:g})",
        ("One point per scored sample and condition; compression = full history length / positions the "
        "base model read."),
        f"![compression]({plot.name})",
        reports.markdown_table(table, list(table[0])),
    ]
    return _finish("compression", out, summary, metrics, {"plot": plot}, sections, {"series": table}, sink)


def position_grid(delta_by_position: Sequence[float], block_size: int) -> np.ndarray:
    """Horizon positions' ΔNLL [H] as [ceil(H / K), K]: row = block of the horizon, column = position in
    the block (the horizon starts on a block boundary, so horizon position h sits at h mod K)."""
    v = np.asarray(delta_by_position, dtype=np.float64)
    rows = -(-len(v) // block_size)
    grid = np.full(rows * block_size, np.nan)
    grid[: len(v)] = v
    return grid.reshape(rows, block_size)


def _worst_column(grid: np.ndarray) -> int:
    """The position within the block with the highest mean ΔNLL (-1 when nothing is finite)."""
    g = np.asarray(grid, dtype=np.float64)
    ok = np.isfinite(g)
    counts = ok.sum(axis=0)
    if not counts.any():
        return -1
    means = np.where(counts > 0, np.where(ok, g, 0.0).sum(axis=0) / np.maximum(counts, 1), -np.inf)
    return int(np.argmax(means))


def boundary_excess(grid: np.ndarray) -> float:
    """Mean ΔNLL of the block's edge positions (first and last) minus the interior's."""
    g = np.atleast_2d(np.asarray(grid, dtype=np.float64))
    edge = np.concatenate([g[:, 0], g[:, -1]])
    return _nanmean(edge) - _nanmean(g[:, 1:-1].ravel())


def stdlib_functions(limit: int = 200, modules: Sequence[str] = BOUNDARY_MODULES) -> list[str]:
    """Source of function definitions from the running interpreter's stdlib (decorators left out,
    methods dedented), in file and line order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in modules:
        path = stdlib / name
        if not path.is_file():
            continue
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_source_segment(source, node, padded=True)
                if text:
                    out.append(textwrap.dedent(text).rstrip() + "\n")
    return out[:limit]


def boundary_samples(tokenizer, functions: Sequence[str], n_samples: int, sample_tokens: int, block_size: int,
                     shift: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """`n_samples` token sequences of function definitions, each definition starting at a position ≡
    `shift` (mod block_size), newline tokens filling the gaps. Returns ids [n, sample_tokens] and each
    sample's definition starts."""
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    encoded = [ids for ids in (tokenizer(f, add_special_tokens=False)["input_ids"] for f in functions)
               if 4 <= len(ids) <= 4 * block_size]
    if not encoded:
        raise ValueError("no function definition of a usable length")
    samples, starts = [], []
    for j in range(n_samples):
        seq: list[int] = []
        at: list[int] = []
        k = 3 * j  # each sample starts from a different function
        while len(seq) < sample_tokens:
            gap = (shift - len(seq)) % block_size
            seq += [newline] * gap
            at.append(len(seq))
            seq += encoded[k % len(encoded)]
            k += 1
        samples.append(seq[:sample_tokens])
        starts.append([s for s in at if s < sample_tokens])
    return np.asarray(samples, dtype=np.int64), starts


def synthetic_boundary_test(cfg: MegaContextConfig, lm, gister, n_samples: int | None = None,
                            progress: bool = False) -> dict:
    """ΔNLL@H of gists vs the full history on code whose definitions start on block boundaries
    ("aligned") or half a block later ("shifted"), per horizon position. Returns the rows, a grid per
    layout and the mean ΔNLL per layout."""
    from mcx_core.eval import nll as E
    from mcx_core.eval.gists import delta_by_position

    K, C, H = cfg.dataset.block_size, cfg.dataset.context_tokens, cfg.dataset.horizon
    wc = cfg.working_context
    n = n_samples or min(8, cfg.evaluation.samples_per_dataset)
    funcs = stdlib_functions()
    layouts = {}
    for name, shift in (("aligned", 0), ("shifted", K // 2)):
        ids, _ = boundary_samples(lm.tokenizer, funcs, n, C + H, K, shift)
        layouts[name] = ([f"{name}/{i:03d}" for i in range(n)], ids)
    conditions = {
        "full": E.full_condition(lm),
        "gist": E.working_context_condition(lm, gister, K, wc.recent_tokens, wc.position_scheme),
    }
    rows = E.evaluate(lm, layouts, conditions, [wc.w_max], C, H, cfg.evaluation.batch_size, progress)
    by_pos = delta_by_position(rows, "gist", wc.w_max)
    full = {(r.dataset, r.sample_id): r.nll for r in rows if r.condition == "full"}
    summary = {
        name: M.mean([r.nll - full[(r.dataset, r.sample_id)] for r in rows if r.dataset == name and r.condition == "gist"])
        for name in layouts
    }
    return {"rows": rows, "by_position": by_pos, "grids": {k: position_grid(v, K) for k, v in by_pos.items()},
            "delta_nll_mean": summary, "samples": n, "w_max": wc.w_max}


def boundary_analysis(grids: dict[str, np.ndarray], out: Path, block_size: int, source: str,
                      synthetic: dict | None = None, sink: TelemetrySink | None = None) -> AnalysisResult:
    """Heatmap of ΔNLL by position within the block, one row per (dataset or layout, horizon block)."""
    groups = {name: np.atleast_2d(g) for name, g in grids.items()}
    if synthetic:
        groups.update({f"synthetic {name}": np.atleast_2d(g) for name, g in synthetic["grids"].items()})
    if not groups:
        raise MissingInput("no per-position ΔNLL to plot")
    labels = [f"{name} · block {b}" for name, g in groups.items() for b in range(len(g))]
    plot = heatmap_plot(out / "boundary.png", np.concatenate(list(groups.values())), labels,
                        xlabel=f"token position within the {block_size}-token block",
                        title="ΔNLL (gists − full history) by position within block", colorbar="ΔNLL (nats)")
    rows = [{"rows": name, "edge_minus_interior": boundary_excess(g),
             "worst_position": _worst_column(g)}
            for name, g in groups.items()]
    excess = boundary_excess(np.concatenate([np.atleast_2d(g) for g in grids.values()])) if grids else math.nan
    metrics = {M.ANALYSIS_BOUNDARY_EXCESS: excess}
    sections = [
        "# Boundary artifacts: ΔNLL by position within the block",
        (f"ΔNLL of each horizon token (gists − full history), arranged by its position within the "
        f"{block_size}-token block; the horizon starts on a block boundary. Edge − interior > 0 means tokens at "
        f"block edges suffer more. Source: {source}."),
        f"![boundary]({plot.name})",
        reports.markdown_table(rows, ["rows", "edge_minus_interior", "worst_position"]),
    ]
    data: dict[str, Any] = {"grids": {k: np.atleast_2d(v).tolist() for k, v in grids.items()}}
    if synthetic:
        al, sh = synthetic["delta_nll_mean"].get("aligned", math.nan), synthetic["delta_nll_mean"].get("shifted", math.nan)
        metrics[M.ANALYSIS_BOUNDARY_ALIGNED], metrics[M.ANALYSIS_BOUNDARY_SHIFTED] = al, sh
        sections += [
            "## Synthetic boundary test",
            (f"{synthetic['samples']} samples per layout of stdlib function definitions, each starting on a block "
            f"boundary (aligned) or {block_size // 2} tokens later (shifted), newline tokens in between; gists "
            f"at W_max = {synthetic['w_max']}. Gister: {synthetic.get('gister', 'learned')}."),
            reports.markdown_table([{"layout": "aligned", "delta_nll_mean": al}, {"layout": "shifted", "delta_nll_mean": sh},
                                    {"layout": "aligned − shifted", "delta_nll_mean": al - sh}],
                                   ["layout", "delta_nll_mean"]),
        ]
        data["synthetic"] = {"delta_nll_mean": synthetic["delta_nll_mean"],
                             "grids": {k: v.tolist() for k, v in synthetic["grids"].items()}}
    summary = f"edge − interior ΔNLL {excess:+.4f}" + (
        f"; synthetic aligned {metrics[M.ANALYSIS_BOUNDARY_ALIGNED]:.3f} vs shifted "
        f"{metrics[M.ANALYSIS_BOUNDARY_SHIFTED]:.3f}" if synthetic else "")
    return _finish("boundary", out, summary, metrics, {"plot": plot}, sections, data, sink)


def latency_analysis(stages: dict[str, dict[str, float]], out: Path,
                     sink: TelemetrySink | None = None) -> AnalysisResult:
    """Measured share of the step per part (LensNet, allocator, forward, reconstruction) vs the seed's
    target split."""
    total = sum(s["mean_ms"] for s in stages.values())
    share: dict[str, float] = dict.fromkeys(TARGET_SPLIT, 0.0)
    for stage, s in stages.items():
        share[STAGE_CATEGORY.get(stage, "Invariant checks")] += s["mean_ms"] / total if total else math.nan
    cats = list(TARGET_SPLIT)
    plot = reports.grouped_bar_plot(
        out / "latency.png", cats, {"measured": [share[c] for c in cats], "target (seed)": [TARGET_SPLIT[c] for c in cats]},
        ylabel="share of the step", title=f"Latency breakdown: mean step {total:.1f} ms",
    )
    metrics = {M.ANALYSIS_LATENCY_SHARE_PREFIX + re.sub(r"\W+", "_", c.lower()): share[c] for c in cats}
    stage_rows = [{"stage": k, "part": STAGE_CATEGORY.get(k, "?"), **v, "share": v["mean_ms"] / total if total else math.nan}
                  for k, v in stages.items()]
    part_rows = [{"part": c, "measured": share[c], "target": TARGET_SPLIT[c], "measured − target": share[c] - TARGET_SPLIT[c]}
                 for c in cats]
    worst = max(part_rows, key=lambda r: abs(r["measured − target"]))
    summary = f"mean step {total:.1f} ms; largest gap to the target split: {worst['part']} {worst['measured − target']:+.0%}"
    sections = [
        "# Latency breakdown by stage",
        ("Mean ms per engine stage over every traced step, grouped as the seed's target allocation (LensNet "
        "30 %, allocator 10 %, base forward 50 %, context reconstruction 10 %); `checks` (SPEC §2 invariants "
        "every step) is debugging cost outside that split; `ingest` includes gisting completed blocks."),
        reports.markdown_table(part_rows, ["part", "measured", "target", "measured − target"]),
        f"![latency]({plot.name})",
        reports.markdown_table(stage_rows, ["stage", "part", "mean_ms", "p50_ms", "p95_ms", "share"]),
    ]
    return _finish("latency", out, summary, metrics, {"plot": plot}, sections,
                   {"stages": stage_rows, "parts": part_rows}, sink)


def oscillation_analysis(events: list[dict], timeline: list[dict], out: Path, window: int,
                         sink: TelemetrySink | None = None) -> AnalysisResult:
    """Ping-pong spans (expand → collapse → expand within `window` steps) and the busiest spans' actions."""
    spans = sorted({(e["trace"], e["span_start"], e["span_end"]) for e in events})
    pp = set(spans)
    for r in timeline:
        key = (r["trace"], r["span_start"], r["span_end"])
        r["label"] = f"{'⟲ ' if key in pp else ''}{_short(r['trace'])} [{r['span_start']},{r['span_end']})"
    order = sorted({(r["trace"], r["span_start"], r["label"]) for r in timeline})
    labels = [lab for _, _, lab in order] or ["(no actions)"]
    plot = timeline_plot(out / "oscillation.png", timeline, labels,
                         title=f"{len(spans)} ping-pong spans (⟲) within {window} steps; busiest spans' actions")
    metrics = {M.ANALYSIS_OSCILLATING_SPANS: float(len(spans)), M.ANALYSIS_PING_PONGS: float(len(events))}
    table = [{"trace": _short(e["trace"]), "span": f"[{e['span_start']}, {e['span_end']})", "level": e["level"],
              "steps": f"{e['step1']} → {e['step2']} → {e['step3']}"} for e in events]
    summary = f"{len(events)} ping-pong events on {len(spans)} spans (window {window} steps)"
    sections = [
        "# Allocator oscillation: ping-pong spans",
        (f"A ping-pong is expand → collapse → expand of the same token span with the third action at most {window} "
        "steps after the first (`alerts.oscillation_window`), found with DuckDB SQL over the traces "
        "(`mcx_core.tools.analysis.PING_PONG_SQL`). Fix: raise cooldown/min residency, widen the hysteresis band, "
        "or smooth LensNet scores."),
        reports.markdown_table(table, ["trace", "span", "level", "steps"]) if table else "No ping-pong span found.",
        f"![oscillation]({plot.name})",
    ]
    return _finish("oscillation", out, summary, metrics, {"plot": plot}, sections,
                   {"events": [{k: v for k, v in e.items()} for e in events]}, sink)


def spikes_analysis(steps: list[dict], out: Path, ratio: float, sink: TelemetrySink | None = None) -> AnalysisResult:
    """Latency spikes (> `ratio` × the trace's median step) and their correlation with allocator actions."""
    if not steps:
        raise MissingInput("the traces hold no step with a latency")
    for s in steps:
        s["x_median"] = s["latency_ms"] / s["median_ms"] if s["median_ms"] else math.nan
        s["spike"] = bool(s["x_median"] > ratio)
    spikes = [s for s in steps if s["spike"]]
    calm = [s for s in steps if not s["spike"]]
    plot = reports.scatter_plot(
        out / "spikes.png",
        {"spike": ([s["actions"] for s in spikes], [s["x_median"] for s in spikes]),
         "other steps": ([s["actions"] for s in calm], [s["x_median"] for s in calm])},
        xlabel="allocator actions in the step (expands + collapses)", ylabel="step latency / trace median",
        title="Latency spikes vs allocator actions", hline=ratio, hline_label=f"spike > {ratio:g}× median",
    )
    corr = _pearson([s["actions"] for s in steps], [s["x_median"] for s in steps])
    metrics = {
        M.ANALYSIS_SPIKE_STEPS: float(len(spikes)),
        M.ANALYSIS_SPIKE_ACTIONS_CORR: corr,
        M.ANALYSIS_SPIKE_ACTIONS_MEAN: _nanmean(s["actions"] for s in spikes),
        M.ANALYSIS_CALM_ACTIONS_MEAN: _nanmean(s["actions"] for s in calm),
    }
    worst = sorted(spikes, key=lambda s: -s["x_median"])[:15]
    table = [{"trace": _short(s["trace"]), "step": s["step"], "latency_ms": s["latency_ms"], "x_median": s["x_median"],
              "actions": s["actions"]} for s in worst]
    summary = (f"{len(spikes)} of {len(steps)} steps spike; corr(actions, latency) = "
               + ("n/a" if math.isnan(corr) else f"{corr:+.2f}"))
    sections = [
        f"# Latency spikes (> {ratio:g}× the trace's median step)",
        ("Pearson correlation of the number of allocator actions with step latency (relative to its trace's "
        "median), and the actions of spike vs other steps. A first step that spikes with no actions is "
        "one-time setup, not focus work."),
        reports.markdown_table([{"steps": "spike", "n": len(spikes), "actions_mean": metrics[M.ANALYSIS_SPIKE_ACTIONS_MEAN]},
                                {"steps": "other", "n": len(calm), "actions_mean": metrics[M.ANALYSIS_CALM_ACTIONS_MEAN]},
                                {"steps": "corr(actions, latency)", "n": len(steps), "actions_mean": corr}],
                               ["steps", "n", "actions_mean"]),
        f"![spikes]({plot.name})",
        reports.markdown_table(table, ["trace", "step", "latency_ms", "x_median", "actions"]) if table else "No spike.",
    ]
    return _finish("spikes", out, summary, metrics, {"plot": plot}, sections, {"spikes": table}, sink)


def jt1_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete JT1 checkpoints in training order (cycle, step)."""
    found = []
    for d in Path(checkpoints_dir).glob("JT1_cycle*_step*"):
        m = re.fullmatch(r"JT1_cycle(\d+)_step(\d+)", d.name)
        if m and (d / "trainer_state.json").is_file():
            found.append(((int(m.group(1)), int(m.group(2))), d))
    return [d for _, d in sorted(found)]


def drift_rows(checkpoints: Sequence[Path], lm, probes) -> list[dict]:
    """Per checkpoint: mean cosine of its probe gists to the first checkpoint's and the previous one's."""
    from mcx_core.compression.drift import gist_drift
    from mcx_core.compression.gistnet import load_gister

    gisters = [load_gister(c, lm) for c in checkpoints]
    return [
        {"checkpoint": c.name, "cosine_to_first": gist_drift(gisters[0], g, probes),
         "cosine_to_previous": gist_drift(gisters[i - 1], g, probes) if i else 1.0}
        for i, (c, g) in enumerate(zip(checkpoints, gisters))
    ]


def drift_analysis(rows: list[dict], out: Path, sink: TelemetrySink | None = None) -> AnalysisResult:
    if not rows:
        raise MissingInput("no complete JT1 checkpoint: materialize gistnet_checkpoint first")
    plot = reports.line_plot(
        out / "drift.png", list(range(len(rows))),
        {"cosine to the first checkpoint": [r["cosine_to_first"] for r in rows],
         "cosine to the previous checkpoint": [r["cosine_to_previous"] for r in rows]},
        xlabel="JT1 checkpoint (training order: " + ", ".join(r["checkpoint"] for r in rows)[:80] + ")",
        ylabel="mean cosine of probe gists", title="Gist drift across checkpoints (1 = unchanged)",
    )
    metrics = {M.ANALYSIS_DRIFT_MIN_COSINE: min(r["cosine_to_first"] for r in rows),
               M.ANALYSIS_DRIFT_LAST_COSINE: rows[-1]["cosine_to_previous"]}
    summary = (f"{len(rows)} checkpoints; min cosine to the first {metrics[M.ANALYSIS_DRIFT_MIN_COSINE]:.3f}"
               if len(rows) > 1 else "one checkpoint: nothing to compare yet")
    sections = [
        "# Gist drift across JT1 checkpoints",
        ("Mean cosine similarity of the gists the checkpoints give the same probe blocks (the first blocks of "
        "each corpus's val split). Falling similarity with rising ΔNLL is the seed's gist-drift scenario: "
        "refresh the delta labels, lower the JT1 learning rate."),
        reports.markdown_table(rows, ["checkpoint", "cosine_to_first", "cosine_to_previous"]),
        f"![drift]({plot.name})",
    ]
    return _finish("drift", out, summary, metrics, {"plot": plot}, sections, {"rows": rows}, sink)


# ---------------------------------------------------------------------------------------------- from a config


def _eval_rows(cfg: MegaContextConfig):
    import pyarrow.parquet as pq

    from mcx_core.artifacts import ArtifactPaths
    from mcx_core.eval.nll import rows_from_table

    ev = ArtifactPaths.from_config(cfg).eval
    for name in ("gist_eval.parquet", "baseline_eval.parquet"):
        if (ev / name).is_file():
            return rows_from_table(pq.read_table(ev / name)), ev / name
    raise MissingInput(f"no evaluation table under {ev}: materialize gist_eval_report (or baseline_eval) first")


def _newest_gister(cfg: MegaContextConfig, lm):
    from mcx_core.artifacts import ArtifactPaths
    from mcx_core.compression.gistnet import load_gister
    from mcx_core.eval.nll import MeanPoolGister

    cks = jt1_checkpoints(ArtifactPaths.from_config(cfg).checkpoints)
    if cks:
        return load_gister(cks[-1], lm), f"learned (`{cks[-1].name}`)"
    return MeanPoolGister(), "mean-pool (no JT1 checkpoint yet)"


def run_analysis(cfg: MegaContextConfig, name: str, sink: TelemetrySink | None = None, lm=None,
                 synthetic: bool = True, progress: bool = False) -> AnalysisResult:
    """One analysis over the artifacts of `cfg`. `lm` (loaded when needed and not given) serves the
    synthetic boundary test and drift. Raises `MissingInput` when an input is not there yet."""
    from mcx_core.artifacts import ArtifactPaths

    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r} (known: {', '.join(ANALYSES)})")
    paths = ArtifactPaths.from_config(cfg)
    out = output_dir(cfg)
    K = cfg.dataset.block_size

    def model():
        nonlocal lm
        if lm is None:
            from mcx_core.model.base import load_base_model

            lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
        return lm

    if name in ("residency", "latency", "oscillation", "spikes"):
        con = connect_traces(paths.traces)
        if name == "residency":
            return residency_analysis(residency_rows(con), out, cfg.acceptance.mean_residency_min, sink)
        if name == "latency":
            return latency_analysis(stage_latency(con), out, sink)
        if name == "spikes":
            return spikes_analysis(step_latencies(con), out, cfg.alerts.latency_spike_ratio, sink)
        events = find_ping_pongs(con, cfg.alerts.oscillation_window)
        spans = [(e["trace"], e["span_start"], e["span_end"]) for e in events]
        return oscillation_analysis(events, busiest_spans(con, include=spans[:12]), out, cfg.alerts.oscillation_window, sink)
    if name == "compression":
        rows, _ = _eval_rows(cfg)
        return compression_analysis(rows, out, cfg.acceptance.delta_nll_max, cfg.dataset.horizon, sink)
    if name == "boundary":
        from mcx_core.eval.gists import delta_by_position

        try:
            rows, table = _eval_rows(cfg)
        except MissingInput:
            if not synthetic:
                raise
            rows, table = [], None
        cond = "gist" if any(r.condition == "gist" for r in rows) else "meanpool"
        grids = {ds: position_grid(v, K) for ds, v in delta_by_position(rows, cond, cfg.working_context.w_max).items()}
        source = f"`{table.name}`, condition `{cond}`" if table else "no evaluation table yet (synthetic test only)"
        found = None
        if synthetic:
            gister, label = _newest_gister(cfg, model())
            found = synthetic_boundary_test(cfg, model(), gister, progress=progress)
            found["gister"] = label
        return boundary_analysis(grids, out, K, source, found, sink)
    from mcx_core.compression.drift import probe_blocks

    cks = jt1_checkpoints(paths.checkpoints)
    if not cks:
        raise MissingInput(f"no complete JT1 checkpoint under {paths.checkpoints}: materialize gistnet_checkpoint first")
    return drift_analysis(drift_rows(cks, model(), probe_blocks(cfg, model())), out, sink)


def run_all(cfg: MegaContextConfig, sink: TelemetrySink | None = None, lm=None, synthetic: bool = True,
            progress: bool = False) -> tuple[dict[str, AnalysisResult], dict[str, str], Path]:
    """Every analysis whose inputs exist; (results, skipped: name → why, index markdown)."""
    done: dict[str, AnalysisResult] = {}
    skipped: dict[str, str] = {}
    for name in ANALYSES:
        try:
            done[name] = run_analysis(cfg, name, sink, lm, synthetic, progress)
        except MissingInput as err:
            skipped[name] = str(err)
    lines = [f"# Telemetry analysis — config `{cfg.name}`"]
    lines += [f"- [{r.name}]({r.files['markdown'].name}): {r.summary}" for r in done.values()]
    lines += [f"- {name}: skipped — {why}" for name, why in skipped.items()]
    index = artifacts.write_text(output_dir(cfg) / "index.md", "\n".join(lines) + "\n")
    return done, skipped, index
