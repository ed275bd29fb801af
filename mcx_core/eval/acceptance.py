"""The acceptance gate (SPEC §8) as data: each criterion is a `Gate` — a measured value, the
configured threshold, pass/fail and a one-line message that says by how much. Asset checks, the CLI
and reports all use these, so a threshold is compared in exactly one place."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mcx_core.config import MegaContextConfig

_OPS = {
    "<=": lambda v, t: v <= t,
    ">=": lambda v, t: v >= t,
    "<": lambda v, t: v < t,
}
_MISSED = {"<=": ">", ">=": "<", "<": ">="}


@dataclass(frozen=True)
class Gate:
    name: str  # e.g. "narrative/w128/delta_nll_gist_mean"
    label: str  # what a person reads, e.g. "narrative ΔNLL@64 at W_max=128"
    value: float
    threshold: float
    op: str  # "<=", ">=" or "<"
    ci: tuple[float, float] | None = None  # paired bootstrap 95 % interval of `value`, where it is a mean over samples

    @property
    def passed(self) -> bool:
        return math.isfinite(self.value) and _OPS[self.op](self.value, self.threshold)

    @property
    def margin(self) -> float:
        """How far inside the threshold the value is (negative: by how much it misses)."""
        if not math.isfinite(self.value):
            return float("-inf")
        return self.value - self.threshold if self.op == ">=" else self.threshold - self.value

    @property
    def message(self) -> str:
        if not math.isfinite(self.value):
            return f"{self.label}: {self.value} is not finite (threshold {self.op} {self.threshold:g})"
        ci = f" [95% CI {self.ci[0]:.4g}, {self.ci[1]:.4g}]" if self.ci is not None else ""
        if self.passed:
            return f"{self.label}: {self.value:.4g}{ci} {self.op} {self.threshold:g} (margin {self.margin:.4g})"
        bad = _MISSED[self.op]
        return f"{self.label}: {self.value:.4g}{ci} {bad} {self.threshold:g}, misses by {-self.margin:.4g}"

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "margin": self.margin, "message": self.message}


def at_most(name: str, label: str, value: float, threshold: float, ci: tuple[float, float] | None = None) -> Gate:
    return Gate(name, label, float(value), float(threshold), "<=", ci)


def _finite(value) -> float:
    """JSON carries an undefined metric as null: NaN here (a gate on it fails, saying it is not finite)."""
    return math.nan if value is None else float(value)


def policy_gates(cfg: MegaContextConfig, paired: list[dict], baselines=("recency", "random", "expand_nearest")) -> list[Gate]:
    """Issue-13 focus targets from `focus.engine.paired_differences(rows, "lensnet")`: LensNet's Loss@H
    minus each baseline policy's, upper end of the paired 95 % interval < `acceptance.policy_minus_baseline_max`;
    and, with the oracle compared, the share of the recency → oracle gap closed ≥ `oracle_gap_closed_min`."""
    a = cfg.acceptance
    gates = [
        Gate(f"lensnet_minus_{p['versus']}_ci_hi", f"LensNet − {p['versus']} Loss@H, upper end of the 95% interval "
             f"({p['samples']} paired steps)", float(p["ci_high"]), a.policy_minus_baseline_max, "<",
             (float(p["ci_low"]), float(p["ci_high"])))
        for p in paired if p["versus"] in baselines
    ]
    if paired and "gap_closed" in paired[0]:
        gates.append(at_least("lensnet_oracle_gap_closed", "share of the recency → oracle Loss@H gap LensNet closes",
                              _finite(paired[0]["gap_closed"]), a.oracle_gap_closed_min))
    return gates


def at_least(name: str, label: str, value: float, threshold: float) -> Gate:
    return Gate(name, label, float(value), float(threshold), ">=")


def gist_delta_nll_gates(cfg: MegaContextConfig, summary: list[dict], w_max: int | None = None) -> list[Gate]:
    """ΔNLL@H of learned gists ≤ `acceptance.delta_nll_max`, one gate per dataset at `w_max`
    (default: `working_context.w_max`). `summary`: `gist_eval`'s per-(dataset, W_max) rows."""
    w = w_max or cfg.working_context.w_max
    H = cfg.dataset.horizon
    rows = [s for s in summary if s["w_max"] == w]
    if not rows:
        raise ValueError(f"the gist evaluation has no rows at W_max={w} (has {sorted({s['w_max'] for s in summary})})")
    return [
        at_most(
            f"{s['dataset']}/w{w}/delta_nll_gist_mean", f"{s['dataset']} ΔNLL@{H} at W_max={w}",
            s["delta_nll_gist_mean"], cfg.acceptance.delta_nll_max, _ci(s, "delta_nll_gist"),
        )
        for s in sorted(rows, key=lambda s: s["dataset"])
    ]


