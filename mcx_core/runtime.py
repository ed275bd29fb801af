"""Runtime engine (the seed's Example 2 loop): stream a long token sequence through a MegaContext.

One step per `runtime.refocus_every` new tokens:

    ingest     tree.ingest(new tokens) (GistNet gists every completed block) + wc.sync()
    fit        FocusAllocator.fit: forced collapses back under W_max (history is never dropped)
    lensnet    policy.scores(wc, tree, step) -> [N] signed focus scores
    allocator  FocusAllocator.step: <= n_diff expand/collapse actions
    checks     wc.check_invariants() (SPEC §2, every step)
    assemble   wc.assemble -> inputs_embeds, position ids
    forward    the frozen base model over [working context ‖ next H tokens]: Loss@H

`latency_ms` is the whole step. In the same step the frozen base model alone runs the same number of
active positions (the newest `wc.cost` raw tokens + the same H) with no MegaContext machinery; the
overhead is `metrics.latency_overhead(step, baseline)`, per step and, in the summary, of the medians.

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
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from mcx_core.allocator import FocusAllocator
from mcx_core.config import MegaContextConfig
from mcx_core.deltas import OraclePolicy
from mcx_core.evaluation import ConditionInput, horizon_nll
from mcx_core.lensnet import LensNet, LensNetPolicy
from mcx_core.model import BaseLM
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import NullSink, TelemetrySink
from mcx_core.tree import GistFn, MegaContextTree
from mcx_core.working_context import WorkingContext

log = logging.getLogger(__name__)

RESIDENCY_BINS = (0, 1, 2, 3, 4, 6, 8, 16, 32)  # histogram bin starts; the last bin is open


class Policy(Protocol):
    name: str

    def scores(self, wc: WorkingContext, tree: MegaContextTree, step: int) -> torch.Tensor: ...


PolicyFactory = Callable[[torch.Tensor], Policy]  # a document's token ids -> a fresh policy for it


# ---------------------------------------------------------------------------------------------- policies


class RecencyPolicy:
    """Scores 0 everywhere: only the budget's forced collapses move anything (the recency baseline)."""

    name = "recency"

    def scores(self, wc: WorkingContext, tree: MegaContextTree, step: int) -> torch.Tensor:
        return torch.zeros(len(wc.entries))


