"""One plain function per pipeline stage. Dagster assets and the CLI are thin wrappers around these,
so the same stage runs the same way from the UI, from `mcx materialize` and from a notebook."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcx_core import data, evaluation, reports
from mcx_core.config import MegaContextConfig, resolve_path
from mcx_core.model import BaseLM, load_base_model, load_tokenizer, tokenizer_id
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import NullSink, TelemetrySink

# A passage every run scores, so a base-model materialization carries one comparable number.
PROBE_PASSAGE = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die—to sleep,\n"
    "No more; and by a sleep to say we end\n"
    "The heart-ache and the thousand natural shocks\n"
    "That flesh is heir to: 'tis a consummation\n"
    "Devoutly to be wish'd."
)


@dataclass(frozen=True)
class ArtifactPaths:
    root: Path

    @classmethod
    def from_config(cls, cfg: MegaContextConfig) -> "ArtifactPaths":
        return cls(resolve_path(cfg.artifacts_dir))

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def deltas(self) -> Path:
        return self.root / "deltas"

    @property
    def traces(self) -> Path:
        return self.root / "traces"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def stage_fingerprint(cfg: MegaContextConfig, sections: list[str], *extra) -> str:
    """Identity of a stage's inputs: the config sections it reads plus anything else it depends on
    (dataset hash, checkpoint ids). Same fingerprint → the stored result is still the answer."""
    import hashlib
    import json

    dump = cfg.model_dump(mode="json")
    payload = {"sections": {k: dump.get(k) for k in sections}, "extra": [str(e) for e in extra]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


TRAINING_SECTIONS = ["seed", "dataset", "base_model", "gistnet", "lensnet", "lora", "deltas", "working_context",
                     "allocator", "training_loop"]


def training_loop_key(cfg: MegaContextConfig) -> str:
    """Identity of one alternating training loop (its MLflow parent run): the config name plus the
    fingerprint of every section the four phases read."""
    return f"{cfg.name}-{stage_fingerprint(cfg, TRAINING_SECTIONS)}"


def checkpoint_id(checkpoint: Path) -> str:
    """A checkpoint's name plus a hash of its trainer state (a retrained directory of the same name differs)."""
    import hashlib

    state = Path(checkpoint) / "trainer_state.json"
    return f"{Path(checkpoint).name}:{hashlib.sha256(state.read_bytes()).hexdigest()[:12]}"


def _stage_file(cfg: MegaContextConfig, name: str) -> Path:
    return ArtifactPaths.from_config(cfg).root / ".stages" / f"{name}.json"


def load_stage(cfg: MegaContextConfig, name: str, fingerprint: str) -> dict | None:
    """The stored result of stage `name` when its fingerprint matches and its files all exist; None
    otherwise, or when MCX_FORCE=1 (`mcx materialize --force`)."""
    import json
    import os

    path = _stage_file(cfg, name)
    if os.environ.get("MCX_FORCE") == "1" or not path.is_file():
        return None
    stored = json.loads(path.read_text(encoding="utf-8"))
    if stored.get("fingerprint") != fingerprint or not all(Path(f).exists() for f in stored["files"]):
        return None
    return {**stored["result"], "cached": True}


def save_stage(cfg: MegaContextConfig, name: str, fingerprint: str, result: dict, files: list) -> None:
    reports.write_json(
        _stage_file(cfg, name),
        {"fingerprint": fingerprint, "files": [str(f) for f in files], "result": _jsonable(result)},
    )


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def datasets_dir(cfg: MegaContextConfig) -> Path:
    return resolve_path(cfg.dataset.output_dir)


# ---------------------------------------------------------------------------------------------- stages


def build_datasets(cfg: MegaContextConfig, progress: bool = True) -> dict:
    tok = load_tokenizer(cfg.base_model, cfg.dataset)
    return data.build_block_datasets(cfg, tok, datasets_dir(cfg), progress=progress)


def check_dataset_determinism(cfg: MegaContextConfig, n: int = 4) -> list[str]:
    """Re-tokenize the source documents of sampled rows; problems where tokens differ."""
    tok = load_tokenizer(cfg.base_model, cfg.dataset)
    return data.verify_retokenization(cfg, tok, datasets_dir(cfg), n=n)


