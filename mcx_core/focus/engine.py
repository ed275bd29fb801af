"""Runtime engine (the seed's Example 2 loop): stream a long token sequence through a MegaContext.

`MegaContextEngine.step` is one refocus, per `runtime.refocus_every` new tokens:

    ingest     tree.ingest(new tokens) (GistNet gists every completed block) + wc.sync()
    fit        FocusAllocator.fit: forced collapses back under W_max (history is never dropped)
    lensnet    policy.scores(wc, tree, step) -> [N] signed focus scores
    allocator  FocusAllocator.step: <= n_diff expand/collapse actions
    checks     wc.check_invariants() (SPEC §2, every step)
    assemble   wc.assemble -> inputs_embeds, position ids
    forward    the frozen base model over [working context ‖ next H tokens]: Loss@H

`run_engine` drives it over a token sequence. `latency_ms` is the whole step; right after it the frozen
base model alone runs the same number of active positions (the newest `wc.cost` raw tokens + the same
H) with no MegaContext machinery, and the overhead is `metrics.latency_overhead(step, baseline)`, per
step and, in the summary, of the medians. `compare_policies` runs several policies on the same
documents at the same W_max.

Residency is SPEC §7's (the allocator's `Action.residency`): per action on a span that a deliberate
allocator action had placed, the steps it stayed at that level. A block gisted as it leaves the recent
window (and its gists collapsed further as they age) was never swapped: such forced collapses are
counted as `runtime/age_out_collapses`, not as residency samples, so a run with no voluntary focus has
no residency samples at all (mean residency undefined: NaN in metrics, null in JSON).

Each step gives one record (a trace line): the SPEC §6 trace keys (`step`, `expanded`, `collapsed`,
`working_context`, `latency_ms`, `budget_utilization`) plus every logged metric under its
`metrics` name. Traces are written line by line to a hidden `.tmp` file next to `trace_path` and
renamed to it when the run ends, so a `*.jsonl` trace is always complete.

Policies share one interface, `scores(wc, tree, step) -> [N]`: `LensNetPolicy` (lensnet.py),
`OraclePolicy` (deltas.py, peeks at the horizon by design), and the baselines here.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mcx_core.compression.gistnet import tree_inputs_fn
from mcx_core.config import MegaContextConfig
from mcx_core.focus.allocator import FocusAllocator, StepStats
from mcx_core.focus.lensnet import LensNetPolicy
from mcx_core.focus.policies import Policy, PolicyFactory
from mcx_core.model.base import BaseLM
from mcx_core.model.scoring import ConditionInput, horizon_nll
from mcx_core.model.tree import GistFn, MegaContextTree
from mcx_core.model.working_context import WorkingContext
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.memory import memory_metrics
from mcx_core.telemetry.sinks import NullSink, TelemetrySink

log = logging.getLogger(__name__)

RESIDENCY_BINS = (0, 1, 2, 3, 4, 6, 8, 16, 32)  # histogram bin starts; the last bin is open


# ---------------------------------------------------------------------------------------------- helpers


def residency_histogram(residencies: Sequence[int]) -> dict[str, int]:
    """Counts per bin of RESIDENCY_BINS, every bin present: {"0": n, ..., "4-5": n, ..., "32+": n}."""
    edges = RESIDENCY_BINS
    labels = [str(a) if b - a == 1 else f"{a}-{b - 1}" for a, b in itertools.pairwise(edges)] + [
        f"{edges[-1]}+"
    ]
    counts = [0] * len(edges)
    for r in residencies:
        counts[bisect.bisect_right(edges, r) - 1] += 1
    return dict(zip(labels, counts))


class Stopwatch:
    """Wall-clock laps in ms; on CUDA each reading waits for the kernels launched before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.laps: dict[str, float] = {}
        self.start = self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, stage: str) -> None:
        now = self._now()
        self.laps[stage], self.last = 1000 * (now - self.last), now

    @property
    def total_ms(self) -> float:
        return 1000 * (self.last - self.start)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


