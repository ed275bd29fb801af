"""Pieces every trainer (JT1, JT2, JT3) shares: optimizer, learning-rate schedule and seeded sampling.
Checkpoints (writing, finding, resuming) live in `mcx_core.checkpoints`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mcx_core import checkpoints
from mcx_core.telemetry import metrics as M
from mcx_core.training import distributed

log = logging.getLogger(__name__)


def make_optimizer(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over every trainable parameter of `module`; 1-D parameters (norms, biases) get no decay."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    assert_all_in_optimizer(module, opt)
    return opt


def assert_all_in_optimizer(module: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every trainable parameter must be in an optimizer param group (the never-trained-aux-nets trap)."""
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in in_opt]
    if missing:
        raise AssertionError(f"parameters missing from the optimizer: {missing}")


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """LR multiplier for step s (0-based): linear warmup to 1, then cosine decay to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_scheduler(opt: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(min(warmup_steps, total_steps - 1), total_steps))


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator that depends only on (seed, step): sampling at step s is the same whether the run
    was interrupted and resumed or not."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ---------------------------------------------------------------------------------------------- the trainers' skeleton
# Every trainer (JT1 GistNet, JT2 LensNet, JT3 LoRA) has the same shape: find the checkpoint to resume
# from, build its optimizer, loop over seeded steps (stop on a non-finite step without applying it),
# checkpoint atomically, end with a run summary and a `TrainResult`. The loop bodies stay in each
# trainer, explicit; these are the pieces they share.

SAMPLING_RULE = "step s draws with torch.Generator().manual_seed(seed * 1_000_003 + s)"


@dataclass
class Run:
    """A step-counted trainer's progress (JT2, JT3); `trainer_state.json` holds it under `run`."""

    step: int = 0
    nan_free: bool = True
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainResult:
    """What a trainer returns."""

    checkpoint: Path
    metrics: dict[str, float]  # last logged metrics + run summary (jt{n}/*)
    history: list[dict[str, float]]  # every logged step, {"step": s, metric: value, ...}
    nan_free: bool
    steps: int
    initial_metrics: dict[str, float] = field(default_factory=dict)  # JT2: held-out metrics before step 1


def sample_step(seed: int, step: int, n_rows: int, batch_size: int, w_values: list[int], rank: int = 0,
                world: int = 1) -> tuple[torch.Tensor, list[int]]:
    """Rows (of `n_rows`) and a W_max per row for step `step`: a function of (seed, step) only (and of the
    rank: rank r of `world` takes its own slice of the step's draws, `distributed.rank_rows`)."""
    g = step_generator(seed, step)
    rows = distributed.rank_rows(torch.randperm(n_rows, generator=g), batch_size, rank)
    b = len(rows)
    w_idx = torch.randint(len(w_values), (world * b,), generator=g)[rank * b : (rank + 1) * b]
    return rows, [w_values[i] for i in w_idx.tolist()]


def resume_point(checkpoints_dir: Path, phase: int, cycle: int, resume: bool,
                 base_checksum: str | None = None) -> tuple[Path | None, dict | None]:
    """(newest complete JT{phase} checkpoint of `cycle`, its trainer state), or (None, None) without
    `resume` or checkpoint. Every rank waits first, so all read the same one. With `base_checksum`, a
    checkpoint trained against other base-model weights is refused."""
    distributed.wait_for_everyone()
    found = checkpoints.latest_checkpoint(checkpoints_dir, phase, cycle) if resume else None
    if found is None:
        return None, None
    state = checkpoints.read_state(found)
    if base_checksum is not None and state["base_model"]["weights_checksum"] != base_checksum:
        raise ValueError(f"{found} was trained against other base-model weights ({state['base_model']})")
    return found, state


def trainer_state(phase: int, cycle: int, run, seed: int, base_model: dict, batch_size: int, params,
                  rng: dict | None = None, **fields) -> dict:
    """The `trainer_state.json` fields every trainer writes (`run` is its progress dataclass), plus its own."""
    return {
        "trainer": f"JT{phase}",
        "cycle": cycle,
        "nan_free": run.nan_free,
        "metrics": run.history[-1] if run.history else {},
        "rng": {"seed": seed, "sampling": SAMPLING_RULE, **(rng or {})},
        "base_model": base_model,
        **distributed.state_fields(batch_size, params),
        **fields,
        "run": run.__dict__,
    }


def stop_if_nonfinite(loss: torch.Tensor, grad_norm: float, sink, step: int, loss_metric: str, what: str) -> bool:
    """True when the step's loss or gradient norm is not finite: logged (`loss_metric` NaN, `train/nan` 1)
    so the caller stops without applying the step and the weights stay the last finite ones."""
    if math.isfinite(loss.item()) and math.isfinite(grad_norm):
        return False
    log.error("%s: non-finite loss/grad at step %d; stopped", what, step)
    sink.log_metrics({loss_metric: math.nan, M.TRAIN_NAN: 1.0}, step=step)
    return True


def apply_step(opt: torch.optim.Optimizer, sched) -> float:
    """Apply the optimizer and scheduler step; the learning rate the step used."""
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    return lr


def last_checkpoint(checkpoint: Path | None, step: int, save: Callable[[], Path]) -> Path:
    """`checkpoint` when it already holds step `step`, else a fresh one from `save()`."""
    if checkpoint is None or checkpoints.read_state(checkpoint)["step"] != step:
        return save()
    return checkpoint


def finish(prefix: str, run, steps: int, seconds: float, sink, extra: dict[str, float] | None = None,
           **result) -> TrainResult:
    """Log the run summary (`{prefix}/steps`, `/seconds`, `/nan_free` plus `extra`) and return the result."""
    summary = {f"{prefix}/steps": float(steps), f"{prefix}/seconds": seconds, f"{prefix}/nan_free": float(run.nan_free),
               **(extra or {})}
    sink.log_metrics(summary, step=steps)
    return TrainResult(
        metrics={**(run.history[-1] if run.history else {}), **summary}, history=run.history,
        nan_free=run.nan_free, steps=steps, **result,
    )
