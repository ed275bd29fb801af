"""ΔNLL@H of what a user would pick without MegaContext — recency (drop the history), untrained mean-pool
gists and the fixed-budget peers (`mcx_core.eval.peers`) — against the full history, per dataset × W_max,
with its report."""

from __future__ import annotations

import time
from pathlib import Path

from mcx_core import artifacts, data, reports
from mcx_core.artifacts import ArtifactPaths, datasets_dir, load_stage, save_stage, stage_fingerprint
from mcx_core.config import MegaContextConfig
from mcx_core.eval import nll as evaluation
from mcx_core.eval import peers as P
from mcx_core.model.base import BaseLM
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import NullSink, TelemetrySink
from mcx_core.telemetry.tables import log_eval_distribution


def run_baseline_eval(cfg: MegaContextConfig, lm: BaseLM, sink: TelemetrySink | None = None, progress: bool = True,
                      force: bool = False) -> dict:
    """ΔNLL@H of recency, untrained mean-pool gists and the peers of `evaluation.peers` against the full
    history, per dataset × W_max (the stored result when its inputs are unchanged, unless `force`)."""
    sink = sink or NullSink()
    paths = ArtifactPaths.from_config(cfg)
    wc = cfg.working_context
    fp = stage_fingerprint(
        cfg, ["dataset", "base_model", "working_context", "evaluation", "seed"],
        data.load_manifest(datasets_dir(cfg))["config_hash"], lm.model_id,
    )
    cached = load_stage(cfg, "baseline_eval", fp, force)
    if cached is not None:
        _log_baseline(sink, cached["summary"], cached["seconds"], cached["peer_seconds"], cached["rows"],
                      cached["report"].values(), cached["table"])
        return cached
    samples = data.load_eval_samples(cfg)
    conditions = {
        "full": evaluation.full_condition(lm),
        "recency": evaluation.recency_condition(lm, wc.sink_tokens, wc.position_scheme),
        "meanpool": evaluation.working_context_condition(
            lm, evaluation.MeanPoolGister(), cfg.dataset.block_size, wc.recent_tokens, wc.position_scheme,
            wc.sink_tokens,
        ),
    }
    peer_names = list(cfg.evaluation.peers)
    peer_ws = cfg.evaluation.peer_w_values(wc.eval_w_max)
    peers = P.config_peer_conditions(cfg, lm)
    t0 = time.perf_counter()
    rows = evaluation.evaluate(
        lm, samples, conditions, wc.eval_w_max, cfg.dataset.context_tokens, cfg.dataset.horizon,
        batch_size=cfg.evaluation.batch_size, progress=progress,
    )
    t1 = time.perf_counter()
    # Scored apart, so the report can say what the peers (and their attention forwards) add.
    rows += evaluation.evaluate(
        lm, samples, peers, peer_ws, cfg.dataset.context_tokens, cfg.dataset.horizon,
        batch_size=cfg.evaluation.batch_size, progress=progress,
    ) if peers else []
    copies = P.copied_rows(rows, peer_names, peer_ws)
    rows += copies
    peer_seconds = time.perf_counter() - t1
    seconds = time.perf_counter() - t0
    summary = evaluation.summarize(rows, methods=["meanpool", *peer_names])
    for s in summary:
        scored_here = [p for p in peer_names if f"nll_{p}" in s]
        if scored_here:
            s["peer_minus_recency_ci_width_median"] = M.median_width(s, [f"{p}_minus_recency" for p in scored_here])

    import pyarrow.parquet as pq

    table_path = paths.eval / "baseline_eval.parquet"
    artifacts.write_atomic(table_path, lambda tmp: pq.write_table(evaluation.rows_to_table(rows), tmp))

    report = write_baseline_report(cfg, summary, paths.reports, seconds, len(rows), peer_seconds, len(copies))
    _log_baseline(sink, summary, seconds, peer_seconds, len(rows), report.values(), table_path)
    log_eval_distribution(sink, table_path, "baseline_eval")
    result = {"summary": summary, "report": report, "table": table_path, "seconds": seconds,
              "peer_seconds": peer_seconds, "rows": len(rows)}
    save_stage(cfg, "baseline_eval", fp, result, [table_path, *report.values()])
    return result

