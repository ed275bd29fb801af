"""GistNet (SPEC §3): a block of 32 vectors -> one gist in the base model's input-embedding space.

The input is 32 token embeddings (an LOD0 block -> an LOD1 gist) or 32 LOD1 gists (-> an LOD2 gist):
`[batch, 32, d_model] -> [batch, d_model]`. A small bidirectional transformer reads the 32 slots
(no causal mask: every slot, and the CLS slot, sees the whole block), then a pooling head reduces them
to one vector: a learned `query` cross-attending over the slots, a prepended `cls` slot, or the `mean`.

Initialisation — why the untrained net *is* the mean-pool baseline:
    gist = meanpool(x) + rms(x) * proj_out(head(encoder(x / rms(x))))        proj_out = 0 at init
  - `meanpool` is the SPEC §7 baseline (mean of the 32 inputs rescaled to their mean norm), so before
    any training a gist already lies in the distribution of vectors the frozen base model reads, and
    JT1 starts from a known ΔNLL instead of from random vectors that make the base model's NLL explode
    (large, noisy first gradients).
  - `proj_out` is zero, not the encoder: d gist / d proj_out = the pooled features ≠ 0, so the first
    step moves `proj_out` and the encoder gets gradients from the second step on (the zero-init
    residual of ReZero / adaLN-zero).
  - The net works in units of the block's RMS (`x / rms` in, `rms *` out), so it is scale-equivariant,
    GistNet(c·x) = c·GistNet(x): the same init and learning rate behave alike for token embeddings of
    norm ~3 (SmolLM2), ~0.2 (the tiny test model) and for LOD1 gists, whatever norm JT1 gives them.
The output norm is free to move away from the input norm as training finds useful.

Contextual input (`input_layers` k > 0, LOD1 only): the inputs are [B, 32, 2·d_model], the block's token
embeddings ‖ the frozen base model's residual stream after its first k layers over the block run alone
(`BaseLM.block_states`; the tree computes them once per block at ingest, `encoder_inputs_fn`). The
embeddings keep their role above (mean-pool skip, RMS units); the states enter the encoder through a
LayerNorm and their own projection, zero at init, so k > 0 starts from the same mean-pool gist and
learns what the pretrained layers add (ICAE, 500xCompressor, ARC-Encoder all read the text with a
pretrained LM).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mcx_core import checkpoints
from mcx_core.config import GistNetModelConfig
from mcx_core.model.attention import Attention
from mcx_core.telemetry import metrics as M

WEIGHTS_FILE = "gistnet.safetensors"
CONFIG_FILE = "config.json"


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block over the slots, bidirectional."""

    def __init__(self, dim: int, num_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, h]
        a = self.ln1(x)
        x = x + self.drop(self.attn(a, a))
        return x + self.drop(self.mlp(self.ln2(x)))


def mean_pool(x: torch.Tensor) -> torch.Tensor:
    """The SPEC §7 mean-pool gist: mean of the inputs, rescaled to their mean norm. [B, S, d] -> [B, d]."""
    pooled = x.mean(dim=1)
    target_norm = x.norm(dim=-1).mean(dim=1, keepdim=True)
    return pooled * target_norm / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class GistNet(nn.Module):
    """One level's compressor: [B, 32, d_model] -> [B, d_model] ([B, 32, 2·d_model] with `contextual`)."""

    def __init__(self, d_model: int, cfg: GistNetModelConfig, contextual: bool = False):
        super().__init__()
        self.d_model = d_model
        self.cfg = cfg
        self.contextual = contextual
        h = d_model if cfg.hidden_size == "auto" else cfg.hidden_size
        self.proj_in = nn.Identity() if h == d_model else nn.Linear(d_model, h)
        if contextual:
            self.ctx_norm = nn.LayerNorm(d_model)
            self.proj_ctx = nn.Linear(d_model, h)
            nn.init.zeros_(self.proj_ctx.weight)  # the states' contribution starts at 0 (module docstring)
            nn.init.zeros_(self.proj_ctx.bias)
        self.slot_pos = nn.Parameter(0.02 * torch.randn(cfg.block_size, h))
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, h)) if cfg.pooling == "cls" else None
        self.blocks = nn.ModuleList(
            [EncoderBlock(h, cfg.num_heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.num_layers)]
        )
        self.ln_f = nn.LayerNorm(h)
        if cfg.pooling == "query":
            self.query = nn.Parameter(0.02 * torch.randn(1, 1, h))
            self.pool_attn = Attention(h, cfg.num_heads, cfg.dropout)
        self.proj_out = nn.Linear(h, d_model)
        nn.init.zeros_(self.proj_out.weight)  # untrained GistNet == mean pool (module docstring)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 32, d_model (x2 if contextual)] -> [B, d_model]
        B, S, D = x.shape
        assert S == self.cfg.block_size, f"GistNet expects blocks of {self.cfg.block_size} slots, got {S}"
        width = self.d_model * (2 if self.contextual else 1)
        assert D == width, f"GistNet expects {width}-wide inputs (contextual={self.contextual}), got {D}"
        states = None
        if self.contextual:
            x, states = x[..., : self.d_model], x[..., self.d_model :]
        rms = x.norm(dim=-1).mean(dim=1, keepdim=True).clamp_min(1e-6) / self.d_model**0.5  # [B, 1]
        z = self.proj_in(x / rms[:, :, None]) + self.slot_pos  # [B, 32, h], unit scale
        if states is not None:
            z = z + self.proj_ctx(self.ctx_norm(states))
        if self.cls is not None:
            z = torch.cat([self.cls.expand(B, -1, -1), z], dim=1)  # [B, 33, h]: the CLS slot sees every slot
        for block in self.blocks:
            z = block(z)
        z = self.ln_f(z)
        if self.cfg.pooling == "query":
            pooled = self.pool_attn(self.query.expand(B, -1, -1), z)[:, 0]  # [B, h]
        elif self.cfg.pooling == "cls":
            pooled = z[:, 0]
        else:
            pooled = z.mean(dim=1)
        return mean_pool(x) + rms * self.proj_out(pooled)  # [B, d_model]