class RandomPolicy:
    """Uniform scores in [-1, 1] from a seeded generator: what chance focus does."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, wc: WorkingContext, tree: MegaContextTree, step: int) -> torch.Tensor:
        return torch.rand(len(wc.entries), generator=self.generator) * 2 - 1


class ExpandNearestPolicy:
    """+1 on the gist nearest the cursor, -0.1 elsewhere (under the collapse threshold, but enough to pay
    for the expand): more detail just behind the recent tokens."""

    name = "expand_nearest"

    def scores(self, wc: WorkingContext, tree: MegaContextTree, step: int) -> torch.Tensor:
        out = torch.full((len(wc.entries),), -0.1)
        gists = [i for i, e in enumerate(wc.entries) if e.level > 0]
        if gists:
            out[gists[-1]] = 1.0
        return out


def standard_policies(
    lm: BaseLM, horizon: int, seed: int = 0, lensnet: LensNet | None = None, oracle: bool = True
) -> dict[str, PolicyFactory]:
    """Factories for compare_policies: recency, random, expand_nearest, oracle (optional), lensnet."""
    out: dict[str, PolicyFactory] = {
        "recency": lambda doc: RecencyPolicy(),
        "random": lambda doc: RandomPolicy(seed),
        "expand_nearest": lambda doc: ExpandNearestPolicy(),
    }
    if oracle:
        out["oracle"] = lambda doc: OraclePolicy(lm, _horizon_fn(doc, horizon))
    if lensnet is not None:
        out["lensnet"] = lambda doc: LensNetPolicy(lensnet, lm.embed)
    return out


def _horizon_fn(doc: torch.Tensor, horizon: int) -> Callable[[int], torch.Tensor]:
    ids = torch.as_tensor(doc, dtype=torch.long)
    return lambda cursor: ids[cursor : cursor + horizon]


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


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory (allocated, reserved) since the run began, or the process's peak RSS."""
    if device.type == "cuda":
        return {
            M.GPU_MEMORY_ALLOCATED_GB: torch.cuda.max_memory_allocated(device) / 1e9,
            M.GPU_MEMORY_RESERVED_GB: torch.cuda.max_memory_reserved(device) / 1e9,
        }
    return {M.PEAK_RSS_MB: peak_rss_mb()}


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class TraceWriter:
    """One JSON line per step into `.{name}.tmp`, renamed to `path` by `close()`; a crashed run leaves
    only the hidden `.tmp` file, never a `*.jsonl` that looks complete."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.path.with_name(f".{self.path.name}.tmp")
            self._file = self.tmp.open("w", encoding="utf-8", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")

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
    }
    for key in (M.PEAK_RSS_MB, M.GPU_MEMORY_ALLOCATED_GB, M.GPU_MEMORY_RESERVED_GB):
        if key in records[0]:
            out[key] = float(max(col(key)))
    return out


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
) -> RuntimeResult:
    """Stream `token_ids` through a MegaContext for `steps` refocus steps (default `runtime.steps`, fewer
    if the sequence ends first: each step needs `horizon` tokens after its cursor).

    `prefill` tokens are ingested up front (untimed) and start from `WorkingContext.initial`, so a step
    can be measured over a long history without streaming all of it. `max_level` (default: the
    gister's, else 2) is the tree's top level. Per-step metrics go to `sink` with `step=`.
    """
    sink = sink or NullSink()
    w_max = w_max or cfg.working_context.w_max
    steps = steps or cfg.runtime.steps
    wcc, R, H = cfg.working_context, cfg.runtime.refocus_every, cfg.dataset.horizon
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

    tree = MegaContextTree(
        lm.d_model,
        lm.embed,
        gister,
        block_size=cfg.dataset.block_size,
        max_level=max_level or getattr(gister, "max_level", 2),
    )
    if prefill:
        tree.ingest(ids[:prefill])
        wc = WorkingContext.initial(tree, w_max, wcc.recent_tokens, wcc.position_scheme)
    else:
        wc = WorkingContext(tree, w_max, wcc.recent_tokens, wcc.position_scheme)
    allocator = FocusAllocator(cfg.allocator, w_max)
    if isinstance(policy, LensNetPolicy):
        policy.ages_fn = allocator.ages  # LensNet's age feature is the allocator's

    # Untimed warm-up, so one-time setup is not charged to the first step.
    horizon_nll(lm, [ConditionInput(lm.embed(ids[:8]), torch.arange(8), 8)], ids[8 : 8 + H][None])

    writer = TraceWriter(trace_path)
    records: list[dict[str, Any]] = []
    residencies: list[int] = []
    for s in tqdm(range(steps), desc=f"runtime [{policy.name}]", unit="step", disable=not progress):
        clock = Stopwatch(device)
        lo = prefill + s * R
        tree.ingest(ids[lo : lo + R])
        wc.sync()
        clock.lap("ingest")
        allocator.fit(wc)  # forced collapses first: policies only ever score a context within budget
        clock.lap("fit")
        scores = policy.scores(wc, tree, s)
        clock.lap("lensnet")
        reported = getattr(policy, "last_causality_violations", None)
        violations = reported if reported is not None else M.causality_violations(wc.entries, tree.cursor)
        stats = allocator.step(wc, scores)
        clock.lap("allocator")
        wc.check_invariants()
        clock.lap("checks")
        embeds, positions, _ = wc.assemble(lm.embed)
        clock.lap("assemble")
        cursor = tree.cursor
        horizon = ids[cursor : cursor + H]
        start = cursor if wc.position_scheme == "center" else positions.numel()
        loss = horizon_nll(lm, [ConditionInput(embeds, positions, start)], horizon[None]).mean().item()
        clock.lap("forward")
        step_ms = clock.total_ms

        T = wc.cost  # the baseline: the frozen model on as many raw tokens, same horizon
        base_clock = Stopwatch(device)
        raw = ConditionInput(lm.embed(ids[cursor - T : cursor]), torch.arange(cursor - T, cursor), cursor)
        horizon_nll(lm, [raw], horizon[None]).mean().item()
        base_clock.lap("forward")
        baseline_ms = base_clock.total_ms

        residencies += stats.residencies
        util = M.budget_utilization(wc.cost, w_max)
        metrics = {
            M.SWAP_RATE: M.swap_rate(stats.num_expands, stats.num_collapses, tree.num_nodes(1)),
            M.NUM_EXPANDS: stats.num_expands,
            M.NUM_COLLAPSES: stats.num_collapses,
            M.NUM_FORCED_COLLAPSES: stats.num_forced,
            M.UTILIZATION: util,
            M.ACTIVE_TOKENS: wc.cost,
            M.BUDGET_LIMIT: w_max,
            M.LATENCY_MS: step_ms,
            **{M.LATENCY_STAGE_PREFIX + k: v for k, v in clock.laps.items()},
            M.BASELINE_LATENCY_MS: baseline_ms,
            M.LATENCY_OVERHEAD: M.latency_overhead(step_ms, baseline_ms),
            M.CAUSALITY_VIOLATION: violations,
            M.RUNTIME_LOSS_AT_H: loss,
            **memory_metrics(device),
        }
        if residencies:
            metrics[M.MEAN_RESIDENCY] = M.mean(residencies)
        record = {
            "step": s,
            "policy": policy.name,
            "position": cursor,
            "expanded": [a.span_id for a in stats.actions if a.kind == "expand"],
            "collapsed": [a.span_id for a in stats.actions if a.kind == "collapse"],
            "working_context": wc.level_counts(),
            "latency_ms": step_ms,
            "budget_utilization": util,
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
) -> list[dict[str, Any]]:
    """Run every policy on the same documents at the same W_max; one row per policy, pooled over the
    documents' steps. Traces go to `trace_dir/{policy}_doc{d}.jsonl`; the table and each policy's
    summary (as `{metric}/{policy}`) go to `sink`."""
    sink = sink or NullSink()
    w = w_max or cfg.working_context.w_max
    rows = []
    for name, make in policies.items():
        records: list[dict[str, Any]] = []
        residencies: list[int] = []
        for d, doc in enumerate(documents):
            doc = torch.as_tensor(np.asarray(doc), dtype=torch.long)
            trace = Path(trace_dir) / f"{name}_doc{d}.jsonl" if trace_dir is not None else None
            res = run_engine(
                cfg, lm, gister, make(doc), doc, steps, w, trace, None, prefill=prefill, progress=progress
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
                "utilization": s[M.UTILIZATION_MEAN],
                "utilization_max": s[M.UTILIZATION_MAX],
                "overhead": s[M.LATENCY_OVERHEAD],
                "latency_p50_ms": s[M.LATENCY_P50],
                "causality_violations": int(s[M.CAUSALITY_VIOLATIONS_TOTAL]),
            }
        )
        sink.log_metrics({f"{k}/{name}": v for k, v in s.items() if math.isfinite(v)})
    sink.log_table({k: [r[k] for r in rows] for k in rows[0]}, "runtime/policy_comparison.json")
    return rows
