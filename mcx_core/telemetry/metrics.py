"""The metric definitions of SPEC §7 — the only place they are computed.

Training, the runtime engine, the Dagster assets and the asset checks all call these, so a number
means the same thing wherever it appears.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

# Metric names, as logged to MLflow and the trace files (the user's document's names).
TRAIN_LOSS = "train/loss"
TRAIN_DELTA_NLL_MEAN = "train/delta_nll_mean"
TRAIN_DELTA_NLL_P95 = "train/delta_nll_p95"
TRAIN_HORIZON = "train/horizon_length"
TRAIN_NLL = "train/nll"  # mean horizon NLL of the batch with the trained compression
TRAIN_KL = "train/kl"  # KL(teacher ‖ student) over the horizon, per token
TRAIN_LOD2_DELTA_NLL = "train/lod2_delta_nll"  # prefix: _mean/_p95 via summarize (1024x stress context)
TRAIN_POOLING_MSE = "train/pooling_mse"  # ||gist - target||² / ||target||², LOD1
TRAIN_POOLING_MSE_LOD2 = "train/pooling_mse_lod2"
TRAIN_RECONSTRUCTION_NLL = "train/reconstruction_nll"  # NLL of a block's own tokens after [sink, its gist]
TRAIN_TEACHER_CACHE_MB = "train/teacher_cache_mb"  # on-disk size of the JT1 pool's teacher shards
TRAIN_GRAD_NORM = "train/grad_norm"  # before clipping
TRAIN_LR = "train/lr"
TRAIN_PHASE_INDEX = "train/phase_index"
TRAIN_TOKENS_PER_S = "train/tokens_per_s"  # base-model positions (delta_nll) or gisted tokens (pooling_mse) / s
TRAIN_NAN = "train/nan"  # 1 when a step's loss or gradient was not finite
VAL_DELTA_NLL_MEAN = "val/delta_nll_mean"  # JT1's validation curve: ΔNLL@H of held-out val-split samples
VAL_DELTA_NLL_P95 = "val/delta_nll_p95"
VAL_NLL = "val/nll"  # their mean horizon NLL through the current gists


def train_loss_of(objective: str) -> str:
    """The loss of one JT1 objective (`train/loss_pooling_mse`, `train/loss_reconstruction`,
    `train/loss_delta_nll`): one curve per objective, where `train/loss` jumps at each phase change."""
    return f"train/loss_{objective}"


GISTNET_PARAMETERS = "gistnet/parameters"
GISTNET_LATENCY_MS = "gistnet/latency_ms_per_block"  # batched (64 blocks per call)
GISTNET_LATENCY_SINGLE_MS = "gistnet/latency_ms_single_block"
SWAP_RATE = "runtime/swap_rate"
NUM_EXPANDS = "runtime/num_expands"
NUM_COLLAPSES = "runtime/num_collapses"
UTILIZATION = "runtime/token_budget_utilization"
ACTIVE_TOKENS = "runtime/active_tokens"
BUDGET_LIMIT = "runtime/budget_limit"
LATENCY_MS = "runtime/latency_ms"
MEAN_RESIDENCY = "runtime/mean_residency"
CAUSALITY_VIOLATION = "debug/causality_violation"
TRAIN_LENSNET_LOSS = "train/lensnet_loss"  # the JT2 objective: the weighted sum of the four terms below
TRAIN_LENSNET_REGRESSION = "train/lensnet_regression"  # MSE of scores vs normalised utilities
TRAIN_LENSNET_RANKING = "train/lensnet_ranking"  # pairwise hinge within a context
TRAIN_LENSNET_BUDGET = "train/lensnet_budget"  # squared mean score per context (zero-sum)
TRAIN_LENSNET_LEGALITY = "train/lensnet_legality"  # raw score mass on illegal directions
TRAIN_LENSNET_RANKING_ACCURACY = "train/lensnet_ranking_accuracy"  # held-out rows
TRAIN_LENSNET_RANK_CORRELATION = "train/lensnet_rank_correlation"  # held-out rows, Spearman
TRAIN_LENSNET_HELDOUT_CONTEXTS = "train/lensnet_heldout_contexts"  # contexts of the held-out documents
TRAIN_LENSNET_HELDOUT_DOCUMENTS = "train/lensnet_heldout_documents"
TRAIN_LENSNET_TRAIN_CONTEXTS = "train/lensnet_train_contexts"
TRAIN_LENSNET_LR = "train/lensnet_lr"
TRAIN_LENSNET_GRAD_NORM = "train/lensnet_grad_norm"  # before clipping
LENSNET_PARAMETERS = "lensnet/parameters"
DELTAS_ROWS = "deltas/rows"
DELTAS_CONTEXTS = "deltas/contexts"
DELTAS_SECONDS = "deltas/seconds"
DELTAS_SAMPLES = "deltas/samples"
DELTAS_SECONDS_PER_CONTEXT = "deltas/seconds_per_context"  # wall time of one labelled working context
DELTAS_ROWS_PER_CONTEXT = "deltas/rows_per_context"  # counterfactual actions evaluated per context
DELTAS_SEQUENCES = "deltas/sequences"  # base-model sequences scored: one per row + one per context
DELTAS_HELPFUL_FRACTION = "deltas/helpful_fraction"  # share of rows with delta_nll < 0
DELTAS_EXPAND_DELTA_NLL_MEAN = "deltas/expand_delta_nll_mean"
DELTAS_COLLAPSE_DELTA_NLL_MEAN = "deltas/collapse_delta_nll_mean"
TRAIN_LENSNET_TRAIN_RANKING_ACCURACY = "train/lensnet_train_ranking_accuracy"  # training rows: the gap to held-out shows memorisation
# Evaluation summaries (mcx_core.eval), per dataset × W_max under eval/{dataset}/w{W_max}/: for each method m
# (meanpool, gist, every peer of mcx_core.eval.peers) nll_{m}, delta_nll_{m}_mean/_p95/_ci_lo/_ci_hi,
# recovery_{m}(_ci_lo/_ci_hi), {m}_minus_recency_*, {m}_beats_recency; for the learned gists against each
# peer p also gist_minus_{p}_mean/_ci_lo/_ci_hi and gist_beats_{p} (the paired interval lies below 0).
# A method scored at only some W_max (the peers, evaluation.peer_w_max) has no keys at the others. Interval
# widths (`ci_width`): {m}_minus_recency_ci_width, gist_minus_{p}_ci_width, and the medians over the row's
# methods delta_nll_ci_width_median, gist_minus_peer_ci_width_median.
EVAL_PEER_SECONDS = "eval/peer_seconds"  # baseline eval: wall time of scoring the peers, attention forwards included


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


def mean_and_p95(values, prefix: str) -> dict[str, float]:
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


# ---------------------------------------------------------------------------------------------- intervals
# Every ΔNLL and recovery is reported with a paired bootstrap interval over samples: the conditions are
# scored on the same held-out samples, so a resample draws sample indices once for all of them. "A beats
# B" means the interval of the paired difference NLL_A − NLL_B lies entirely below 0.

CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000


def bootstrap_ci(statistic, *samples, n_resamples: int = BOOTSTRAP_RESAMPLES, level: float = CI_LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Paired percentile-bootstrap interval of `statistic(*samples, axis=-1)` (vectorized over resamples);
    the samples are equal-length per-sample arrays resampled together. (nan, nan) below 2 samples."""
    from scipy.stats import bootstrap

    arrays = [_arr(s) for s in samples]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"paired samples differ in length: {[len(a) for a in arrays]}")
    if len(arrays[0]) < 2:
        return float("nan"), float("nan")
    if all(np.ptp(a) == 0 for a in arrays):  # no spread: every resample gives the same value
        v = float(statistic(*[a[None] for a in arrays], axis=-1)[0])
        return v, v
    res = bootstrap(arrays, statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                    confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _mean_stat(x, axis=-1):
    return x.mean(axis=axis)


def _difference_stat(a, b, axis=-1):
    return (a - b).mean(axis=axis)


def _recovery_stat(rec, method, full, axis=-1):
    gap = rec.mean(axis=axis) - full.mean(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(gap) < 1e-9, np.nan, (rec.mean(axis=axis) - method.mean(axis=axis)) / gap)


def mean_ci(values) -> tuple[float, float]:
    """Interval of the mean of per-sample values (a ΔNLL@H)."""
    return bootstrap_ci(_mean_stat, values)


def difference_ci(nll_a, nll_b) -> tuple[float, float]:
    """Interval of mean(NLL_a − NLL_b) over paired samples: below 0 everywhere = a beats b."""
    return bootstrap_ci(_difference_stat, nll_a, nll_b)


def recovery_ci(nll_recency, nll_method, nll_full) -> tuple[float, float]:
    """Interval of `recovery` (a ratio of means), resampling the samples of all three conditions together."""
    return bootstrap_ci(_recovery_stat, nll_recency, nll_method, nll_full)


def beats(nll_a, nll_b) -> bool:
    """Whether a beats b: the paired interval of mean(NLL_a − NLL_b) lies entirely below 0."""
    return bool(difference_ci(nll_a, nll_b)[1] < 0)


def with_ci(prefix: str, interval: tuple[float, float]) -> dict[str, float]:
    """`{prefix}_ci_lo`, `{prefix}_ci_hi` — the flat form intervals take in summaries, Parquet and MLflow."""
    return {f"{prefix}_ci_lo": interval[0], f"{prefix}_ci_hi": interval[1]}


def ci_width(interval: tuple[float, float]) -> float:
    """hi − lo of an interval: how finely the samples measure. A difference smaller than about half the width
    of the paired interval cannot be decided with this many samples (`decidable_difference`)."""
    return float(interval[1] - interval[0])


def decidable_difference(width: float) -> float:
    """The smallest difference of means an interval `width` wide can tell from 0: about half the width."""
    return width / 2


def median_width(row: dict, prefixes: Iterable[str]) -> float:
    """Median `ci_width` of the intervals `{prefix}_ci_lo/_ci_hi` a summary row holds (NaN when it holds none)."""
    widths = [ci_width((row[f"{p}_ci_lo"], row[f"{p}_ci_hi"])) for p in prefixes if f"{p}_ci_lo" in row]
    return float(np.median(widths)) if widths else float("nan")


def swap_rate(num_expands: int, num_collapses: int, num_lod1_nodes: int) -> float:
    """(expands + collapses) in one allocator step / number of LOD1 nodes in the tree."""
    return (num_expands + num_collapses) / num_lod1_nodes if num_lod1_nodes else 0.0


def budget_utilization(cost: int, w_max: int) -> float:
    """Working-context cost / W_max."""
    return cost / w_max


def latency_overhead(step_ms: float, baseline_ms: float) -> float:
    """(MegaContext step − frozen base model step on the same active positions) / baseline step."""
    return (step_ms - baseline_ms) / baseline_ms


def causality_violations(spans: Iterable, cursor: int) -> int:
    """Entries (anything with an `end`) LensNet reads whose span ends after the cursor. Must be 0."""
    return sum(1 for s in spans if s.end > cursor)


# Statistics that are NaN by definition when there is nothing to measure (no held-out context, no pair of
# distinct utilities): reported, but not a sign of a diverging run (training-finite checks skip them).
UNDEFINED_WHEN_EMPTY = frozenset({TRAIN_LENSNET_RANKING_ACCURACY, TRAIN_LENSNET_RANK_CORRELATION, TRAIN_LENSNET_TRAIN_RANKING_ACCURACY})


def pairwise_ranking_accuracy(scores, utilities, groups, min_gap: float = 0.0) -> float:
    """Share of pairs within a group (a working context) that `scores` order like `utilities`.

    Only pairs whose utilities differ by more than `min_gap` count; a tie in the scores counts half.
    NaN when no group has such a pair. Chance level is 0.5.
    """
    s, u, g = _arr(scores), _arr(utilities), np.asarray(groups)
    if not (s.shape == u.shape == g.shape):
        raise ValueError(f"shape mismatch: scores {s.shape}, utilities {u.shape}, groups {g.shape}")
    right, total = 0.0, 0
    for key in np.unique(g):
        idx = np.flatnonzero(g == key)
        du = u[idx, None] - u[None, idx]  # [n, n]
        ds = s[idx, None] - s[None, idx]
        pairs = du > min_gap  # each unordered pair once, oriented so that utility i > utility j
        right += float((ds[pairs] > 0).sum() + 0.5 * (ds[pairs] == 0).sum())
        total += int(pairs.sum())
    return right / total if total else float("nan")


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank."""
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a))
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson of the tie-averaged ranks); NaN if either side is constant."""
    a, b = _arr(x), _arr(y)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def is_finite(values) -> bool:
    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())


