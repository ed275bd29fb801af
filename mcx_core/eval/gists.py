"""ΔNLL@H of learned gists against the full history, the two baselines (recency, mean-pool) and the
fixed-budget peers (`mcx_core.eval.peers`), at 32× (LOD1, every W_max) and 1024× (one LOD2 gist), plus
where the loss comes from: by position of the horizon token and by distance of a single gisted block
from the cursor."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from mcx_core import artifacts, checkpoints, data, reports
from mcx_core.artifacts import (
    ArtifactPaths,
    datasets_dir,
    load_stage,
    save_stage,
    stage_fingerprint,
    write_atomic,
)
from mcx_core.compression.gistnet import load_gister
from mcx_core.config import MegaContextConfig
from mcx_core.eval import nll as E
from mcx_core.eval import peers as P
from mcx_core.model.base import BaseLM
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import NullSink, TelemetrySink
from mcx_core.telemetry.tables import log_eval_distribution

STRESS = "stress1024"


def conditions(cfg: MegaContextConfig, lm: BaseLM, gister) -> dict[str, E.Condition]:
    wc = cfg.working_context
    K = cfg.dataset.block_size
    return {
        "full": E.full_condition(lm),
        "recency": E.recency_condition(lm, wc.sink_tokens, wc.position_scheme),
        "meanpool": E.working_context_condition(lm, E.MeanPoolGister(), K, wc.recent_tokens, wc.position_scheme,
                                                wc.sink_tokens),
        "gist": E.working_context_condition(lm, gister, K, wc.recent_tokens, wc.position_scheme, wc.sink_tokens),
        **P.config_peer_conditions(cfg, lm),
    }


def evaluate_gists(
    cfg: MegaContextConfig,
    lm: BaseLM,
    gister,
    samples: dict[str, tuple[list[str], np.ndarray]],
    progress: bool = True,
    baseline_rows: list[E.EvalRow] | None = None,
) -> dict:
    """All rows and summaries of the gist evaluation (no files written). `baseline_rows` (the
    `baseline_eval` table) supply full/recency/meanpool/peer scores of the same samples, so they are not
    recomputed; a condition they miss for any sample or W_max is scored here. Peers are scored at
    `evaluation.peer_w_max` only; StreamingLLM's rows are recency's (`peers.copied_rows`)."""
    C, H, K = cfg.dataset.context_tokens, cfg.dataset.horizon, cfg.dataset.block_size
    ev, wc = cfg.evaluation, cfg.working_context
    conds = conditions(cfg, lm, gister)
    fixed = {"full"}
    if C >= K * K:
        conds[STRESS] = E.max_compression_condition(lm, gister, K, wc.position_scheme, wc.sink_tokens)
        fixed.add(STRESS)
    t0 = time.perf_counter()
    peers = list(ev.peers)
    peer_ws = ev.peer_w_values(wc.eval_w_max)
    scored_peers = P.scored(peers)
    needed = {c: [0] if c in fixed else peer_ws if c in scored_peers else wc.eval_w_max for c in conds}
    reusable = ["full", "recency", "meanpool", *scored_peers]
    reused = _covered(baseline_rows or [], samples, {c: needed[c] for c in reusable})
    rows = [r for r in baseline_rows or []
            if r.condition in reused and r.w_max in needed[r.condition] and _wanted(r, samples)]
    todo = {k: v for k, v in conds.items() if k not in reused}
    for is_peer, ws in ((False, wc.eval_w_max), (True, peer_ws)):
        group = {k: v for k, v in todo.items() if (k in scored_peers) == is_peer}
        if group:
            rows += E.evaluate(lm, samples, group, ws, C, H, ev.batch_size, progress, frozenset(fixed))
    rows += P.copied_rows(rows, peers, peer_ws)
    # Distance probe: one gisted block at a time, on the first few samples (each costs a full forward).
    distances = [d for d in ev.distance_blocks if d <= C // K]
    probe_rows: list[E.EvalRow] = []
    if ev.distance_probe_samples and distances:
        few = {ds: (ids[: ev.distance_probe_samples], x[: ev.distance_probe_samples]) for ds, (ids, x) in samples.items()}
        probes = {f"gist_d{d}": E.single_gist_condition(lm, gister, K, d, wc.position_scheme, wc.sink_tokens)
                  for d in distances}
        probe_rows = E.evaluate(lm, few, probes, [], C, H, ev.batch_size, progress, frozenset(probes))
        probe_rows += [r for r in rows if r.condition == "full"]
    seconds = time.perf_counter() - t0
    summary = summarize(rows, peers)
    stress = E.summarize_fixed(rows, STRESS) if STRESS in conds else []
    distance = [
        {"distance_blocks": d, **s} for d in distances for s in E.summarize_fixed(probe_rows, f"gist_d{d}")
    ]
    return {
        "rows": rows,
        "probe_rows": probe_rows,
        "summary": summary,
        "stress": stress,
        "distance": distance,
        "by_position": delta_by_position(rows, "gist", cfg.working_context.w_max),
        "seconds": seconds,
        "seconds_per_sample": seconds / max(1, sum(len(v[0]) for v in samples.values())),
    }


def _wanted(r: E.EvalRow, samples) -> bool:
    return r.dataset in samples and r.sample_id in set(samples[r.dataset][0])


def summarize(rows: list[E.EvalRow], peers: list[str]) -> list[dict]:
    """`E.summarize` of mean-pool, the peers and the learned gists, plus the gists' paired difference against
    mean-pool and every peer scored at the row's W_max on the same samples: `gist_beats_{m}`, and for peers
    `gist_minus_{p}_mean/_ci_*/_ci_width` and `gist_minus_peer_ci_width_median`."""
    summary = E.summarize(rows, methods=["meanpool", *peers, "gist"])
    for s in summary:
        if "nll_gist" not in s:
            continue
        here = [p for p in peers if f"nll_{p}" in s]
        gist, pool, *others = E.condition_nlls(rows, s["dataset"], s["w_max"], ["gist", "meanpool", *here])
        s["gist_beats_meanpool"] = M.beats(gist, pool)
        for p, nll in zip(here, others):
            diff = M.difference_ci(gist, nll)
            s[f"gist_minus_{p}_mean"] = M.mean(gist - nll)
            s.update(M.with_ci(f"gist_minus_{p}", diff))
            s[f"gist_minus_{p}_ci_width"] = M.ci_width(diff)
            s[f"gist_beats_{p}"] = bool(diff[1] < 0)
        if here:
            s["gist_minus_peer_ci_width_median"] = M.median_width(s, [f"gist_minus_{p}" for p in here])
    return summary


def _covered(rows: list[E.EvalRow], samples, needed: dict[str, list[int]]) -> set[str]:
    """Of the conditions of `needed` (condition -> its W_max values, [0] for a W_max-independent one), those
    scored in `rows` for every sample at every W_max it needs."""
    have = {(r.dataset, r.condition, r.w_max, r.sample_id) for r in rows}
    return {
        cond for cond, ws in needed.items()
        if all((ds, cond, w, s) in have for ds, (ids, _) in samples.items() for s in ids for w in ws)
    }


def delta_by_position(rows: list[E.EvalRow], condition: str, w_max: int) -> dict[str, list[float]]:
    """Mean ΔNLL of each horizon position (gist vs full), per dataset: boundary artifacts show here."""
    full = {(r.dataset, r.sample_id): np.array(r.token_nll) for r in rows if r.condition == "full"}
    out: dict[str, list[float]] = {}
    for ds in sorted({r.dataset for r in rows}):
        diffs = [
            np.array(r.token_nll) - full[(ds, r.sample_id)]
            for r in rows
            if r.dataset == ds and r.condition == condition and r.w_max == w_max
        ]
        if diffs:
            out[ds] = np.mean(diffs, axis=0).tolist()
    return out


def log_metrics(result: dict, sink: TelemetrySink, step: int = 0) -> dict[str, float]:
    """The evaluation's numbers under stable names (MLflow, Dagster metadata, checks)."""
    flat: dict[str, float] = {}
    for s in result["summary"]:
        for k, v in s.items():
            if isinstance(v, float | bool) and not isinstance(v, str):
                flat[f"eval/{s['dataset']}/w{s['w_max']}/{k}"] = float(v)
    for s in result["stress"]:
        flat[f"eval/{s['dataset']}/{STRESS}/delta_nll_mean"] = s["delta_nll_mean"]
        flat[f"eval/{s['dataset']}/{STRESS}/delta_nll_p95"] = s["delta_nll_p95"]
    for s in result["distance"]:
        flat[f"eval/{s['dataset']}/distance/d{s['distance_blocks']}/delta_nll_mean"] = s["delta_nll_mean"]
    flat["eval/seconds_per_sample"] = result["seconds_per_sample"]
    sink.log_metrics(flat, step=step)
    return flat


