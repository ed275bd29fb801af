"""JT3: LoRA adapters on the frozen base model, trained on Loss@H (SPEC §6); GistNet and LensNet frozen.

The adapter lives in `mcx_core.model.lora` (attached only for the length of a `with` block).

A sample: ids [C + H]. Its working context is the one the runtime would hold at cursor C: the first
C − S·R tokens are ingested at once (`WorkingContext.initial`), then S = `lora.refocus_steps` steps of
R = `runtime.refocus_every` tokens: ingest, `FocusAllocator.fit`, `LensNetPolicy.scores`,
`FocusAllocator.step`, `check_invariants` — `MegaContextEngine.step` without its base-model forward.
(Voluntary actions need `allocator.min_residency` steps of age, so S = 1 would leave LensNet no say.)
The context does not depend on the adapter (LensNet reads token embeddings and gists only) and is built
without grad; W_max is drawn per sample from `working_context.eval_w_max`, as in JT1.

Loss@H: mean NLL of the H horizon tokens after [working context], adapter on (`horizon_nll_grad`, one
packed forward per group of equal-length contexts). Gradients reach the LoRA matrices only: the base is
frozen and GistNet and LensNet run under no_grad. Every `lora.without_adapter_every` steps the same batch
is also scored with the adapter disabled (`train/lora_loss_without_adapter`, `train/lora_gain`).

Checkpoints `JT3_cycle{c}_step{s}/`: `lora/` (peft `save_pretrained`: adapter_model.safetensors +
adapter_config.json, adapter weights only), `gistnet/` and `lensnet/` (the frozen nets, so a checkpoint
is self-contained: `load_gister` / `load_lensnet` read them), `optimizer.pt`, `config.yaml`,
`trainer_state.json` (last, via `checkpoints.write_checkpoint`). Step s samples with a generator seeded by
(seed, s) and seeds torch (LoRA dropout) with seed + s; the fresh adapter is initialised from `seed`
alone. So a run resumed from its newest checkpoint takes exactly the steps of an uninterrupted one.

Data parallel (`accelerate launch`, N processes; see `training.distributed`): every rank attaches the
adapter to its own copy of the base model, builds the working contexts of its slice of step s's
permutation only (effective batch batch_size · N; LoRA dropout seeded with seed + s + r · 1_000_003),
the LoRA gradients are averaged over ranks before clipping, and only rank 0 logs and writes
checkpoints. One process is exactly the single-process trainer.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mcx_core.compression.gistnet import tree_inputs_fn
from mcx_core import checkpoints
from mcx_core.config import MegaContextConfig
from mcx_core.focus.allocator import FocusAllocator
from mcx_core.focus.lensnet import LensNet, LensNetPolicy
from mcx_core.model.base import BaseLM
from mcx_core.model.lora import (
    _set_dropout,
    load_adapter_weights,
    lora_adapter,
    lora_parameters,
    save_adapter,
)
from mcx_core.model.scoring import ConditionInput, horizon_nll_grad
from mcx_core.model.tree import GistFn, MegaContextTree
from mcx_core.model.working_context import WorkingContext
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import TelemetrySink
from mcx_core.training import common, distributed

log = logging.getLogger(__name__)

JT = 3


# ---------------------------------------------------------------------------------------------- samples


@dataclass
class LoRASample:
    """One sample's working context as the base model reads it, and its horizon."""

    condition: ConditionInput
    horizon: torch.Tensor  # [H] long
    cost: int  # working-context cost (positions before the horizon)
    focus_actions: int  # voluntary LensNet actions during its refocus steps


