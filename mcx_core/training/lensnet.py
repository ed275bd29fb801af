"""JT2: train LensNet from counterfactual delta tables (SPEC §4, §6), base model and GistNet frozen.

Data: each labelled context is rebuilt from the delta table's contexts file (history re-ingested with
the given GistNet, which must be the one the labels were computed with: `gistnet_checkpoint`) and turned
into LensNet inputs once; only LensNet runs per step.

Targets. For a row (an action on entry i) the utility is u = −ΔNLL, normalised per context:
u / max(max |u| of the context, `utility_floor`), in [-1, 1]. An expand is what a positive score asks
for, a collapse what a negative one asks for, so the row's target for score i is t = +u (expand) or
t = −u (collapse), then clamped to what the entry can legally show (<= 0 if it cannot expand, >= 0 if it
cannot collapse): a harmful expand of a gist that cannot collapse has target 0, "leave it".
The *action score* of a row is a = sign · score (sign +1 expand, −1 collapse), its target ta = sign · t.

Loss (weights from `lensnet.training`):
  regression  mean over rows of (score_i − t)²  (masked scores, as the allocator reads them)
  ranking     within a context, for every pair with ta_p > ta_q: relu((ta_p − ta_q) − (a_p − a_q)),
              i.e. order the actions like their utilities, at least as far apart as their targets
  budget      per context, (mean score over its entries)²: scores should not all push the same way
  legality    mean over entries of the raw (pre-mask) score mass in an illegal direction
Held-out evaluation (sample_ids held out, `holdout_fraction`): pairwise ranking accuracy of a against
ta within contexts (pairs with distinct targets; chance 0.5) and Spearman of a against ta over all
held-out rows. Targets are the legality-clamped ones: orderings LensNet's masked output can express.
The same metrics of the LensNet before its first step are logged at step 0 (`TrainResult.initial_metrics`):
the baseline a trained LensNet must beat. The ranking accuracy on a fixed subset of *training* contexts
is logged too: within one history a gist always sits at the same distance from the cursor, so with few
histories LensNet can fit its labels from gist content alone, and a large train/held-out gap is how that
memorisation shows (more samples in the delta tables is the cure).

Gradients reach LensNet only: the contexts' inputs (gists included) are computed once, without grad,
when the tables are loaded; the base model and GistNet are never in the optimizer.

Checkpoints `JT2_cycle{c}_step{s}/` next to JT1's: `lensnet/` (save_pretrained), `gistnet/` (the frozen
GistNet the labels and inputs came from, when it is a module with `save_pretrained`, so the checkpoint
holds the pair the runtime needs), `optimizer.pt`, `config.yaml`, `trainer_state.json` (written last,
via `checkpoints.write_checkpoint`). Step s draws its contexts from a generator seeded by (seed, s), so a
resumed run takes the same steps as an uninterrupted one.

Data parallel (`accelerate launch`, N processes; see `training.distributed`): every rank loads all the
contexts, rank r trains on its slice of step s's permutation (effective batch batch_size · N), gradients
are averaged over ranks before clipping, LensNet starts from rank 0's initialisation, and only rank 0
logs and writes checkpoints. One process is exactly the single-process trainer.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from mcx_core import checkpoints
from mcx_core.compression.gistnet import num_parameters, tree_inputs_fn
from mcx_core.config import MegaContextConfig
from mcx_core.focus.delta_tables import (
    gistnet_label,
    read_contexts,
    rebuild_context,
    rebuild_tree,
    validate_delta_table,
)
from mcx_core.focus.deltas import normalised_utilities, score_targets
from mcx_core.focus.lensnet import LensNet, collate, entry_inputs, load_lensnet, mask_scores
from mcx_core.model.base import BaseLM
from mcx_core.model.tree import GistFn
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import TelemetrySink
from mcx_core.training import common, distributed

log = logging.getLogger(__name__)

JT = 2
EVAL_BATCH = 64  # held-out contexts per LensNet forward
INTERVAL_RESAMPLES = 400  # bootstrap draws for the held-out intervals (final evaluation only)


@dataclass
class ContextExample:
    """One labelled working context: LensNet's inputs and its rows' targets."""

    context_id: str
    sample_id: str
    inputs: tuple  # entry_inputs(...): embeds [N, d], features [N, F], tail [k, d], masks
    entry_index: torch.Tensor  # [R] long: the entry each row acts on
    sign: torch.Tensor  # [R] +1 expand, -1 collapse
    target: torch.Tensor  # [R] legality-clamped target of the entry's score, in [-1, 1]
    doc_id: str = ""  # the sample's document: the unit of the held-out split ("" = the sample itself)


def load_examples(
    delta_paths: list[Path],
    lm: BaseLM,
    gister: GistFn,
    tail_gists: int,
    utility_floor: float,
    progress: bool = True,
    validate: bool = True,
) -> tuple[list[ContextExample], int]:
    """Every labelled context of the delta tables as a `ContextExample`; also returns their max_level.
    With `validate`, a table `validate_delta_table` finds problems with is refused (ValueError)."""
    examples, max_levels = [], set()
    for path in delta_paths:
        problems = validate_delta_table(path) if validate else []
        if problems:
            raise ValueError(f"{path}: unusable delta table: " + "; ".join(problems[:5]))
        rows_by_context: dict[str, list[dict]] = defaultdict(list)
        for row in pq.read_table(path).to_pylist():
            rows_by_context[row["context_id"]].append(row)
        contexts = read_contexts(path).to_pylist()
        tree, tree_key = None, None  # the contexts of one sample share a history: ingest it once
        for ctx in tqdm(contexts, desc=f"JT2 contexts ({Path(path).name})", disable=not progress):
            rows = rows_by_context.get(ctx["context_id"])
            if not rows:
                continue
            key = (ctx["block_size"], ctx["max_level"], tuple(ctx["history_ids"]))
            if key != tree_key:
                input_fn = tree_inputs_fn(lm, gister, ctx["block_size"])
                tree, tree_key = rebuild_tree(ctx, lm.embed, gister, lm.d_model, input_fn), key
            wc, ages = rebuild_context(ctx, lm.embed, gister, lm.d_model, tree=tree)
            with torch.no_grad():
                inputs = entry_inputs(wc, lm.embed, torch.tensor(ages), tail_gists)
            inputs = tuple(t.cpu() for t in inputs[:3]) + ({k: m.cpu() for k, m in inputs[3].items()},)
            index = torch.tensor([r["entry_index"] for r in rows], dtype=torch.long)
            sign = torch.tensor([1.0 if r["action"] == "expand" else -1.0 for r in rows])
            utility = normalised_utilities(np.array([r["delta_nll"] for r in rows]), utility_floor)
            masks = inputs[3]
            target = score_targets(utility, sign, masks["can_expand"][index], masks["can_collapse"][index])
            examples.append(ContextExample(ctx["context_id"], ctx["sample_id"], inputs, index, sign, target,
                                           ctx.get("doc_id") or ctx["sample_id"]))
            max_levels.add(ctx["max_level"])
    if not examples:
        raise ValueError(f"no labelled contexts in {[str(p) for p in delta_paths]}")
    if len(max_levels) != 1:
        raise ValueError(f"delta tables mix trees of max_level {sorted(max_levels)}")
    return examples, max_levels.pop()


def table_gistnet_checkpoints(delta_paths: list[Path]) -> list[str]:
    """The GistNet checkpoint ids the tables' labels were computed with."""
    ids: set[str] = set()
    for path in delta_paths:
        ids.update(pq.read_table(path, columns=["gistnet_checkpoint"]).column(0).to_pylist())
    return sorted(ids)


