"""The metric definitions of SPEC §7 — the only place they are computed.

Training, the runtime engine, the Dagster assets and the asset checks all call these, so a number
means the same thing wherever it appears.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Metric names, as logged to MLflow and the trace files (the user's document's names).
TRAIN_LOSS = "train/loss"
TRAIN_DELTA_NLL_MEAN = "train/delta_nll_mean"
TRAIN_DELTA_NLL_P95 = "train/delta_nll_p95"
TRAIN_HORIZON = "train/horizon_length"
SWAP_RATE = "runtime/swap_rate"
NUM_EXPANDS = "runtime/num_expands"
NUM_COLLAPSES = "runtime/num_collapses"
UTILIZATION = "runtime/token_budget_utilization"
ACTIVE_TOKENS = "runtime/active_tokens"
BUDGET_LIMIT = "runtime/budget_limit"
LATENCY_MS = "runtime/latency_ms"
MEAN_RESIDENCY = "runtime/mean_residency"
CAUSALITY_VIOLATION = "debug/causality_violation"


def _arr(values: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("metric over an empty set of values")
    return a


def delta_nll(nll_condition: Sequence[float] | np.ndarray, nll_full: Sequence[float] | np.ndarray) -> np.ndarray:
    """ΔNLL@H per sample: NLL of the horizon given the condition minus NLL given the full history."""
    c, f = _arr(nll_condition), _arr(nll_full)
    if c.shape != f.shape:
        raise ValueError(f"shape mismatch: condition {c.shape} vs full {f.shape}")
    return c - f


def mean(values) -> float:
    return float(_arr(values).mean())


def p95(values) -> float:
    return float(np.percentile(_arr(values), 95))


def p50(values) -> float:
    return float(np.percentile(_arr(values), 50))


def p99(values) -> float:
    return float(np.percentile(_arr(values), 99))


def summarize(values, prefix: str) -> dict[str, float]:
    """`{prefix}_mean`, `{prefix}_p95` — the two numbers every ΔNLL is reported with."""
    return {f"{prefix}_mean": mean(values), f"{prefix}_p95": p95(values)}


def recovery(nll_recency: float, nll_method: float, nll_full: float) -> float:
    """Share of the truncation gap won back: (NLL_recency − NLL_method) / (NLL_recency − NLL_full).

    1 = as good as the full history, 0 = no better than dropping history, < 0 = worse than dropping.
    NaN when recency loses nothing (no gap to win back).
    """
    gap = nll_recency - nll_full
    if abs(gap) < 1e-9:
        return float("nan")
    return float((nll_recency - nll_method) / gap)


def swap_rate(num_expands: int, num_collapses: int, num_lod1_nodes: int) -> float:
    """(expands + collapses) in one allocator step / number of LOD1 nodes in the tree."""
    return (num_expands + num_collapses) / num_lod1_nodes if num_lod1_nodes else 0.0


def budget_utilization(cost: int, w_max: int) -> float:
    """Working-context cost / W_max."""
    return cost / w_max


def latency_overhead(step_ms: float, baseline_ms: float) -> float:
    """(MegaContext step − frozen base model step on the same active positions) / baseline step."""
    return (step_ms - baseline_ms) / baseline_ms


def is_finite(values) -> bool:
    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())