def write_report(cfg: MegaContextConfig, result: dict, out: Path, checkpoint: str, name: str = "gist_eval") -> dict:
    H = cfg.dataset.horizon
    thr = cfg.acceptance.delta_nll_max
    summary = result["summary"]
    peers = list(cfg.evaluation.peers)
    bar = reports.grouped_bar_plot(
        out / f"{name}.png",
        [f"{s['dataset']} W={s['w_max']}" for s in summary],
        {
            "recency": [s["delta_nll_recency_mean"] for s in summary],
            "mean-pool gists": [s["delta_nll_meanpool_mean"] for s in summary],
            **{P.PEER_LABELS[p]: [s.get(f"delta_nll_{p}_mean", float("nan")) for s in summary] for p in peers},
            "learned gists": [s["delta_nll_gist_mean"] for s in summary],
        },
        ylabel=f"ΔNLL@{H} (nats/token)",
        title=f"Learned gists vs baselines and peers ({cfg.name})",
        hline=thr,
        hline_label=f"acceptance ≤ {thr}",
    )
    scatter = reports.scatter_plot(
        out / f"{name}_compression.png",
        compression_points(result["rows"]),
        xlabel="compression (history tokens per position read, log)",
        ylabel=f"ΔNLL@{H}",
        title="ΔNLL vs compression",
        hline=thr,
        hline_label=f"acceptance ≤ {thr}",
        logx=True,
    )
    position = reports.line_plot(
        out / f"{name}_by_position.png",
        list(range(1, H + 1)),
        result["by_position"],
        xlabel="horizon position",
        ylabel="ΔNLL (learned gists − full)",
        title=f"ΔNLL by horizon position, W={cfg.working_context.w_max}",
    )
    plots = {"plot": bar, "scatter": scatter, "by_position": position}
    sections = [
        f"# Gist evaluation — config `{cfg.name}`, checkpoint `{checkpoint}`",
        f"ΔNLL@{H} = NLL(condition) − NLL(full {cfg.dataset.context_tokens}-token history), nats per horizon "
        f"token, held-out split `{cfg.evaluation.split}`. recovery = share of the recency gap won back. "
        "Brackets: paired bootstrap 95 % intervals over the samples; \"beats\" = the interval of the paired "
        "NLL difference lies below 0. "
        f"Acceptance: ΔNLL ≤ {thr} at W_max = {cfg.working_context.w_max}; ≤ {cfg.acceptance.delta_nll_1024x_max} "
        "at 1024×.",
        reports.markdown_table(
            reports.with_intervals(summary, ["delta_nll_recency", "delta_nll_meanpool", "delta_nll_gist", "recovery_gist",
                                             "gist_minus_recency"]),
            ["dataset", "w_max", "n_samples", "nll_full", "delta_nll_recency", "delta_nll_meanpool",
             "delta_nll_gist", "delta_nll_gist_p95", "recovery_gist", "gist_minus_recency", "gist_beats_recency",
             "gist_beats_meanpool"],
        ),
        f"![ΔNLL by condition]({bar.name})",
    ]
    if peers:
        sections += [
            "## Fixed-budget peers",
            P.report_note(cfg.dataset.block_size, cfg.evaluation.peer_w_values(cfg.working_context.eval_w_max))
            + " \"gist − peer\": the paired NLL difference of the learned gists against the peer on the same "
            "samples (below 0: the gists are better).",
            reports.markdown_table(*P.peer_table(summary, peers, versus="gist")),
        ]
    peer_width = {"gist − peer": "gist_minus_peer_ci_width_median"} if peers else {}
    sections += E.interval_width_section(
        summary, cfg.working_context.w_max,
        {"ΔNLL (median)": "delta_nll_ci_width_median", "gist − recency": "gist_minus_recency_ci_width",
         **{f"{k} (median)": v for k, v in peer_width.items()}},
        {"gist − recency": "gist_minus_recency_ci_width", **peer_width},
    )
    if result["stress"]:
        sections += [
            "## Maximum compression (1024×)",
            "The oldest whole 1024-token spans are one LOD2 gist each, the horizon starts at the span boundary.",
            reports.markdown_table(reports.with_intervals(result["stress"], ["delta_nll"]),
                                   ["dataset", "n_samples", "compression", "delta_nll", "delta_nll_p95"]),
        ]
    sections += ["## ΔNLL vs compression", f"![scatter]({scatter.name})"]
    sections += ["## Boundary artifacts: ΔNLL by horizon position", f"![by position]({position.name})"]
    if result["distance"]:
        series: dict[str, list[float]] = {}
        ds_list = sorted({s["dataset"] for s in result["distance"]})
        ds_dist = sorted({s["distance_blocks"] for s in result["distance"]})
        for ds in ds_list:
            series[ds] = [next(s["delta_nll_mean"] for s in result["distance"] if s["dataset"] == ds and s["distance_blocks"] == d) for d in ds_dist]
        distance = reports.line_plot(
            out / f"{name}_by_distance.png", ds_dist, series,
            xlabel="distance of the single gisted block from the cursor (blocks)",
            ylabel="ΔNLL vs full", title="Cost of gisting one block, by distance",
        )
        plots["by_distance"] = distance
        sections += [
            "## ΔNLL by distance of the gisted block",
            reports.markdown_table(result["distance"], ["dataset", "distance_blocks", "n_samples", "delta_nll_mean", "delta_nll_p95"]),
            f"![by distance]({distance.name})",
        ]
    sections.append(f"Evaluation time: {result['seconds']:.1f} s ({result['seconds_per_sample']:.2f} s per sample).")
    md = artifacts.write_text(out / f"{name}.md", "\n\n".join(sections) + "\n")
    js = artifacts.write_json(out / f"{name}.json", {k: result[k] for k in ("summary", "stress", "distance", "by_position", "seconds")})
    return {"markdown": md, "json": js, **plots}


