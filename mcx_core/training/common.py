"""Pieces every trainer (JT1, JT2, JT3) shares: optimizer, learning-rate schedule and seeded sampling.
Checkpoints (writing, finding, resuming) live in `mcx_core.checkpoints`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


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