def check_dataset_boundaries(cfg: MegaContextConfig) -> list[str]:
    return data.verify_document_boundaries(datasets_dir(cfg))


def check_dataset_split_sizes(cfg: MegaContextConfig) -> list[str]:
    sizes = data.split_summary(data.load_manifest(datasets_dir(cfg)))
    minimum = cfg.acceptance.split_min_samples
    return [
        f"{corpus}/{split}: {splits.get(split, 0)} samples < minimum {minimum}"
        for corpus, splits in sizes.items()
        for split in ("train", "val", "test")
        if splits.get(split, 0) < minimum
    ]


def prepare_base_model(cfg: MegaContextConfig) -> tuple[BaseLM, dict]:
    """Load (converting once if needed) and describe the frozen base model."""
    t0 = time.perf_counter()
    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed)
    load_s = time.perf_counter() - t0
    ids = lm.tokenizer(PROBE_PASSAGE, return_tensors="pt", add_special_tokens=False).input_ids.to(lm.device)
    import torch

    with torch.no_grad():
        probe_nll = float(lm.model(ids, labels=ids).loss)
    frozen = all(not p.requires_grad for p in lm.model.parameters()) and not lm.model.training
    info = {
        "model_id": lm.model_id,
        "parameters": lm.num_parameters,
        "d_model": lm.d_model,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "tokenizer": tokenizer_id(lm.tokenizer),
        "load_seconds": load_s,
        "probe_nll": probe_nll,
        "frozen": frozen,
    }
    return lm, info


def load_eval_samples(cfg: MegaContextConfig, limit: int | None = None) -> dict[str, tuple[list[str], np.ndarray]]:
    out = datasets_dir(cfg)
    manifest = data.load_manifest(out)
    limit = limit or cfg.evaluation.samples_per_dataset
    result = {}
    for corpus in manifest["corpora"]:
        table = data.load_split(out, corpus, cfg.evaluation.split)
        ids = data.load_samples(out, corpus, cfg.evaluation.split, limit=limit)
        result[corpus] = (table.column("sample_id").to_pylist()[: len(ids)], ids)
    return result


def run_baseline_eval(cfg: MegaContextConfig, lm: BaseLM, sink: TelemetrySink | None = None, progress=True) -> dict:
    """ΔNLL@H of recency and untrained mean-pool gists against the full history, per dataset × W_max."""
    sink = sink or NullSink()
    paths = ArtifactPaths.from_config(cfg)
    wc = cfg.working_context
    fp = stage_fingerprint(
        cfg, ["dataset", "base_model", "working_context", "evaluation", "seed"],
        data.load_manifest(datasets_dir(cfg))["config_hash"], lm.model_id,
    )
    cached = load_stage(cfg, "baseline_eval", fp)
    if cached is not None:
        _log_baseline(sink, cached["summary"], cached["seconds"], cached["rows"], cached["report"].values(), cached["table"])
        return cached
    samples = load_eval_samples(cfg)
    conditions = {
        "full": evaluation.full_condition(lm),
        "recency": evaluation.recency_condition(lm, wc.sink_tokens, wc.position_scheme),
        "meanpool": evaluation.working_context_condition(
            lm, evaluation.MeanPoolGister(), cfg.dataset.block_size, wc.recent_tokens, wc.position_scheme
        ),
    }
    t0 = time.perf_counter()
    rows = evaluation.evaluate(
        lm, samples, conditions, wc.eval_w_max, cfg.dataset.context_tokens, cfg.dataset.horizon,
        batch_size=cfg.evaluation.batch_size, progress=progress,
    )
    seconds = time.perf_counter() - t0
    summary = evaluation.summarize(rows, methods=["meanpool"])

    import pyarrow.parquet as pq

    table_path = paths.eval / "baseline_eval.parquet"
    data.write_atomic(table_path, lambda tmp: pq.write_table(evaluation.rows_to_table(rows), tmp))

    report = write_baseline_report(cfg, summary, paths.reports, seconds, len(rows))
    _log_baseline(sink, summary, seconds, len(rows), report.values(), table_path)
    log_eval_distribution(sink, table_path, "baseline_eval")
    result = {"summary": summary, "report": report, "table": table_path, "seconds": seconds, "rows": len(rows)}
    save_stage(cfg, "baseline_eval", fp, result, [table_path, *report.values()])
    return result