def _log_baseline(sink: TelemetrySink, summary, seconds, peer_seconds, n_rows, report_files, table_path) -> None:
    for s in summary:
        tag = f"{s['dataset']}/w{s['w_max']}"
        sink.log_metrics({f"eval/{tag}/{k}": v for k, v in s.items() if isinstance(v, float)}, step=0)
    sink.log_metrics({"eval/seconds": seconds, "eval/seconds_per_sample": seconds / max(1, n_rows),
                      M.EVAL_PEER_SECONDS: peer_seconds}, step=0)
    for p in report_files:
        sink.log_artifact(p, "reports")
    sink.log_artifact(table_path, "eval")

def write_baseline_report(cfg: MegaContextConfig, summary: list[dict], out: Path, seconds: float, n_rows: int,
                          peer_seconds: float, n_copied: int = 0):
    groups = [f"{s['dataset']} W={s['w_max']}" for s in summary]
    peers = list(cfg.evaluation.peers)
    plot = reports.grouped_bar_plot(
        out / "baseline_eval.png",
        groups,
        {
            "recency": [s["delta_nll_recency_mean"] for s in summary],
            "mean-pool gists": [s["delta_nll_meanpool_mean"] for s in summary],
            **{P.PEER_LABELS[p]: [s.get(f"delta_nll_{p}_mean", float("nan")) for s in summary] for p in peers},
        },
        ylabel=f"ΔNLL@{cfg.dataset.horizon} (nats/token)",
        title=f"Baselines and peers vs full {cfg.dataset.context_tokens}-token history ({cfg.name})",
        hline=cfg.acceptance.delta_nll_max,
        hline_label=f"acceptance ≤ {cfg.acceptance.delta_nll_max}",
    )
    cols = [
        "dataset", "w_max", "n_samples", "nll_full", "nll_recency", "nll_meanpool",
        "delta_nll_recency", "delta_nll_recency_p95", "delta_nll_meanpool", "delta_nll_meanpool_p95",
        "recovery_meanpool",
    ]
    sections = [
        f"# Baseline ΔNLL@{cfg.dataset.horizon} — config `{cfg.name}`",
        (f"Base model `{cfg.base_model.name}` ({cfg.base_model.source}); histories of "
         f"{cfg.dataset.context_tokens} tokens, horizon H = {cfg.dataset.horizon}, block {cfg.dataset.block_size}; "
         f"held-out split `{cfg.evaluation.split}`. ΔNLL = NLL(condition) − NLL(full history), nats per horizon "
         "token; recovery = share of the recency gap won back (negative: worse than dropping history). "
         "Brackets: paired bootstrap 95 % intervals over the samples."),
        reports.markdown_table(
            reports.with_intervals(summary, ["delta_nll_recency", "delta_nll_meanpool", "recovery_meanpool"]), cols
        ),
    ]
    if peers:
        sections += [
            "## Fixed-budget peers",
            P.report_note(cfg.dataset.block_size, cfg.evaluation.peer_w_values(cfg.working_context.eval_w_max)),
            reports.markdown_table(*P.peer_table(summary, peers)),
        ]
    sections.append("![ΔNLL by condition](baseline_eval.png)")
    sections += evaluation.interval_width_section(
        summary, cfg.working_context.w_max,
        {"ΔNLL (median)": "delta_nll_ci_width_median", "mean-pool − recency": "meanpool_minus_recency_ci_width",
         **({"peer − recency (median)": "peer_minus_recency_ci_width_median"} if peers else {})},
        {"mean-pool − recency": "meanpool_minus_recency_ci_width",
         **({"peer − recency": "peer_minus_recency_ci_width_median"} if peers else {})},
    )
    sections += [
        (f"{n_rows - n_copied} scored (sample, condition, W_max) rows in {seconds:.1f} s, of which the peers (with "
         f"their attention forwards) {peer_seconds:.1f} s; {n_copied} more copied (StreamingLLM's, from recency). "
         "Per-token NLLs: `artifacts/eval/baseline_eval.parquet`."),
    ]
    md = "\n\n".join(sections)
    md_path = artifacts.write_text(out / "baseline_eval.md", md + "\n")
    json_path = artifacts.write_json(out / "baseline_eval.json", summary)
    return {"markdown": md_path, "plot": plot, "json": json_path}