class TraceWriter:
    """One JSON line per step into `.{stem}.{pid}-{token}{suffix}.tmp`, renamed to `path` by `close()`; a crashed run leaves
    only the hidden `.tmp` file, never a `*.jsonl` that looks complete."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Unique per process (two writers of one path never share a temp file); `.jsonl.tmp` last,
            # which is how the alert watcher finds a trace in progress.
            self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}{self.path.suffix}.tmp")
            self._file = self.tmp.open("w", encoding="utf-8", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_finite_or_none(record), allow_nan=False) + "\n")

    def close(self) -> Path | None:
        if self._file is None:
            return None
        self._file.close()
        os.replace(self.tmp, self.path)
        return self.path


# ---------------------------------------------------------------------------------------------- engine


@dataclass
class RuntimeResult:
    policy: str
    records: list[dict[str, Any]]  # one per step, as written to the trace
    residencies: list[int]  # every swap's residency, in order
    summary: dict[str, float]
    trace_path: Path | None


def summarize_run(records: list[dict[str, Any]], residencies: Sequence[int]) -> dict[str, float]:
    """Run summary from step records (one run, or several concatenated)."""
    if not records:
        raise ValueError("no steps to summarize")

    def col(key: str) -> list:
        return [r[key] for r in records]

    latency, baseline = col(M.LATENCY_MS), col(M.BASELINE_LATENCY_MS)
    out = {
        "steps": float(len(records)),
        M.SWAP_RATE_MEAN: M.mean(col(M.SWAP_RATE)),
        M.MEAN_RESIDENCY: M.mean(residencies) if len(residencies) else math.nan,
        M.UTILIZATION_MEAN: M.mean(col(M.UTILIZATION)),
        M.UTILIZATION_MAX: float(max(col(M.UTILIZATION))),
        M.CAUSALITY_VIOLATIONS_TOTAL: float(sum(col(M.CAUSALITY_VIOLATION))),
        M.LATENCY_P50: M.p50(latency),
        M.LATENCY_P99: M.p99(latency),
        M.BASELINE_LATENCY_P50: M.p50(baseline),
        M.LATENCY_OVERHEAD: M.latency_overhead(M.p50(latency), M.p50(baseline)),
        M.RUNTIME_LOSS_AT_H_MEAN: M.mean(col(M.RUNTIME_LOSS_AT_H)),
        M.NUM_EXPANDS: float(sum(col(M.NUM_EXPANDS))),
        M.NUM_COLLAPSES: float(sum(col(M.NUM_COLLAPSES))),
        M.NUM_FORCED_COLLAPSES: float(sum(col(M.NUM_FORCED_COLLAPSES))),
        M.AGE_OUT_COLLAPSES: float(sum(col(M.AGE_OUT_COLLAPSES))),
        M.NUM_SWAPS: float(sum(col(M.NUM_SWAPS))),
        M.RESIDENCY_SAMPLES: float(len(residencies)),
    }
    for key in (M.PEAK_RSS_MB, M.GPU_MEMORY_ALLOCATED_GB, M.GPU_MEMORY_RESERVED_GB):
        if key in records[0]:
            out[key] = float(max(col(key)))
    return out


@dataclass
class StepOutput:
    stats: StepStats  # the allocator's step: actions, residencies, costs
    loss_at_h: float  # mean NLL of the horizon given the working context
    laps: dict[str, float]  # ms per stage
    latency_ms: float  # the whole step
    causality_violations: int  # spans the policy read that end after the cursor


class MegaContextEngine:
    """The seed's Example 2 loop, one `step(new_tokens, horizon)` per refocus: ingest, fit, score,
    allocate, check, assemble, base forward. Holds the tree, the working context and the allocator."""

    def __init__(
        self,
        cfg: MegaContextConfig,
        lm: BaseLM,
        gister: GistFn,
        policy: Policy,
        w_max: int | None = None,
        prefill_ids: torch.Tensor | None = None,
        max_level: int | None = None,
    ):
        """`prefill_ids` are ingested at once (the context starts as `WorkingContext.initial`);
        `max_level` defaults to the gister's, else 2."""
        wcc = cfg.working_context
        self.lm, self.policy = lm, policy
        self.w_max = w_max or wcc.w_max
        self.tree = MegaContextTree(
            lm.d_model, lm.embed, gister, block_size=cfg.dataset.block_size,
            max_level=max_level or getattr(gister, "max_level", 2),
            input_fn=tree_inputs_fn(lm, gister, cfg.dataset.block_size),
        )  # fmt: skip
        if prefill_ids is not None and len(prefill_ids):
            self.tree.ingest(prefill_ids)
            self.wc = WorkingContext.initial(self.tree, self.w_max, wcc.recent_tokens, wcc.position_scheme,
                                             wcc.sink_tokens)
        else:
            self.wc = WorkingContext(self.tree, self.w_max, wcc.recent_tokens, wcc.position_scheme,
                                     sink_tokens=wcc.sink_tokens)
        self.allocator = FocusAllocator(cfg.allocator, self.w_max)
        if prefill_ids is not None and len(prefill_ids):
            self.allocator.settle(self.wc)  # the prefilled context was never acted on: no residency to protect
        if isinstance(policy, LensNetPolicy):
            policy.ages_fn = self.allocator.ages  # LensNet's age feature is the allocator's
        self.steps = 0

    def step(self, new_tokens: torch.Tensor, horizon: torch.Tensor) -> StepOutput:
        """Ingest `new_tokens` [n] and refocus; Loss@H on `horizon` [H], the tokens after the cursor."""
        tree, wc, clock = self.tree, self.wc, Stopwatch(self.lm.device)
        tree.ingest(new_tokens)
        wc.sync()
        clock.lap("ingest")
        # a contextual GistNet's base-model layers over new blocks, inside ingest: shown as its own stage
        clock.laps["encode"] = 1000 * tree.last_ingest_seconds["encode"]
        clock.laps["ingest"] -= clock.laps["encode"]
        self.allocator.fit(wc)  # forced collapses first: a policy only ever scores a context within budget
        clock.lap("fit")
        scores = self.policy.scores(wc, tree, self.steps)
        clock.lap("lensnet")
        reported = getattr(self.policy, "last_causality_violations", None)
        violations = reported if reported is not None else M.causality_violations(wc.entries, tree.cursor)
        stats = self.allocator.step(wc, scores)
        clock.lap("allocator")
        wc.check_invariants()
        clock.lap("checks")
        embeds, positions, _ = wc.assemble(self.lm.embed)
        clock.lap("assemble")
        start = tree.cursor if wc.position_scheme == "center" else positions.numel()
        loss = horizon_nll(self.lm, [ConditionInput(embeds, positions, start)], horizon[None]).mean().item()
        clock.lap("forward")
        self.steps += 1
        return StepOutput(stats, loss, clock.laps, clock.total_ms, violations)


