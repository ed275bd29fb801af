"""Running the code location's asset graph in-process, as `mcx materialize` does: the Dagster instance of a
project, the runs a selection needs (one per training cycle), and their outcome read as one result."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from mcx_dagster.defs.partitions import JT_CYCLES, cycle_keys, register_cycles

# The post-hoc analyses, which must run even when a gate failed: a second pass after the main graph
# (`run_materialize(..., POST_HOC)`: first the demo's one small sweep cell, job mcx_demo_sweep, then the
# analyses, job mcx_post_hoc).
POST_HOC = ["telemetry_analysis"]


def project_instance(root: Path) -> dg.DagsterInstance:
    """The Dagster instance at `$DAGSTER_HOME`, else at `<root>/.dagster_home` (created, seeded with the
    project's dagster.yaml when it has none)."""
    home = Path(os.environ.get("DAGSTER_HOME") or root / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and (root / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text((root / "dagster.yaml").read_text())
    return dg.DagsterInstance.from_config(str(home))


class Materialized:
    """The runs one `mcx materialize` made, read as one result: with `training_loop.n_cycles` > 1 the
    cycle-partitioned training assets need one Dagster run per cycle (run c: cycle c's JT1 → deltas →
    JT2 → JT3; the first also builds what training reads, the last also evaluates and gates)."""

    def __init__(self, results: list) -> None:
        self.results = results

    @property
    def success(self) -> bool:
        return all(r.success for r in self.results)

    @property
    def run_id(self) -> str:
        return self.results[-1].run_id

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.results]

    @property
    def all_events(self) -> list:
        return [e for r in self.results for e in r.all_events]

    def get_asset_check_evaluations(self) -> list:
        return [e for r in self.results for e in r.get_asset_check_evaluations()]

    def get_asset_materialization_events(self) -> list:
        return [e for r in self.results for e in r.get_asset_materialization_events()]

    def asset_materializations_for_node(self, node: str) -> list:
        return [m for r in self.results for m in r.asset_materializations_for_node(node)]


def cycle_plan(definitions, selection, cfg) -> list[tuple[str | None, set]]:
    """[(partition key, asset keys)] — the runs that materialize `selection` (all assets when None).
    Without cycle-partitioned assets in it: one run. With them: one run per cycle, in order."""
    graph = definitions.resolve_asset_graph()
    if selection is None:  # everything but other partitioned assets (the sweep runs per partition: its schedule)
        sel = dg.AssetSelection.all() - dg.AssetSelection.assets(*POST_HOC)
    else:
        sel = dg.AssetSelection.from_coercible(selection)
    selected = set(sel.resolve(graph))
    cycle_assets, other_partitioned = set(), set()
    for a in definitions.assets or []:
        pd = getattr(a, "partitions_def", None)
        if pd is None:
            continue
        (cycle_assets if getattr(pd, "name", None) == JT_CYCLES else other_partitioned).update(a.keys)
    if selection is None:
        selected -= other_partitioned
    cyc = selected & cycle_assets
    if not cyc:
        return [(None, selected)]
    before = selected & set(dg.AssetSelection.assets(*cyc).upstream().resolve(graph)) - cyc
    after = selected - cyc - before
    keys = cycle_keys(cfg)
    return [
        (key, cyc | (before if i == 0 else set()) | (after if i == len(keys) - 1 else set()))
        for i, key in enumerate(keys)
    ]


def run_materialize(definitions, selection, instance, resources: dict | None = None,
                    log_level: str = "INFO", job_name: str = "mcx_pipeline", partition_key: str | None = None,
                    run_config: dict | None = None, tags: dict | None = None) -> Materialized:
    """Materialize `selection` (all assets when None) of `definitions`; never raises on step failure.
    `resources` replaces bound resources by key (tests point them at temporary stores). Registers the
    config's cycle partitions, then runs the cycles in order and stops after a cycle whose run failed a
    step or a check (a later cycle would start from an unchecked one)."""
    resources = {**(definitions.resources or {}), **(resources or {})}
    cfg = resources["settings"].load()
    register_cycles(instance, cfg)
    assets = list(definitions.assets or []) + list(definitions.asset_checks or [])
    results = []
    if partition_key is not None:
        plan = [(job_name, partition_key, set(dg.AssetSelection.from_coercible(selection).resolve(
            definitions.resolve_asset_graph())), run_config)]
    elif selection == POST_HOC:  # the second pass: the demo's small sweep, then the analyses
        plan = [*demo_sweep_plan(definitions, cfg), ("mcx_post_hoc", None, set(
            dg.AssetSelection.assets(*POST_HOC).resolve(definitions.resolve_asset_graph())), run_config)]
    else:
        plan = [(job_name, key, keys, run_config) for key, keys in cycle_plan(definitions, selection, cfg)]
    for name, key, keys, config in plan:
        # dg.materialize would name every run `__ephemeral_asset_job__`; named jobs (the code location
        # defines the same names, mcx_dagster/defs/jobs.py) make CLI runs findable in the UI.
        job = dg.define_asset_job(name, selection=dg.AssetSelection.assets(*keys))
        located = dg.Definitions(jobs=[job], assets=assets, resources=resources)
        result = located.resolve_job_def(name).execute_in_process(
            instance=instance,
            partition_key=key,
            raise_on_error=False,
            tags={**(tags or {}), **({"mcx.cycle": key} if key in cycle_keys(cfg) else {})} or None,
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}, **(config or {})},
        )
        results.append(result)
        if name == "mcx_demo_sweep":  # its failure is reported, and the analyses still run
            continue
        if step_failures(result) or failed_checks(result) or any(e.is_step_skipped for e in result.all_events):
            break
    return Materialized(results)


def demo_sweep_plan(definitions, cfg) -> list[tuple]:
    """One small run of the nightly sweep for the demo: one grid cell with `DEMO_SWEEP_SAMPLES` samples
    (seconds), so `deltas/eval_sweep.parquet` exists after `make demo`. The cell is a partition of the
    code location's grid (the config it serves, `MCX_CONFIG`): the first one `cfg`'s grid also holds,
    else its first. None when the code location has no sweep."""
    from mcx_core.eval.sweep import sweep_partitions
    from mcx_dagster.defs.sweep import DEMO_SWEEP_SAMPLES, SWEEP_ASSET

    key = dg.AssetKey(SWEEP_ASSET)
    if key not in definitions.resolve_asset_graph().get_all_asset_keys():
        return []
    served = definitions.resolve_assets_def(key).partitions_def.get_partition_keys()
    wanted = [k for k in served if k in set(sweep_partitions(cfg))]
    if not served:
        return []
    samples = min(DEMO_SWEEP_SAMPLES, cfg.sweep.samples)
    return [("mcx_demo_sweep", (wanted or served)[0], {key}, {"ops": {SWEEP_ASSET: {"config": {"samples": samples}}}})]


def step_failures(result) -> list[str]:
    """Steps that failed for a reason other than a failed blocking check (which is a result, not an
    error: the check reports by how much the criterion was missed)."""
    failed = {ev.check_name for ev in failed_checks(result)}
    return [
        e.step_key for e in result.all_events
        if e.is_step_failure and not any(name in e.step_key for name in failed)
    ]


def failed_checks(result) -> list:
    """The check evaluations of `result` that did not pass."""
    return [e for e in result.get_asset_check_evaluations() if not e.passed]
