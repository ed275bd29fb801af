"""Checkpoints: the one home for naming, writing, finding and reading them.

A checkpoint is a directory `JT{phase}_cycle{c}_step{s}/` (the seed's phase names: JT1 GistNet, JT2
LensNet, JT3 LoRA) holding each trained module's `save_pretrained` directory (`gistnet/`, `lensnet/`,
`lora/`), `optimizer.pt`, `config.yaml` and `trainer_state.json`. It is written under a temporary name
and renamed last, so a directory with the final name is always complete; an interrupted write leaves
only a hidden temp directory, which nothing here lists; a rewrite swaps directories (the old one renamed
aside, the new one in, then the old deleted). The models load themselves from one
(`Gister.from_pretrained`, `LensNet.from_pretrained`, `lora.load_lora`) through `load_module` /
`check_adapter`, which validate before anything is allocated: files present and readable, config.json
parsed and its sizes bounded, the weights' names and shapes those of the config's model, and the base
model the checkpoint was trained on the one loaded. Each failure is one `CheckpointError` line.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from mcx_core.artifacts import ArtifactPaths, read_json, swap_dir, temp_path, write_json
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
    """Call `write(tmp_dir)` to fill a temporary directory (unique to this process), then swap it in at
    `final_dir` (`artifacts.swap_dir`: the old one aside, the new one in, the old one deleted).
    `write` must write `trainer_state.json` last."""
    final_dir = Path(final_dir)
    tmp = temp_path(final_dir)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if not (tmp / TRAINER_STATE_FILE).is_file():
            raise RuntimeError(f"checkpoint writer left no {TRAINER_STATE_FILE}")
        swap_dir(tmp, final_dir)
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


# ---------------------------------------------------------------------------------------------- validated loading

MODULE_CONFIG_FILE = "config.json"
MAX_D_MODEL = 1 << 16  # wider than any base model this project loads; a larger value is a corrupt config
MAX_LEVEL = 16
MAX_PARAMETERS = 1 << 31  # an auxiliary net above 2 G parameters is a corrupt config, not a GistNet


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: one line naming the file and what is wrong."""


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (not a complete checkpoint)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _weights_header(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors file's header (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing (not a complete checkpoint)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0][:200]})") from None


def _bounded_int(config: dict, key: str, lo: int, hi: int, where: Path) -> int:
    v = config.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CheckpointError(f"{where}: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def trained_on(checkpoint: Path) -> dict | None:
    """The `base_model` record (`id`, weights checksum) of the JT checkpoint holding `checkpoint` (the
    checkpoint itself or one of its module directories); None for a bare `save_pretrained` directory."""
    for d in (Path(checkpoint), Path(checkpoint).parent):
        state = d / TRAINER_STATE_FILE
        if state.is_file():
            try:
                return read_json(state).get("base_model") or None
            except (ValueError, OSError, AttributeError):
                raise CheckpointError(f"{state}: not a valid trainer state (not valid JSON)") from None
    return None


def check_base_model(checkpoint: Path, model_id: str | None) -> None:
    """CheckpointError unless the checkpoint was trained on base model `model_id` (unknown: not checked)."""
    base = trained_on(checkpoint)
    if model_id is not None and base and base.get("id") and base["id"] != model_id:
        raise CheckpointError(
            f"{checkpoint} was trained on base model {base['id']}, but the config loads {model_id}: "
            "use the config it was trained with"
        )


def load_module(directory: Path, module: str, weights_file: str, build: Callable[[dict], torch.nn.Module],
                d_model: int | None = None, model_id: str | None = None) -> torch.nn.Module:
    """The `module` (`gistnet`, `lensnet`) saved in `directory` (a JT checkpoint or a `save_pretrained`
    directory), validated before any weight is allocated: config.json parses and its `d_model` /
    `max_level` are bounded (and `d_model` is the base model's, when given), `build(config)` makes a
    model (first on the meta device, so an absurd size costs nothing) of at most MAX_PARAMETERS whose
    tensor names and shapes are the file's, the checkpoint was trained on `model_id`. CheckpointError
    (one line) otherwise; the loaded module on the CPU otherwise."""
    from pydantic import ValidationError
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a checkpoint directory")
    d = module_dir(root, module)
    cfg_path, w_path = d / MODULE_CONFIG_FILE, d / weights_file
    config = _read_config(cfg_path)
    got = _bounded_int(config, "d_model", 1, MAX_D_MODEL, cfg_path)
    _bounded_int(config, "max_level", 1, MAX_LEVEL, cfg_path)
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{cfg_path}: model must be an object of {module} settings")
    if d_model is not None and got != d_model:
        raise CheckpointError(f"{cfg_path}: d_model {got} is not the base model's {d_model} (trained on another model)")
    check_base_model(root, model_id)
    try:
        with torch.device("meta"):
            shell = build(config)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(["model", *(str(x) for x in e["loc"])])
        raise CheckpointError(f"{cfg_path}: {field}: {e['msg']}") from None
    except (ValueError, TypeError, KeyError, AssertionError, RuntimeError) as err:
        raise CheckpointError(f"{cfg_path}: not a valid {module} config ({str(err).splitlines()[0][:200]})") from None
    n = sum(p.numel() for p in shell.parameters())
    if n > MAX_PARAMETERS:
        raise CheckpointError(f"{cfg_path}: describes a {module} of {n:,} parameters (limit {MAX_PARAMETERS:,})")
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    have = _weights_header(w_path)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = [k for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    if missing or extra or wrong:
        what = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {', '.join(extra[:3])}"] if extra else []) + (
            [f"{k} is {list(have[k])}, config.json says {list(want[k])}" for k in wrong[:2]])
        raise CheckpointError(f"{w_path}: weights do not match {cfg_path.name}: {'; '.join(what)}")
    net = build(config)
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{w_path}: not a readable safetensors file ({str(err).splitlines()[0][:200]})") from None
    net.load_state_dict(state, strict=True)
    return net


def check_adapter(path: Path, config_file: str, model_id: str | None = None) -> None:
    """A LoRA adapter directory that peft can load: its adapter config parses, its safetensors header
    parses, and the checkpoint was trained on `model_id`. CheckpointError (one line) otherwise."""
    path = Path(path)
    config = _read_config(path / config_file)
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_D_MODEL:
        raise CheckpointError(f"{path / config_file}: r must be an integer in [1, {MAX_D_MODEL}], got {r!r}")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path} holds no adapter weights (*.safetensors)")
    for w in weights:
        _weights_header(w)
    check_base_model(path, model_id)
