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

from mcx_core import reports
from mcx_core.compression.gistnet import tree_inputs_fn
from mcx_core.model.base import BaseLM
from mcx_core.model.scoring import ConditionInput, horizon_nll, horizon_nll_grad  # noqa: F401  (E.horizon_nll)
from mcx_core.model.tree import MegaContextTree
from mcx_core.model.working_context import WorkingContext, entry_for
from mcx_core.telemetry import metrics as M

Condition = Callable[[torch.Tensor, int], ConditionInput]  # (history ids [C], w_max) -> input


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
    lm: BaseLM, gist_fn, block_size: int, recent_tokens: int, position_scheme: str = "center", sink_tokens: int = 0,
) -> Condition:
    """Ingest the history into a MegaContext tree built with `gist_fn`; read the most detailed working
    context that fits W_max (the sink, then older spans as gists, the newest blocks raw)."""

    @torch.no_grad()
    def build(history: torch.Tensor, w_max: int) -> ConditionInput:
        tree = _tree(lm, gist_fn, block_size, history)
        wc = WorkingContext.initial(tree, w_max, recent_tokens, position_scheme, sink_tokens)
        wc.check_invariants()
        embeds, positions, _ = wc.assemble(lm.embed)
        start = history.numel() if position_scheme == "center" else positions.numel()
        return ConditionInput(embeds, positions, start)

    return build


def _tree(lm: BaseLM, gist_fn, block_size: int, history: torch.Tensor) -> MegaContextTree:
    tree = MegaContextTree(lm.d_model, embed_fn=lm.embed, gist_fn=gist_fn, block_size=block_size,
                           input_fn=tree_inputs_fn(lm, gist_fn, block_size))
    tree.ingest(history)
    return tree


def _read(lm: BaseLM, tree: MegaContextTree, entries, position_scheme: str, sink_tokens: int) -> ConditionInput:
    # recent_tokens=0: probes place gists anywhere, the legality rule for live contexts does not apply.
    wc = WorkingContext(tree, tree.cursor + sink_tokens, 0, position_scheme, entries, sink_tokens)
    wc.check_invariants()
    embeds, positions, _ = wc.assemble(lm.embed)
    return ConditionInput(embeds, positions, tree.cursor if position_scheme == "center" else positions.numel())


def max_compression_condition(lm: BaseLM, gist_fn, block_size: int, position_scheme: str = "center",
                              sink_tokens: int = 0) -> Condition:
    """The 1024× stress test: every whole LOD2 span of the history (oldest first) is one LOD2 gist,
    the rest stays raw, and the horizon starts right after a span boundary (samples are block-aligned).
    With a 1024-token history the model reads a single vector. Independent of W_max."""

    @torch.no_grad()
    def build(history: torch.Tensor, w_max: int) -> ConditionInput:
        tree = _tree(lm, gist_fn, block_size, history)
        n2 = tree.num_nodes(2)
        if n2 == 0:
            raise ValueError(f"a 1024x condition needs a history of at least {block_size**2} tokens")
        first_raw = n2 * block_size  # LOD0 block index after the last LOD2 span
        entries = [entry_for(tree, 2, i) for i in range(n2)]
        entries += [entry_for(tree, 0, b) for b in range(first_raw, tree.num_nodes(0))]
        return _read(lm, tree, entries, position_scheme, sink_tokens)

    return build


def single_gist_condition(
    lm: BaseLM, gist_fn, block_size: int, distance_blocks: int, position_scheme: str = "center", sink_tokens: int = 0,
) -> Condition:
    """The full history with exactly one LOD1 block replaced by its gist, `distance_blocks` blocks
    before the cursor: the marginal cost of gisting a block as a function of its distance."""

    @torch.no_grad()
    def build(history: torch.Tensor, w_max: int) -> ConditionInput:
        tree = _tree(lm, gist_fn, block_size, history)
        target = tree.num_nodes(1) - distance_blocks
        if not 0 <= target < tree.num_nodes(1):
            raise ValueError(f"no complete block {distance_blocks} blocks before the cursor")
        entries = [entry_for(tree, 1 if b == target else 0, b) for b in range(tree.num_nodes(0))]
        return _read(lm, tree, entries, position_scheme, sink_tokens)

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
    context_len: int  # positions the base model read before the horizon (its cost)


def evaluate(
    lm: BaseLM,
    datasets: dict[str, tuple[list[str], np.ndarray]],
    conditions: dict[str, Condition],
    w_max_values: list[int],
    context_tokens: int,
    horizon: int,
    batch_size: int = 4,
    progress: bool = True,
    w_independent: frozenset[str] = frozenset({"full"}),
) -> list[EvalRow]:
    """Score every condition on every sample. `datasets[name] = (sample_ids, ids [N, C+H])`.

    Conditions in `w_independent` (the full history, probes) are scored once per sample (w_max = 0).
    """
    rows: list[EvalRow] = []
    jobs = [
        (ds, cond, w)
        for ds in datasets
        for cond in conditions
        for w in ([0] if cond in w_independent else w_max_values)
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
                        EvalRow(
                            ds, sample_ids[i + j], cond, w, float(per_tok.mean()), per_tok.tolist(),
                            inputs[j].embeds.shape[0],
                        )
                    )
            bar.update(len(chunk))
    bar.close()
    return rows