def _log_baseline(sink: TelemetrySink, summary, seconds, n_rows, report_files, table_path) -> None:
    for s in summary:
        tag = f"{s['dataset']}/w{s['w_max']}"
        sink.log_metrics({f"eval/{tag}/{k}": v for k, v in s.items() if isinstance(v, float)}, step=0)
    sink.log_metrics({"eval/seconds": seconds, "eval/seconds_per_sample": seconds / max(1, n_rows)}, step=0)
    for p in report_files:
        sink.log_artifact(p, "reports")
    sink.log_artifact(table_path, "eval")


def write_baseline_report(cfg: MegaContextConfig, summary: list[dict], out: Path, seconds: float, n_rows: int):
    groups = [f"{s['dataset']} W={s['w_max']}" for s in summary]
    plot = reports.grouped_bar_plot(
        out / "baseline_eval.png",
        groups,
        {
            "recency": [s["delta_nll_recency_mean"] for s in summary],
            "mean-pool gists": [s["delta_nll_meanpool_mean"] for s in summary],
        },
        ylabel=f"ΔNLL@{cfg.dataset.horizon} (nats/token)",
        title=f"Baselines vs full {cfg.dataset.context_tokens}-token history ({cfg.name})",
        hline=cfg.acceptance.delta_nll_max,
        hline_label=f"acceptance ≤ {cfg.acceptance.delta_nll_max}",
    )
    cols = [
        "dataset", "w_max", "n_samples", "nll_full", "nll_recency", "nll_meanpool",
        "delta_nll_recency_mean", "delta_nll_recency_p95", "delta_nll_meanpool_mean", "delta_nll_meanpool_p95",
        "recovery_meanpool",
    ]
    md = "\n\n".join(
        [
            f"# Baseline ΔNLL@{cfg.dataset.horizon} — config `{cfg.name}`",
            f"Base model `{cfg.base_model.name}` ({cfg.base_model.source}); histories of "
            f"{cfg.dataset.context_tokens} tokens, horizon H = {cfg.dataset.horizon}, block {cfg.dataset.block_size}; "
            f"held-out split `{cfg.evaluation.split}`. ΔNLL = NLL(condition) − NLL(full history), nats per horizon "
            f"token; recovery = share of the recency gap won back (negative: worse than dropping history).",
            reports.markdown_table(summary, cols),
            "![ΔNLL by condition](baseline_eval.png)",
            f"{n_rows} scored (sample, condition, W_max) rows in {seconds:.1f} s. "
            "Per-token NLLs: `artifacts/eval/baseline_eval.parquet`.",
        ]
    )
    md_path = reports.atomic_write_text(out / "baseline_eval.md", md + "\n")
    json_path = reports.write_json(out / "baseline_eval.json", summary)
    return {"markdown": md_path, "plot": plot, "json": json_path}


# ---------------------------------------------------------------------------------------------- compression


def train_ids(cfg: MegaContextConfig) -> np.ndarray:
    """Every corpus's train split, stacked: [N, context_tokens + horizon]."""
    out = datasets_dir(cfg)
    manifest = data.load_manifest(out)
    return np.concatenate([data.load_samples(out, corpus, "train") for corpus in sorted(manifest["corpora"])])


def train_gistnet(cfg: MegaContextConfig, lm: BaseLM, sink: TelemetrySink | None = None, cycle: int = 0,
                  resume: bool = True, init_from: Path | None = None, progress: bool = True):
    """JT1: train GistNet on the train splits; returns the trainer's `JT1Result`."""
    from mcx_core.training.jt1 import train_jt1

    return train_jt1(
        cfg, lm, train_ids(cfg), ArtifactPaths.from_config(cfg).checkpoints, sink or NullSink(),
        cycle=cycle, resume=resume, progress=progress, init_from=init_from,
    )