def baseline_step_ms(lm: BaseLM, history: torch.Tensor, positions: int, horizon: torch.Tensor) -> float:
    """The frozen base model alone on the newest `positions` raw tokens of `history` + the same horizon
    (same forward and loss as a step, no MegaContext machinery): ms."""
    cursor = len(history)
    clock = Stopwatch(lm.device)
    raw = ConditionInput(
        lm.embed(history[cursor - positions :]), torch.arange(cursor - positions, cursor), cursor
    )
    horizon_nll(lm, [raw], horizon[None]).mean().item()
    clock.lap("forward")
    return clock.total_ms


def run_engine(
    cfg: MegaContextConfig,
    lm: BaseLM,
    gister: GistFn,
    policy: Policy,
    token_ids: Sequence[int] | torch.Tensor | np.ndarray,
    steps: int | None = None,
    w_max: int | None = None,
    trace_path: str | os.PathLike | None = None,
    sink: TelemetrySink | None = None,
    *,
    prefill: int = 0,
    max_level: int | None = None,
    progress: bool = False,
    measure_baseline: bool = True,
) -> RuntimeResult:
    """Stream `token_ids` through a MegaContext for `steps` refocus steps (default `runtime.steps`, fewer
    if the sequence ends first: each step needs `horizon` tokens after its cursor). After each step the
    frozen base model alone runs the same active positions (`baseline_step_ms`), so the overhead is
    measured in the same run. One trace line and one `sink.log_metrics(step=)` per step.

    `prefill` tokens are ingested up front (untimed), so a step can be measured over a long history
    without streaming all of it. `max_level` (default: the gister's, else 2) is the tree's top level.
    Without `measure_baseline` the frozen-model step is not run (baseline latency and overhead NaN):
    policy comparisons score Loss@H at half the cost.
    """
    sink = sink or NullSink()
    steps = steps or cfg.runtime.steps
    R, H = cfg.runtime.refocus_every, cfg.dataset.horizon
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long).flatten()
    available = (len(ids) - prefill - H) // R
    if available < 1:
        raise ValueError(
            f"{len(ids)} tokens leave no step: prefill {prefill} + one step of {R} + horizon {H} needed"
        )
    if steps > available:
        log.warning("%s: %d tokens allow %d steps of %d, not %d", policy.name, len(ids), available, R, steps)
        steps = available
    device = lm.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine = MegaContextEngine(cfg, lm, gister, policy, w_max, ids[:prefill], max_level)
    w_max, tree, wc = engine.w_max, engine.tree, engine.wc

    # Untimed warm-up, so one-time setup is not charged to the first step.
    n = min(8, len(ids) - 1)
    horizon_nll(lm, [ConditionInput(lm.embed(ids[:n]), torch.arange(n), n)], ids[n : n + H][None])

    writer = TraceWriter(trace_path)
    records: list[dict[str, Any]] = []
    residencies: list[int] = []
    for s in tqdm(range(steps), desc=f"runtime [{policy.name}]", unit="step", disable=not progress):
        lo = prefill + s * R
        horizon = ids[lo + R : lo + R + H]
        out = engine.step(ids[lo : lo + R], horizon)
        baseline_ms = (
            baseline_step_ms(lm, ids[: lo + R], wc.assembled_positions, horizon) if measure_baseline else math.nan
        )
        stats = out.stats
        residencies += stats.residencies
        util = M.budget_utilization(wc.cost, w_max)
        metrics = {
            M.SWAP_RATE: M.swap_rate(stats.num_expands, stats.num_collapses, tree.num_nodes(1)),
            M.NUM_EXPANDS: stats.num_expands,
            M.NUM_COLLAPSES: stats.num_collapses,
            M.NUM_FORCED_COLLAPSES: stats.num_forced,
            M.AGE_OUT_COLLAPSES: stats.num_age_outs,
            M.NUM_SWAPS: stats.num_swaps,
            M.UTILIZATION: util,
            M.ACTIVE_TOKENS: wc.cost,
            M.BUDGET_LIMIT: w_max,
            M.LATENCY_MS: out.latency_ms,
            **{M.LATENCY_STAGE_PREFIX + k: v for k, v in out.laps.items()},
            M.BASELINE_LATENCY_MS: baseline_ms,
            M.LATENCY_OVERHEAD: M.latency_overhead(out.latency_ms, baseline_ms),
            M.CAUSALITY_VIOLATION: out.causality_violations,
            M.RUNTIME_LOSS_AT_H: out.loss_at_h,
            **memory_metrics(device),
        }
        if residencies:
            metrics[M.MEAN_RESIDENCY] = M.mean(residencies)
        record = {
            # the SPEC §6 trace keys
            "step": s,
            "expanded": [a.span_id for a in stats.actions if a.kind == "expand"],
            "collapsed": [a.span_id for a in stats.actions if a.kind == "collapse"],
            "working_context": wc.level_counts(),
            "sink_tokens": wc.sink_cost,  # the attention sink's positions, in `active_tokens` beside the levels
            "latency_ms": out.latency_ms,
            "budget_utilization": util,
            # detail for replay and debugging
            "policy": policy.name,
            "position": tree.cursor,
            "lod1_nodes": tree.num_nodes(1),
            "entries": len(wc.entries),
            "actions": stats.to_dict()["actions"],
            "residency": stats.residencies,
            "residency_histogram": residency_histogram(residencies),
            **metrics,
        }
        records.append(record)
        writer.write(record)
        sink.log_metrics(metrics, step=s)
    path = writer.close()
    summary = summarize_run(records, residencies)
    sink.log_metrics({k: v for k, v in summary.items() if math.isfinite(v)})
    return RuntimeResult(policy.name, records, residencies, summary, path)