class Gister(nn.Module):
    """The tree's GistFn: `gister(level, inputs [n, 32, d]) -> gists [n, d]`.

    One GistNet per level (LOD1, LOD2, ...) or, with `share_levels`, one module for every level.
    """

    def __init__(self, d_model: int, cfg: GistNetModelConfig, max_level: int = 2):
        super().__init__()
        self.d_model = d_model
        self.cfg = cfg
        self.max_level = max_level
        self.nets = nn.ModuleList(
            [GistNet(d_model, cfg, contextual=cfg.input_layers > 0 and level == 1)
             for level in range(1, 2 if cfg.share_levels else max_level + 1)]
        )

    def net(self, level: int) -> GistNet:
        if not 1 <= level <= self.max_level:
            raise ValueError(f"no GistNet for level {level} (levels 1..{self.max_level})")
        return self.nets[0 if self.cfg.share_levels else level - 1]

    @property
    def input_layers(self) -> int:
        """Base-model layers the LOD1 inputs went through (0: token embeddings)."""
        return self.cfg.input_layers

    def forward(self, level: int, inputs: torch.Tensor) -> torch.Tensor:  # [n, 32, d (2d: contextual LOD1)] -> [n, d]
        p = self.nets[0].proj_out.weight
        return self.net(level)(inputs.to(device=p.device, dtype=p.dtype)).to(inputs.dtype)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Weights as safetensors + a JSON config; `Gister.from_pretrained(directory)` reads them back."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_FILE))
        config = {"d_model": self.d_model, "max_level": self.max_level, "model": self.cfg.model_dump(mode="json")}
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu", d_model: int | None = None,
                        model_id: str | None = None) -> Gister:
        """A `save_pretrained` directory, or the `gistnet/` of a JT checkpoint, in eval mode; validated
        (`checkpoints.load_module`: CheckpointError), against the base model's `d_model` / `model_id` when given."""
        gister = checkpoints.load_module(
            directory, checkpoints.GISTNET_DIR, WEIGHTS_FILE,
            lambda c: cls(c["d_model"], GistNetModelConfig(**c["model"]), max_level=c["max_level"]),
            d_model=d_model, model_id=model_id,
        )
        return gister.to(device).eval()


def encoder_inputs_fn(lm, input_layers: int, block_size: int):
    """The tree's `input_fn` for a GistNet reading `input_layers` base-model layers: token ids [n·K] ->
    [n, K, 2·d] (token embeddings ‖ `lm.block_states`), None for 0 (the tree embeds the tokens itself)."""
    if input_layers == 0:
        return None

    def inputs(ids: torch.Tensor) -> torch.Tensor:
        blocks = ids.long().view(-1, block_size)
        embeds = lm.embed(blocks)
        return torch.cat([embeds, lm.block_states(blocks, input_layers).to(embeds.dtype)], dim=-1)

    return inputs


def tree_inputs_fn(lm, gist_fn, block_size: int):
    """`encoder_inputs_fn` for whatever gister a tree is built with (mean pools and test callables read
    token embeddings)."""
    return encoder_inputs_fn(lm, getattr(gist_fn, "input_layers", 0), block_size)


def load_gister(checkpoint_dir: str | Path, lm) -> Gister:
    """The trained GistNet of a JT checkpoint (or a `save_pretrained` directory) on `lm`'s device, in eval mode."""
    return Gister.from_pretrained(checkpoint_dir, device=lm.device, d_model=lm.d_model, model_id=lm.model_id)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def profile_gister(gister: Gister, n_blocks: int = 64, repeats: int = 3) -> dict[str, float]:
    """Parameter count and per-block latency (ms) of LOD1 gisting, alone and batched; for telemetry."""
    p = gister.nets[0].proj_out.weight
    was_training = gister.training
    gister.eval()
    out: dict[str, float] = {M.GISTNET_PARAMETERS: float(num_parameters(gister))}
    for name, n in ((M.GISTNET_LATENCY_SINGLE_MS, 1), (M.GISTNET_LATENCY_MS, n_blocks)):
        width = gister.d_model * (2 if gister.input_layers else 1)
        x = torch.randn(n, gister.cfg.block_size, width, device=p.device, dtype=p.dtype)
        gister(1, x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            gister(1, x)
        out[name] = 1000 * (time.perf_counter() - t0) / (repeats * n)
    gister.train(was_training)
    return out