def probe_blocks(cfg: MegaContextConfig, lm: BaseLM, n: int = 16):
    """Fixed probe blocks for gist drift: the first `n` blocks of each corpus's val split, embedded."""
    import torch

    out = datasets_dir(cfg)
    K = cfg.dataset.block_size
    blocks = []
    for corpus in sorted(data.load_manifest(out)["corpora"]):
        ids = data.load_samples(out, corpus, "val", limit=1)[0, : min(n, cfg.dataset.context_tokens // K) * K]
        blocks.append(torch.as_tensor(ids).view(-1, K))
    with torch.no_grad():
        return lm.embed(torch.cat(blocks)).float()  # [n_blocks, K, d]


def previous_checkpoint(cfg: MegaContextConfig, current: Path, phase: int = 1) -> Path | None:
    """The newest complete JT{phase} checkpoint other than `current` (for drift)."""
    from mcx_core.training import common

    done = [
        p for p in ArtifactPaths.from_config(cfg).checkpoints.glob(f"JT{phase}_cycle*_step*")
        if (p / common.TRAINER_STATE_FILE).is_file() and p.resolve() != Path(current).resolve()
    ]
    return max(done, key=lambda p: p.stat().st_mtime, default=None)


def gist_drift(cfg: MegaContextConfig, lm: BaseLM, current: Path) -> tuple[float | None, Path | None]:
    from mcx_core.training.jt1 import gist_drift as drift
    from mcx_core.training.jt1 import load_gister

    prev = previous_checkpoint(cfg, current)
    if prev is None:
        return None, None
    probes = probe_blocks(cfg, lm)
    return drift(load_gister(prev, lm), load_gister(current, lm), probes), prev


def run_gist_eval(cfg: MegaContextConfig, lm: BaseLM, checkpoint: Path, sink: TelemetrySink | None = None,
                  progress: bool = True) -> dict:
    """ΔNLL@H of the checkpoint's gists vs full / recency / mean-pool, 1024× stress, boundary probes."""
    import pyarrow.parquet as pq

    from mcx_core import gist_eval
    from mcx_core.training.jt1 import load_gister

    paths = ArtifactPaths.from_config(cfg)
    fp = stage_fingerprint(
        cfg, ["dataset", "base_model", "working_context", "evaluation", "seed", "gistnet"],
        data.load_manifest(datasets_dir(cfg))["config_hash"], lm.model_id, checkpoint_id(checkpoint),
    )
    cached = load_stage(cfg, "gist_eval", fp)
    if cached is not None:
        (sink or NullSink()).log_metrics(cached["metrics"], step=0)
        for p in [*cached["report"].values(), cached["table"]]:
            (sink or NullSink()).log_artifact(p, "reports")
        return cached
    baseline = paths.eval / "baseline_eval.parquet"
    table = pq.read_table(baseline) if baseline.is_file() else None
    # Reuse the baseline scores only when the table has every column (older tables are rescored).
    baseline_rows = evaluation.rows_from_table(table) if table is not None and "context_len" in table.column_names else None
    result = gist_eval.run(
        cfg, lm, load_gister(checkpoint, lm), load_eval_samples(cfg), paths.root, Path(checkpoint).name,
        sink, progress, baseline_rows,
    )
    log_eval_distribution(sink or NullSink(), result["table"], "gist_eval")
    keep = {k: result[k] for k in ("summary", "stress", "distance", "metrics", "report", "table", "seconds")}
    save_stage(cfg, "gist_eval", fp, keep, [result["table"], *result["report"].values()])
    return keep


def final_cycle(cfg: MegaContextConfig) -> int:
    """The cycle whose checkpoints the evaluations, the gate and the sweep read: the last of `n_cycles`."""
    return cfg.training_loop.n_cycles - 1


def jt_checkpoint(cfg: MegaContextConfig, phase: int, cycle: int | None = None) -> Path:
    """The newest complete JT{phase} checkpoint of `cycle` (default: the final cycle), or
    FileNotFoundError naming where it looked."""
    from mcx_core.training.common import latest_checkpoint

    cycle = final_cycle(cfg) if cycle is None else cycle
    where = ArtifactPaths.from_config(cfg).checkpoints
    found = latest_checkpoint(where, phase, cycle)
    if found is None:
        what = {1: "train GistNet", 2: "train LensNet", 3: "train LoRA"}[phase]
        raise FileNotFoundError(f"no complete JT{phase}_cycle{cycle}_step* checkpoint under {where}; {what} first")
    return found


def jt1_checkpoint(cfg: MegaContextConfig, cycle: int | None = None) -> Path:
    return jt_checkpoint(cfg, 1, cycle)


def check_training_finite(checkpoint: Path) -> tuple[list[str], dict[str, float]]:
    """Problems with a JT checkpoint's logged training history: non-finite values, phases stopped on NaN."""
    import math

    from mcx_core.training import common

    state = common.read_json(Path(checkpoint) / common.TRAINER_STATE_FILE)
    history = state["run"]["history"]
    problems = [f"phase {i} stopped on a non-finite loss/gradient" for i in state["run"].get("nan_phases", [])]
    if not state.get("nan_free", True) and not problems:
        problems.append("the trainer stopped on a non-finite loss/gradient")
    undefined = 0
    for h in history:
        bad = [k for k, v in h.items() if isinstance(v, float) and not math.isfinite(v)]
        undefined += sum(k in M.UNDEFINED_WHEN_EMPTY for k in bad)
        bad = [k for k in bad if k not in M.UNDEFINED_WHEN_EMPTY]
        if bad:
            problems.append(f"step {int(h['step'])}: non-finite {', '.join(sorted(bad))}")
    step = state.get("global_step", state.get("step", 0))
    return problems, {"logged_steps": float(len(history)), "global_step": float(step),
                      "undefined_statistics": float(undefined)}


def read_gist_eval(cfg: MegaContextConfig) -> dict:
    """The last gist evaluation's summary (`reports/gist_eval.json`)."""
    import json

    path = ArtifactPaths.from_config(cfg).reports / "gist_eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; materialize gist_eval_report first")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- focus


def generate_deltas(cfg: MegaContextConfig, lm: BaseLM, sink: TelemetrySink | None = None, cycle: int = 0,
                    progress: bool = True) -> tuple[Path, dict[str, float], Path]:
    """On-policy counterfactual labels from the newest JT1 checkpoint: (table, stats, checkpoint)."""
    from mcx_core import deltas
    from mcx_core.training import distributed
    from mcx_core.training.jt1 import load_gister

    ck = jt1_checkpoint(cfg, cycle)
    fp = stage_fingerprint(
        cfg, ["dataset", "base_model", "working_context", "deltas", "seed"],
        data.load_manifest(datasets_dir(cfg))["config_hash"], lm.model_id, checkpoint_id(ck), cycle,
    )
    # Several processes (accelerate launch): rank 0 labels and writes the table; the others then find its stage.
    with distributed.main_process_first():
        cached = load_stage(cfg, f"deltas_cycle{cycle}", fp)
        if cached is not None:
            (sink or NullSink()).log_metrics(cached["stats"], step=0)
            log_delta_tables(sink or NullSink(), Path(cached["path"]))
            return Path(cached["path"]), cached["stats"], ck
        path, stats = deltas.generate_delta_table(
            cfg, lm, load_gister(ck, lm), ck, train_ids(cfg), ArtifactPaths.from_config(cfg).deltas,
            sink or NullSink(), progress, cycle=cycle,
        )
        save_stage(cfg, f"deltas_cycle{cycle}", fp, {"path": path, "stats": stats}, [path, deltas.contexts_path(path)])
        log_delta_tables(sink or NullSink(), path)
        return path, stats, ck


def delta_table(cfg: MegaContextConfig, cycle: int | None = None) -> Path:
    """The delta table labelled by the newest JT1 checkpoint of `cycle` (default: the final cycle)."""
    from mcx_core import deltas

    cycle = final_cycle(cfg) if cycle is None else cycle
    path = deltas.delta_table_path(ArtifactPaths.from_config(cfg).deltas, cycle, jt1_checkpoint(cfg, cycle))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; materialize delta_table first")
    return path


def train_lensnet(cfg: MegaContextConfig, lm: BaseLM, sink: TelemetrySink | None = None, cycle: int = 0,
                  resume: bool = True, progress: bool = True, init_from: Path | None = None):
    """JT2: train LensNet on the delta table of the current GistNet; returns the trainer's `JT2Result`."""
    from mcx_core.training.jt1 import load_gister
    from mcx_core.training.jt2 import train_jt2

    ck = jt1_checkpoint(cfg, cycle)
    return train_jt2(
        cfg, lm, load_gister(ck, lm), [delta_table(cfg, cycle)], ArtifactPaths.from_config(cfg).checkpoints,
        sink or NullSink(), cycle=cycle, resume=resume, progress=progress, init_from=init_from, gistnet_checkpoint=ck,
    )


def jt2_checkpoint(cfg: MegaContextConfig, cycle: int | None = None) -> Path:
    return jt_checkpoint(cfg, 2, cycle)


def held_out_documents(cfg: MegaContextConfig, tokenizer, n: int, min_tokens: int) -> list[tuple[str, np.ndarray]]:
    """Up to `n` whole documents of the evaluation split with at least `min_tokens` tokens, taken in
    turn from each corpus (re-read from the sources the block dataset was built from)."""
    out = datasets_dir(cfg)
    manifest = data.load_manifest(out)
    per_corpus: dict[str, list[tuple[str, np.ndarray]]] = {}
    for corpus in sorted(manifest["corpora"]):
        if corpus not in cfg.dataset.corpora:
            continue
        table = data.load_split(out, corpus, cfg.evaluation.split)
        wanted = sorted(set(table.column("doc_id").to_pylist()))
        docs = [d for d in data.iter_documents(corpus, cfg.dataset.corpora[corpus]) if d.doc_id in wanted]
        ids = data.tokenize_texts(tokenizer, [d.text for d in docs])
        per_corpus[corpus] = [(f"{corpus}/{d.doc_id}", x) for d, x in zip(docs, ids) if len(x) >= min_tokens]
    chosen: list[tuple[str, np.ndarray]] = []
    while len(chosen) < n and any(per_corpus.values()):
        for corpus in sorted(per_corpus):
            if per_corpus[corpus] and len(chosen) < n:
                chosen.append(per_corpus[corpus].pop(0))
    if not chosen:
        raise ValueError(
            f"no {cfg.evaluation.split} document has {min_tokens} tokens (runtime.prefill_tokens + "
            "runtime.steps × runtime.refocus_every + horizon); lower runtime.steps"
        )
    return chosen


def run_runtime_eval(cfg: MegaContextConfig, lm: BaseLM, sink: TelemetrySink | None = None,
                     progress: bool = True) -> dict:
    """The focus evaluation: stream held-out documents through the engine with the learned LensNet
    (per-step telemetry, one JSONL trace per document), then compare policies at the same W_max."""
    import torch

    from mcx_core import runtime
    from mcx_core.lensnet import LensNetPolicy
    from mcx_core.telemetry.sinks import OffsetSink
    from mcx_core.training.jt1 import load_gister
    from mcx_core.training.jt2 import load_lensnet

    sink = sink or NullSink()
    rc, R, H = cfg.runtime, cfg.runtime.refocus_every, cfg.dataset.horizon
    paths = ArtifactPaths.from_config(cfg)
    gist_ck, lens_ck = jt1_checkpoint(cfg), jt2_checkpoint(cfg)
    fp = stage_fingerprint(
        cfg, ["dataset", "base_model", "working_context", "allocator", "runtime", "evaluation", "seed"],
        data.load_manifest(datasets_dir(cfg))["config_hash"], lm.model_id, checkpoint_id(gist_ck), checkpoint_id(lens_ck),
    )
    cached = load_stage(cfg, "runtime_eval", fp)
    if cached is not None:
        sink.log_metrics({f"runtime_eval/{k}": v for k, v in cached["metrics"].items()}, step=cached["summary"]["steps"])
        for p in [*cached["report"].values(), *cached["traces"]]:
            sink.log_artifact(p, "runtime")
        return cached
    gister, lensnet = load_gister(gist_ck, lm), load_lensnet(lens_ck, lm.device)
    docs = held_out_documents(cfg, lm.tokenizer, rc.documents, rc.prefill_tokens + rc.steps * R + H)
    t0 = time.perf_counter()
    trace_dir = paths.traces / "runtime_eval"
    records, residencies, traces, per_doc = [], [], [], []
    for d, (name, ids) in enumerate(docs):
        res = runtime.run_engine(
            cfg, lm, gister, LensNetPolicy(lensnet, lm.embed), torch.as_tensor(ids), rc.steps, None,
            trace_dir / f"lensnet_doc{d}.jsonl", OffsetSink(sink, d * rc.steps), prefill=rc.prefill_tokens,
            progress=progress,
        )
        records += res.records
        residencies += res.residencies
        traces.append(res.trace_path)
        per_doc.append({"document": name, **{k: v for k, v in res.summary.items()}})
    summary = runtime.summarize_run(records, residencies)
    _log_focus_tables(sink, records, residencies)
    main = {
        "policy": "lensnet", "w_max": cfg.working_context.w_max, "documents": len(docs), "steps": len(records),
        "loss_at_h": summary[M.RUNTIME_LOSS_AT_H_MEAN], "swap_rate": summary[M.SWAP_RATE_MEAN],
        "mean_residency": summary[M.MEAN_RESIDENCY], "utilization": summary[M.UTILIZATION_MEAN],
        "utilization_max": summary[M.UTILIZATION_MAX], "overhead": summary[M.LATENCY_OVERHEAD],
        "latency_p50_ms": summary[M.LATENCY_P50], "latency_p99_ms": summary[M.LATENCY_P99],
        "causality_violations": int(summary[M.CAUSALITY_VIOLATIONS_TOTAL]),
    }
    sink.log_metrics({f"runtime_eval/{k}": v for k, v in summary.items()}, step=len(records))
    comparison = []
    if rc.compare_steps and rc.compare_policies:
        factories = runtime.standard_policies(lm, H, seed=cfg.seed, lensnet=lensnet, oracle="oracle" in rc.compare_policies)
        chosen = {k: factories[k] for k in rc.compare_policies if k in factories}
        comparison = runtime.compare_policies(
            cfg, lm, gister, chosen, [torch.as_tensor(x) for _, x in docs], rc.compare_steps, None,
            paths.traces / "compare", sink, prefill=rc.prefill_tokens, progress=progress,
        )
    seconds = time.perf_counter() - t0
    report = write_runtime_report(cfg, main, per_doc, comparison, records, paths.reports, seconds,
                                  {"gistnet": gist_ck.name, "lensnet": lens_ck.name})
    result = {"summary": main, "per_document": per_doc, "comparison": comparison, "report": report,
              "traces": traces, "seconds": seconds, "metrics": summary}
    reports.write_json(paths.reports / "runtime_eval.json", {k: result[k] for k in ("summary", "per_document", "comparison", "seconds")})
    for p in [*report.values(), *traces]:
        sink.log_artifact(p, "runtime")
    save_stage(cfg, "runtime_eval", fp, result, [*report.values(), *traces])
    return result


def write_runtime_report(cfg, main: dict, per_doc: list[dict], comparison: list[dict], records: list[dict],
                         out: Path, seconds: float, checkpoints: dict) -> dict:
    from mcx_core.acceptance import runtime_gates

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
            reports.markdown_table(comparison, ["policy", "steps", "loss_at_h", "swap_rate", "mean_residency",
                                                "utilization", "utilization_max", "overhead", "latency_p50_ms"]),
            f"![policies]({bar.name})",
        ]
    sections.append(f"Wall time {seconds:.1f} s. Traces: `{cfg.artifacts_dir}/traces/` (DuckDB view `traces`).")
    md = reports.atomic_write_text(out / "runtime_eval.md", "\n\n".join(sections) + "\n")
    return {"markdown": md, **plots}


