"""`mcx ablate`: train each JT1 variant for the same wall-clock budget and score it on the validation
split, one table — which lever moves ΔNLL@H and by how much, with paired intervals.

An ablation file (YAML):

    base: configs/default.yaml        # every variant starts from this config
    budget_seconds: 240               # JT1 training seconds per variant, all phases (teacher pass excluded)
    common: {gistnet.training.sample_pool: 24}   # overrides every variant starts from
    eval_samples: 16                  # validation samples per corpus
    w_max: 128                        # default: the base config's working_context.w_max
    variants:                         # name -> dotted overrides of the base config
      recipe: {}
      no_sink: {working_context.sink_tokens: 0}
      k4: {gistnet.model.input_layers: 4}

Each variant trains from scratch into `artifacts/ablation/<ablation>/<variant>/` (resumable: a finished
variant is read back, not retrained), then full history, recency and its gists are scored with the same
`horizon_nll` on the same validation samples. Defaults are chosen from this table — never from the test
split. Variants may change anything but the dataset (they share the block datasets and teacher shards).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mcx_core import artifacts, data, reports
from mcx_core.config import MegaContextConfig, load_config
from mcx_core.eval import nll as E

FORBIDDEN_PREFIXES = ("dataset.", "base_model.", "artifacts_dir")


class AblationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str
    budget_seconds: float = Field(gt=0)
    eval_samples: int = Field(default=16, gt=0)
    w_max: int | None = Field(default=None, gt=0)
    common: dict[str, Any] = Field(default_factory=dict, description="overrides every variant starts from")
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    phases_: dict[str, Any] | None = Field(default=None, alias="_phases", description="YAML anchors only")


def load_spec(path: str | Path) -> AblationSpec:
    import yaml
    from pydantic import ValidationError

    from mcx_core.config import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), [f"<file>: ablation file not found: {p.resolve()}"])
    try:
        spec = AblationSpec(**(yaml.safe_load(p.read_text(encoding="utf-8")) or {}))
    except yaml.YAMLError as err:
        raise ConfigError(str(p), [f"<yaml>: not valid YAML: {err}"]) from None
    except ValidationError as err:
        raise ConfigError(str(p), [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]) from None
    bad = [f"variants.{v}.{k}" for v, o in spec.variants.items() for k in o if k.startswith(FORBIDDEN_PREFIXES)]
    bad += [f"common.{k}" for k in spec.common if k.startswith(FORBIDDEN_PREFIXES)]
    if bad:
        raise ConfigError(str(p), [f"{b}: variants share the datasets and base model; this key cannot vary" for b in bad])
    return spec


def variant_config(spec: AblationSpec, name: str, root: Path) -> MegaContextConfig:
    """The base config with the variant's overrides, the shared budget and its own checkpoint directory."""
    overrides = {**spec.common, **spec.variants[name], "gistnet.training.max_seconds": spec.budget_seconds,
                 "evaluation.split": "val"}
    return load_config(Path(root) / spec.base, root, overrides)


def run_ablation(spec_path: str | Path, root: Path, progress: bool = True, only: list[str] | None = None) -> dict:
    """Train and score every variant (or those in `only`); returns {rows, markdown, json}."""
    from mcx_core.compression.gistnet import load_gister
    from mcx_core.model.base import load_base_model
    from mcx_core.telemetry.sinks import NullSink
    from mcx_core.training.gistnet import train_gistnet

    spec = load_spec(spec_path)
    ablation = Path(spec_path).stem
    names = [n for n in spec.variants if not only or n in only]
    base_cfg = variant_config(spec, names[0], root)
    out_dir = artifacts.ArtifactPaths.from_config(base_cfg).root / "ablation" / ablation
    lm = load_base_model(base_cfg.base_model, base_cfg.dataset, seed=base_cfg.seed, root=base_cfg.root)
    train = data.train_ids(base_cfg)
    samples = data.load_eval_samples(base_cfg, limit=spec.eval_samples)
    w = spec.w_max or base_cfg.working_context.w_max
    C, H, K = base_cfg.dataset.context_tokens, base_cfg.dataset.horizon, base_cfg.dataset.block_size
    reference: dict[tuple, list[E.EvalRow]] = {}  # full + recency rows, per sink/position setting
    rows_path = out_dir / "ablation.json"
    previous = artifacts.read_json(rows_path) if rows_path.is_file() else []
    rows_out = [r for r in previous if r["variant"] in spec.variants and r["variant"] not in names]  # --only keeps the rest
    for name in names:
        cfg = variant_config(spec, name, root)
        wc = cfg.working_context
        ident = artifacts.stage_fingerprint(cfg, ["gistnet", "working_context", "seed"])  # a changed variant retrains
        result = train_gistnet(cfg, lm, train, out_dir / name / ident, NullSink(), progress=progress,
                               teacher_root=artifacts.ArtifactPaths.from_config(cfg).root / "teacher")
        gister = load_gister(result.checkpoint, lm)
        key = (wc.sink_tokens, wc.position_scheme)
        if key not in reference:
            reference[key] = E.evaluate(
                lm, samples, {"full": E.full_condition(lm), "recency": E.recency_condition(lm, *key)}, [w], C, H,
                cfg.evaluation.batch_size, progress,
            )
        t0 = time.perf_counter()
        gist_rows = E.evaluate(
            lm, samples, {"gist": E.working_context_condition(lm, gister, K, wc.recent_tokens, wc.position_scheme,
                                                              wc.sink_tokens)},
            [w], C, H, cfg.evaluation.batch_size, progress,
        )
        for s in E.summarize(reference[key] + gist_rows, methods=["gist"]):
            by_sample = {r.sample_id: r.nll for r in gist_rows if r.dataset == s["dataset"]}
            rows_out.append({
                "gist_nll_by_sample": by_sample,
                "variant": name, "dataset": s["dataset"], "w_max": w, "n_samples": s["n_samples"],
                **{k: s[k] for k in s if k.startswith(("delta_nll_gist", "delta_nll_recency", "recovery_gist",
                                                       "gist_minus_recency", "gist_beats_recency"))},
                "train_seconds": result.metrics.get("jt1/train_seconds", float("nan")),
                "steps": result.steps, "eval_seconds": time.perf_counter() - t0,
                "overrides": ", ".join(f"{k}={v}" for k, v in spec.variants[name].items()) or "(base)",
            })
        rows_out.sort(key=lambda r: (list(spec.variants).index(r["variant"]), r["dataset"]))
        versus_first(rows_out, next(iter(spec.variants)))
        artifacts.write_json(rows_path, rows_out)  # partial results survive an interruption
    md = write_report(spec, ablation, rows_out, out_dir)
    return {"rows": rows_out, "markdown": md, "json": rows_path}