def _same_length_groups(inputs: list[ConditionInput]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for j, c in enumerate(inputs):
        groups.setdefault(c.embeds.shape[0], []).append(j)
    return list(groups.values())


def condition_nlls(rows: list[EvalRow], dataset: str, w_max: int, conditions: list[str]) -> list[np.ndarray]:
    """Per condition, the horizon NLL of each of `dataset`'s samples at `w_max`, aligned by sample id
    (the paired arrays the intervals resample); a W_max-independent condition (`full`) is read at W_max 0."""
    by = {(r.condition, r.w_max, r.sample_id): r.nll for r in rows if r.dataset == dataset and r.w_max in (0, w_max)}
    ids = sorted({s for c, w, s in by if c == conditions[0]})
    return [np.array([by.get((c, w_max, s), by.get((c, 0, s))) for s in ids], dtype=np.float64) for c in conditions]


def summarize(rows: list[EvalRow], methods: list[str]) -> list[dict]:
    """Per dataset × W_max: NLL of each condition, ΔNLL@H (mean, p95, paired 95 % interval) and recovery
    (with its interval) of each method, and whether each method beats recency (`{m}_beats_recency`: the
    interval of the paired NLL difference lies below 0, `{m}_minus_recency_ci_*`, its width
    `{m}_minus_recency_ci_width`); `delta_nll_ci_width_median` over the row's ΔNLL intervals. A method with
    no rows at a W_max (a peer outside `evaluation.peer_w_max`) has no keys in that W_max's row."""
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
            summary.update(M.mean_and_p95(M.delta_nll(rec, nll_full), "delta_nll_recency"))
            summary.update(M.with_ci("delta_nll_recency", M.mean_ci(M.delta_nll(rec, nll_full))))
            present = [m for m in methods if (ds, m, w) in by_key]
            for m in present:
                vals = np.array([by_key[(ds, m, w)][s] for s in ids])
                summary[f"nll_{m}"] = M.mean(vals)
                summary.update(M.mean_and_p95(M.delta_nll(vals, nll_full), f"delta_nll_{m}"))
                summary.update(M.with_ci(f"delta_nll_{m}", M.mean_ci(M.delta_nll(vals, nll_full))))
                summary[f"recovery_{m}"] = M.recovery(M.mean(rec), M.mean(vals), M.mean(nll_full))
                summary.update(M.with_ci(f"recovery_{m}", M.recovery_ci(rec, vals, nll_full)))
                diff = M.difference_ci(vals, rec)
                summary[f"{m}_minus_recency_mean"] = M.mean(vals - rec)
                summary.update(M.with_ci(f"{m}_minus_recency", diff))
                summary[f"{m}_minus_recency_ci_width"] = M.ci_width(diff)
                summary[f"{m}_beats_recency"] = bool(diff[1] < 0)
            summary["delta_nll_ci_width_median"] = M.median_width(
                summary, [f"delta_nll_{m}" for m in ["recency", *present]]
            )
            out.append(summary)
    return out


def interval_width_section(summary: list[dict], w_max: int, widths: dict[str, str],
                           decide: dict[str, str]) -> list[str]:
    """A report section stating how wide the paired 95 % intervals are at `w_max`, one row per dataset:
    the sample count, `widths` (column header -> width key of the summary rows; empty where a row lacks it)
    and, for each paired difference of `decide` (label -> width key), the smallest difference it resolves."""
    rows = [s for s in summary if s["w_max"] == w_max]

    def cell(v):
        return "" if v is None else "n/a" if not np.isfinite(v) else f"{v:.3f}"

    decidable = {f"decidable {label} ≳": key for label, key in decide.items()}
    table = [
        {"dataset": s["dataset"], "n_samples": s["n_samples"], **{h: cell(s.get(k)) for h, k in widths.items()},
         **{h: cell(M.decidable_difference(s[k]) if k in s else None) for h, k in decidable.items()}}
        for s in rows
    ]
    columns = ["dataset", "n_samples", *widths, *decidable]
    counts = ", ".join(str(n) for n in sorted({s["n_samples"] for s in rows}))
    return [
        "## How wide the intervals are",
        (f"Width (hi − lo, nats/token) of the paired 95 % intervals at W_max = {w_max}, with {counts} samples per "
         "dataset; a median is over the methods (or peers) of the row. A difference smaller than about half the "
         "width cannot be decided with this many samples: the \"decidable\" columns give that half, the smallest "
         "difference of means these samples resolve."),
        reports.markdown_table(table, columns),
    ]


def summarize_fixed(rows: list[EvalRow], condition: str) -> list[dict]:
    """Per dataset: ΔNLL@H (mean, p95) of a W_max-independent condition against the full history."""
    by_key = {(r.dataset, r.condition, r.sample_id): r for r in rows if r.w_max == 0}
    out = []
    for ds in sorted({r.dataset for r in rows}):
        ids = sorted(s for (d, c, s) in by_key if d == ds and c == condition)
        if not ids:
            continue
        vals = np.array([by_key[(ds, condition, s)].nll for s in ids])
        full = np.array([by_key[(ds, "full", s)].nll for s in ids])
        summary = {"dataset": ds, "condition": condition, "n_samples": len(ids)}
        summary.update(M.mean_and_p95(M.delta_nll(vals, full), "delta_nll"))
        summary.update(M.with_ci("delta_nll", M.mean_ci(M.delta_nll(vals, full))))
        # History tokens per position the model read: 32x for LOD1-only, 1024x for one LOD2 gist.
        ratios = [by_key[(ds, "full", s)].context_len / by_key[(ds, condition, s)].context_len for s in ids]
        summary["compression"] = float(np.mean(ratios))
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
            "context_len": pa.array([r.context_len for r in rows], pa.int32()),
        }
    )


def rows_from_table(table) -> list[EvalRow]:
    """The inverse of `rows_to_table` (reuse scored rows instead of recomputing them)."""
    d = table.to_pydict()
    return [
        EvalRow(d["dataset"][i], d["sample_id"][i], d["condition"][i], d["w_max"][i], d["nll"][i],
                d["token_nll"][i], d["context_len"][i])
        for i in range(table.num_rows)
    ]