def read_runtime_eval(cfg: MegaContextConfig) -> dict:
    import json

    path = ArtifactPaths.from_config(cfg).reports / "runtime_eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; materialize runtime_eval first")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- JT3 + gate


def train_lora(cfg: MegaContextConfig, lm: BaseLM, sink: TelemetrySink | None = None, cycle: int = 0,
               resume: bool = True, progress: bool = True, init_from: Path | None = None):
    """JT3: LoRA adapters on the base model, trained on Loss@H with working contexts chosen by the
    current LensNet + allocator (GistNet, LensNet frozen); returns the trainer's `JT3Result`."""
    from mcx_core.training.jt1 import load_gister
    from mcx_core.training.jt2 import load_lensnet
    from mcx_core.training.jt3 import train_jt3

    gist_ck, lens_ck = jt1_checkpoint(cfg, cycle), jt2_checkpoint(cfg, cycle)
    return train_jt3(
        cfg, lm, load_gister(gist_ck, lm), load_lensnet(lens_ck, lm.device), train_ids(cfg),
        ArtifactPaths.from_config(cfg).checkpoints, sink or NullSink(), cycle=cycle, resume=resume, progress=progress,
        init_from=init_from,
    )


def evaluate_lora(cfg: MegaContextConfig, lm: BaseLM, checkpoint: Path, sink: TelemetrySink | None = None,
                  per_dataset: int = 4, cycle: int | None = None) -> dict[str, float]:
    """Held-out Loss@H with and without the JT3 adapter (same LensNet-chosen contexts), per dataset,
    with `cycle`'s GistNet and LensNet (default: the final cycle's)."""
    from mcx_core.training import jt3
    from mcx_core.training.jt1 import load_gister
    from mcx_core.training.jt2 import load_lensnet

    gister, lensnet = load_gister(jt1_checkpoint(cfg, cycle), lm), load_lensnet(jt2_checkpoint(cfg, cycle), lm.device)
    out: dict[str, float] = {}
    for ds, (_, ids) in load_eval_samples(cfg).items():
        for k, v in jt3.evaluate_lora(cfg, lm, gister, lensnet, checkpoint, ids[:per_dataset]).items():
            out[f"eval/{ds}/lora/{k.split('/')[-1]}"] = float(v)
    (sink or NullSink()).log_metrics(out, step=0)
    return out