@torch.no_grad()
def focused_context(
    cfg: MegaContextConfig,
    lm: BaseLM,
    gister: GistFn,
    lensnet: LensNet,
    history: torch.Tensor,
    w_max: int,
) -> tuple[WorkingContext, int]:
    """The runtime's working context at the end of `history` [C] (module docstring), and the number of
    voluntary actions LensNet's scores made the allocator take."""
    wcc, R, S = cfg.working_context, cfg.runtime.refocus_every, cfg.lora.refocus_steps
    history = torch.as_tensor(history, dtype=torch.long).flatten()
    C = len(history)
    prefill = max(0, C - S * R)
    tree = MegaContextTree(lm.d_model, lm.embed, gister, cfg.dataset.block_size, max_level=lensnet.max_level,
                           input_fn=tree_inputs_fn(lm, gister, cfg.dataset.block_size))
    if prefill:
        tree.ingest(history[:prefill])
        wc = WorkingContext.initial(tree, w_max, wcc.recent_tokens, wcc.position_scheme, wcc.sink_tokens)
    else:
        wc = WorkingContext(tree, w_max, wcc.recent_tokens, wcc.position_scheme, sink_tokens=wcc.sink_tokens)
    allocator = FocusAllocator(cfg.allocator, w_max)
    policy = LensNetPolicy(lensnet, lm.embed, ages_fn=allocator.ages)
    actions = 0
    for step, lo in enumerate(range(prefill, C, R)):
        tree.ingest(history[lo : lo + R])
        wc.sync()
        allocator.fit(wc)  # forced collapses first, so LensNet scores a context within budget
        stats = allocator.step(wc, policy.scores(wc, tree, step))
        actions += len(stats.actions) - stats.num_forced
        wc.check_invariants()
    if policy.causality_violations:
        raise AssertionError(f"LensNet read {policy.causality_violations} spans past the cursor")
    return wc, actions


def build_samples(
    cfg: MegaContextConfig,
    lm: BaseLM,
    gister: GistFn,
    lensnet: LensNet,
    ids: torch.Tensor,
    w_maxes: list[int],
) -> list[LoRASample]:
    """`ids` [B, >= C + H] -> one `LoRASample` per row, its context chosen by LensNet + allocator."""
    C, H = cfg.dataset.context_tokens, cfg.dataset.horizon
    out = []
    for row, w in zip(torch.as_tensor(ids, dtype=torch.long), w_maxes):
        wc, actions = focused_context(cfg, lm, gister, lensnet, row[:C], w)
        with torch.no_grad():
            embeds, positions, _ = wc.assemble(lm.embed)  # [T, d], [T]
        start = wc.tree.cursor if wc.position_scheme == "center" else positions.numel()
        out.append(LoRASample(ConditionInput(embeds, positions, start), row[C : C + H], wc.cost, actions))
    return out


def sample_nll(lm: BaseLM, samples: list[LoRASample], batch_size: int | None = None) -> torch.Tensor:
    """Per-token horizon NLL [B, H] in sample order, with whatever adapter state `lm.model` has; one
    packed forward per group of equal-length contexts (at most `batch_size` samples each). Keeps the
    graph when grad is enabled."""
    groups: dict[int, list[int]] = {}
    for j, s in enumerate(samples):
        groups.setdefault(s.condition.embeds.shape[0], []).append(j)
    rows: list[torch.Tensor | None] = [None] * len(samples)
    for group in groups.values():
        step = batch_size or len(group)
        for a in range(0, len(group), step):
            part = group[a : a + step]
            horizons = torch.stack([samples[j].horizon for j in part])  # [g, H]
            nll = horizon_nll_grad(lm, [samples[j].condition for j in part], horizons)  # [g, H]
            for j, r in zip(part, nll):
                rows[j] = r
    return torch.stack(rows)


def jt3_loss(lm: BaseLM, samples: list[LoRASample]) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss@H of the batch (mean NLL over every horizon token) with the adapter as attached."""
    nll = sample_nll(lm, samples)  # [B, H]
    loss = nll.mean()
    metrics = {
        M.TRAIN_LORA_LOSS: loss.item(),
        M.TRAIN_LOSS_AT_H: loss.item(),
        M.TRAIN_LORA_ACTIVE_TOKENS: float(np.mean([s.cost for s in samples])),
        M.TRAIN_LORA_FOCUS_ACTIONS: float(np.mean([s.focus_actions for s in samples])),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------- training


def module_checksum(module) -> str:
    """Identity of a frozen net's weights (a non-module, e.g. MeanPoolGister, by its type)."""
    if not isinstance(module, torch.nn.Module):
        return type(module).__name__
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _save(checkpoints_dir, cycle, adapter, gister, lensnet, opt, sched, cfg, state) -> Path:
    parts = {checkpoints.LORA_DIR: lambda d: save_adapter(adapter, d), checkpoints.LENSNET_DIR: lensnet.save_pretrained}
    if isinstance(gister, torch.nn.Module) and hasattr(gister, "save_pretrained"):
        parts[checkpoints.GISTNET_DIR] = gister.save_pretrained
    return checkpoints.save_jt_checkpoint(checkpoints_dir, JT, cycle, state["step"], parts, opt, sched, cfg, state)


