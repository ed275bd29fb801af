"""The attention layer GistNet and LensNet build on: multi-head, bidirectional (no causal mask),
queries from one sequence and keys/values from another (the same one for self-attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention of queries `x_q` over keys/values `x_kv`; `kv_mask` masks padded keys."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, Q, h], [B, S, h], kv_mask [B, S] (True = attend) or None -> [B, Q, h]."""
        B, Q, h = x_q.shape
        S = x_kv.shape[1]
        q = self.q(x_q).view(B, Q, self.num_heads, -1).transpose(1, 2)  # [B, nh, Q, hd]
        k, v = self.kv(x_kv).view(B, S, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 2 x [B, nh, S, hd]
        mask = kv_mask[:, None, None, :] if kv_mask is not None else None
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=False, dropout_p=self.dropout if self.training else 0.0
        )  # bidirectional
        return self.out(y.transpose(1, 2).reshape(B, Q, h))
