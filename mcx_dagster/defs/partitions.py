"""The alternating training loop (SPEC §6) in Dagster: the four phase assets (gistnet_checkpoint →
delta_table → lensnet_checkpoint → lora_checkpoint) are partitioned by cycle, so the UI shows one row per
cycle. Keys are "0" … "n_cycles − 1", registered by `mcx materialize` / `mcx register-cycles` from the
config's `training_loop.n_cycles`. Cycle c starts from cycle c − 1's checkpoints (read from the checkpoint
store; Dagster cannot express that edge without a graph cycle), so cycles run in order."""

from __future__ import annotations

import dagster as dg

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