def _ci(row: dict, prefix: str) -> tuple[float, float] | None:
    """The row's `{prefix}_ci_lo/hi` interval (rows stored before intervals existed have none)."""
    lo, hi = row.get(f"{prefix}_ci_lo"), row.get(f"{prefix}_ci_hi")
    return (float(lo), float(hi)) if lo is not None and hi is not None else None


def peer_gates(cfg: MegaContextConfig, summary: list[dict], w_max: int | None = None) -> list[Gate]:
    """The learned gists beat every peer of `evaluation.peers`: per dataset × peer at `w_max` (default:
    `working_context.w_max`), the upper end of the paired 95 % interval of NLL_gist − NLL_peer lies below
    `acceptance.gist_minus_peer_max`. Not a SPEC §8 criterion (the POC gate does not read these)."""
    w = w_max or cfg.working_context.w_max
    peer_ws = cfg.evaluation.peer_w_values(cfg.working_context.eval_w_max)
    if cfg.evaluation.peers and w not in peer_ws:
        raise ValueError(f"the peers are scored at W_max {peer_ws} (evaluation.peer_w_max), not at W_max={w}: "
                         "no peer gate can run there")
    rows = sorted((s for s in summary if s["w_max"] == w), key=lambda s: s["dataset"])
    if not rows:
        raise ValueError(f"the gist evaluation has no rows at W_max={w} (has {sorted({s['w_max'] for s in summary})})")
    missing = [p for p in cfg.evaluation.peers if f"gist_minus_{p}_ci_hi" not in rows[0]]
    if missing:
        raise ValueError(f"the gist evaluation has no scores of the peer(s) {missing}: rematerialize gist_eval_report")
    return [
        Gate(
            f"{s['dataset']}/w{w}/gist_minus_{p}_ci_hi",
            f"{s['dataset']} W_max={w}: learned gists − {p}, upper end of the 95% interval of the NLL difference",
            float(s[f"gist_minus_{p}_ci_hi"]), cfg.acceptance.gist_minus_peer_max, "<",
            _ci(s, f"gist_minus_{p}"),
        )
        for s in rows
        for p in cfg.evaluation.peers
    ]


def stress_gates(cfg: MegaContextConfig, stress: list[dict]) -> list[Gate]:
    """1024× stress: one LOD2 gist per 1024-token span, ΔNLL ≤ `acceptance.delta_nll_1024x_max`."""
    H = cfg.dataset.horizon
    return [
        at_most(
            f"{s['dataset']}/stress1024/delta_nll_mean", f"{s['dataset']} ΔNLL@{H} at 1024× compression",
            s["delta_nll_mean"], cfg.acceptance.delta_nll_1024x_max, _ci(s, "delta_nll"),
        )
        for s in sorted(stress, key=lambda s: s["dataset"])
    ]


def verdict(gates: list[Gate]) -> str:
    """One line: all passed, or each failure's message."""
    failed = [g for g in gates if not g.passed]
    if not failed:
        return f"all {len(gates)} criteria met"
    return "; ".join(g.message for g in failed)


def runtime_gates(cfg: MegaContextConfig, row: dict) -> dict[str, list[Gate]]:
    """SPEC §8 focus criteria from a runtime summary row (`focus.engine.compare_policies` form), grouped
    by the check that reports them."""
    a = cfg.acceptance
    steps = f"over {row['steps']} steps"
    residency = "mean residency (steps; SPEC §7, age-out collapses apart)"
    residency_value = _finite(row["mean_residency"])
    if row.get("residency_samples") == 0:
        # Nothing a deliberate action placed was acted on again: no thrash to measure. The criterion
        # exists to catch thrash, so it holds; the label says why the value is the threshold itself.
        residency += " — no residency sample (no span an allocator action placed was acted on again): holds"
        residency_value = float(a.mean_residency_min)
    return {
        "swap_rate": [at_most("swap_rate", f"mean swap rate {steps}", row["swap_rate"], a.swap_rate_max)],
        "residency": [at_least("mean_residency", residency, residency_value, a.mean_residency_min)],
        "utilization": [
            at_least("utilization_mean", "mean budget utilization", row["utilization"], a.utilization_min),
            at_most("utilization_max", "max budget utilization", row["utilization_max"], a.utilization_max),
        ],
        "causality": [
            at_most("causality_violations", "causality violations", row["causality_violations"], a.causality_violations_max)
        ],
        "latency": [at_most("latency_overhead", "latency overhead vs frozen base", row["overhead"], a.latency_overhead_max)],
    }
