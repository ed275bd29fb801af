"""LensNet (SPEC §4): one signed focus score per working-context entry.

Positive = "this span deserves more detail" (expand), negative = "this can be coarser" (collapse).

Inputs for one working context of N entries, built by `entry_inputs` from the context's own entries:

    embeds    [N, d_model]  a gist entry's gist vector; an LOD0 block entry's mean token embedding
    features  [N, F]        level one-hot, log2 span width, distance from the cursor (relative and log),
                            age at current level, can-expand and can-collapse flags
    tail      [k, d_model]  LOD1 gists of the k newest complete blocks: what the text is about *now*
    masks     {"entry": [N], "tail": [k], "can_expand": [N], "can_collapse": [N]} (bool)

`collate` pads a list of these into a batch ([B, N_max, ...]); padding is False in the masks.

Architecture: entries and tail are projected to `hidden_size`; each of `num_layers` pre-LayerNorm blocks
runs *bidirectional* self-attention over the entries (no causal mask: every entry sees every entry, only
padding is masked), cross-attention from the entries to the tail plus a learned null slot (so a context
with no complete block still has something to attend to), and an MLP. A linear head + tanh gives a raw
score in [-1, 1]; `mask_scores` then clamps illegal directions (LOD0 cannot expand: score <= 0; an entry
that cannot collapse: score >= 0).

Causality: LensNet's cursor is the end of the context's last entry, and every input comes from entries
and blocks that end at or before it. `spans_read` lists what it reads, so a caller counts violations
against the tree's true cursor with `metrics.causality_violations` (it must be 0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mcx_core import checkpoints
from mcx_core.config import LensNetModelConfig
from mcx_core.model.attention import Attention
from mcx_core.model.tree import EmbedFn, MegaContextTree, Node
from mcx_core.model.working_context import Entry, WorkingContext
from mcx_core.telemetry import metrics as M

WEIGHTS_FILE = "lensnet.safetensors"
CONFIG_FILE = "config.json"
FFN_MULT = 4
LOG_DISTANCE_SCALE = (
    16.0  # log2(1 + distance) / 16: 1.0 at 65k tokens, the same meaning at any history length
)
AGE_SCALE = 64  # ages saturate: log1p(age) / log1p(64), clipped to 1


def num_features(max_level: int) -> int:
    """Level one-hot (max_level + 1) + span width, 2 distances, age, can_expand, can_collapse."""
    return max_level + 1 + 6


def tail_blocks(wc: WorkingContext, k: int) -> list[Node]:
    """The k newest complete LOD0 blocks that end at or before the context's last entry (oldest first)."""
    if not wc.entries or k == 0:
        return []
    n_complete = wc.entries[-1].end // wc.tree.block_size
    return [wc.tree.node(1, b) for b in range(max(0, n_complete - k), n_complete)]


def spans_read(wc: WorkingContext, tail_gists: int) -> list[Entry | Node]:
    """Everything LensNet reads for this context: its entries and the tail gists' nodes."""
    return list(wc.entries) + tail_blocks(wc, tail_gists)


def _entry_embeddings(wc: WorkingContext, embed_fn: EmbedFn) -> torch.Tensor:
    """[N, d] float32: gist vectors for gist entries, mean token embedding for LOD0 block entries."""
    tree = wc.tree
    lod0 = [i for i, e in enumerate(wc.entries) if e.level == 0]
    token_ids = torch.cat([tree.tokens[wc.entries[i].start : wc.entries[i].end] for i in lod0]).long()
    token_embeds = embed_fn(token_ids).float()  # [n_tokens, d]
    device = token_embeds.device
    out = torch.zeros(len(wc.entries), tree.d_model, device=device)
    # Segment mean over each LOD0 entry's tokens.
    owner = torch.repeat_interleave(
        torch.tensor(lod0, dtype=torch.long), torch.tensor([wc.entries[i].cost for i in lod0])
    ).to(device)  # [n_tokens]
    out.index_add_(0, owner, token_embeds)
    counts = torch.tensor([e.cost if e.level == 0 else 1 for e in wc.entries], device=device)
    out = out / counts[:, None]
    for level in range(1, tree.max_level + 1):
        rows = [i for i, e in enumerate(wc.entries) if e.level == level]
        if rows:
            gists = tree.gists(level, [wc.entries[i].index for i in rows])  # [n, d]
            out[torch.tensor(rows, device=device)] = gists.to(device, torch.float32)
    return out


