"""ΔNLL@H evaluation: the NLL of the H horizon tokens under different views of the same history.

A *condition* turns a history into what the base model reads instead of it:
  full      — every history token (the teacher);
  recency   — the first block as an attention sink + the newest tokens, W_max in all;
  meanpool  — a working context whose gists are norm-matched mean pools (untrained compression);
  gist      — the same working context with GistNet gists (added by the compression work).
Every condition is scored by the same `horizon_nll`, so the numbers are comparable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from mcx_core.model import BaseLM
from mcx_core.telemetry import metrics as M
from mcx_core.tree import MegaContextTree
from mcx_core.working_context import WorkingContext


@dataclass
class ConditionInput:
    """What the base model reads before the horizon."""

    embeds: torch.Tensor  # [T, d]
    positions: torch.Tensor  # [T] long
    horizon_start: int  # position id of the first horizon token


Condition = Callable[[torch.Tensor, int], ConditionInput]  # (history ids [C], w_max) -> input


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
    out = lm.model(
        inputs_embeds=torch.cat([embeds, h_emb], dim=1), position_ids=positions, logits_to_keep=H + 1, use_cache=False
    )
    logits = out.logits[:, :-1].float()  # [B, H, V]: positions T-1 .. T+H-2
    assert logits.shape[1] == H, (logits.shape, T, H)
    return torch.nn.functional.cross_entropy(logits.reshape(B * H, -1), horizons.reshape(-1), reduction="none").view(
        B, H
    )


# ---------------------------------------------------------------------------------------------- conditions


def full_condition(lm: BaseLM) -> Condition:
    def build(history: torch.Tensor, w_max: int) -> ConditionInput:
        C = history.numel()
        return ConditionInput(lm.embed(history), torch.arange(C), C)

    return build


def recency_condition(lm: BaseLM, sink_tokens: int, position_scheme: str = "center") -> Condition:
    """Only the newest tokens, with the first `sink_tokens` kept as an attention sink; W_max in all."""

    def build(history: torch.Tensor, w_max: int) -> ConditionInput:
        C = history.numel()
        if C <= w_max:
            return ConditionInput(lm.embed(history), torch.arange(C), C)
        sink = min(sink_tokens, w_max)
        keep = torch.cat([torch.arange(sink), torch.arange(C - (w_max - sink), C)])
        if position_scheme == "compact":
            return ConditionInput(lm.embed(history[keep]), torch.arange(w_max), w_max)
        return ConditionInput(lm.embed(history[keep]), keep, C)

    return build


class MeanPoolGister:
    """Untrained compression: a gist is the mean of its 32 inputs, rescaled to their mean norm."""

    def __call__(self, level: int, inputs: torch.Tensor) -> torch.Tensor:  # [n, 32, d] -> [n, d]
        pooled = inputs.float().mean(dim=1)
        target_norm = inputs.float().norm(dim=-1).mean(dim=1, keepdim=True)
        return (pooled * target_norm / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(inputs.dtype)


def working_context_condition(
    lm: BaseLM, gist_fn, block_size: int, recent_tokens: int, position_scheme: str = "center"
) -> Condition:
    """Ingest the history into a MegaContext tree built with `gist_fn`; read the most detailed working
    context that fits W_max (newest blocks raw, older ones as gists)."""

    @torch.no_grad()
    def build(history: torch.Tensor, w_max: int) -> ConditionInput:
        tree = MegaContextTree(lm.d_model, embed_fn=lm.embed, gist_fn=gist_fn, block_size=block_size)
        tree.ingest(history)
        wc = WorkingContext.initial(tree, w_max, recent_tokens=recent_tokens, position_scheme=position_scheme)
        wc.check_invariants()
        embeds, positions, _ = wc.assemble(lm.embed)
        start = history.numel() if position_scheme == "center" else positions.numel()
        return ConditionInput(embeds, positions, start)

    return build


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class EvalRow:
    dataset: str
    sample_id: str
    condition: str
    w_max: int
    nll: float  # mean over the horizon
    token_nll: list[float]  # per horizon position


def evaluate(
    lm: BaseLM,
    datasets: dict[str, tuple[list[str], np.ndarray]],
    conditions: dict[str, Condition],
    w_max_values: list[int],
    context_tokens: int,
    horizon: int,
    batch_size: int = 4,
    progress: bool = True,
) -> list[EvalRow]:
    """Score every condition on every sample. `datasets[name] = (sample_ids, ids [N, C+H])`.

    The `full` condition does not depend on W_max and is scored once per sample (w_max = 0).
    """
    rows: list[EvalRow] = []
    jobs = [
        (ds, cond, (0 if cond == "full" else w))
        for ds in datasets
        for cond in conditions
        for w in ([0] if cond == "full" else w_max_values)
    ]
    total = sum(len(datasets[ds][0]) for ds, _, _ in jobs)
    bar = tqdm(total=total, desc="ΔNLL eval", unit="sample", disable=not progress)
    for ds, cond, w in jobs:
        sample_ids, ids = datasets[ds]
        tokens = torch.as_tensor(ids, dtype=torch.long)
        for i in range(0, len(sample_ids), batch_size):
            chunk = tokens[i : i + batch_size]
            inputs = [conditions[cond](row[:context_tokens], w) for row in chunk]
            horizons = chunk[:, context_tokens : context_tokens + horizon]
            for group in _same_length_groups(inputs):
                nll = horizon_nll(lm, [inputs[j] for j in group], horizons[group]).cpu()
                for j, per_tok in zip(group, nll):
                    rows.append(
                        EvalRow(ds, sample_ids[i + j], cond, w, float(per_tok.mean()), per_tok.tolist())
                    )
            bar.update(len(chunk))
    bar.close()
    return rows


def _same_length_groups(inputs: list[ConditionInput]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for j, c in enumerate(inputs):
        groups.setdefault(c.embeds.shape[0], []).append(j)
    return list(groups.values())


def summarize(rows: list[EvalRow], methods: list[str]) -> list[dict]:
    """Per dataset × W_max: NLL of each condition, ΔNLL@H (mean, p95) and recovery of each method."""
    by_key: dict[tuple[str, str, int], dict[str, float]] = {}
    for r in rows:
        by_key.setdefault((r.dataset, r.condition, r.w_max), {})[r.sample_id] = r.nll
    out = []
    datasets = sorted({r.dataset for r in rows})
    w_values = sorted({r.w_max for r in rows if r.w_max})
    for ds in datasets:
        full = by_key[(ds, "full", 0)]
        ids = sorted(full)
        nll_full = np.array([full[s] for s in ids])
        for w in w_values:
            rec = np.array([by_key[(ds, "recency", w)][s] for s in ids])
            summary = {"dataset": ds, "w_max": w, "n_samples": len(ids), "nll_full": M.mean(nll_full)}
            summary["nll_recency"] = M.mean(rec)
            summary.update(M.summarize(M.delta_nll(rec, nll_full), "delta_nll_recency"))
            for m in methods:
                vals = np.array([by_key[(ds, m, w)][s] for s in ids])
                summary[f"nll_{m}"] = M.mean(vals)
                summary.update(M.summarize(M.delta_nll(vals, nll_full), f"delta_nll_{m}"))
                summary[f"recovery_{m}"] = M.recovery(M.mean(rec), M.mean(vals), M.mean(nll_full))
            out.append(summary)
    return out


def rows_to_table(rows: list[EvalRow]):
    import pyarrow as pa

    return pa.table(
        {
            "dataset": [r.dataset for r in rows],
            "sample_id": [r.sample_id for r in rows],
            "condition": [r.condition for r in rows],
            "w_max": pa.array([r.w_max for r in rows], pa.int32()),
            "nll": [r.nll for r in rows],
            "token_nll": pa.array([r.token_nll for r in rows], pa.list_(pa.float32())),
        }
    )
