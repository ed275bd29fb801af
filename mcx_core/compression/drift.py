"""Gist drift: how far a GistNet's gists moved from another checkpoint's, on fixed probe blocks
(mean cosine similarity, 1 = no drift). The JT1 asset reports it against the previous checkpoint; the
drift analysis across every checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from mcx_core import checkpoints, data
from mcx_core.artifacts import datasets_dir
from mcx_core.compression.gistnet import Gister, load_gister
from mcx_core.config import MegaContextConfig
from mcx_core.model.base import BaseLM


@torch.no_grad()
def gist_drift(old: Gister, new: Gister, probe_blocks: torch.Tensor, level: int = 1) -> float:
    """Mean cosine similarity of the two GistNets' gists on fixed probe blocks [n, 32, d] (1 = no drift)."""
    a, b = old(level, probe_blocks).float(), new(level, probe_blocks.to(probe_blocks.dtype)).float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def probe_blocks(cfg: MegaContextConfig, lm: BaseLM, n: int = 16):
    """Fixed probe blocks for gist drift: the first `n` blocks of each corpus's val split, embedded."""
    out = datasets_dir(cfg)
    K = cfg.dataset.block_size
    blocks = []
    for corpus in sorted(data.load_manifest(out)["corpora"]):
        ids = data.load_samples(out, corpus, "val", limit=1)[0, : min(n, cfg.dataset.context_tokens // K) * K]
        blocks.append(torch.as_tensor(ids).view(-1, K))
    with torch.no_grad():
        return lm.embed(torch.cat(blocks)).float()  # [n_blocks, K, d]


def drift_from_previous(cfg: MegaContextConfig, lm: BaseLM, current: Path) -> tuple[float | None, Path | None]:
    """(drift of `current` against the newest other JT1 checkpoint, that checkpoint), or (None, None)."""
    prev = checkpoints.previous_checkpoint(cfg, current)
    if prev is None:
        return None, None
    probes = probe_blocks(cfg, lm)
    return gist_drift(load_gister(prev, lm), load_gister(current, lm), probes), prev