def jt3_checkpoint(cfg: MegaContextConfig, cycle: int | None = None) -> Path:
    return jt_checkpoint(cfg, 3, cycle)


def acceptance_evidence(cfg: MegaContextConfig) -> dict:
    """Every SPEC §8 criterion as a gate, from the stored evaluations and training states."""
    from mcx_core import acceptance
    from mcx_core.training import common

    gist = read_gist_eval(cfg)
    gates = acceptance.gist_delta_nll_gates(cfg, gist["summary"]) + acceptance.stress_gates(cfg, gist["stress"])
    for group in acceptance.runtime_gates(cfg, read_runtime_eval(cfg)["summary"]).values():
        gates += group
    jt1 = jt1_checkpoint(cfg)
    state = common.read_json(jt1 / common.TRAINER_STATE_FILE)
    problems, _ = check_training_finite(jt1)
    finite_steps = float(state["global_step"]) if not problems else 0.0
    gates.append(acceptance.at_least("nan_free_steps", "JT1 steps without NaN/inf", finite_steps, cfg.acceptance.nan_free_steps))
    return {
        "gates": [g.to_dict() for g in gates],
        "passed": all(g.passed for g in gates),
        "cycle": final_cycle(cfg),
        "checkpoints": {"gistnet": str(jt1), "lensnet": str(jt2_checkpoint(cfg)), "lora": str(jt3_checkpoint(cfg))},
        "summary": acceptance.summarize(gates),
    }


