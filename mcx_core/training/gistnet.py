"""JT1: train GistNet with the base model frozen (SPEC §3, §6), phase by phase as the config lists them.

Training data is a fixed pool of `gistnet.training.sample_pool` samples (history = the first
`context_tokens` tokens, horizon = the next H). Everything about a sample that does not depend on
GistNet is computed once with the frozen base model and cached (`build_pool`): the full-history
teacher's horizon NLL (for ΔNLL; ~3 s per 1088-token sample on 2 CPU cores), optionally its horizon
distribution (for the KL term), and the pooling_mse targets (~2 s per sample).

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
  delta_nll    substitutability: per sample, the working context `WorkingContext.initial(tree, w_max,
               recent_tokens)` (w_max drawn per sample from `working_context.eval_w_max`), assembled with
               GistNet's gists *with grad*, then one packed forward of the frozen base model over
               [WC ‖ next H tokens]; loss = mean horizon NLL (+ kl_weight · KL(teacher ‖ student) over the
               horizon). Gradients reach GistNet only.
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mcx_core import checkpoints
from mcx_core.compression.gistnet import Gister, load_gister, mean_pool, profile_gister
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


# ---------------------------------------------------------------------------------------------- sample pool


@dataclass
class SamplePool:
    """The fixed training samples and what the frozen base model says about them (computed once)."""

    ids: torch.Tensor  # [n, C + H] long
    teacher_nll: torch.Tensor  # [n, H] per-token NLL of the horizon given the full history
    lod1_targets: torch.Tensor  # [n, C // K, d] pooling_mse targets of the LOD1 gists
    lod2_targets: torch.Tensor  # [n, C // K², d] pooling_mse targets of the LOD2 gists (maybe 0 wide)
    teacher_logprobs: torch.Tensor | None  # [n, H, V] float16; only when a phase has kl_weight > 0


@contextmanager
def capture_logits(lm: BaseLM):
    """`out["logits"]`: the logits of the last base-model forward inside the block (horizon_nll keeps
    only the last H + 1 positions), for the KL term."""
    out: dict[str, torch.Tensor] = {}
    hook = lm.model.register_forward_hook(lambda m, args, o: out.__setitem__("logits", o.logits))
    try:
        yield out
    finally:
        hook.remove()


def pooling_targets(hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
    """Mean hidden state per span, rescaled to the span's mean token-embedding norm.
    hidden [n, S, d], token_embeds [n, S', d] -> [n, d]."""
    mean_h = hidden.mean(dim=1)
    norm = token_embeds.norm(dim=-1).mean(dim=1, keepdim=True)
    return mean_h * norm / mean_h.norm(dim=-1, keepdim=True).clamp_min(1e-6)


@torch.no_grad()
def build_pool(
    lm: BaseLM,
    ids: np.ndarray | torch.Tensor,
    context_tokens: int,
    horizon: int,
    block_size: int,
    keep_logprobs: bool = False,
    batch_size: int = 2,
    progress: bool = True,
) -> SamplePool:
    """The full-history teacher and the pooling targets, once per sample; `ids` [n, >= C + H]."""
    ids = torch.as_tensor(ids, dtype=torch.long)[:, : context_tokens + horizon]
    C, K = context_tokens, block_size
    decoder = lm.model.get_decoder()
    nll, lod1, lod2, logprobs = [], [], [], []
    for i in tqdm(range(0, len(ids), batch_size), desc="JT1 teacher + pooling targets", disable=not progress):
        chunk = ids[i : i + batch_size]  # [b, C + H]
        b = len(chunk)
        history_embeds = lm.embed(chunk[:, :C])  # [b, C, d]
        conditions = [ConditionInput(e, torch.arange(C), C) for e in history_embeds]
        with capture_logits(lm) as out:
            nll.append(horizon_nll(lm, conditions, chunk[:, C:]).float().cpu())
        if keep_logprobs:
            logprobs.append(out["logits"][:, :-1].float().log_softmax(-1).half().cpu())  # [b, H, V]
        # Every block run alone: [b * nb, K] tokens -> [b * nb, K, d] final hidden states.
        hidden = decoder(input_ids=chunk[:, :C].reshape(-1, K).to(lm.device), use_cache=False).last_hidden_state
        t1 = pooling_targets(hidden.float(), history_embeds.float().reshape(-1, K, lm.d_model))  # [b * nb, d]
        lod1.append(t1.view(b, C // K, -1).cpu())
        # LOD2: the mean of its 32 blocks' targets, rescaled the same way (the LOD2 net reads LOD1 gists).
        n2 = C // (K * K)
        if n2 == 0:  # histories shorter than one LOD2 span: no LOD2 targets
            lod2.append(torch.zeros(b, 0, lm.d_model))
            continue
        children = t1.view(b, C // K, -1)[:, : n2 * K].reshape(b * n2, K, -1)
        child_embeds = history_embeds[:, : n2 * K * K].float().reshape(b * n2, K * K, -1)
        lod2.append(pooling_targets(children, child_embeds).view(b, n2, -1).cpu())
    return SamplePool(
        ids=ids,
        teacher_nll=torch.cat(nll),
        lod1_targets=torch.cat(lod1),
        lod2_targets=torch.cat(lod2),
        teacher_logprobs=torch.cat(logprobs) if keep_logprobs else None,
    )


def choose_pool_rows(n_available: int, pool_size: int, seed: int, cycle: int) -> torch.Tensor:
    """Which training samples form this cycle's pool: a seeded random subset (each cycle its own)."""
    g = torch.Generator().manual_seed(seed * 7919 + cycle)
    return torch.randperm(n_available, generator=g)[: min(pool_size, n_available)].sort().values


# ---------------------------------------------------------------------------------------------- objectives


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over rows of ||pred - target||² / ||target||²: [n, d], [n, d] -> scalar."""
    target = target.to(pred.dtype)
    return ((pred - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


def pooling_mse_loss(gister: Gister, lm: BaseLM, pool: SamplePool, rows: torch.Tensor, C: int, K: int):
    """LOD1 gists of every block of the chosen samples against their targets; LOD2 gists (of detached
    LOD1 gists) against theirs when the history holds a complete 1024-token span."""
    B = len(rows)
    blocks = lm.embed(pool.ids[rows, :C]).view(B * (C // K), K, -1)  # [B * nb, K, d]
    g1 = gister(1, blocks)  # [B * nb, d]
    mse1 = relative_mse(g1, pool.lod1_targets[rows].flatten(0, 1).to(g1.device))
    loss, metrics = mse1, {M.TRAIN_POOLING_MSE: mse1.item()}
    n2 = C // (K * K)
    if n2:
        children = g1.detach().view(B, C // K, -1)[:, : n2 * K].reshape(B * n2, K, -1)  # [B * n2, K, d]
        mse2 = relative_mse(gister(2, children), pool.lod2_targets[rows].flatten(0, 1).to(g1.device))
        loss = loss + mse2
        metrics[M.TRAIN_POOLING_MSE_LOD2] = mse2.item()
    metrics[M.TRAIN_TOKENS_PER_S] = B * C  # divided by the step time by the caller
    return loss, metrics


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
    pool: SamplePool,
    rows: torch.Tensor,
    w_maxes: list[int],
    cfg: MegaContextConfig,
    phase: PhaseConfig,
):
    """Horizon NLL through GistNet's gists for the chosen samples; returns (loss, metrics)."""
    C, H, K = cfg.dataset.context_tokens, cfg.dataset.horizon, cfg.dataset.block_size
    wcc = cfg.working_context
    B = len(rows)
    ids = pool.ids[rows]  # [B, C + H]
    blocks = lm.embed(ids[:, :C]).view(B, C // K, K, -1)  # [B, nb, K, d]
    g1 = gister(1, blocks.flatten(0, 1)).view(B, C // K, -1)  # [B, nb, d], with grad

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
    nll, tokens, kl = _grouped_nll(lm, contexts, horizons, pool.teacher_logprobs, rows, phase.kl_weight)
    loss = nll.mean()
    teacher = pool.teacher_nll[rows].to(nll.device)
    delta = M.delta_nll(nll.detach().mean(1).cpu().numpy(), teacher.mean(1).cpu().numpy())
    metrics = {
        M.TRAIN_DELTA_NLL_MEAN: M.mean(delta),
        M.TRAIN_DELTA_NLL_P95: M.p95(delta),
        M.TRAIN_HORIZON: float(H),
        M.TRAIN_NLL: nll.detach().mean().item(),
    }
    if phase.kl_weight > 0:
        loss = loss + phase.kl_weight * kl
        metrics[M.TRAIN_KL] = kl.item()
    if stress:
        stress_nll, stress_tokens, _ = _grouped_nll(lm, stress, horizons, None, rows, 0.0)
        loss = loss + phase.lod2_weight * stress_nll.mean()
        tokens += stress_tokens
        lod2_delta = M.delta_nll(stress_nll.detach().mean(1).cpu().numpy(), teacher.mean(1).cpu().numpy())
        metrics.update(M.mean_and_p95(lod2_delta, M.TRAIN_LOD2_DELTA_NLL))
    metrics[M.TRAIN_TOKENS_PER_S] = tokens  # divided by the step time by the caller
    return loss, metrics


def _grouped_nll(lm, contexts, horizons, teacher_logprobs, rows, kl_weight):
    """One packed forward per group of equal-length contexts (horizon_nll_grad needs equal T).
    -> per-token NLL [B, H] (sample order kept), base-model tokens processed, mean KL (0 if unused)."""
    H = horizons.shape[1]
    nll = [None] * len(contexts)
    kls, tokens = [], 0
    groups: dict[int, list[int]] = {}
    for j, c in enumerate(contexts):
        groups.setdefault(c.embeds.shape[0], []).append(j)
    for T, group in groups.items():
        with capture_logits(lm) as out:
            group_nll = horizon_nll_grad(lm, [contexts[j] for j in group], horizons[group])  # [g, H]
        for j, row in zip(group, group_nll):
            nll[j] = row
        tokens += len(group) * (T + H)
        if kl_weight > 0:
            student = out["logits"][:, :-1].float().log_softmax(-1)  # [g, H, V]
            teacher = teacher_logprobs[rows[group]].to(student.device).float()
            kls.append((teacher.exp() * (teacher - student)).sum(-1).mean(-1))  # [g]
    kl = torch.cat(kls).mean() if kls else torch.zeros(())
    return torch.stack(nll), tokens, kl


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
) -> common.TrainResult:
    """Train GistNet through `cfg.gistnet.training.phases`; `train_ids` [N, >= C + H] token ids.

    With `resume`, continue from the newest complete JT1 checkpoint of this cycle (a finished run
    returns at once). Otherwise start from `init_from` (a JT1 checkpoint, e.g. the previous cycle's)
    or from the mean-pool initialisation.
    """
    t_start = time.perf_counter()
    tcfg = cfg.gistnet.training
    C, H, K = cfg.dataset.context_tokens, cfg.dataset.horizon, cfg.dataset.block_size
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

    rows = choose_pool_rows(len(train_ids), tcfg.sample_pool, cfg.seed, cycle)
    finished = run.phase_index == len(tcfg.phases) - 1 and run.phase_complete
    needs_kl = any(p.kl_weight > 0 for p in tcfg.phases)
    # A finished run (resumed after its last phase) needs no teacher pass: it returns at once.
    pool = None if finished else build_pool(
        lm, np.asarray(train_ids)[rows.numpy()], C, H, K, keep_logprobs=needs_kl, progress=progress
    )

    def trainer_state() -> dict:
        return common.trainer_state(
            JT, cycle, run, cfg.seed, {"id": lm.model_id, "weights_checksum": base_checksum}, tcfg.batch_size,
            gister.parameters(),
            rng={
                "torch_manual_seed": "seed + s before step s (dropout)",
                "pool": f"torch.Generator().manual_seed(seed * 7919 + cycle); rows {rows.tolist()}",
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
            t0 = time.perf_counter()
            batch_rows, w_maxes = common.sample_step(
                cfg.seed, run.global_step, len(pool.ids), tcfg.batch_size, cfg.working_context.eval_w_max,
                rank, world,
            )
            torch.manual_seed(distributed.rank_seed(cfg.seed + run.global_step))
            if phase.objective == "pooling_mse":
                loss, metrics = pooling_mse_loss(gister, lm, pool, batch_rows, C, K)
            else:
                loss, metrics = delta_nll_loss(gister, lm, pool, batch_rows, w_maxes, cfg, phase)
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
            metrics.update(
                {
                    M.TRAIN_LOSS: loss.item(),
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
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if tcfg.checkpoint_every and run.global_step % tcfg.checkpoint_every == 0:
                run.phase_complete = run.phase_step == phase.max_steps
                checkpoint = _save(checkpoints_dir, cycle, gister, opt, sched, cfg, trainer_state())
        bar.close()
        if steps_timed:
            run.seconds_per_step[phase.name] = t_phase / steps_timed
        run.phase_complete = True
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
    for name, s in run.seconds_per_step.items():
        out[f"jt1/seconds_per_step/{name}"] = s
    return out
