"""Horizon scoring: the NLL of the H tokens after what the base model reads (a working context, a
recency window, the full history). Training (JT1, JT3), counterfactual labels, the runtime and every
evaluation score through these two functions, so their numbers are comparable."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mcx_core.model.base import BaseLM


@dataclass
class ConditionInput:
    """What the base model reads before the horizon."""

    embeds: torch.Tensor  # [T, d]
    positions: torch.Tensor  # [T] long
    horizon_start: int  # position id of the first horizon token


@torch.no_grad()
def horizon_nll(lm: BaseLM, batch: list[ConditionInput], horizons: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of the horizon: [B, H]. All inputs in `batch` must have the same length T.

    The horizon token j is predicted from sequence position T-1+j (next-token targets, never the
    token at the same position), so only the last H+1 logits are computed.
    """
    return horizon_nll_grad(lm, batch, horizons)


def horizon_nll_grad(lm: BaseLM, batch: list[ConditionInput], horizons: torch.Tensor) -> torch.Tensor:
    """`horizon_nll` without `no_grad`, for training through gists or adapters."""
    B, H = horizons.shape
    horizons = horizons.to(lm.device)
    h_emb = lm.embed(horizons).to(lm.dtype)  # [B, H, d]
    embeds = torch.stack([c.embeds for c in batch]).to(device=lm.device, dtype=lm.dtype)  # [B, T, d]
    T = embeds.shape[1]
    h_pos = torch.stack(
        [torch.arange(c.horizon_start, c.horizon_start + H, device=lm.device) for c in batch]
    )  # [B, H]
    positions = torch.cat([torch.stack([c.positions for c in batch]).to(lm.device), h_pos], dim=1)
    # An explicit all-ones mask: without one, transformers 5 reads non-consecutive position ids (gists at
    # span centres, recency's sink + newest tokens) as packed separate sequences and masks attention
    # across every jump, so the horizon would only see the last contiguous run of positions.
    out = lm.model(
        inputs_embeds=torch.cat([embeds, h_emb], dim=1),
        position_ids=positions,
        attention_mask=torch.ones(positions.shape, dtype=torch.long, device=lm.device),
        logits_to_keep=H + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1].float()  # [B, H, V]: positions T-1 .. T+H-2
    assert logits.shape[1] == H, (logits.shape, T, H)
    return torch.nn.functional.cross_entropy(logits.reshape(B * H, -1), horizons.reshape(-1), reduction="none").view(
        B, H
    )