def entry_inputs(
    wc: WorkingContext,
    embed_fn: EmbedFn,
    ages: torch.Tensor | None = None,
    tail_gists: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """LensNet's inputs for one working context: (embeds [N, d], features [N, F], tail [k', d], masks).

    `ages` [N]: allocator steps each entry has been at its level (None: all 0). k' <= `tail_gists`
    (fewer when the context has fewer complete blocks). Reads only the context's entries and complete
    blocks ending at or before its last entry, never `tree.cursor`.
    """
    tree = wc.tree
    N, K, L = len(wc.entries), tree.block_size, tree.max_level
    if N == 0:
        raise ValueError("LensNet needs a working context with at least one entry")
    embeds = _entry_embeddings(wc, embed_fn)
    device = embeds.device
    cursor = wc.entries[-1].end
    level = torch.tensor([e.level for e in wc.entries])
    width = torch.tensor([e.end - e.start for e in wc.entries], dtype=torch.float32)
    distance = torch.tensor([cursor - e.end for e in wc.entries], dtype=torch.float32)
    age = torch.zeros(N) if ages is None else torch.as_tensor(ages, dtype=torch.float32).cpu()
    if age.shape != (N,):
        raise ValueError(f"ages must be [{N}] (one per entry), got {tuple(age.shape)}")
    can_expand = torch.tensor([wc.can_expand(i) for i in range(N)])
    can_collapse = torch.tensor([wc.can_collapse(i) for i in range(N)])
    features = torch.cat(
        [
            F.one_hot(level, L + 1).float(),  # [N, L + 1]
            (torch.log2(width) / math.log2(K**L))[:, None],
            (distance / max(cursor, 1))[:, None],
            (torch.log2(1 + distance) / LOG_DISTANCE_SCALE)[:, None],
            (torch.log1p(age) / math.log1p(AGE_SCALE)).clamp(max=1)[:, None],
            can_expand.float()[:, None],
            can_collapse.float()[:, None],
        ],
        dim=1,
    ).to(device)  # [N, F]
    blocks = tail_blocks(wc, tail_gists)
    tail = tree.gists(1, [b.index for b in blocks]).to(device, torch.float32)  # [k', d]
    masks = {
        "entry": torch.ones(N, dtype=torch.bool, device=device),
        "tail": torch.ones(len(blocks), dtype=torch.bool, device=device),
        "can_expand": can_expand.to(device),
        "can_collapse": can_collapse.to(device),
    }
    return embeds, features, tail, masks


def collate(items: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Pad `entry_inputs` results into a batch: embeds [B, N, d], features [B, N, F], tail [B, k, d],
    masks [B, N] / [B, k] (False on padding)."""

    def pad(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
        out = tensors[0].new_zeros((len(tensors), width, *tensors[0].shape[1:]))
        for b, t in enumerate(tensors):
            out[b, : len(t)] = t
        return out

    n = max(len(it[0]) for it in items)
    k = max(len(it[2]) for it in items)
    embeds = pad([it[0] for it in items], n)
    features = pad([it[1] for it in items], n)
    tail = pad([it[2] for it in items], k)
    masks = {key: pad([it[3][key] for it in items], k if key == "tail" else n) for key in items[0][3]}
    return embeds, features, tail, masks


def mask_scores(raw: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Clamp illegal directions: no positive score where an entry cannot expand, no negative score where
    it cannot collapse; padding scores 0. raw [B, N] -> [B, N]."""
    scores = torch.where(masks["can_expand"], raw, raw.clamp(max=0))
    scores = torch.where(masks["can_collapse"], scores, scores.clamp(min=0))
    return scores * masks["entry"]


class LensBlock(nn.Module):
    """Bidirectional self-attention over the entries, cross-attention to the tail, MLP (all pre-LN)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.ln_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.ln_cross = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, FFN_MULT * dim), nn.GELU(), nn.Linear(FFN_MULT * dim, dim))

    def forward(self, x, entry_mask, tail, tail_mask):  # [B, N, h], [B, N], [B, k + 1, h], [B, k + 1]
        a = self.ln_self(x)
        x = x + self.self_attn(a, a, entry_mask)
        x = x + self.cross_attn(self.ln_cross(x), tail, tail_mask)
        return x + self.mlp(self.ln_mlp(x))


class LensNet(nn.Module):
    def __init__(self, d_model: int, cfg: LensNetModelConfig, max_level: int = 2):
        super().__init__()
        self.d_model = d_model
        self.cfg = cfg
        self.max_level = max_level
        self.num_features = num_features(max_level)
        h = cfg.hidden_size
        # Embeddings are LayerNormed first: token embeddings and gists differ in scale between base
        # models and GistNet versions, LensNet should read their direction.
        self.ln_in = nn.LayerNorm(d_model)
        self.proj_in = nn.Linear(d_model, h)
        self.proj_features = nn.Linear(self.num_features, h)
        self.tail_type = nn.Parameter(0.02 * torch.randn(h))  # tells tail slots from entries
        self.null_tail = nn.Parameter(0.02 * torch.randn(1, 1, h))
        self.blocks = nn.ModuleList([LensBlock(h, cfg.num_heads) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(h)
        self.head = nn.Linear(h, 1)
        # Small initial scores (std ~0.1): an untrained LensNet mostly stays under the allocator's
        # thresholds instead of swapping at random.
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def raw_scores(self, embeds, features, tail, masks) -> torch.Tensor:
        """Scores before legality masking, [B, N] in [-1, 1] (JT2's legality penalty reads these)."""
        p = self.proj_in.weight
        embeds, features, tail = (t.to(p.device, p.dtype) for t in (embeds, features, tail))
        B = embeds.shape[0]
        if features.shape[-1] != self.num_features:
            raise ValueError(
                f"LensNet expects {self.num_features} features per entry, got {features.shape[-1]}"
            )
        x = self.proj_in(self.ln_in(embeds)) + self.proj_features(features)  # [B, N, h]
        t = self.proj_in(self.ln_in(tail)) + self.tail_type  # [B, k, h]
        t = torch.cat([self.null_tail.expand(B, -1, -1), t], dim=1)  # [B, k + 1, h]
        tail_mask = torch.cat(
            [torch.ones(B, 1, dtype=torch.bool, device=p.device), masks["tail"].to(p.device)], 1
        )
        entry_mask = masks["entry"].to(p.device)
        for block in self.blocks:
            x = block(x, entry_mask, t, tail_mask)
        return torch.tanh(self.head(self.ln_f(x)).squeeze(-1))  # [B, N]

    def forward(self, embeds, features, tail, masks) -> torch.Tensor:
        """[B, N, d], [B, N, F], [B, k, d], masks -> scores [B, N] in [-1, 1], illegal directions masked."""
        raw = self.raw_scores(embeds, features, tail, masks)
        return mask_scores(raw, {key: m.to(raw.device) for key, m in masks.items()})

    def save_pretrained(self, directory: str | Path) -> Path:
        """Weights as safetensors + a JSON config; `LensNet.from_pretrained(directory)` reads them back."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(d / WEIGHTS_FILE)
        )
        config = {
            "d_model": self.d_model,
            "max_level": self.max_level,
            "model": self.cfg.model_dump(mode="json"),
        }
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> LensNet:
        """A `save_pretrained` directory, or the `lensnet/` of a JT2/JT3 checkpoint, in eval mode."""
        net = checkpoints.load_module(  # validated: CheckpointError, one line
            directory, checkpoints.LENSNET_DIR, WEIGHTS_FILE,
            lambda c: cls(c["d_model"], LensNetModelConfig(**c["model"]), max_level=c["max_level"]),
        )
        return net.to(device).eval()


def load_lensnet(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> LensNet:
    """The LensNet of a JT2/JT3 checkpoint (or of a `save_pretrained` directory), in eval mode."""
    return LensNet.from_pretrained(checkpoint_dir, device=device)


class LensNetPolicy:
    """The runtime's `Policy` backed by a LensNet: `scores(wc, tree, step) -> [N]` in [-1, 1].

    `ages_fn(wc) -> [N]` supplies each entry's age at its level (the allocator's `ages`); without it
    ages are 0. `causality_violations` accumulates, over every call, the entries and tail gists read
    whose span ends after `tree.cursor`; `last_causality_violations` is the last call's count.
    """

    name = "lensnet"

    def __init__(self, lensnet: LensNet, embed_fn: EmbedFn, ages_fn=None):
        self.lensnet = lensnet
        self.embed_fn = embed_fn
        self.ages_fn = ages_fn
        self.causality_violations = 0
        self.last_causality_violations = 0

    @torch.no_grad()
    def scores(self, wc: WorkingContext, tree: MegaContextTree, step: int) -> torch.Tensor:
        k = self.lensnet.cfg.tail_gists
        self.last_causality_violations = M.causality_violations(spans_read(wc, k), tree.cursor)
        self.causality_violations += self.last_causality_violations
        ages = self.ages_fn(wc) if self.ages_fn is not None else None
        inputs = entry_inputs(wc, self.embed_fn, ages, k)
        return self.lensnet(*collate([inputs]))[0].cpu()  # [N]