def promote_champion(cfg: MegaContextConfig, evidence: dict) -> Path:
    """Mark the checkpoint set that passed the gate: `artifacts/champion.json` (atomic)."""
    import datetime

    path = ArtifactPaths.from_config(cfg).root / "champion.json"
    reports.write_json(path, {"promoted_at": datetime.datetime.now(datetime.UTC).isoformat(), **evidence})
    return path


TABLE_ROWS_MAX = 2000  # rows per MLflow table (a sample: the full data is in the Parquet/JSONL artifacts)


def columns(rows: list[dict]) -> dict[str, list]:
    """Row dicts -> the column dict `log_table` takes (keys of the first row)."""
    return {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}


def _log_focus_tables(sink: TelemetrySink, records: list[dict], residencies: list[int]) -> None:
    """Focus actions and the residency distribution as MLflow tables."""
    from mcx_core import runtime

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

    rows = evaluation.rows_from_table(pq.read_table(table_path))
    full = {(r.dataset, r.sample_id): r.nll for r in rows if r.condition == "full"}
    out = [
        {"dataset": r.dataset, "w_max": r.w_max, "condition": r.condition, "sample_id": r.sample_id,
         "delta_nll": r.nll - full[(r.dataset, r.sample_id)]}
        for r in rows if r.condition != "full" and (r.dataset, r.sample_id) in full
    ][:TABLE_ROWS_MAX]
    if out:
        sink.log_table(columns(out), f"eval/{name}_delta_nll_samples.json")
