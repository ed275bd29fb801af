"""Held-out Loss@H with and without a JT3 LoRA adapter, on the same LensNet-chosen working contexts."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from mcx_core import checkpoints, data
from mcx_core.compression.gistnet import load_gister
from mcx_core.config import MegaContextConfig
from mcx_core.focus.lensnet import LensNet, load_lensnet
from mcx_core.model.base import BaseLM
from mcx_core.model.lora import load_lora
from mcx_core.model.tree import GistFn
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import NullSink, TelemetrySink
from mcx_core.training.lora import build_samples, eval_mode, module_checksum, sample_nll

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_lora(
    cfg: MegaContextConfig,
    lm: BaseLM,
    gister: GistFn,
    lensnet: LensNet,
    checkpoint: str | Path,
    samples: np.ndarray | torch.Tensor,
    w_max: int | None = None,
) -> dict[str, float]:
    """Held-out Loss@H with and without the checkpoint's adapter, on the same LensNet-chosen working
    contexts (at `w_max`, default `working_context.w_max`) of `samples` [n, >= C + H]."""
    C, H = cfg.dataset.context_tokens, cfg.dataset.horizon
    ids = torch.as_tensor(np.asarray(samples), dtype=torch.long)
    if ids.ndim != 2 or ids.shape[1] < C + H or len(ids) == 0:
        raise ValueError(f"samples must be [n >= 1, >= {C + H}], got {tuple(ids.shape)}")
    if checkpoints.is_complete(checkpoint):
        trained_with = checkpoints.read_state(checkpoint).get("frozen")
        now = {"gistnet": module_checksum(gister), "lensnet": module_checksum(lensnet)}
        if trained_with is not None and trained_with != now:
            log.warning(
                "evaluate_lora: %s was trained with another GistNet/LensNet than the ones given", checkpoint
            )
    w = w_max or cfg.working_context.w_max
    with eval_mode(gister, lensnet):
        built = build_samples(cfg, lm, gister, lensnet, ids, [w] * len(ids))
    with load_lora(lm, checkpoint) as adapter:
        with_adapter = sample_nll(lm, built, cfg.evaluation.batch_size).mean(1).cpu().numpy()  # [n]
        with adapter.disable_adapter():
            without = sample_nll(lm, built, cfg.evaluation.batch_size).mean(1).cpu().numpy()
    return {
        M.EVAL_LORA_LOSS_AT_H: M.mean(with_adapter),
        M.EVAL_LORA_LOSS_AT_H_WITHOUT_ADAPTER: M.mean(without),
        **M.mean_and_p95(with_adapter - without, M.EVAL_LORA_DELTA_LOSS),
        M.EVAL_LORA_SAMPLES: float(len(ids)),
    }


def run_lora_eval(cfg: MegaContextConfig, lm: BaseLM, checkpoint: Path, sink: TelemetrySink | None = None,
                  per_dataset: int = 4, cycle: int | None = None) -> dict[str, float]:
    """Held-out Loss@H with and without the JT3 adapter (same LensNet-chosen contexts), per dataset,
    with `cycle`'s GistNet and LensNet (default: the final cycle's)."""
    gister, lensnet = load_gister(checkpoints.jt1_checkpoint(cfg, cycle), lm), load_lensnet(checkpoints.jt2_checkpoint(cfg, cycle), lm.device)
    out: dict[str, float] = {}
    for ds, (_, ids) in data.load_eval_samples(cfg).items():
        for k, v in evaluate_lora(cfg, lm, gister, lensnet, checkpoint, ids[:per_dataset]).items():
            out[f"eval/{ds}/lora/{k.split('/')[-1]}"] = float(v)
    (sink or NullSink()).log_metrics(out, step=0)
    return out
