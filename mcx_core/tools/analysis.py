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

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mcx_core import artifacts, checkpoints, reports
from mcx_core.artifacts import ArtifactPaths
from mcx_core.compression.drift import gist_drift, probe_blocks
from mcx_core.compression.gistnet import load_gister
from mcx_core.config import MegaContextConfig
from mcx_core.eval.gists import compression_points
from mcx_core.eval.nll import MeanPoolGister, rows_from_table
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import TelemetrySink
from mcx_core.tools.boundary import boundary_analysis, position_grid, synthetic_boundary_test
from mcx_core.tools.findings import AnalysisResult, MissingInput, nanmean, output_dir, pearson, write_findings
from mcx_core.tools.traces import (
    busiest_spans,
    connect_traces,
    find_ping_pongs,
    residency_rows,
    stage_latency,
    step_latencies,
)

ANALYSES = ("residency", "compression", "boundary", "latency", "oscillation", "spikes", "drift")

# The seed's "Latency Breakdown → Target allocation" (shares of one block's time), and which engine
# stage (`focus.engine.MegaContextEngine.step`) belongs to which part. Invariant checks are debugging cost
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
    plot = reports.histogram_plot(
        out / "residency.png", bins, {"chosen by the policy": count(chosen), "forced by the budget": count(forced)},
        xlabel="residency (allocator steps at one level before the swap)",
        title=f"Focus stability: {len(rows)} swaps", vline=min_residency, vline_label=f"min residency {min_residency:g}",
    )
    metrics = {
        M.ANALYSIS_RESIDENCY_MEAN: nanmean(chosen),
        M.ANALYSIS_RESIDENCY_BELOW_MIN: (sum(v < min_residency for v in chosen) / len(chosen)) if chosen else math.nan,
        M.ANALYSIS_FORCED_RESIDENCY_MEAN: nanmean(forced),
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
    return write_findings("residency", out, summary, metrics, {"plot": plot}, sections, {"histogram": table}, sink)


def compression_analysis(rows, out: Path, threshold: float, horizon: int,
                         sink: TelemetrySink | None = None) -> AnalysisResult:
    """ΔNLL vs compression ratio for every scored (sample, condition), with the acceptance line."""
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
    return write_findings("compression", out, summary, metrics, {"plot": plot}, sections, {"series": table}, sink)


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
    return write_findings("latency", out, summary, metrics, {"plot": plot}, sections,
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
    plot = reports.timeline_plot(out / "oscillation.png", timeline, labels,
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
    return write_findings("oscillation", out, summary, metrics, {"plot": plot}, sections,
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
    corr = pearson([s["actions"] for s in steps], [s["x_median"] for s in steps])
    metrics = {
        M.ANALYSIS_SPIKE_STEPS: float(len(spikes)),
        M.ANALYSIS_SPIKE_ACTIONS_CORR: corr,
        M.ANALYSIS_SPIKE_ACTIONS_MEAN: nanmean(s["actions"] for s in spikes),
        M.ANALYSIS_CALM_ACTIONS_MEAN: nanmean(s["actions"] for s in calm),
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
    return write_findings("spikes", out, summary, metrics, {"plot": plot}, sections, {"spikes": table}, sink)


def drift_rows(checkpoints: Sequence[Path], lm, probes) -> list[dict]:
    """Per checkpoint: mean cosine of its probe gists to the first checkpoint's and the previous one's."""
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
    return write_findings("drift", out, summary, metrics, {"plot": plot}, sections, {"rows": rows}, sink)


# ---------------------------------------------------------------------------------------------- from a config


def _eval_rows(cfg: MegaContextConfig):
    import pyarrow.parquet as pq


    ev = ArtifactPaths.from_config(cfg).eval
    for name in ("gist_eval.parquet", "baseline_eval.parquet"):
        if (ev / name).is_file():
            return rows_from_table(pq.read_table(ev / name)), ev / name
    raise MissingInput(f"no evaluation table under {ev}: materialize gist_eval_report (or baseline_eval) first")


def _newest_gister(cfg: MegaContextConfig, lm):

    cks = checkpoints.list_checkpoints(ArtifactPaths.from_config(cfg).checkpoints, 1)
    if cks:
        return load_gister(cks[-1], lm), f"learned (`{cks[-1].name}`)"
    return MeanPoolGister(), "mean-pool (no JT1 checkpoint yet)"


def run_analysis(cfg: MegaContextConfig, name: str, sink: TelemetrySink | None = None, lm=None,
                 synthetic: bool = True, progress: bool = False) -> AnalysisResult:
    """One analysis over the artifacts of `cfg`. `lm` (loaded when needed and not given) serves the
    synthetic boundary test and drift. Raises `MissingInput` when an input is not there yet."""
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

    cks = checkpoints.list_checkpoints(paths.checkpoints, 1)
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