def compression_points(rows: list[E.EvalRow]) -> dict[str, tuple[list[float], list[float]]]:
    """Per condition: (compression ratio, ΔNLL) for every scored sample — the scatter's points."""
    full = {(r.dataset, r.sample_id): r for r in rows if r.condition == "full"}
    points: dict[str, tuple[list[float], list[float]]] = {}
    for r in rows:
        if r.condition == "full":
            continue
        f = full[(r.dataset, r.sample_id)]
        xs, ys = points.setdefault(f"{r.condition} ({r.dataset})", ([], []))
        xs.append(f.context_len / r.context_len)
        ys.append(r.nll - f.nll)
    return points


# ---------------------------------------------------------------------------------------------- any text


from mcx_core.textstream import TextError, read_text_prefix  # TextError: one class for text problems


def samples_from_text(text: str, tokenizer, sample_tokens: int, block_size: int, max_samples: int) -> np.ndarray:
    """Cut a text into non-overlapping, block-aligned samples of `sample_tokens` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stride = -(-sample_tokens // block_size) * block_size
    n = 0 if len(ids) < sample_tokens else 1 + (len(ids) - sample_tokens) // stride
    if n == 0:
        raise TextError(
            f"the text has {len(ids)} tokens; one sample needs {sample_tokens} (history + horizon)"
        )
    n = min(n, max_samples)
    return np.stack([np.asarray(ids[i * stride : i * stride + sample_tokens], dtype=np.int64) for i in range(n)])


def read_text_file(path: Path, max_chars: int | None = None) -> str:
    """A UTF-8 text file's text (at most `max_chars` characters, read incrementally); TextError when it is
    missing, empty, binary or not UTF-8. To tokenize a prefix, see `mcx_core.textstream.stream_token_prefix`."""
    return read_text_prefix(Path(path), max_chars)


def evaluate_text(
    cfg: MegaContextConfig, lm: BaseLM, gister, text: str, w_max: int, horizon: int, max_samples: int,
    progress: bool = False,
) -> dict:
    """`mcx eval-text`: the gist evaluation on any text, as one dict (numbers, intervals as [lo, hi], and by
    peer name its NLL and whether the learned gists beat it)."""
    C, K = cfg.dataset.context_tokens, cfg.dataset.block_size
    ids = samples_from_text(text, lm.tokenizer, C + horizon, K, max_samples)
    rows = E.evaluate(
        lm, {"text": ([f"text/{i:04d}" for i in range(len(ids))], ids)}, conditions(cfg, lm, gister), [w_max],
        C, horizon, cfg.evaluation.batch_size, progress,
    )
    peers = list(cfg.evaluation.peers)
    rows += P.copied_rows(rows, peers, [w_max])
    (s,) = summarize(rows, peers)
    return {
        "nll_full": s["nll_full"],
        "nll_recency": s["nll_recency"],
        "nll_meanpool": s["nll_meanpool"],
        "nll_gist": s["nll_gist"],
        "delta_nll": s["delta_nll_gist_mean"],
        "delta_nll_ci": [s["delta_nll_gist_ci_lo"], s["delta_nll_gist_ci_hi"]],
        "delta_nll_p95": s["delta_nll_gist_p95"],
        "recovery": s["recovery_gist"],
        "recovery_ci": [s["recovery_gist_ci_lo"], s["recovery_gist_ci_hi"]],
        "beats_recency": s["gist_beats_recency"],
        "peers": {p: s[f"nll_{p}"] for p in peers},
        "beats_peers": {p: s[f"gist_beats_{p}"] for p in peers},
        "n_samples": s["n_samples"],
        "w_max": w_max,
        "horizon": horizon,
        "history_tokens": C,
    }


def run(cfg: MegaContextConfig, lm: BaseLM, gister, samples, out_dir: Path, checkpoint: str,
        sink: TelemetrySink | None = None, progress: bool = True, baseline_rows=None) -> dict:
    """Evaluate, write the Parquet rows and the report, log everything; return the result + paths."""
    import pyarrow.parquet as pq

    sink = sink or NullSink()
    result = evaluate_gists(cfg, lm, gister, samples, progress, baseline_rows)
    table_path = out_dir / "eval" / "gist_eval.parquet"
    probes = [r for r in result["probe_rows"] if r.condition != "full"]  # full rows are in result["rows"]
    write_atomic(table_path, lambda tmp: pq.write_table(E.rows_to_table(result["rows"] + probes), tmp))
    result["report"] = write_report(cfg, result, out_dir / "reports", checkpoint)
    result["table"] = table_path
    result["metrics"] = log_metrics(result, sink)
    for p in result["report"].values():
        sink.log_artifact(p, "reports")
    sink.log_artifact(table_path, "eval")
    return result


def run_gist_eval(cfg: MegaContextConfig, lm: BaseLM, checkpoint: Path, sink: TelemetrySink | None = None,
                  progress: bool = True, force: bool = False) -> dict:
    """ΔNLL@H of the checkpoint's gists vs full / recency / mean-pool, 1024× stress, boundary probes
    (the stored result when its inputs are unchanged, unless `force`)."""
    import pyarrow.parquet as pq


    paths = ArtifactPaths.from_config(cfg)
    fp = stage_fingerprint(
        cfg, ["dataset", "base_model", "working_context", "evaluation", "seed", "gistnet"],
        data.load_manifest(datasets_dir(cfg))["config_hash"], lm.model_id, checkpoints.checkpoint_id(checkpoint),
    )
    cached = load_stage(cfg, "gist_eval", fp, force)
    if cached is not None:
        (sink or NullSink()).log_metrics(cached["metrics"], step=0)
        for p in [*cached["report"].values(), cached["table"]]:
            (sink or NullSink()).log_artifact(p, "reports")
        return cached
    baseline = paths.eval / "baseline_eval.parquet"
    table = pq.read_table(baseline) if baseline.is_file() else None
    # Reuse the baseline scores only when the table has every column (older tables are rescored).
    baseline_rows = E.rows_from_table(table) if table is not None and "context_len" in table.column_names else None
    result = run(
        cfg, lm, load_gister(checkpoint, lm), data.load_eval_samples(cfg), paths.root, Path(checkpoint).name,
        sink, progress, baseline_rows,
    )
    log_eval_distribution(sink or NullSink(), result["table"], "gist_eval")
    keep = {k: result[k] for k in ("summary", "stress", "distance", "metrics", "report", "table", "seconds")}
    save_stage(cfg, "gist_eval", fp, keep, [result["table"], *result["report"].values()])
    return keep


def read_gist_eval(cfg: MegaContextConfig) -> dict:
    """The last gist evaluation's summary (`reports/gist_eval.json`)."""
    path = ArtifactPaths.from_config(cfg).reports / "gist_eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; materialize gist_eval_report first")
    return json.loads(path.read_text(encoding="utf-8"))