# Runtime engine (mcx_core.focus.engine): per step, then a run summary. Stage latencies are
# f"{LATENCY_STAGE_PREFIX}{stage}" for stage in ingest, fit, lensnet, allocator, checks, assemble, forward.
NUM_FORCED_COLLAPSES = "runtime/num_forced_collapses"  # collapses the budget forced (part of NUM_COLLAPSES)
AGE_OUT_COLLAPSES = "runtime/age_out_collapses"  # forced collapses of spans no action placed (part of forced)
NUM_SWAPS = "runtime/num_swaps"  # expands paid for by collapses in the same step (SPEC §5.3)
RESIDENCY_SAMPLES = "runtime/residency_samples"  # actions on spans a deliberate action placed (SPEC §7)
LATENCY_STAGE_PREFIX = "runtime/latency_ms/"
BASELINE_LATENCY_MS = "runtime/baseline_latency_ms"  # frozen base model alone, same active positions
LATENCY_OVERHEAD = "runtime/latency_overhead"  # latency_overhead(step, baseline)
RUNTIME_LOSS_AT_H = "runtime/loss_at_h"  # mean NLL of the next H tokens given the working context
GPU_MEMORY_ALLOCATED_GB = "runtime/gpu_memory_allocated_gb"  # peak since the run began
GPU_MEMORY_RESERVED_GB = "runtime/gpu_memory_reserved_gb"
PEAK_RSS_MB = "runtime/peak_rss_mb"  # CPU runs: peak resident set size of the process
SWAP_RATE_MEAN = "runtime/swap_rate_mean"
UTILIZATION_MEAN = "runtime/token_budget_utilization_mean"
UTILIZATION_MAX = "runtime/token_budget_utilization_max"
LATENCY_P50 = "runtime/latency_p50"
LATENCY_P99 = "runtime/latency_p99"
BASELINE_LATENCY_P50 = "runtime/baseline_latency_p50"
RUNTIME_LOSS_AT_H_MEAN = "runtime/loss_at_h_mean"
CAUSALITY_VIOLATIONS_TOTAL = "debug/causality_violations_total"
TRAIN_LORA_LOSS = "train/lora_loss"  # the JT3 objective: mean NLL of the horizon (Loss@H), adapter on
TRAIN_LOSS_AT_H = "train/loss_at_h"  # the user's document's name for the same JT3 Loss@H
TRAIN_LORA_LOSS_WITHOUT_ADAPTER = "train/lora_loss_without_adapter"  # same batch, adapter disabled
TRAIN_LORA_GAIN = "train/lora_gain"  # loss without adapter − loss with it, same batch (> 0: it helps)
TRAIN_LORA_GRAD_NORM = "train/lora_grad_norm"  # before clipping
TRAIN_LORA_LR = "train/lora_lr"
TRAIN_LORA_TOKENS_PER_S = "train/lora_tokens_per_s"  # base-model positions (context + horizon) / step wall s
TRAIN_LORA_ACTIVE_TOKENS = "train/lora_active_tokens"  # mean working-context cost (Loss@H vs budget)
TRAIN_LORA_FOCUS_ACTIONS = "train/lora_focus_actions"  # mean voluntary LensNet actions per sample's refocus
LORA_PARAMETERS = "lora/parameters"  # trainable adapter parameters
EVAL_LORA_LOSS_AT_H = "eval/lora_loss_at_h"  # held-out Loss@H with the adapter
EVAL_LORA_LOSS_AT_H_WITHOUT_ADAPTER = "eval/lora_loss_at_h_without_adapter"  # same contexts, adapter off
EVAL_LORA_DELTA_LOSS = "eval/lora_delta_loss"  # prefix (_mean/_p95): with − without per sample (< 0: helps)
EVAL_LORA_SAMPLES = "eval/lora_samples"

