"""The focus evaluation: held-out documents streamed through the runtime engine with the learned
LensNet (one JSONL trace per document), then the policies compared at the same W_max; its report."""

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
)
from mcx_core.compression.gistnet import load_gister
from mcx_core.config import MegaContextConfig
from mcx_core.eval.acceptance import runtime_gates
from mcx_core.focus import engine as runtime
from mcx_core.focus.lensnet import LensNetPolicy, load_lensnet
from mcx_core.focus.policies import standard_policies
from mcx_core.model.base import BaseLM
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import NullSink, OffsetSink, TelemetrySink
from mcx_core.telemetry.tables import log_focus_tables


def held_out_documents(cfg: MegaContextConfig, tokenizer, n: int, min_tokens: int,
                       split: str | None = None) -> list[tuple[str, np.ndarray]]:
    """Up to `n` whole documents of `split` (default: the evaluation split) with at least `min_tokens`
    tokens, taken in turn from each corpus (re-read from the sources the block dataset was built from)."""
    out = datasets_dir(cfg)
    manifest = data.load_manifest(out)
    per_corpus: dict[str, list[tuple[str, np.ndarray]]] = {}
    for corpus in sorted(manifest["corpora"]):
        if corpus not in cfg.dataset.corpora:
            continue
        table = data.load_split(out, corpus, split or cfg.evaluation.split)
        wanted = sorted(set(table.column("doc_id").to_pylist()))
        docs = [d for d in data.iter_documents(corpus, cfg.dataset.corpora[corpus], root=cfg.root) if d.doc_id in wanted]
        ids = data.tokenize_texts(tokenizer, [d.text for d in docs])
        per_corpus[corpus] = [(f"{corpus}/{d.doc_id}", x) for d, x in zip(docs, ids) if len(x) >= min_tokens]
    chosen: list[tuple[str, np.ndarray]] = []
    while len(chosen) < n and any(per_corpus.values()):
        for corpus in sorted(per_corpus):
            if per_corpus[corpus] and len(chosen) < n:
                chosen.append(per_corpus[corpus].pop(0))
    if not chosen:
        raise ValueError(
            f"no {split or cfg.evaluation.split} document has {min_tokens} tokens (runtime.prefill_tokens + "
            "runtime.steps × runtime.refocus_every + horizon); lower runtime.steps"
        )
    return chosen


