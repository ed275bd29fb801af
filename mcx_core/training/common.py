"""Pieces every trainer (JT1, JT2, JT3) shares: optimizer, learning-rate schedule, seeded sampling and
checkpoint directories that are written atomically and found again on resume.

A checkpoint is a directory `JT{phase}_cycle{c}_step{s}/`. It is written under a temporary name and
renamed last, so a directory with the final name is always complete; an interrupted write leaves only a
`.tmp-*` directory, which `latest_checkpoint` ignores.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "config.yaml"


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


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_name(phase: int, cycle: int, step: int) -> str:
    return f"JT{phase}_cycle{cycle}_step{step}"


def latest_checkpoint(checkpoints_dir: Path, phase: int, cycle: int) -> Path | None:
    """The complete checkpoint of (phase, cycle) with the highest step, or None."""
    pattern = re.compile(rf"JT{phase}_cycle{cycle}_step(\d+)")
    found = []
    for d in Path(checkpoints_dir).glob(f"JT{phase}_cycle{cycle}_step*"):
        m = pattern.fullmatch(d.name)
        if m and (d / TRAINER_STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


def write_checkpoint(final_dir: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` to fill a temporary directory, then rename it to `final_dir` atomically.
    `write` must write `trainer_state.json` last."""
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if not (tmp / TRAINER_STATE_FILE).is_file():
            raise RuntimeError(f"checkpoint writer left no {TRAINER_STATE_FILE}")
        shutil.rmtree(final_dir, ignore_errors=True)
        tmp.rename(final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Plain state dicts only (tensors, numbers, lists; LambdaLR stores no function), so `load_optimizer`
    can use weights_only=True."""
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, scheduler) -> None:
    state = torch.load(path, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_jt_checkpoint(
    checkpoints_dir: Path, phase: int, cycle: int, step: int, parts: dict[str, Callable[[Path], None]],
    optimizer: torch.optim.Optimizer, scheduler, cfg, state: dict,
) -> Path:
    """`JT{phase}_cycle{cycle}_step{step}/`: each `parts[subdir](path)` (a module's save_pretrained),
    the optimizer, `config.yaml`, and `trainer_state.json` last — its presence marks it complete.
    With several processes only the main one writes; every rank returns once it is written (collective:
    every rank must call it)."""
    from mcx_core.training import distributed

    def write(tmp: Path) -> None:
        for subdir, save in parts.items():
            save(tmp / subdir)
        save_optimizer(tmp / OPTIMIZER_FILE, optimizer, scheduler)
        (tmp / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
        write_json(tmp / TRAINER_STATE_FILE, state)

    final_dir = Path(checkpoints_dir) / checkpoint_name(phase, cycle, step)
    if distributed.is_main_process():
        write_checkpoint(final_dir, write)
    distributed.wait_for_everyone()
    return final_dir