# Post-hoc analysis (mcx_core.tools.analysis), alerts (mcx_core.tools.alerts) and profiling (mcx_core.tools.profiling).
ANALYSIS_RESIDENCY_MEAN = "analysis/residency_mean"  # policy-chosen swaps only (forced collapses apart)
ANALYSIS_RESIDENCY_BELOW_MIN = "analysis/residency_below_min_fraction"  # share < acceptance.mean_residency_min
ANALYSIS_FORCED_RESIDENCY_MEAN = "analysis/forced_residency_mean"
ANALYSIS_COMPRESSION_WITHIN = "analysis/compression_within_acceptance_fraction"  # learned-gist points
ANALYSIS_BOUNDARY_EXCESS = "analysis/boundary_delta_nll_excess"  # edge positions minus interior, per block
ANALYSIS_BOUNDARY_ALIGNED = "analysis/boundary_aligned_delta_nll_mean"  # synthetic test, defs on boundaries
ANALYSIS_BOUNDARY_SHIFTED = "analysis/boundary_shifted_delta_nll_mean"  # same defs, half a block later
ANALYSIS_LATENCY_SHARE_PREFIX = "analysis/latency_share/"  # + category: measured share of the step
ANALYSIS_OSCILLATING_SPANS = "analysis/oscillating_spans"
ANALYSIS_PING_PONGS = "analysis/ping_pong_events"
ANALYSIS_SPIKE_STEPS = "analysis/latency_spike_steps"
ANALYSIS_SPIKE_ACTIONS_CORR = "analysis/latency_actions_correlation"  # Pearson, all steps
ANALYSIS_SPIKE_ACTIONS_MEAN = "analysis/latency_spike_actions_mean"  # actions per spike step
ANALYSIS_CALM_ACTIONS_MEAN = "analysis/latency_calm_actions_mean"  # actions per other step
ANALYSIS_DRIFT_MIN_COSINE = "analysis/gist_drift_min_cosine_to_first"
ANALYSIS_DRIFT_LAST_COSINE = "analysis/gist_drift_last_cosine_to_previous"
ALERTS_FIRED = "alerts/fired"
PROFILE_STEP_MS = "profile/step_ms"  # the profiled step, under the profiler
PROFILE_MEMORY_STEP_MS = "profile/memory_step_ms"  # the memory-tracked step
PROFILE_PEAK_RSS_MB = "profile/peak_rss_mb"  # CPU: peak RSS sampled during the memory-tracked step
PROFILE_RSS_GROWTH_MB = "profile/rss_growth_mb"

