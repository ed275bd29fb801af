"""Small helpers that turn mcx_core results into Dagster metadata."""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg


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
    return dg.AssetCheckResult(passed=not problems, metadata=meta)


def gates_result(gates, **metadata) -> dg.AssetCheckResult:
    """A check result from `mcx_core.eval.acceptance` gates: value, threshold and margin of each as float
    metadata; the description names every miss and by how much."""
    from mcx_core.eval.acceptance import summarize

    meta = {}
    for g in gates:
        meta[f"{g.name}"] = dg.MetadataValue.float(g.value if math.isfinite(g.value) else float("nan"))
        meta[f"{g.name}/threshold"] = dg.MetadataValue.float(g.threshold)
        meta[f"{g.name}/margin"] = dg.MetadataValue.float(g.margin if math.isfinite(g.margin) else float("nan"))
    meta["details"] = dg.MetadataValue.md("\n".join(f"- {'✅' if g.passed else '❌'} {g.message}" for g in gates))
    return dg.AssetCheckResult(
        passed=all(g.passed for g in gates), metadata={**meta, **metadata}, description=summarize(gates)
    )


# The alternating training loop (SPEC §6) in Dagster: the four phase assets (gistnet_checkpoint →
# delta_table → lensnet_checkpoint → lora_checkpoint) are partitioned by cycle, so the UI shows one
# row per cycle. Keys are "0" … "n_cycles − 1", registered by `mcx materialize` / `mcx register-cycles`
# from the config's `training_loop.n_cycles`. Cycle c starts from cycle c − 1's checkpoints (read from
# the checkpoint store; Dagster cannot express that edge without a graph cycle), so cycles run in order.
JT_CYCLES = "jt_cycle"
jt_cycles = dg.DynamicPartitionsDefinition(name=JT_CYCLES)

# Consumers of the trained checkpoint set (evaluations, the gate, the sweep) read the final cycle
# (as `mcx_core.pipeline.final_cycle` does: the newest cycle partition is n_cycles − 1).
FROM_FINAL_CYCLE = dg.LastPartitionMapping()


def cycle_keys(cfg) -> list[str]:
    return [str(c) for c in range(cfg.training_loop.n_cycles)]


def register_cycles(instance: dg.DagsterInstance, cfg) -> list[str]:
    """Add the config's cycle partitions that the instance does not know yet; the config's keys."""
    keys = cycle_keys(cfg)
    known = set(instance.get_dynamic_partitions(JT_CYCLES))
    missing = [k for k in keys if k not in known]
    if missing:
        instance.add_dynamic_partitions(JT_CYCLES, missing)
    return keys


def cycle_of(context) -> int:
    """The cycle a partitioned phase asset (or its check) is materializing."""
    return int(context.partition_key)


def training_finite_result(context, settings, phase: int) -> dg.AssetCheckResult:
    """The finiteness check of a JT{phase} checkpoint of the cycle being materialized."""
    from mcx_core import checkpoints

    checkpoint = checkpoints.jt_checkpoint(settings.load(), phase, cycle_of(context))
    problems, meta = checkpoints.check_training_finite(checkpoint)
    return problems_result(problems, f"all logged JT{phase} steps finite", **floats(meta),
                           checkpoint=dg.MetadataValue.path(str(checkpoint)))
