"""Small helpers that turn mcx_core results into Dagster metadata and check results."""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg

from mcx_dagster.defs.partitions import cycle_of


def floats(values: dict, prefix: str = "") -> dict:
    """Numbers as float metadata, so the UI charts them across materializations."""
    out = {}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[f"{prefix}{k}"] = dg.MetadataValue.float(float(v) if math.isfinite(float(v)) else float("nan"))
    return out


def markdown_file(path: Path) -> dg.MetadataValue:
    return dg.MetadataValue.md(Path(path).read_text(encoding="utf-8"))


def problems_result(problems: list[str], passed_text: str, **metadata) -> dg.AssetCheckResult:
    """A check result that names every problem (first 20) and counts them."""
    meta = {"problems": dg.MetadataValue.int(len(problems)), **metadata}
    if problems:
        meta["details"] = dg.MetadataValue.md("\n".join(f"- {p}" for p in problems[:20]))
    else:
        meta["details"] = dg.MetadataValue.text(passed_text)
    description = passed_text if not problems else "; ".join(problems[:3]) + (
        f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    )
    return dg.AssetCheckResult(passed=not problems, metadata=meta, description=description)


def gates_result(gates, **metadata) -> dg.AssetCheckResult:
    """A check result from `mcx_core.eval.acceptance` gates: value, threshold and margin of each as float
    metadata; the description names every miss and by how much."""
    from mcx_core.eval.acceptance import verdict

    meta = {}
    for g in gates:
        meta[f"{g.name}"] = dg.MetadataValue.float(g.value if math.isfinite(g.value) else float("nan"))
        meta[f"{g.name}/threshold"] = dg.MetadataValue.float(g.threshold)
        meta[f"{g.name}/margin"] = dg.MetadataValue.float(g.margin if math.isfinite(g.margin) else float("nan"))
        if g.ci is not None:
            meta[f"{g.name}/ci_lo"], meta[f"{g.name}/ci_hi"] = (dg.MetadataValue.float(v) for v in g.ci)
    meta["details"] = dg.MetadataValue.md("\n".join(f"- {'✅' if g.passed else '❌'} {g.message}" for g in gates))
    return dg.AssetCheckResult(
        passed=all(g.passed for g in gates), metadata={**meta, **metadata}, description=verdict(gates)
    )


def trained_metadata(result, phase: dict) -> dict:
    """Metadata of a trainer's checkpoint: its last logged metrics and the phase's wall time and peak memory
    (`phase/*`) as floats, the checkpoint path, the steps, whether every step was finite."""
    return {
        **floats(result.metrics),
        **floats(phase),
        "checkpoint": dg.MetadataValue.path(str(result.checkpoint)),
        "steps": dg.MetadataValue.int(result.steps),
        "nan_free": dg.MetadataValue.bool(result.nan_free),
    }


def training_finite_result(context, settings, phase: int) -> dg.AssetCheckResult:
    """The finiteness check of a JT{phase} checkpoint of the cycle being materialized."""
    from mcx_core import checkpoints

    checkpoint = checkpoints.jt_checkpoint(settings.load(), phase, cycle_of(context))
    problems, meta = checkpoints.check_training_finite(checkpoint)
    return problems_result(problems, f"all logged JT{phase} steps finite", **floats(meta),
                           checkpoint=dg.MetadataValue.path(str(checkpoint)))