# --- per training phase (JT1, deltas, JT2, JT3), logged by every phase's MLflow run ------------------
PHASE_SECONDS = "phase/seconds"  # wall time of the phase
PHASE_PEAK_RSS_MB = "phase/peak_rss_mb"  # peak resident set size sampled while the phase ran
PHASE_RSS_GROWTH_MB = "phase/rss_growth_mb"  # peak RSS minus RSS when the phase began
PHASE_GPU_PEAK_ALLOCATED_GB = "phase/gpu_peak_allocated_gb"  # CUDA: peak allocated during the phase
# --- per cycle, on the training loop's parent run (step = cycle) ----------------------------------------
CYCLE_SECONDS = "cycle/seconds"  # JT1 + deltas + JT2 + JT3 wall time; per phase: cycle/<phase>/seconds
CYCLE_PEAK_RSS_MB = "cycle/peak_rss_mb"  # the largest phase peak; per phase: cycle/<phase>/peak_rss_mb
PROFILE_TRACED_PEAK_MB = "profile/python_traced_peak_mb"  # tracemalloc (Python allocations only)
PROFILE_GPU_PEAK_ALLOCATED_GB = "profile/gpu_peak_allocated_gb"
PROFILE_GPU_PEAK_RESERVED_GB = "profile/gpu_peak_reserved_gb"
