"""Small helpers that turn mcx_core results into Dagster metadata and check results."""

from __future__ import annotations

import hashlib
import math
import re
from functools import cache
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


OWNERS = ["team:megacontext"]
PACKAGES = ("mcx_core", "mcx_dagster")
# What an evaluation charts across materializations: the headline means and recoveries. Interval
# bounds, counts, W_max and the other constants stay readable in one JSON entry (`summary`), not as
# one-point plots.
HEADLINE = re.compile(r"(^|/)(delta_nll_\w+_(mean|p95)|recovery_\w+|nll_\w+|accuracy\w*)$")
NOT_CHARTED = re.compile(r"_ci_(lo|hi)$|_ci_width|(^|/)(n_samples|w_max|samples|steps|documents)$")


@cache
def code_hash() -> str:
    """sha256 (12 hex) of the Python sources of mcx_core and mcx_dagster, as installed."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for package in PACKAGES:
        for f in sorted((root / package).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def code_version(cfg=None, sections: list[str] | None = None) -> str:
    """An asset's code version: `code-<source hash>`, with `cfg` also `+cfg-<fingerprint of the config
    sections it reads>` (a changed section or source file makes the asset's materialization stale)."""
    if cfg is None:
        return f"code-{code_hash()}"
    from mcx_core.artifacts import stage_fingerprint

    return f"code-{code_hash()}+cfg-{stage_fingerprint(cfg, sections or [])[:8]}"


def charted(values: dict, prefix: str = "") -> dict:
    """The headline numbers of `values` as float metadata (charted across materializations)."""
    return floats({k: v for k, v in values.items() if HEADLINE.search(k) and not NOT_CHARTED.search(k)}, prefix)


def summary_json(rows: list[dict] | dict) -> dg.MetadataValue:
    """Every value, constants included, as one JSON entry (non-finite numbers as null)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v if isinstance(v, str | int | float | bool) or v is None else str(v)

    return dg.MetadataValue.json(clean(rows))


def markdown_file(path: Path) -> dg.MetadataValue:
    """A markdown report as rendered metadata, its PNG plots embedded as data URIs (Dagster's markdown
    view renders those; it cannot fetch a path relative to the report)."""
    from mcx_core.reports import embed_images

    path = Path(path)
    return dg.MetadataValue.md(embed_images(path.read_text(encoding="utf-8"), path.parent))


def images(paths) -> dict:
    """One `plot/<name>` path entry per PNG beside a report (what the asset links)."""
    return {f"plot/{Path(p).stem}": dg.MetadataValue.path(str(p)) for p in paths if Path(p).is_file()}


def stage_data_version(cfg, stage: str) -> dg.DataVersion | None:
    """The data version of a cached stage (`mcx_core.artifacts.save_stage`): the fingerprint of its
    inputs, read from the stage record, so a rerun over unchanged inputs returns the same version and
    nothing downstream turns Unsynced. None when the stage left no record."""
    import json

    from mcx_core.artifacts import ArtifactPaths

    record = ArtifactPaths.from_config(cfg).stages / f"{stage}.json"
    try:
        fingerprint = json.loads(record.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None
    return dg.DataVersion(str(fingerprint)) if fingerprint else None


def reuse_metadata(result: dict, seconds: float) -> dict:
    """`reused` (the stage's stored result was still the answer) and this run's seconds; the stored
    run's own time as `computed_seconds`."""
    reused = bool(result.get("cached", False))
    return {
        "reused": dg.MetadataValue.bool(reused),
        "seconds": dg.MetadataValue.float(float(seconds)),
        "computed_seconds": dg.MetadataValue.float(float(result.get("seconds", math.nan))),
    }


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