def split_holdout(examples: list[ContextExample], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of (train, held-out) examples; whole documents are held out (the samples of one document,
    and the contexts of one history, never straddle the split: a held-out score is on unseen text)."""
    groups = sorted({e.doc_id or e.sample_id for e in examples})
    n_hold = min(len(groups) - 1, max(1, round(fraction * len(groups)))) if len(groups) > 1 and fraction > 0 else 0
    held = {groups[i] for i in np.random.default_rng(seed).permutation(len(groups))[:n_hold]}
    train = [i for i, e in enumerate(examples) if (e.doc_id or e.sample_id) not in held]
    return train, [i for i, e in enumerate(examples) if (e.doc_id or e.sample_id) in held]


def _row_scores(scores: torch.Tensor, batch: list[ContextExample]) -> list[torch.Tensor]:
    """scores [B, N] -> per example, the score of the entry each row acts on ([R_b])."""
    return [scores[b, ex.entry_index.to(scores.device)] for b, ex in enumerate(batch)]


def jt2_loss(
    lensnet: LensNet, batch: list[ContextExample], cfg: MegaContextConfig
) -> tuple[torch.Tensor, dict]:
    """The four-term JT2 objective over a batch of contexts; returns (loss, metrics)."""
    tcfg = cfg.lensnet.training
    embeds, features, tail, masks = collate([ex.inputs for ex in batch])
    raw = lensnet.raw_scores(embeds, features, tail, masks)  # [B, N]
    masks = {k: m.to(raw.device) for k, m in masks.items()}
    scores = mask_scores(raw, masks)  # [B, N], what the allocator reads
    per_row = _row_scores(scores, batch)
    targets = [ex.target.to(raw.device) for ex in batch]
    regression = torch.cat([(s - t).pow(2) for s, t in zip(per_row, targets)]).mean()
    hinge, n_pairs = raw.new_zeros(()), 0
    for s, t, ex in zip(per_row, targets, batch):
        sign = ex.sign.to(raw.device)
        a, ta = sign * s, sign * t  # action scores and their targets
        gap = ta[:, None] - ta[None, :]  # [R, R]
        pairs = gap > 1e-6
        hinge = hinge + torch.relu(gap - (a[:, None] - a[None, :]))[pairs].sum()
        n_pairs += int(pairs.sum())
    ranking = hinge / max(n_pairs, 1)
    entry = masks["entry"].float()
    budget = ((scores * entry).sum(1) / entry.sum(1)).pow(2).mean()
    illegal = torch.relu(raw) * (~masks["can_expand"]) + torch.relu(-raw) * (~masks["can_collapse"])
    legality = (illegal * entry).sum() / entry.sum()
    loss = (
        regression
        + tcfg.ranking_weight * ranking
        + tcfg.budget_weight * budget
        + tcfg.legality_weight * legality
    )
    metrics = {
        M.TRAIN_LENSNET_LOSS: loss.item(),
        M.TRAIN_LENSNET_REGRESSION: regression.item(),
        M.TRAIN_LENSNET_RANKING: ranking.item(),
        M.TRAIN_LENSNET_BUDGET: budget.item(),
        M.TRAIN_LENSNET_LEGALITY: legality.item(),
    }
    return loss, metrics


@torch.no_grad()
def evaluate_lensnet(lensnet: LensNet, examples: list[ContextExample], intervals: bool = False) -> dict[str, float]:
    """Held-out ranking accuracy and Spearman of action scores against their targets (NaN if empty); with
    `intervals`, each with a 95 % bootstrap interval over contexts (`{metric}_ci_low` / `_ci_high`)."""
    if not examples:
        return {M.TRAIN_LENSNET_RANKING_ACCURACY: math.nan, M.TRAIN_LENSNET_RANK_CORRELATION: math.nan}
    action_scores, action_targets, groups = [], [], []
    for a in range(0, len(examples), EVAL_BATCH):
        batch = examples[a : a + EVAL_BATCH]
        scores = lensnet(*collate([ex.inputs for ex in batch]))  # [B, N]
        for j, (ex, s) in enumerate(zip(batch, _row_scores(scores, batch))):
            action_scores.append((ex.sign * s.cpu()).numpy())
            action_targets.append((ex.sign * ex.target).numpy())
            groups.append(np.full(len(s), a + j))
    a_s, a_t, g = np.concatenate(action_scores), np.concatenate(action_targets), np.concatenate(groups)
    out = {
        M.TRAIN_LENSNET_RANKING_ACCURACY: M.pairwise_ranking_accuracy(a_s, a_t, g, min_gap=1e-6),
        M.TRAIN_LENSNET_RANK_CORRELATION: M.spearman(a_s, a_t),
    }
    if intervals:  # whole contexts resampled with replacement (rows within a context are correlated)
        rng = np.random.default_rng(0)
        rows_of = [np.flatnonzero(g == c) for c in np.unique(g)]
        acc, rho = [], []
        for _ in range(INTERVAL_RESAMPLES):
            draw = rng.integers(len(rows_of), size=len(rows_of))
            pick = np.concatenate([rows_of[i] for i in draw])
            groups_k = np.concatenate([np.full(len(rows_of[i]), k) for k, i in enumerate(draw)])  # a context drawn twice counts twice
            acc.append(M.pairwise_ranking_accuracy(a_s[pick], a_t[pick], groups_k, min_gap=1e-6))
            rho.append(M.spearman(a_s[pick], a_t[pick]))
        for key, values in ((M.TRAIN_LENSNET_RANKING_ACCURACY, acc), (M.TRAIN_LENSNET_RANK_CORRELATION, rho)):
            v = np.asarray(values, dtype=np.float64)
            v = v[np.isfinite(v)]
            lo, hi = np.quantile(v, [(1 - M.CI_LEVEL) / 2, (1 + M.CI_LEVEL) / 2]) if len(v) else (math.nan, math.nan)
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = float(lo), float(hi)
    return out


@dataclass
class _Run(common.Run):
    initial: dict[str, float] = field(default_factory=dict)  # held-out metrics before step 1


def _save(checkpoints_dir: Path, cycle: int, lensnet: LensNet, gister: GistFn, opt, sched, cfg: MegaContextConfig,
          state: dict) -> Path:
    parts = {checkpoints.LENSNET_DIR: lensnet.save_pretrained}
    if isinstance(gister, torch.nn.Module) and hasattr(gister, "save_pretrained"):
        parts[checkpoints.GISTNET_DIR] = gister.save_pretrained  # the frozen GistNet the labels came from
    return checkpoints.save_jt_checkpoint(checkpoints_dir, JT, cycle, state["step"], parts, opt, sched, cfg, state)


def train_lensnet(
    cfg: MegaContextConfig,
    lm: BaseLM,
    gister: GistFn,
    delta_paths: list[Path],
    checkpoints_dir: Path,
    sink: TelemetrySink,
    cycle: int = 0,
    resume: bool = True,
    progress: bool = True,
    init_from: Path | None = None,
    *,
    gistnet_checkpoint: str | Path | None = None,
) -> common.TrainResult:
    """Train LensNet for `lensnet.training.max_steps` steps on the delta tables' labels.

    `gister` must be the GistNet the tables were computed with; given `gistnet_checkpoint` (its checkpoint
    directory or id), a table labelled with any other GistNet is refused (stale, off-policy labels).
    With `resume`, continue from the newest complete JT2 checkpoint of this cycle (a finished run returns
    at once). Otherwise start from `init_from` (a JT2 checkpoint, e.g. the previous cycle's) or afresh.
    """
    t_start = time.perf_counter()
    tcfg = cfg.lensnet.training
    checkpoints_dir = Path(checkpoints_dir)
    sink, rank = distributed.main_sink(sink), distributed.process_index()
    progress = progress and distributed.is_main_process()
    delta_paths = [Path(p) for p in delta_paths]
    for path in delta_paths:  # before the (slow) loading: refuse unusable or stale tables at once
        problems = validate_delta_table(path)
        if problems:
            raise ValueError(f"{path}: unusable delta table: " + "; ".join(problems[:5]))
    label_gistnets = table_gistnet_checkpoints(delta_paths)
    if gistnet_checkpoint is not None and label_gistnets != [gistnet_label(gistnet_checkpoint)]:
        raise ValueError(
            f"JT2: the delta tables were labelled with GistNet {label_gistnets}, not "
            f"{gistnet_label(gistnet_checkpoint)!r}: regenerate them with the current GistNet (on-policy labels)"
        )
    examples, max_level = load_examples(
        delta_paths, lm, gister, cfg.lensnet.model.tail_gists, tcfg.utility_floor, progress, validate=False
    )
    train_idx, held_idx = split_holdout(examples, tcfg.holdout_fraction, cfg.seed)
    if not train_idx:
        raise ValueError("JT2: no training contexts left after the hold-out split")
    held_out = [examples[i] for i in held_idx]
    # A fixed probe of training contexts, as many as held out (at least a batch): the memorisation gap.
    train_probe = [examples[i] for i in train_idx[: max(len(held_idx), EVAL_BATCH)]]

    lensnet = LensNet(lm.d_model, cfg.lensnet.model, max_level=max_level).to(lm.device)
    run = _Run()
    resume_dir, state = common.resume_point(checkpoints_dir, JT, cycle, resume)
    if resume_dir is not None:
        lensnet.load_state_dict(load_lensnet(resume_dir).state_dict())
        run = _Run(**state["run"])
        log.info("JT2: resuming from %s (step %d)", resume_dir, run.step)
    elif init_from is not None:
        lensnet.load_state_dict(load_lensnet(init_from).state_dict())
    distributed.broadcast_parameters(lensnet.parameters())  # every rank starts from rank 0's weights
    lensnet.train()
    opt = common.make_optimizer(lensnet, tcfg.lr, tcfg.weight_decay)  # asserts every parameter is in it
    sched = common.make_scheduler(opt, tcfg.warmup_steps, tcfg.max_steps)
    if resume_dir is not None:
        checkpoints.load_optimizer(resume_dir / checkpoints.OPTIMIZER_FILE, opt, sched)
    sink.log_params(
        {
            "jt2.lensnet_parameters": num_parameters(lensnet),
            "jt2.gistnet_checkpoint": ",".join(label_gistnets),
        }
    )
    if run.step == 0:  # the baseline on the curve: this LensNet before any JT2 step
        lensnet.eval()
        run.initial = evaluate_lensnet(lensnet, held_out)
        lensnet.train()
        sink.log_metrics({**run.initial, M.LENSNET_PARAMETERS: float(num_parameters(lensnet))}, step=0)

    def trainer_state() -> dict:
        return common.trainer_state(
            JT, cycle, run, cfg.seed, {"id": lm.model_id}, tcfg.batch_size, lensnet.parameters(),
            step=run.step, max_steps=tcfg.max_steps, delta_tables=[str(p) for p in delta_paths],
            gistnet_checkpoint=label_gistnets, contexts={"train": len(train_idx), "held_out": len(held_idx)},
            held_out_samples=sorted({e.sample_id for e in held_out}), lensnet_parameters=num_parameters(lensnet),
        )

    checkpoint = resume_dir
    bar = tqdm(total=tcfg.max_steps, initial=run.step, desc="JT2 LensNet", disable=not progress)
    while run.step < tcfg.max_steps:
        g = common.step_generator(cfg.seed, run.step)
        picks = distributed.rank_rows(torch.randperm(len(train_idx), generator=g), tcfg.batch_size, rank).tolist()
        loss, metrics = jt2_loss(lensnet, [examples[train_idx[i]] for i in picks], cfg)
        # backward + gradient all-reduce over ranks + clipping; NaN when any rank's loss is non-finite
        grad_norm = distributed.backward_step(loss, opt, lensnet.parameters(), tcfg.grad_clip)
        if common.stop_if_nonfinite(loss, grad_norm, sink, run.step, M.TRAIN_LENSNET_LOSS, "JT2"):
            run.nan_free = False
            break
        lr = common.apply_step(opt, sched)
        run.step += 1
        if run.step % tcfg.log_every == 0 or run.step == tcfg.max_steps:
            metrics = distributed.reduce_metrics(metrics)  # the held-out metrics below agree on every rank
            lensnet.eval()
            metrics.update(evaluate_lensnet(lensnet, held_out))
            train_eval = evaluate_lensnet(lensnet, train_probe)
            metrics[M.TRAIN_LENSNET_TRAIN_RANKING_ACCURACY] = train_eval[M.TRAIN_LENSNET_RANKING_ACCURACY]
            lensnet.train()
            metrics.update({M.TRAIN_LENSNET_LR: lr, M.TRAIN_LENSNET_GRAD_NORM: grad_norm})
            sink.log_metrics(metrics, step=run.step)
            run.history.append({"step": run.step, **metrics})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if tcfg.checkpoint_every and run.step % tcfg.checkpoint_every == 0 and run.step < tcfg.max_steps:
            checkpoint = _save(checkpoints_dir, cycle, lensnet, gister, opt, sched, cfg, trainer_state())
    bar.close()
    checkpoint = common.last_checkpoint(
        checkpoint, run.step, lambda: _save(checkpoints_dir, cycle, lensnet, gister, opt, sched, cfg, trainer_state())
    )
    lensnet.eval()
    # the held-out numbers' intervals (the numbers themselves are the last step's, logged above)
    final = {k: v for k, v in evaluate_lensnet(lensnet, held_out, intervals=True).items() if "_ci_" in k}
    final.update({M.TRAIN_LENSNET_HELDOUT_CONTEXTS: float(len(held_idx)),
                  M.TRAIN_LENSNET_HELDOUT_DOCUMENTS: float(len({e.doc_id for e in held_out})),
                  M.TRAIN_LENSNET_TRAIN_CONTEXTS: float(len(train_idx))})
    return common.finish("jt2", run, run.step, time.perf_counter() - t_start, sink, extra=final,
                         checkpoint=checkpoint, initial_metrics=dict(run.initial))