def compare_policies(
    cfg: MegaContextConfig,
    lm: BaseLM,
    gister: GistFn,
    policies: dict[str, PolicyFactory],
    documents: Sequence[Sequence[int] | torch.Tensor | np.ndarray],
    steps: int | None = None,
    w_max: int | None = None,
    trace_dir: str | os.PathLike | None = None,
    sink: TelemetrySink | None = None,
    *,
    prefill: int = 0,
    progress: bool = False,
    measure_baseline: bool = True,
    done: dict[str, list[RuntimeResult]] | None = None,
) -> list[dict[str, Any]]:
    """Run every policy on the same documents at the same W_max; one row per policy, pooled over the
    documents' steps, with `loss_per_step` (the paired samples `paired_differences` compares).
    Traces go to `trace_dir/{policy}_doc{d}.jsonl`; the table and each policy's summary (as
    `{metric}/{policy}`) go to `sink`. `done[name]` are finished runs of a policy on the same documents
    and steps (the runtime evaluation's own LensNet runs), reused instead of run again."""
    sink = sink or NullSink()
    w = w_max or cfg.working_context.w_max
    rows = []
    for name, make in policies.items():
        records: list[dict[str, Any]] = []
        residencies: list[int] = []
        for d, doc in enumerate(documents):
            if done and name in done:
                res = done[name][d]
            else:
                doc = torch.as_tensor(np.asarray(doc), dtype=torch.long)
                trace = Path(trace_dir) / f"{name}_doc{d}.jsonl" if trace_dir is not None else None
                res = run_engine(
                    cfg, lm, gister, make(doc), doc, steps, w, trace, None, prefill=prefill, progress=progress,
                    measure_baseline=measure_baseline,
                )
            records += res.records
            residencies += res.residencies
        s = summarize_run(records, residencies)
        rows.append(
            {
                "policy": name,
                "w_max": w,
                "documents": len(documents),
                "steps": int(s["steps"]),
                "loss_at_h": s[M.RUNTIME_LOSS_AT_H_MEAN],
                "swap_rate": s[M.SWAP_RATE_MEAN],
                "mean_residency": s[M.MEAN_RESIDENCY],
                "residency_samples": int(s[M.RESIDENCY_SAMPLES]),
                "expands": int(s[M.NUM_EXPANDS]),
                "swaps": int(s[M.NUM_SWAPS]),
                "age_out_collapses": int(s[M.AGE_OUT_COLLAPSES]),
                "utilization": s[M.UTILIZATION_MEAN],
                "utilization_max": s[M.UTILIZATION_MAX],
                "overhead": s[M.LATENCY_OVERHEAD],
                "latency_p50_ms": s[M.LATENCY_P50],
                "causality_violations": int(s[M.CAUSALITY_VIOLATIONS_TOTAL]),
                "loss_per_step": [r[M.RUNTIME_LOSS_AT_H] for r in records],
            }
        )
        sink.log_metrics({f"{k}/{name}": v for k, v in s.items() if math.isfinite(v)})
    table = [{k: v for k, v in r.items() if k != "loss_per_step"} for r in rows]
    sink.log_table({k: [r[k] for r in table] for k in table[0]}, "runtime/policy_comparison.json")
    return rows


