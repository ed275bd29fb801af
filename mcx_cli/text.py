"""`mcx eval-text`, `mcx run`: a checkpoint on any text file — its gists' ΔNLL, or the runtime engine
streaming the text."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from mcx_cli._common import check_text, config_option, fail, focus_policy, load, print_summary, text_tokens


@click.command("eval-text")
@config_option()
@click.option("--checkpoint", required=True, type=click.Path(), help="A JT1 checkpoint directory.")
@click.option("--text", "text_path", required=True, type=click.Path(), help="Any UTF-8 text file.")
@click.option("--w-max", type=click.IntRange(min=1), default=None, help="Working budget (default: working_context.w_max).")
@click.option("--horizon", type=click.IntRange(min=1), default=None, help="Horizon H (default: dataset.horizon).")
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True, help="At most this many samples.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (default: a table).")
def eval_text(config_path, checkpoint, text_path, w_max, horizon, samples, as_json):
    """ΔNLL@H of a checkpoint's gists vs full history, recency, mean-pool and the fixed-budget peers
    (`evaluation.peers`) on any text file."""
    from mcx_core.checkpoints import CheckpointError
    from mcx_core.eval import gists as gist_eval

    cfg = load(config_path)
    check_text(text_path)
    ck = Path(checkpoint)
    if not (ck / "gistnet").is_dir():
        fail(f"{ck} is not a JT1 checkpoint (no gistnet/ inside); see artifacts/checkpoints/JT1_cycle*_step*")
    w = w_max or cfg.working_context.w_max
    H = horizon or cfg.dataset.horizon
    if w < cfg.working_context.recent_tokens + cfg.dataset.block_size:
        fail(f"--w-max {w} leaves no room for gists beside the {cfg.working_context.recent_tokens} recent tokens")

    from mcx_core.compression.gistnet import load_gister
    from mcx_core.model.base import load_base_model

    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    # Only the tokens the samples need are read: non-overlapping block-aligned samples of C + H tokens.
    sample = cfg.dataset.context_tokens + H
    stride = -(-sample // cfg.dataset.block_size) * cfg.dataset.block_size
    text, _ = text_tokens(lm, text_path, sample + (samples - 1) * stride)
    try:
        out = gist_eval.evaluate_text(cfg, lm, load_gister(ck, lm), text, w, H, samples, progress=not as_json)
    except (gist_eval.TextError, CheckpointError) as err:
        fail(str(err))
    print_summary(out, as_json, f"{text_path}: ΔNLL@{H}, W_max={w}", "{:.4f}")


@click.command("run")
@config_option()
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A JT2 checkpoint (gistnet/ + lensnet/), or a JT1 one with a non-learned --policy.")
@click.option("--text", "text_path", required=True, type=click.Path(), help="Any UTF-8 text file.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Refocus steps (default: runtime.steps).")
@click.option("--w-max", type=click.IntRange(min=1), default=None, help="Working budget (default: working_context.w_max).")
@click.option("--policy", default="lensnet", show_default=True,
              type=click.Choice(["lensnet", "recency", "random", "expand_nearest", "attention"]))
@click.option("--prefill", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens ingested before the first step.")
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False), help="JSONL trace to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as one JSON object.")
def run_text(config_path, checkpoint, text_path, steps, w_max, policy, prefill, trace_path, as_json):
    """Stream a text file through the runtime engine (ingest → focus → forward every
    `runtime.refocus_every` tokens) and write one trace line per step."""
    cfg = load(config_path)
    check_text(text_path)
    from mcx_core.config.loading import unwritable_dir

    problem = unwritable_dir(Path(trace_path).resolve().parent)
    if problem:
        fail(f"--trace {trace_path}: {problem}")
    ck = Path(checkpoint)
    if not (ck / "gistnet").is_dir():
        fail(f"{ck} is not a JT checkpoint (no gistnet/ inside); see artifacts/checkpoints/")
    if policy == "lensnet" and not (ck / "lensnet").is_dir():
        fail(f"{ck} holds no lensnet/ (a JT1 checkpoint?): give a JT2 checkpoint or another --policy")

    from mcx_cli.pipeline import project_writer
    from mcx_core.artifacts import ArtifactPaths
    from mcx_core.checkpoints import CheckpointError
    from mcx_core.compression.gistnet import load_gister
    from mcx_core.focus import engine as runtime
    from mcx_core.model.base import load_base_model

    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    # Read only what the steps use: prefill + steps x refocus_every + horizon tokens.
    _, ids = text_tokens(lm, text_path, prefill + (steps or cfg.runtime.steps) * cfg.runtime.refocus_every
                         + cfg.dataset.horizon)
    need = prefill + cfg.runtime.refocus_every + cfg.dataset.horizon
    if len(ids) < need:
        fail(f"{text_path} has {len(ids)} tokens; one step needs {need} (prefill + refocus_every + horizon)")
    try:
        pol = focus_policy(policy, ck, lm, cfg.dataset.horizon, cfg.seed, ids)
        gister = load_gister(ck, lm)
    except CheckpointError as err:
        fail(str(err))
    # A trace under the config's artifacts is written holding the project lock (mcx_core.locking).
    under = Path(trace_path).resolve().is_relative_to(ArtifactPaths.from_config(cfg).root)
    with project_writer(cfg, "mcx run", 0.0) if under else contextlib.nullcontext():
        try:
            res = runtime.run_engine(
                cfg, lm, gister, pol, ids, steps, w_max, Path(trace_path), prefill=prefill, progress=not as_json,
            )
        except ValueError as err:
            fail(str(err))
    summary = {"policy": policy, "trace": str(res.trace_path), **res.summary}
    print_summary(summary, as_json, f"{text_path}: {int(res.summary['steps'])} steps, policy {policy}", "{:.4g}")