def runtime_histories(cfg: MegaContextConfig, tokenizer, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`n` training histories in the runtime evaluation's setting — `runtime.prefill_tokens` tokens + the
    horizon, one seeded window of a training document each, corpora in turn — and their documents: what
    the delta tables label when `deltas.histories` is "runtime", so LensNet learns in the setting it is
    evaluated in. Documents are read in a seeded order and tokenized one at a time until `n` long
    enough ones are found (a document is reused when a corpus has fewer)."""
    need = cfg.runtime.prefill_tokens + cfg.dataset.horizon
    out = datasets_dir(cfg)
    rng = np.random.default_rng(seed)
    per_corpus: dict[str, list[tuple[str, np.ndarray]]] = {}
    corpora = [c for c in sorted(data.load_manifest(out)["corpora"]) if c in cfg.dataset.corpora]
    for corpus in corpora:
        wanted = set(data.load_split(out, corpus, "train").column("doc_id").to_pylist())
        docs = [d for d in data.iter_documents(corpus, cfg.dataset.corpora[corpus], root=cfg.root) if d.doc_id in wanted]
        found = []
        for i in rng.permutation(len(docs)):
            if len(docs[i].text) < need:  # fewer characters than tokens needed: cannot be long enough
                continue
            [ids] = data.tokenize_texts(tokenizer, [docs[i].text])
            if len(ids) >= need:
                found.append((f"{corpus}/{docs[i].doc_id}", ids))
            if len(found) >= -(-n // len(corpora)):
                break
        if found:
            per_corpus[corpus] = found
    if not per_corpus:
        raise ValueError(f"no training document has {need} tokens (runtime.prefill_tokens + horizon)")
    turns = [d for k in range(max(map(len, per_corpus.values()))) for c in sorted(per_corpus)
             for d in per_corpus[c][k % len(per_corpus[c]) : k % len(per_corpus[c]) + 1]]
    rows, names = [], []
    for k in range(n):
        name, ids = turns[k % len(turns)]
        start = int(rng.integers(0, len(ids) - need + 1))
        rows.append(np.asarray(ids[start : start + need], dtype=np.int64))
        names.append(name)
    return np.stack(rows), names


def run_runtime_eval(cfg: MegaContextConfig, lm: BaseLM, sink: TelemetrySink | None = None,
                     progress: bool = True, force: bool = False) -> dict:
    """The focus evaluation: stream held-out documents through the engine with the learned LensNet
    (per-step telemetry, one JSONL trace per document), then compare policies at the same W_max."""
    import torch


    sink = sink or NullSink()
    rc, R, H = cfg.runtime, cfg.runtime.refocus_every, cfg.dataset.horizon
    paths = ArtifactPaths.from_config(cfg)
    gist_ck, lens_ck = checkpoints.jt1_checkpoint(cfg), checkpoints.jt2_checkpoint(cfg)
    fp = stage_fingerprint(
        cfg, ["dataset", "base_model", "working_context", "allocator", "runtime", "evaluation", "seed"],
        data.load_manifest(datasets_dir(cfg))["config_hash"], lm.model_id, checkpoints.checkpoint_id(gist_ck), checkpoints.checkpoint_id(lens_ck),
    )
    cached = load_stage(cfg, "runtime_eval", fp, force)
    if cached is not None:
        sink.log_metrics({f"runtime_eval/{k}": v for k, v in cached["metrics"].items()}, step=cached["summary"]["steps"])
        for p in [*cached["report"].values(), *cached["traces"]]:
            sink.log_artifact(p, "runtime")
        return cached
    gister, lensnet = load_gister(gist_ck, lm), load_lensnet(lens_ck, lm.device)
    w_max = rc.w_max or cfg.working_context.w_max
    docs = held_out_documents(cfg, lm.tokenizer, rc.documents,
                              rc.prefill_tokens + max(rc.steps, rc.compare_steps) * R + H)
    t0 = time.perf_counter()
    trace_dir = paths.traces / "runtime_eval"
    records, residencies, traces, per_doc, runs = [], [], [], [], []
    for d, (name, ids) in enumerate(docs):
        res = runtime.run_engine(
            cfg, lm, gister, LensNetPolicy(lensnet, lm.embed), torch.as_tensor(ids), rc.steps, w_max,
            trace_dir / f"lensnet_doc{d}.jsonl", OffsetSink(sink, d * rc.steps), prefill=rc.prefill_tokens,
            progress=progress,
        )
        records += res.records
        residencies += res.residencies
        traces.append(res.trace_path)
        runs.append(res)
        per_doc.append({"document": name, **{k: v for k, v in res.summary.items()}})
    summary = runtime.summarize_run(records, residencies)
    log_focus_tables(sink, records, residencies)
    main = {
        "policy": "lensnet", "w_max": w_max, "documents": len(docs), "steps": len(records),
        "loss_at_h": summary[M.RUNTIME_LOSS_AT_H_MEAN], "swap_rate": summary[M.SWAP_RATE_MEAN],
        "mean_residency": summary[M.MEAN_RESIDENCY], "utilization": summary[M.UTILIZATION_MEAN],
        "utilization_max": summary[M.UTILIZATION_MAX], "overhead": summary[M.LATENCY_OVERHEAD],
        "latency_p50_ms": summary[M.LATENCY_P50], "latency_p99_ms": summary[M.LATENCY_P99],
        "causality_violations": int(summary[M.CAUSALITY_VIOLATIONS_TOTAL]),
        "expands": int(summary[M.NUM_EXPANDS]), "swaps": int(summary[M.NUM_SWAPS]),
        "age_out_collapses": int(summary[M.AGE_OUT_COLLAPSES]), "residency_samples": int(summary[M.RESIDENCY_SAMPLES]),
    }
    sink.log_metrics({f"runtime_eval/{k}": v for k, v in summary.items()}, step=len(records))
    comparison, paired, done = [], [], None
    if rc.compare_steps and rc.compare_policies:
        factories = standard_policies(lm, H, seed=cfg.seed, lensnet=lensnet, oracle="oracle" in rc.compare_policies)
        chosen = {k: factories[k] for k in rc.compare_policies if k in factories}
        # the evaluation's own LensNet runs are the comparison's when they cover the same steps
        done = {"lensnet": runs} if rc.compare_steps == rc.steps else None
        comparison = runtime.compare_policies(
            cfg, lm, gister, chosen, [torch.as_tensor(x) for _, x in docs], rc.compare_steps, w_max,
            paths.traces / "compare", sink, prefill=rc.prefill_tokens, progress=progress,
            measure_baseline=rc.compare_baseline_latency, done=done,
        )
        paired = runtime.paired_differences(comparison, "lensnet")
        for row in paired:
            sink.log_metrics({f"runtime_eval/lensnet_minus_{row['versus']}": row["difference"],
                              f"runtime_eval/lensnet_minus_{row['versus']}_ci_low": row["ci_low"],
                              f"runtime_eval/lensnet_minus_{row['versus']}_ci_high": row["ci_high"]})
        if paired and "gap_closed" in paired[0]:
            sink.log_metrics({"runtime_eval/lensnet_gap_closed": paired[0]["gap_closed"]})
    seconds = time.perf_counter() - t0
    report = write_runtime_report(cfg, main, per_doc, comparison, records, paths.reports, seconds,
                                  {"gistnet": gist_ck.name, "lensnet": lens_ck.name}, paired)
    result = {"summary": main, "per_document": per_doc, "comparison": comparison, "paired": paired,
              "report": report, "traces": traces, "seconds": seconds, "metrics": summary}
    artifacts.write_json(paths.reports / "runtime_eval.json",
                         {k: result[k] for k in ("summary", "per_document", "comparison", "paired", "seconds")})
    for p in [*report.values(), *traces]:
        sink.log_artifact(p, "runtime")
    reused = set(done or {})  # their traces are the evaluation's own, not compare/'s
    compared = [paths.traces / "compare" / f"{r['policy']}_doc{d}.jsonl" for r in comparison
                for d in range(len(docs)) if r["policy"] not in reused]
    save_stage(cfg, "runtime_eval", fp, result, [*report.values(), *traces, *compared],
               owns=[trace_dir, paths.traces / "compare"])
    return result

def write_runtime_report(cfg, main: dict, per_doc: list[dict], comparison: list[dict], records: list[dict],
                         out: Path, seconds: float, checkpoints: dict, paired: list[dict] | None = None) -> dict:

    steps = list(range(1, len(records) + 1))
    timeline = reports.line_plot(
        out / "runtime_eval_timeline.png", steps,
        {"utilization": [r[M.UTILIZATION] for r in records], "swap rate": [r[M.SWAP_RATE] for r in records]},
        xlabel="refocus step (documents back to back)", ylabel="fraction", title="Budget utilization and swap rate",
    )
    latency = reports.line_plot(
        out / "runtime_eval_latency.png", steps,
        {"MegaContext step": [r[M.LATENCY_MS] for r in records], "frozen base, same positions": [r[M.BASELINE_LATENCY_MS] for r in records]},
        xlabel="refocus step", ylabel="ms", title="Step latency vs the frozen base model",
    )
    plots = {"timeline": timeline, "latency": latency}
    gates = [g for group in runtime_gates(cfg, main).values() for g in group]
    sections = [
        f"# Runtime evaluation — config `{cfg.name}`",
        f"Checkpoints: GistNet `{checkpoints['gistnet']}`, LensNet `{checkpoints['lensnet']}`. {main['documents']} held-out "
        f"documents, {cfg.runtime.prefill_tokens} tokens prefilled, then {cfg.runtime.steps} refocus steps of "
        f"{cfg.runtime.refocus_every} tokens each at W_max = {main['w_max']}"
        + " — residency is SPEC §7's: steps a span stays at the level a deliberate allocator action put it in; "
        "blocks gisted as they age out of the recent window are counted apart (`age_out_collapses`)"
        + (" (the acceptance run is 1000 steps: `configs/gpu.yaml`)." if cfg.runtime.steps < 1000 else "."),
        "## Acceptance (SPEC §8)",
        "\n".join(f"- {'✅' if g.passed else '❌'} {g.message}" for g in gates),
        reports.markdown_table([main], list(main)),
        reports.markdown_table(per_doc, ["document", "steps", M.SWAP_RATE_MEAN, M.MEAN_RESIDENCY, M.UTILIZATION_MEAN,
                                         M.LATENCY_OVERHEAD, M.RUNTIME_LOSS_AT_H_MEAN]),
        f"![timeline]({timeline.name})", f"![latency]({latency.name})",
    ]
    if comparison:
        bar = reports.grouped_bar_plot(
            out / "runtime_eval_policies.png", [r["policy"] for r in comparison],
            {"Loss@H": [r["loss_at_h"] for r in comparison], "swap rate": [r["swap_rate"] for r in comparison]},
            ylabel="nats/token · fraction", title=f"Policies at W_max={main['w_max']}, {cfg.runtime.compare_steps} steps/document",
        )
        plots["policies"] = bar
        sections += [
            "## Policies compared (same documents, same W_max)",
            reports.markdown_table(comparison, ["policy", "steps", "loss_at_h", "swap_rate", "expands", "swaps",
                                                "mean_residency", "residency_samples", "age_out_collapses",
                                                "utilization", "utilization_max", "latency_p50_ms"]),
            f"![policies]({bar.name})",
        ]
        if paired:
            sections += [
                ("### LensNet minus each policy: Loss@H, paired over the same (document, step) samples, 95 % bootstrap "
                 "interval (\"beats\": the interval lies below 0; steps of one document are correlated, so read the "
                 f"interval with the {main['documents']} documents)"),
                reports.markdown_table(paired, ["versus", "difference", "ci_low", "ci_high", "beats", "samples"]
                                       + (["gap_closed"] if "gap_closed" in paired[0] else [])),
            ]
    sections.append(f"Wall time {seconds:.1f} s. Traces: `{cfg.artifacts_dir}/traces/` (DuckDB view `traces`).")
    md = artifacts.write_text(out / "runtime_eval.md", "\n\n".join(sections) + "\n")
    return {"markdown": md, **plots}

def read_runtime_eval(cfg: MegaContextConfig) -> dict:

    path = ArtifactPaths.from_config(cfg).reports / "runtime_eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; materialize runtime_eval first")
    return json.loads(path.read_text(encoding="utf-8"))