@contextmanager
def eval_mode(*modules) -> Iterator[None]:
    """Frozen nets run in eval mode (no dropout); their previous mode is restored afterwards."""
    nets = [m for m in modules if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in nets]
    for m in nets:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(nets, modes):
            m.train(mode)


def train_lora(
    cfg: MegaContextConfig,
    lm: BaseLM,
    gister: GistFn,
    lensnet: LensNet,
    train_ids: np.ndarray | torch.Tensor,
    checkpoints_dir: Path,
    sink: TelemetrySink,
    cycle: int = 0,
    resume: bool = True,
    progress: bool = True,
    init_from: Path | None = None,
) -> common.TrainResult:
    """Train a LoRA adapter for `lora.training.max_steps` steps on `train_ids` [N, >= C + H].

    With `resume`, continue from the newest complete JT3 checkpoint of this cycle (a finished run returns
    at once; it must have been trained against the same base weights, GistNet and LensNet). Otherwise
    start from `init_from` (a JT3 checkpoint, e.g. the previous cycle's) or a fresh adapter. `lm` is
    returned exactly as it came: the adapter lives in the checkpoint's `lora/`, use `load_lora`.
    """
    t_start = time.perf_counter()
    tcfg = cfg.lora.training
    C, H = cfg.dataset.context_tokens, cfg.dataset.horizon
    checkpoints_dir = Path(checkpoints_dir)
    train_ids = torch.as_tensor(np.asarray(train_ids), dtype=torch.long)
    if train_ids.ndim != 2 or train_ids.shape[1] < C + H:
        raise ValueError(f"train_ids must be [N, >= {C + H}], got {tuple(train_ids.shape)}")
    if getattr(gister, "max_level", lensnet.max_level) < lensnet.max_level:
        raise ValueError(f"GistNet has levels up to {gister.max_level}, LensNet reads {lensnet.max_level}")
    base_checksum = lm.weights_checksum()
    frozen = {"gistnet": module_checksum(gister), "lensnet": module_checksum(lensnet)}
    sink, rank, world = distributed.main_sink(sink), distributed.process_index(), distributed.world_size()
    progress = progress and distributed.is_main_process()

    run = common.Run()
    resume_dir, state = common.resume_point(checkpoints_dir, JT, cycle, resume, base_checksum)
    if state is not None:
        if state["frozen"] != frozen:
            raise ValueError(f"{resume_dir} was trained with another GistNet/LensNet ({state['frozen']})")
        run = common.Run(**state["run"])

    with eval_mode(gister, lensnet), lora_adapter(lm, cfg.lora, cfg.seed) as adapter:
        if resume_dir is not None:
            load_adapter_weights(adapter, resume_dir, cfg.lora)
            log.info("JT3: resuming from %s (step %d)", resume_dir, run.step)
        elif init_from is not None:
            load_adapter_weights(adapter, init_from, cfg.lora)
        params = lora_parameters(adapter)
        distributed.broadcast_parameters(p for _, p in params)  # every rank starts from rank 0's adapter
        n_params = sum(p.numel() for _, p in params)
        opt = common.make_optimizer(adapter, tcfg.lr, tcfg.weight_decay)  # asserts every parameter is in it
        sched = common.make_scheduler(opt, tcfg.warmup_steps, tcfg.max_steps)
        if resume_dir is not None:
            checkpoints.load_optimizer(resume_dir / checkpoints.OPTIMIZER_FILE, opt, sched)
        sink.log_params(
            {
                "jt3.lora_parameters": n_params,
                "jt3.lora_rank": cfg.lora.rank,
                "jt3.lora_target_modules": ",".join(cfg.lora.target_modules),
            }
        )
        sink.log_metrics({M.LORA_PARAMETERS: float(n_params)}, step=run.step)

        def trainer_state() -> dict:
            return common.trainer_state(
                JT, cycle, run, cfg.seed, {"id": lm.model_id, "weights_checksum": base_checksum}, tcfg.batch_size,
                lora_params,
                rng={
                    "torch_manual_seed": "seed + s before step s (LoRA dropout)",
                    "adapter_init": "torch.manual_seed(seed) before get_peft_model",
                },
                step=run.step, max_steps=tcfg.max_steps, frozen=frozen,
                lora={**cfg.lora.model_dump(mode="json", exclude={"training"}), "parameters": n_params},
            )

        checkpoint = resume_dir
        lora_params = [p for _, p in params]
        bar = tqdm(total=tcfg.max_steps, initial=run.step, desc="JT3 LoRA", disable=not progress)
        while run.step < tcfg.max_steps:
            t0 = time.perf_counter()
            rows, w_maxes = common.sample_step(
                cfg.seed, run.step, len(train_ids), tcfg.batch_size, cfg.working_context.eval_w_max, rank, world
            )
            samples = build_samples(cfg, lm, gister, lensnet, train_ids[rows], w_maxes)
            torch.manual_seed(distributed.rank_seed(cfg.seed + run.step))
            _set_dropout(adapter, True)
            loss, metrics = jt3_loss(lm, samples)
            _set_dropout(adapter, False)
            # backward + gradient all-reduce over ranks + clipping; NaN when any rank's loss is non-finite
            grad_norm = distributed.backward_step(loss, opt, lora_params, tcfg.grad_clip)
            if common.stop_if_nonfinite(loss, grad_norm, sink, run.step, M.TRAIN_LORA_LOSS, "JT3"):
                run.nan_free = False
                break
            every = cfg.lora.without_adapter_every
            if every and run.step % every == 0:  # the step's batch, adapter off (before this update)
                with torch.no_grad(), adapter.disable_adapter():
                    without = sample_nll(lm, samples).mean().item()
                metrics[M.TRAIN_LORA_LOSS_WITHOUT_ADAPTER] = without
                metrics[M.TRAIN_LORA_GAIN] = without - loss.item()
            lr = common.apply_step(opt, sched)
            run.step += 1
            dt = time.perf_counter() - t0
            tokens = sum(s.cost + H for s in samples)
            metrics.update(
                {
                    M.TRAIN_LORA_GRAD_NORM: grad_norm,
                    M.TRAIN_LORA_LR: lr,
                    M.TRAIN_LORA_TOKENS_PER_S: tokens / dt,
                }
            )
            if run.step % tcfg.log_every == 0 or run.step == tcfg.max_steps:
                metrics = distributed.reduce_metrics(metrics, sum_keys=[M.TRAIN_LORA_TOKENS_PER_S])
                sink.log_metrics(metrics, step=run.step)
                run.history.append({"step": run.step, **metrics})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if tcfg.checkpoint_every and run.step % tcfg.checkpoint_every == 0 and run.step < tcfg.max_steps:
                checkpoint = _save(
                    checkpoints_dir, cycle, adapter, gister, lensnet, opt, sched, cfg, trainer_state()
                )
        bar.close()
        checkpoint = common.last_checkpoint(checkpoint, run.step, lambda: _save(
            checkpoints_dir, cycle, adapter, gister, lensnet, opt, sched, cfg, trainer_state()
        ))
    # Leaving lora_adapter detached the adapter and checked the base model (BaseModelChanged otherwise).
    if {"gistnet": module_checksum(gister), "lensnet": module_checksum(lensnet)} != frozen:
        raise AssertionError("JT3 changed GistNet or LensNet; both must stay frozen")
    return common.finish("jt3", run, run.step, time.perf_counter() - t_start, sink, _summary(run),
                         checkpoint=checkpoint)


def _summary(run: common.Run, window: int = 10) -> dict[str, float]:
    """Run-level numbers beyond steps, wall time and NaN-freedom: Loss@H at the start and end (mean of
    the first / last `window` logged steps)."""
    out = {}
    losses = [h[M.TRAIN_LORA_LOSS] for h in run.history if M.TRAIN_LORA_LOSS in h]
    if losses:
        out["jt3/loss_at_h_start"] = M.mean(losses[:window])
        out["jt3/loss_at_h_end"] = M.mean(losses[-window:])
    return out
