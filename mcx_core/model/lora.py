"""LoRA adapters on the frozen base model (peft), the JT3 trained piece.

The adapter and the shared model. `BaseLM.model` is shared by everything else (evaluation, the runtime,
JT1, JT2), so an adapter is attached only for the length of a `with` block: `lora_adapter` (a fresh one
from `cfg.lora`) or `load_lora` (a saved one) inject peft LoRA layers into `lm.model` *in place*
(`get_peft_model` / `PeftModel.from_pretrained`) and yield the `PeftModel`; on exit `unload()` puts the
original modules back (never `merge_and_unload`: nothing is merged into the base weights). Inside the
block every existing code path that calls `lm.model` (`horizon_nll`, the runtime engine) runs *with* the
adapter; `adapter.disable_adapter()` gives the plain base model back within the block. On a normal exit
the model must be what it was before — the same module objects with the same hooks, train/eval flags and
`requires_grad`, and the same `weights_checksum()` — or `BaseModelChanged` is raised. Attaching a second
adapter while one is attached is refused.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mcx_core import checkpoints
from mcx_core.config import LoRAConfig
from mcx_core.model.base import BaseLM

ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_WEIGHTS = "adapter_model.safetensors"


class BaseModelChanged(AssertionError):
    """The shared base model is not what it was before an adapter was attached."""


def peft_config(lora: LoRAConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )


def _structure(model: torch.nn.Module) -> list[tuple]:
    """What must be identical before and after an adapter visit: every module (same object), its hooks
    and train/eval flag, and every parameter's requires_grad."""
    modules = [
        (name, id(m), len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), m.training)
        for name, m in model.named_modules()
    ]
    return modules + [(name, p.requires_grad) for name, p in model.named_parameters()]


def has_adapter(lm: BaseLM) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return hasattr(lm.model, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in lm.model.modules())


@contextmanager
def _attached(lm: BaseLM, attach: Callable[[torch.nn.Module], object]) -> Iterator:
    if has_adapter(lm):
        raise RuntimeError("the base model already has an adapter attached; detach it first")
    structure, checksum = _structure(lm.model), lm.weights_checksum()
    config, pretraining_tp = lm.model.config.to_dict(), getattr(lm.model.config, "pretraining_tp", None)
    with warnings.catch_warnings():  # peft reads the deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        adapter = attach(lm.model)
    try:
        yield adapter
    finally:
        restored = adapter.unload()  # the original modules back, nothing merged
        if restored is not lm.model:
            raise BaseModelChanged("peft unload() returned another model object")
        if pretraining_tp is not None:  # PeftModel sets it to 1 on the base model's config
            lm.model.config.pretraining_tp = pretraining_tp
    if lm.model.config.to_dict() != config:
        raise BaseModelChanged("the base model's config changed while an adapter was attached")
    if _structure(lm.model) != structure:
        raise BaseModelChanged("the base model's modules, hooks or flags differ after detaching the adapter")
    if lm.weights_checksum() != checksum:
        raise BaseModelChanged("the base model's weights changed while an adapter was attached")


@contextmanager
def lora_adapter(lm: BaseLM, lora: LoRAConfig, seed: int = 0) -> Iterator:
    """A fresh, trainable LoRA adapter on `lm.model` for the block; yields the `PeftModel`. Its
    initialisation depends on `seed` only (lora_B = 0: it starts as the identity)."""
    from peft import get_peft_model

    def attach(model):
        with torch.random.fork_rng(devices=[]):  # peft initialises on the CPU, then moves to the device
            torch.manual_seed(seed)
            return get_peft_model(model, peft_config(lora))

    with _attached(lm, attach) as adapter:
        yield adapter


def adapter_dir(checkpoint_dir: str | Path) -> Path:
    """The adapter directory of a JT3 checkpoint (or the directory itself if it holds an adapter)."""
    d = Path(checkpoint_dir)
    return d / checkpoints.LORA_DIR if (d / checkpoints.LORA_DIR / ADAPTER_CONFIG).is_file() else d


@contextmanager
def load_lora(lm: BaseLM, checkpoint_dir: str | Path, trainable: bool = False) -> Iterator:
    """The saved adapter of a JT3 checkpoint (or of a `save_pretrained` directory) on `lm.model` for the
    block; yields the `PeftModel`. `with adapter.disable_adapter():` runs the plain base model."""
    from peft import PeftModel

    path = adapter_dir(checkpoint_dir)
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"no LoRA adapter ({ADAPTER_CONFIG}) in {checkpoint_dir}")
    checkpoints.check_adapter(path, ADAPTER_CONFIG, lm.model_id)  # CheckpointError: one line

    def attach(model):
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)

    with _attached(lm, attach) as adapter:
        _set_dropout(adapter, False)  # LoRA dropout off; the base model stays as it is (eval)
        yield adapter


def lora_parameters(adapter) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's trainable parameters; raises if anything but a LoRA matrix is trainable."""
    named = [(n, p) for n, p in adapter.named_parameters() if p.requires_grad]
    others = [n for n, _ in named if ".lora_A." not in n and ".lora_B." not in n]
    if others:
        raise AssertionError(f"non-LoRA parameters are trainable: {others[:5]}")
    if not named:
        raise AssertionError("the adapter has no trainable parameters")
    return named


def save_adapter(adapter, directory: Path) -> Path:
    """Adapter weights only (safetensors) + adapter_config.json."""
    adapter.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
    (Path(directory) / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    return Path(directory)


def load_adapter_weights(adapter, checkpoint_dir: str | Path, lora: LoRAConfig) -> None:
    """Copy a saved adapter's weights into an attached one built from `lora` (resume, warm start);
    refuses an adapter of another rank, alpha, dropout or target modules."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    path = adapter_dir(checkpoint_dir)
    saved = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    want = {"r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout}
    got = {k: saved.get(k) for k in want}
    if got != want or sorted(saved.get("target_modules") or []) != sorted(lora.target_modules):
        raise ValueError(
            f"{path}: adapter {got | {'target_modules': saved.get('target_modules')}} does not match "
            f"lora config {want | {'target_modules': list(lora.target_modules)}}"
        )
    weights = load_peft_weights(str(path), device=str(next(adapter.parameters()).device))
    expected = get_peft_model_state_dict(adapter)
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise ValueError(f"{path}: adapter tensors do not match the attached adapter's")
    set_peft_model_state_dict(adapter, weights)


def _set_dropout(adapter, train: bool) -> None:
    """LoRA dropout on (training) or off; the frozen base model stays in eval mode throughout."""
    from peft.tuners.lora import LoraLayer

    for m in adapter.modules():
        if isinstance(m, LoraLayer):
            m.lora_dropout.train(train)