def versus_first(rows: list[dict], first: str) -> None:
    """Each variant's paired difference to the first variant (`minus_first_*`): NLL of its gists minus
    the first variant's on the same validation samples — the interval that decides "this lever helps"."""
    from mcx_core.telemetry import metrics as M

    import numpy as np

    base = {r["dataset"]: r["gist_nll_by_sample"] for r in rows if r["variant"] == first}
    for r in rows:
        ref = base.get(r["dataset"])
        if not ref:
            continue
        ids = sorted(set(ref) & set(r["gist_nll_by_sample"]))
        a = np.array([r["gist_nll_by_sample"][i] for i in ids])
        b = np.array([ref[i] for i in ids])
        r["minus_first_mean"] = float(np.mean(a - b))
        if r["variant"] == first:
            r["minus_first_ci_lo"] = r["minus_first_ci_hi"] = 0.0
        else:
            r.update(M.with_ci("minus_first", M.difference_ci(a, b)))


COLUMNS = ["variant", "dataset", "delta_nll_gist", "recovery_gist", "gist_minus_recency", "minus_first",
           "delta_nll_recency", "steps", "train_seconds", "overrides"]


def write_report(spec: AblationSpec, ablation: str, rows: list[dict], out_dir: Path) -> Path:
    table = reports.markdown_table(
        reports.with_intervals(rows, ["delta_nll_gist", "recovery_gist", "gist_minus_recency", "minus_first",
                                      "delta_nll_recency"]),
        COLUMNS,
    )
    plot = reports.grouped_bar_plot(
        out_dir / "ablation.png",
        sorted({r["variant"] for r in rows}, key=[r["variant"] for r in rows].index),
        {ds: [next(r["delta_nll_gist_mean"] for r in rows if r["variant"] == v and r["dataset"] == ds)
              for v in dict.fromkeys(r["variant"] for r in rows)]
         for ds in sorted({r["dataset"] for r in rows})},
        ylabel="ΔNLL@H of learned gists (validation)",
        title=f"Ablation `{ablation}`: {spec.budget_seconds:.0f} s of JT1 per variant",
    )
    md = "\n\n".join([
        f"# Ablation `{ablation}` — validation split",
        f"Every variant: `{spec.base}` plus its overrides, JT1 for {spec.budget_seconds:.0f} s of training "
        f"(teacher pass excluded), scored on {spec.eval_samples} validation samples per corpus at W_max "
        f"{rows[0]['w_max'] if rows else '?'}. Brackets: paired bootstrap 95 % intervals over samples; "
        "gist − recency < 0 with its interval below 0 means the gists beat dropping the history; "
        f"`minus_first`: the paired difference to `{rows[0]['variant'] if rows else '?'}` on the same samples "
        "(below 0 with its interval: the lever helps).",
        table,
        f"![ΔNLL by variant]({plot.name})",
    ])
    return artifacts.write_text(out_dir / "ablation.md", md + "\n")


def print_table(rows: list[dict]) -> str:
    """The terminal table: one line per variant × corpus."""
    head = f"{'variant':<16} {'dataset':<10} {'ΔNLL gist [95% CI]':<26} {'recovery [95% CI]':<26} " \
           f"{'gist−recency [95% CI]':<26} {'vs first [95% CI]':<26} {'steps':>6} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        def ci(k):
            return f"{r[k + '_mean'] if k + '_mean' in r else r[k]:+.3f} [{r[k + '_ci_lo']:+.3f}, {r[k + '_ci_hi']:+.3f}]"
        lines.append(f"{r['variant']:<16} {r['dataset']:<10} {ci('delta_nll_gist'):<26} {ci('recovery_gist'):<26} "
                     f"{ci('gist_minus_recency'):<26} {ci('minus_first') if 'minus_first_ci_lo' in r else '':<26} "
                     f"{r['steps']:>6} {r['train_seconds']:>8.0f}")
    return "\n".join(lines)

