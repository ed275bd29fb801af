"""Checkpoints: the one home for naming, writing, finding and reading them.

A checkpoint is a directory `JT{phase}_cycle{c}_step{s}/` (the seed's phase names: JT1 GistNet, JT2
LensNet, JT3 LoRA) holding each trained module's `save_pretrained` directory (`gistnet/`, `lensnet/`,
`lora/`), `optimizer.pt`, `config.yaml` and `trainer_state.json`. It is written under a temporary name
and renamed last, so a directory with the final name is always complete; an interrupted write leaves
only a `.tmp-*` directory, which nothing here lists. The models load themselves from one
(`Gister.from_pretrained`, `LensNet.from_pretrained`, `lora.load_lora`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from mcx_core.artifacts import ArtifactPaths, read_json, write_json
from mcx_core.config import MegaContextConfig
from mcx_core.telemetry import metrics as M
from mcx_core.training import distributed

TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "config.yaml"
GISTNET_DIR = "gistnet"
LENSNET_DIR = "lensnet"
LORA_DIR = "lora"
PHASE_TRAINS = {1: "GistNet", 2: "LensNet", 3: "LoRA"}
_NAME = re.compile(r"JT(\d)_cycle(\d+)_step(\d+)")

# ---------------------------------------------------------------------------------------------- names


def checkpoint_name(phase: int, cycle: int, step: int) -> str:
    return f"JT{phase}_cycle{cycle}_step{step}"


def parse_name(name: str) -> tuple[int, int, int] | None:
    """(phase, cycle, step) of a checkpoint directory name, or None for anything else."""
    m = _NAME.fullmatch(name)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def is_complete(checkpoint: Path) -> bool:
    return (Path(checkpoint) / TRAINER_STATE_FILE).is_file()


def list_checkpoints(checkpoints_dir: Path, phase: int, cycle: int | None = None) -> list[Path]:
    """Complete JT{phase} checkpoints (of `cycle`, or of every cycle) in training order (cycle, step)."""
    found = []
    for d in Path(checkpoints_dir).glob(f"JT{phase}_cycle*_step*"):
        parsed = parse_name(d.name)
        if parsed and parsed[0] == phase and (cycle is None or parsed[1] == cycle) and is_complete(d):
            found.append((parsed[1:], d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(checkpoints_dir: Path, phase: int, cycle: int) -> Path | None:
    """The complete checkpoint of (phase, cycle) with the highest step, or None."""
    found = list_checkpoints(checkpoints_dir, phase, cycle)
    return found[-1] if found else None


def newest_per_cycle(checkpoints_dir: Path, phase: int) -> dict[int, Path]:
    """cycle -> its complete JT{phase} checkpoint with the highest step."""
    return {parse_name(d.name)[1]: d for d in list_checkpoints(checkpoints_dir, phase)}


# ---------------------------------------------------------------------------------------------- a config's checkpoints


def final_cycle(cfg: MegaContextConfig) -> int:
    """The cycle whose checkpoints the evaluations, the gate and the sweep read: the last of `n_cycles`."""
    return cfg.training_loop.n_cycles - 1


def jt_checkpoint(cfg: MegaContextConfig, phase: int, cycle: int | None = None) -> Path:
    """The newest complete JT{phase} checkpoint of `cycle` (default: the final cycle), or
    FileNotFoundError naming where it looked."""
    cycle = final_cycle(cfg) if cycle is None else cycle
    where = ArtifactPaths.from_config(cfg).checkpoints
    found = latest_checkpoint(where, phase, cycle)
    if found is None:
        raise FileNotFoundError(
            f"no complete JT{phase}_cycle{cycle}_step* checkpoint under {where}; train {PHASE_TRAINS[phase]} first"
        )
    return found


def jt1_checkpoint(cfg: MegaContextConfig, cycle: int | None = None) -> Path:
    return jt_checkpoint(cfg, 1, cycle)


def jt2_checkpoint(cfg: MegaContextConfig, cycle: int | None = None) -> Path:
    return jt_checkpoint(cfg, 2, cycle)


def jt3_checkpoint(cfg: MegaContextConfig, cycle: int | None = None) -> Path:
    return jt_checkpoint(cfg, 3, cycle)


def previous_checkpoint(cfg: MegaContextConfig, current: Path, phase: int = 1) -> Path | None:
    """The newest complete JT{phase} checkpoint other than `current` (for drift)."""
    done = [
        p for p in list_checkpoints(ArtifactPaths.from_config(cfg).checkpoints, phase)
        if p.resolve() != Path(current).resolve()
    ]
    return max(done, key=lambda p: p.stat().st_mtime, default=None)


# ---------------------------------------------------------------------------------------------- reading


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's `trainer_state.json`."""
    return read_json(Path(checkpoint) / TRAINER_STATE_FILE)


def checkpoint_id(checkpoint: Path) -> str:
    """A checkpoint's name plus a hash of its trainer state (a retrained directory of the same name differs)."""
    state = Path(checkpoint) / TRAINER_STATE_FILE
    return f"{Path(checkpoint).name}:{hashlib.sha256(state.read_bytes()).hexdigest()[:12]}"


def module_dir(checkpoint: Path, module: str) -> Path:
    """The `save_pretrained` directory of `module` (`gistnet`, `lensnet`, `lora`) inside a JT checkpoint,
    or `checkpoint` itself when it is such a directory already."""
    d = Path(checkpoint)
    return d / module if (d / module).is_dir() else d


def check_training_finite(checkpoint: Path) -> tuple[list[str], dict[str, float]]:
    """Problems with a JT checkpoint's logged training history: non-finite values, phases stopped on NaN."""
    state = read_state(checkpoint)
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


# ---------------------------------------------------------------------------------------------- writing


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


def save_jt_checkpoint(
    checkpoints_dir: Path, phase: int, cycle: int, step: int, parts: dict[str, Callable[[Path], None]],
    optimizer: torch.optim.Optimizer, scheduler, cfg, state: dict,
) -> Path:
    """`JT{phase}_cycle{cycle}_step{step}/`: each `parts[subdir](path)` (a module's save_pretrained),
    the optimizer, `config.yaml`, and `trainer_state.json` last — its presence marks it complete.
    With several processes only the main one writes; every rank returns once it is written (collective:
    every rank must call it)."""
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
