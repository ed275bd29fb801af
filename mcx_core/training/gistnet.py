"""JT1: train GistNet with the base model frozen (SPEC §3, §6), phase by phase as the config lists them.

Training data is a pool of `gistnet.training.sample_pool` samples (history = the first
`context_tokens` tokens, horizon = the next H), cycle c taking the next pool of a seeded permutation of
the train split. Everything about a sample that does not depend on GistNet comes from the teacher pass
(`compression.teacher`): computed once per dataset version into safetensors shards on disk (~4.5 s a
sample on 2 CPU cores), resumable, and read row by row each step, so the process holds the batch, not
the pool: the full-history teacher's horizon NLL (ΔNLL's reference) and top-k log-probs (KL targets),
the recency NLL (token weighting), the pooling_mse targets, and with `input_layers` k > 0 the blocks'
first-k-layer states (a contextual GistNet's inputs).

Phases (`gistnet.training.phases[i].objective`):
  pooling_mse  cheap warm start, no backward through the base model. Target of an LOD1 gist: the mean
               of the base model's final hidden states over the block run *alone* (one batched forward
               of [n_blocks, 32] tokens per sample, no grad), rescaled to the block's mean
               token-embedding norm; of an LOD2 gist: the mean of its 32 blocks' targets, rescaled the
               same way. Why: with tied embeddings (SmolLM2) a final hidden state points at the
               embeddings of the tokens the model expects next, so its mean says what the block is
               about in the input-embedding space. Used directly as the 29 LOD1 gists of a W_max=128
               working context (SmolLM2-135M, 1024-token histories, H=64, 8 val samples per corpus)
               it gives ΔNLL +0.48 (narrative) / +0.64 (code), against +3.05 / +1.88 for the mean-pool
               baseline, +0.45 / +0.83 for the same mean taken in context (free from the teacher pass,
               but worse on code) and +0.68 / +1.02 for the last in-context hidden state of the block.
               Loss: ||g - t||² / ||t||² averaged over blocks (scale-free across base models).
  reconstruction  cheap warm start through the base model (`reconstruction_loss`): it reads [sink, gist]
               and predicts the gisted block's own 32 tokens — 36-position sequences, many blocks a step.
  delta_nll    substitutability: per sample, the working context `WorkingContext.initial(tree, w_max,
               recent_tokens)` (w_max drawn per sample from `working_context.eval_w_max`), assembled with
               GistNet's gists *with grad*, then one packed forward of the frozen base model over
               [WC ‖ next H tokens]; loss = mean horizon NLL (+ kl_weight · top-k KL(teacher ‖ student) over
               the horizon; tokens weighted by `horizon_weighting`). Gradients reach GistNet only.
               LOD2: a 1024-token history never holds an LOD2 gist in its working context (the newest
               `recent_tokens` stay LOD0, so the 1024-token span is never complete outside them), so
               LOD2 is trained on a stress context instead, weighted by `lod2_weight`: every complete
               1024-token span of the history as one LOD2 gist, the remainder raw, then the horizon.
               The LOD2 net reads LOD1 gists *detached*: LOD1 is shaped only by contexts in which the
               base model reads LOD1 gists directly.

Determinism: step s samples with a generator seeded from (seed, s) and seeds torch (dropout) with
seed + s, so an interrupted run resumed from its newest checkpoint takes exactly the steps an
uninterrupted run takes.

Data parallel (`accelerate launch`, N processes; see `training.distributed`): rank r trains on its slice
of step s's permutation (the effective batch is batch_size · N; dropout seeded with seed + s +
r · 1_000_003), gradients are averaged over ranks before clipping, metrics averaged before logging, and
only rank 0 logs and writes checkpoints. One process is exactly the single-process trainer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mcx_core import checkpoints, data
from mcx_core.compression.gistnet import Gister, load_gister, mean_pool, profile_gister
from mcx_core.compression.teacher import TeacherCache, capture_logits, pool_positions
from mcx_core.config import MegaContextConfig, PhaseConfig
from mcx_core.model.base import BaseLM
from mcx_core.model.scoring import ConditionInput, horizon_nll, horizon_nll_grad
from mcx_core.model.tree import MegaContextTree
from mcx_core.model.working_context import WorkingContext, entry_for
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import TelemetrySink
from mcx_core.training import common, distributed

log = logging.getLogger(__name__)

JT = 1  # this trainer's phase number in checkpoint names: JT1_cycle{c}_step{s}


# ---------------------------------------------------------------------------------------------- batches

Batch = dict[str, torch.Tensor]  # teacher fields (`compression.teacher`) of the step's samples, stacked


def lod1_inputs(lm: BaseLM, batch: Batch, C: int, K: int) -> torch.Tensor:
    """GistNet's LOD1 inputs for every history block of the batch: [B, nb, K, d] token embeddings, or
    [B, nb, K, 2d] with the cached base-model states (`states`) of a contextual GistNet."""
    ids = batch["ids"][:, :C].long()
    B = len(ids)
    embeds = lm.embed(ids).view(B, C // K, K, -1)
    if "states" not in batch:
        return embeds
    return torch.cat([embeds, batch["states"].to(device=embeds.device, dtype=embeds.dtype)], dim=-1)


# ---------------------------------------------------------------------------------------------- objectives


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over rows of ||pred - target||² / ||target||²: [n, d], [n, d] -> scalar."""
    target = target.to(pred.dtype)
    return ((pred - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


def pooling_mse_loss(gister: Gister, lm: BaseLM, batch: Batch, C: int, K: int):
    """LOD1 gists of every block of the batch against their targets; LOD2 gists (of detached LOD1
    gists) against theirs when the history holds a complete 1024-token span."""
    inputs = lod1_inputs(lm, batch, C, K)
    B = len(inputs)
    g1 = gister(1, inputs.flatten(0, 1))  # [B * nb, d]
    mse1 = relative_mse(g1, batch["lod1_targets"].flatten(0, 1).to(g1.device))
    loss, metrics = mse1, {M.TRAIN_POOLING_MSE: mse1.item()}
    n2 = C // (K * K)
    if n2:
        children = g1.detach().view(B, C // K, -1)[:, : n2 * K].reshape(B * n2, K, -1)  # [B * n2, K, d]
        mse2 = relative_mse(gister(2, children), batch["lod2_targets"].flatten(0, 1).to(g1.device))
        loss = loss + mse2
        metrics[M.TRAIN_POOLING_MSE_LOD2] = mse2.item()
    metrics[M.TRAIN_TOKENS_PER_S] = B * C  # divided by the step time by the caller
    return loss, metrics


def reconstruction_loss(gister: Gister, lm: BaseLM, batch: Batch, cfg: MegaContextConfig, phase: PhaseConfig,
                        step_seed: int):
    """The cheap warm start (ICAE/REFRAG-style): the frozen base model reads [sink, gist] and predicts the
    gisted block's own K tokens. `phase.blocks_per_step` blocks drawn (seeded by `step_seed`) from the
    batch's history blocks after the first (block 0 holds the sink itself): sequences of sink + 1 + K
    positions, so a step costs a fraction of a ΔNLL step. Positions: the sink at 0.., the gist at its
    working-context position (`position_scheme` center: the span's centre), the block's tokens right
    after it. Gradients reach GistNet only."""
    C, K = cfg.dataset.context_tokens, cfg.dataset.block_size
    wcc = cfg.working_context
    inputs = lod1_inputs(lm, batch, C, K)  # [B, nb, K, d_in]
    B, nb = inputs.shape[:2]
    g = torch.Generator().manual_seed(step_seed)
    n = min(phase.blocks_per_step, B * (nb - 1))
    flat = torch.randperm(B * (nb - 1), generator=g)[:n]
    rows, blocks = flat // (nb - 1), flat % (nb - 1) + 1
    gists = gister(1, inputs[rows, blocks])  # [n, d], with grad
    ids = batch["ids"].long()
    sink = min(wcc.sink_tokens, C)
    sink_embeds = lm.embed(ids[rows, :sink])  # [n, sink, d]
    conditions = []
    for j in range(n):
        start = int(blocks[j]) * K
        gist_pos = start + K // 2 if wcc.position_scheme == "center" else sink
        embeds = torch.cat([sink_embeds[j], gists[j : j + 1].to(sink_embeds.dtype)])
        positions = torch.cat([torch.arange(sink), torch.tensor([gist_pos])])
        conditions.append(ConditionInput(embeds, positions, gist_pos + 1))
    targets = torch.stack([ids[r, int(b) * K : (int(b) + 1) * K] for r, b in zip(rows, blocks)])  # [n, K]
    nll = horizon_nll_grad(lm, conditions, targets)  # [n, K]
    metrics = {M.TRAIN_RECONSTRUCTION_NLL: nll.detach().mean().item(), M.TRAIN_TOKENS_PER_S: n * (sink + 1 + K)}
    return nll.mean(), metrics


def topk_kl(student_logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per horizon token from the teacher's top-k only: both distributions coarsened
    to the k tokens + one bucket for the rest (a proper KL, ≥ 0, exact as k → V).
    student_logits [B, H, V], topk_logprobs / topk_ids [B, H, k] -> [B, H]."""
    student = student_logits.float().log_softmax(-1)
    s_top = student.gather(-1, topk_ids.long().to(student.device))  # [B, H, k]
    t_top = topk_logprobs.float().to(student.device)
    t_rest = torch.log1p(-t_top.exp().sum(-1).clamp(max=1 - 1e-6))  # log teacher mass outside the top-k
    s_rest = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))
    return (t_top.exp() * (t_top - s_top)).sum(-1) + t_rest.exp() * (t_rest - s_rest)


def horizon_weights(batch: Batch, strength: float) -> torch.Tensor | None:
    """Per-token weights [B, H] (mean 1 per sample): 1 + strength · gain / mean gain, gain = (recency NLL −
    teacher NLL)+ — the tokens the full history helps; None for `strength` 0 (uniform)."""
    if strength <= 0:
        return None
    gain = (batch["recency_nll"] - batch["teacher_nll"]).clamp_min(0)
    w = 1 + strength * gain / gain.mean(-1, keepdim=True).clamp_min(1e-6)
    return w / w.mean(-1, keepdim=True)


def _gist_override(gister: Gister, g1: torch.Tensor, K: int):
    """The working context's gist_override for one sample: LOD1 gists from `g1` [nb, d] (with grad),
    LOD2 gists computed by GistNet from the *detached* LOD1 gists of their 32 blocks."""

    def override(level: int, indices: torch.Tensor) -> torch.Tensor:  # [n] -> [n, d]
        indices = indices.to(g1.device)
        if level == 1:
            return g1[indices]
        if level != 2:
            raise ValueError(f"JT1 trains LOD1 and LOD2 gists; got level {level}")
        children = g1.detach()[: (len(g1) // K) * K].view(-1, K, g1.shape[-1])  # [n2, K, d]
        return gister(2, children[indices])

    return override


def _condition(wc: WorkingContext, embed_fn, override, history_len: int) -> ConditionInput:
    embeds, positions, _ = wc.assemble(embed_fn, gist_override=override)
    start = history_len if wc.position_scheme == "center" else positions.numel()
    return ConditionInput(embeds, positions, start)


def lod2_stress_context(tree: MegaContextTree, position_scheme: str, sink_tokens: int = 0) -> WorkingContext | None:
    """Every complete K²-token span as one LOD2 gist, the rest LOD0: maximum (1024x) compression.
    Not a legal runtime context (no recent LOD0 tokens when the history is a multiple of 1024), so it
    is built by hand with recent_tokens = 0; None when the history has no complete LOD2 span."""
    n2 = tree.num_nodes(2)
    if n2 == 0:
        return None
    entries = [entry_for(tree, 2, j) for j in range(n2)]
    entries += [entry_for(tree, 0, b) for b in range(n2 * tree.block_size, tree.num_nodes(0))]
    cost = sum(e.cost for e in entries) + min(sink_tokens, tree.cursor)
    return WorkingContext(tree, cost, 0, position_scheme, entries, sink_tokens)


def delta_nll_loss(
    gister: Gister,
    lm: BaseLM,
    batch: Batch,
    w_maxes: list[int],
    cfg: MegaContextConfig,
    phase: PhaseConfig,
):
    """Horizon NLL through GistNet's gists for the batch's samples (+ `kl_weight` · top-k KL to the
    full-history teacher, tokens weighted by `horizon_weighting`); returns (loss, metrics)."""
    C, H, K = cfg.dataset.context_tokens, cfg.dataset.horizon, cfg.dataset.block_size
    wcc = cfg.working_context
    ids = batch["ids"].long()  # [B, C + H]
    B = len(ids)
    g1 = gister(1, lod1_inputs(lm, batch, C, K).flatten(0, 1)).view(B, C // K, -1)  # [B, nb, d], with grad

    contexts, stress = [], []
    for b in range(B):
        # The tree only supplies structure here (which spans the WC holds): its stored gists are cheap
        # mean pools that `gist_override` replaces with GistNet's, computed with grad.
        tree = MegaContextTree(lm.d_model, lm.embed, lambda L, x: mean_pool(x), block_size=K, max_level=2)
        tree.ingest(ids[b, :C])
        override = _gist_override(gister, g1[b], K)
        wc = WorkingContext.initial(tree, w_maxes[b], wcc.recent_tokens, wcc.position_scheme, wcc.sink_tokens)
        contexts.append(_condition(wc, lm.embed, override, C))
        stress_wc = lod2_stress_context(tree, wcc.position_scheme, wcc.sink_tokens) if phase.lod2_weight > 0 else None
        if stress_wc is not None:
            stress.append(_condition(stress_wc, lm.embed, override, C))

    horizons = ids[:, C:]
    nll, tokens, kl = _grouped_nll(lm, contexts, horizons, batch if phase.kl_weight > 0 else None)
    weights = horizon_weights(batch, phase.horizon_weighting)
    loss = nll.mean() if weights is None else (nll * weights.to(nll.device)).mean()
    teacher = batch["teacher_nll"].to(nll.device)
    delta = M.delta_nll(nll.detach().mean(1).cpu().numpy(), teacher.mean(1).cpu().numpy())
    metrics = {
        M.TRAIN_DELTA_NLL_MEAN: M.mean(delta),
        M.TRAIN_DELTA_NLL_P95: M.p95(delta),
        M.TRAIN_HORIZON: float(H),
        M.TRAIN_NLL: nll.detach().mean().item(),
    }
    if phase.kl_weight > 0:
        kl_mean = kl.mean() if weights is None else (kl * weights.to(kl.device)).mean()
        loss = loss + phase.kl_weight * kl_mean
        metrics[M.TRAIN_KL] = kl.detach().mean().item()
    if stress:
        stress_nll, stress_tokens, _ = _grouped_nll(lm, stress, horizons, None)
        loss = loss + phase.lod2_weight * stress_nll.mean()
        tokens += stress_tokens
        lod2_delta = M.delta_nll(stress_nll.detach().mean(1).cpu().numpy(), teacher.mean(1).cpu().numpy())
        metrics.update(M.mean_and_p95(lod2_delta, M.TRAIN_LOD2_DELTA_NLL))
    metrics[M.TRAIN_TOKENS_PER_S] = tokens  # divided by the step time by the caller
    return loss, metrics


def _grouped_nll(lm, contexts, horizons, teacher: Batch | None):
    """One packed forward per group of equal-length contexts (horizon_nll_grad needs equal T).
    -> per-token NLL [B, H] (sample order kept), base-model tokens processed, per-token top-k KL to the
    `teacher` [B, H] (None without one)."""
    H = horizons.shape[1]
    nll = [None] * len(contexts)
    kl = [None] * len(contexts)
    tokens = 0
    groups: dict[int, list[int]] = {}
    for j, c in enumerate(contexts):
        groups.setdefault(c.embeds.shape[0], []).append(j)
    for T, group in groups.items():
        with capture_logits(lm) as out:
            group_nll = horizon_nll_grad(lm, [contexts[j] for j in group], horizons[group])  # [g, H]
        for j, row in zip(group, group_nll):
            nll[j] = row
        tokens += len(group) * (T + H)
        if teacher is not None:
            group_kl = topk_kl(out["logits"][:, :-1], teacher["topk_logprobs"][group], teacher["topk_ids"][group])
            for j, row in zip(group, group_kl):
                kl[j] = row
    return torch.stack(nll), tokens, (torch.stack(kl) if teacher is not None else None)


# ---------------------------------------------------------------------------------------------- validation


def validation_ids(cfg: MegaContextConfig, n: int) -> np.ndarray:
    """The validation curve's samples: the first of the `val` split of each corpus in turn, `n` in all
    ([n, C + H] token ids; none when no corpus has a `val` split). Never the test split (the evaluations')."""
    out = cfg.resolve(cfg.dataset.output_dir)
    corpora = data.load_manifest(out)["corpora"]
    with_val = sorted(c for c, entry in corpora.items() if "val" in entry["splits"])
    per = -(-n // max(1, len(with_val)))
    rows = [data.load_samples(out, c, "val", limit=per) for c in with_val]
    picked = [r[i] for i in range(per) for r in rows if i < len(r)][:n]  # interleaved: every corpus first
    return np.stack(picked) if picked else np.empty((0, cfg.dataset.context_tokens + cfg.dataset.horizon), np.int64)


@torch.no_grad()
def validation_batch(lm: BaseLM, val_ids: np.ndarray, cfg: MegaContextConfig) -> Batch:
    """What the validation ΔNLL needs of the held-out samples, computed once: ids, the full-history
    teacher's horizon NLL, and with `input_layers` k > 0 the blocks' first-k-layer states."""
    C, K = cfg.dataset.context_tokens, cfg.dataset.block_size
    ids = torch.as_tensor(np.asarray(val_ids), dtype=torch.long)[:, : C + cfg.dataset.horizon]
    embeds = lm.embed(ids[:, :C])  # [n, C, d]
    teacher = horizon_nll(lm, [ConditionInput(e, torch.arange(C), C) for e in embeds], ids[:, C:]).float().cpu()
    batch = {"ids": ids, "teacher_nll": teacher}
    layers = cfg.gistnet.model.input_layers
    if layers:
        batch["states"] = lm.block_states(ids[:, :C].reshape(-1, K), layers).half().cpu().view(len(ids), C // K, K, -1)
    return batch


@torch.no_grad()
def validation_metrics(gister: Gister, lm: BaseLM, batch: Batch, cfg: MegaContextConfig) -> dict[str, float]:
    """Held-out ΔNLL@H of the current gists at `working_context.w_max` (the delta_nll objective's context,
    no KL, no LOD2 stress, uniform tokens), GistNet in eval mode: the JT1 validation curve."""
    phase = PhaseConfig(name="validation", objective="delta_nll", max_steps=1, kl_weight=0.0, lod2_weight=0.0,
                        horizon_weighting=0.0)
    was_training = gister.training
    gister.eval()
    try:
        w = cfg.working_context.w_max
        _, m = delta_nll_loss(gister, lm, batch, [w] * len(batch["ids"]), cfg, phase)
    finally:
        gister.train(was_training)
    return {M.VAL_DELTA_NLL_MEAN: m[M.TRAIN_DELTA_NLL_MEAN], M.VAL_DELTA_NLL_P95: m[M.TRAIN_DELTA_NLL_P95],
            M.VAL_NLL: m[M.TRAIN_NLL]}


# ---------------------------------------------------------------------------------------------- training


def _phase_lr(cfg: MegaContextConfig, phase: PhaseConfig) -> float:
    return phase.lr or cfg.gistnet.training.lr


def _new_gister(cfg: MegaContextConfig, lm: BaseLM) -> Gister:
    torch.manual_seed(cfg.seed)  # the initialisation depends on the config's seed only
    return Gister(lm.d_model, cfg.gistnet.model).to(lm.device)


def _save(checkpoints_dir: Path, cycle: int, gister: Gister, opt, sched, cfg: MegaContextConfig, state: dict) -> Path:
    return checkpoints.save_jt_checkpoint(
        checkpoints_dir, JT, cycle, state["global_step"], {checkpoints.GISTNET_DIR: gister.save_pretrained}, opt, sched, cfg, state
    )


@dataclass
class _Run:
    """The trainer's progress; `trainer_state.json` is this plus identity fields."""

    phase_index: int = 0
    phase_step: int = 0
    phase_complete: bool = False
    global_step: int = 0
    nan_free: bool = True
    nan_phases: list[int] = field(default_factory=list)
    seconds_per_step: dict[str, float] = field(default_factory=dict)  # phase name -> mean wall s/step
    train_seconds: float = 0.0  # wall seconds of training steps so far, all phases (`max_seconds`)
    history: list[dict[str, float]] = field(default_factory=list)


def train_gistnet(
    cfg: MegaContextConfig,
    lm: BaseLM,
    train_ids: np.ndarray,
    checkpoints_dir: Path,
    sink: TelemetrySink,
    cycle: int = 0,
    resume: bool = True,
    progress: bool = True,
    init_from: Path | None = None,
    teacher_root: Path | None = None,
    val_ids: np.ndarray | None = None,
) -> common.TrainResult:
    """Train GistNet through `cfg.gistnet.training.phases`; `train_ids` [N, >= C + H] token ids.

    With `val_ids` (held-out samples, `validation_ids`) and `gistnet.training.val_every` > 0, the main
    process logs the validation curve (`val/*`, `validation_metrics`) at the start, every `val_every`
    steps and at the end of each phase.

    The teacher pass over this cycle's pool is read from (or first written to) the shards under
    `teacher_root` (default: `teacher/` beside `checkpoints_dir`; `compression.teacher`).

    With `resume`, continue from the newest complete JT1 checkpoint of this cycle (a finished run
    returns at once). Otherwise start from `init_from` (a JT1 checkpoint, e.g. the previous cycle's)
    or from the mean-pool initialisation.
    """
    t_start = time.perf_counter()
    tcfg = cfg.gistnet.training
    C, K = cfg.dataset.context_tokens, cfg.dataset.block_size
    checkpoints_dir = Path(checkpoints_dir)
    base_checksum = lm.weights_checksum()
    sink, rank, world = distributed.main_sink(sink), distributed.process_index(), distributed.world_size()
    progress = progress and distributed.is_main_process()

    gister = _new_gister(cfg, lm)
    run = _Run()
    resume_dir, state = common.resume_point(checkpoints_dir, JT, cycle, resume, base_checksum)
    if resume_dir is not None:
        gister.load_state_dict(load_gister(resume_dir, lm).state_dict())
        run = _Run(**state["run"])
        log.info("JT1: resuming from %s (global step %d)", resume_dir, run.global_step)
    elif init_from is not None:
        gister.load_state_dict(load_gister(init_from, lm).state_dict())
    distributed.broadcast_parameters(gister.parameters())  # every rank starts from rank 0's weights
    gister.train()

    gist_profile = profile_gister(gister)
    sink.log_metrics(gist_profile, step=run.global_step)
    sink.log_params({"jt1.gistnet_parameters": int(gist_profile[M.GISTNET_PARAMETERS])})

    positions = pool_positions(len(train_ids), tcfg.sample_pool, cycle)
    layers = cfg.gistnet.model.input_layers
    teacher = TeacherCache.for_config(cfg, lm, np.asarray(train_ids), teacher_root or checkpoints_dir.parent / "teacher")
    finished = run.phase_index == len(tcfg.phases) - 1 and run.phase_complete
    # A finished run (resumed after its last phase) needs no teacher pass: it returns at once.
    if not finished and distributed.is_main_process():
        teacher.ensure(lm, np.asarray(train_ids), positions, layers, progress=progress)
    distributed.wait_for_everyone()
    sink.log_params({"jt1.teacher_fingerprint": teacher.spec.fingerprint, "jt1.pool_samples": len(positions)})
    if not finished:
        sink.log_metrics({M.TRAIN_TEACHER_CACHE_MB: teacher.nbytes(positions, layers) / 2**20}, step=run.global_step)

    validate = not finished and val_ids is not None and len(val_ids) > 0 and tcfg.val_every > 0 \
        and distributed.is_main_process()
    val_batch = validation_batch(lm, val_ids, cfg) if validate else None

    def log_validation() -> None:
        if val_batch is not None:
            sink.log_metrics(validation_metrics(gister, lm, val_batch, cfg), step=run.global_step)

    log_validation()

    def trainer_state() -> dict:
        return common.trainer_state(
            JT, cycle, run, cfg.seed, {"id": lm.model_id, "weights_checksum": base_checksum}, tcfg.batch_size,
            gister.parameters(),
            rng={
                "torch_manual_seed": "seed + s before step s (dropout)",
                "pool": f"positions {int(positions[0])}..{int(positions[-1])} of teacher.pool_order(N, seed)",
            },
            global_step=run.global_step, phase_index=run.phase_index, phase_name=tcfg.phases[run.phase_index].name,
            healthy=run.nan_free, gistnet=gist_profile,
        )

    checkpoint = resume_dir
    for index, phase in enumerate(tcfg.phases):
        if index < run.phase_index or (index == run.phase_index and run.phase_complete):
            continue
        opt = common.make_optimizer(gister, _phase_lr(cfg, phase), tcfg.weight_decay)
        sched = common.make_scheduler(opt, tcfg.warmup_steps, phase.max_steps)
        if index == run.phase_index and run.phase_step > 0:
            checkpoints.load_optimizer(resume_dir / checkpoints.OPTIMIZER_FILE, opt, sched)
        else:
            run.phase_index, run.phase_step, run.phase_complete = index, 0, False
        t_phase, steps_timed = 0.0, 0
        bar = tqdm(
            total=phase.max_steps, initial=run.phase_step, desc=f"JT1 {phase.name}", disable=not progress
        )
        while run.phase_step < phase.max_steps:
            if phase.max_seconds is not None and t_phase >= phase.max_seconds:
                log.info("JT1 %s: phase budget of %.0f s reached at step %d", phase.name, phase.max_seconds,
                         run.phase_step)
                break
            if tcfg.max_seconds is not None and run.train_seconds >= tcfg.max_seconds:
                log.info("JT1 %s: training budget of %.0f s reached at step %d", phase.name, tcfg.max_seconds,
                         run.phase_step)
                break
            t0 = time.perf_counter()
            batch_rows, w_maxes = common.sample_step(
                cfg.seed, run.global_step, len(positions), tcfg.batch_size, cfg.working_context.eval_w_max,
                rank, world,
            )
            batch = teacher.rows(positions[batch_rows.numpy()], layers=layers)
            torch.manual_seed(distributed.rank_seed(cfg.seed + run.global_step))
            if phase.objective == "pooling_mse":
                loss, metrics = pooling_mse_loss(gister, lm, batch, C, K)
            elif phase.objective == "reconstruction":
                step_seed = distributed.rank_seed(cfg.seed * 1_000_003 + run.global_step)
                loss, metrics = reconstruction_loss(gister, lm, batch, cfg, phase, step_seed)
            else:
                loss, metrics = delta_nll_loss(gister, lm, batch, w_maxes, cfg, phase)
            # backward + gradient all-reduce over ranks + clipping; NaN when any rank's loss is non-finite
            grad_norm = distributed.backward_step(loss, opt, gister.parameters(), tcfg.grad_clip)
            if common.stop_if_nonfinite(loss, grad_norm, sink, run.global_step, M.TRAIN_LOSS, f"JT1 {phase.name}"):
                run.nan_free = False  # this phase stops; the next one starts from the last finite weights
                run.nan_phases.append(index)
                break
            lr = common.apply_step(opt, sched)
            run.global_step += 1
            run.phase_step += 1
            dt = time.perf_counter() - t0
            t_phase, steps_timed = t_phase + dt, steps_timed + 1
            run.train_seconds += dt
            metrics.update(
                {
                    M.TRAIN_LOSS: loss.item(),
                    M.train_loss_of(phase.objective): loss.item(),
                    M.TRAIN_GRAD_NORM: grad_norm,
                    M.TRAIN_LR: lr,
                    M.TRAIN_PHASE_INDEX: float(index),
                    M.TRAIN_TOKENS_PER_S: metrics[M.TRAIN_TOKENS_PER_S] / dt,
                }
            )
            if run.global_step % tcfg.log_every == 0 or run.phase_step == phase.max_steps:
                metrics = distributed.reduce_metrics(metrics, sum_keys=[M.TRAIN_TOKENS_PER_S])
                sink.log_metrics(metrics, step=run.global_step)
                run.history.append({"step": run.global_step, **metrics})
            if tcfg.val_every and run.global_step % tcfg.val_every == 0 and run.phase_step < phase.max_steps:
                log_validation()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if tcfg.checkpoint_every and run.global_step % tcfg.checkpoint_every == 0:
                run.phase_complete = run.phase_step == phase.max_steps
                checkpoint = _save(checkpoints_dir, cycle, gister, opt, sched, cfg, trainer_state())
        bar.close()
        if steps_timed:
            run.seconds_per_step[phase.name] = t_phase / steps_timed
        run.phase_complete = True
        log_validation()
        checkpoint = _save(checkpoints_dir, cycle, gister, opt, sched, cfg, trainer_state())

    if lm.weights_checksum() != base_checksum:
        raise AssertionError("JT1 changed the base model's weights; it must stay frozen")
    return common.finish("jt1", run, run.global_step, time.perf_counter() - t_start, sink, _summary(run),
                         checkpoint=checkpoint)


def _summary(run: _Run, window: int = 10) -> dict[str, float]:
    """Run-level numbers beyond steps, wall time and NaN-freedom: ΔNLL at the start and end of delta_nll
    training (mean of the first / last `window` logged steps), seconds per step per phase."""
    out = {}
    delta = [h[M.TRAIN_DELTA_NLL_MEAN] for h in run.history if M.TRAIN_DELTA_NLL_MEAN in h]
    if delta:
        out["jt1/delta_nll_mean_start"] = M.mean(delta[:window])
        out["jt1/delta_nll_mean_end"] = M.mean(delta[-window:])
    out["jt1/train_seconds"] = run.train_seconds
    for name, s in run.seconds_per_step.items():
        out[f"jt1/seconds_per_step/{name}"] = s
    return out