def paired_differences(rows: list[dict[str, Any]], policy: str) -> list[dict[str, Any]]:
    """`policy`'s Loss@H minus every other policy's, paired over the same (document, step) samples, each
    with its paired bootstrap 95 % interval; "beats" = the interval lies below 0 (SPEC §7). Where an
    oracle row exists, `gap_closed` is (recency − policy) / (recency − oracle). Steps of one document
    are not independent, so the interval is optimistic when documents are few: read it with the
    number of documents."""
    by_name = {r["policy"]: np.asarray(r["loss_per_step"], dtype=np.float64) for r in rows}
    if policy not in by_name:
        return []
    mine, out = by_name[policy], []
    for name, other in by_name.items():
        if name == policy or len(other) != len(mine):
            continue
        lo, hi = M.difference_ci(mine, other)
        out.append({"policy": policy, "versus": name, "difference": float((mine - other).mean()),
                    "ci_low": lo, "ci_high": hi, "beats": bool(hi < 0), "samples": len(mine)})
    if "recency" in by_name and "oracle" in by_name:
        gap = float(by_name["recency"].mean() - by_name["oracle"].mean())
        closed = float(by_name["recency"].mean() - mine.mean()) / gap if gap > 0 else math.nan
        for row in out:
            row["gap_closed"] = closed
    return out
