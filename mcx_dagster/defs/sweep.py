"""The nightly evaluation sweep: a partitioned grid of W_max × dataset (narrative, code, recall),
each partition scored with the current GistNet and upserted into
`artifacts/deltas/eval_sweep.parquet`; the `nightly_eval_sweep` schedule requests every partition.

The grid and the cron come from the config the code location serves, so they are built when the
definitions load (`sweep()`), never on import."""

import os
from pathlib import Path

import dagster as dg

from mcx_dagster.defs.metadata import OWNERS, code_version, floats
from mcx_dagster.defs.partitions import FROM_FINAL_CYCLE
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker
from mcx_dagster.project import DEFAULT_CONFIG, load_project_config, project_home

SWEEP_ASSET = "eval_sweep"
DEMO_SWEEP_SAMPLES = 1  # the demo's one sweep cell (orchestration.demo_sweep_plan): measured ~12 s on SmolLM2-135M, 2 loaded CPU cores


class SweepRunConfig(dg.Config):
    samples: int = 0  # samples per cell; 0: the config's sweep.samples (the nightly schedule's)


def _sweep_config():
    """The config the code location serves (`MCX_CONFIG`, default configs/default.yaml)."""
    path = Path(os.environ.get("MCX_CONFIG", DEFAULT_CONFIG))
    if not path.is_absolute():  # under the project root, else the repository's own (a project without configs/)
        here = project_home() / path
        path = here if here.is_file() else Path(__file__).resolve().parents[2] / path
    return load_project_config(path)


def sweep_definitions(cfg) -> dg.Definitions:
    """The sweep asset partitioned by `cfg`'s grid, its job, and the schedule at `cfg.sweep.cron` (UTC)."""
    from mcx_core.eval.sweep import sweep_partitions

    eval_sweep_partitions = dg.StaticPartitionsDefinition(sweep_partitions(cfg))

    @dg.asset(
        group_name="evaluation",
        deps=[dg.AssetDep("gistnet_checkpoint", partition_mapping=FROM_FINAL_CYCLE)],
        partitions_def=eval_sweep_partitions,
        kinds={"parquet"},
        owners=OWNERS,
        tags={"mcx/stage": "evaluation", "mcx/table_kind": "eval_sweep"},
        code_version=code_version(cfg, ["dataset", "base_model", "working_context", "evaluation", "sweep"]),
        # A new GistNet checkpoint re-scores the grid (with the automation sensor on: `make dev`). Not
        # `eager()`: that would also fill every never-run cell the first time the daemon looks.
        automation_condition=(dg.AutomationCondition.any_deps_updated() & ~dg.AutomationCondition.any_deps_missing()
                              & ~dg.AutomationCondition.in_progress()),
    )
    def eval_sweep(context: dg.AssetExecutionContext, config: SweepRunConfig, settings: MegaContextSettings,
                   mlflow: MLflowTracker) -> dg.MaterializeResult:
        """One cell of the W_max × dataset grid: full / recency / mean-pool / learned-gist NLLs per sample
        (answer NLL and accuracy on the planted needle for `recall`), upserted into eval_sweep.parquet."""
        from mcx_core import checkpoints, pipeline
        from mcx_core.eval import sweep

        cfg = settings.load()
        if config.samples:
            cfg = cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"samples": config.samples})})
        with mlflow.run(context, cfg, settings.root_dir(), name=f"eval_sweep[{context.partition_key}]") as sink:
            lm, _ = pipeline.prepare_base_model(cfg)
            out = sweep.run_partition(cfg, lm, checkpoints.jt1_checkpoint(cfg), context.partition_key, sink,
                                      progress=False)
            rows = out["summary"]
            sink.log_table({k: [r.get(k) for r in rows] for k in rows[0]}, f"sweep/{context.partition_key}.json")
        return dg.MaterializeResult(
            metadata={
                **floats({k.split("/", 3)[-1]: v for k, v in out["metrics"].items()
                          if k.endswith(("_mean", "_p95")) or "/recovery_" in k and "_ci_" not in k}),
                "rows": dg.MetadataValue.int(out["rows"]),
                "samples": dg.MetadataValue.int(cfg.sweep.samples),
                "checkpoint": out["checkpoint"],
                "table": dg.MetadataValue.path(str(out["table"])),
                "seconds": dg.MetadataValue.float(out["seconds"]),
            }
        )

    nightly_eval_sweep_job = dg.define_asset_job(
        "nightly_eval_sweep_job", selection=[eval_sweep], partitions_def=eval_sweep_partitions
    )

    @dg.schedule(
        name="nightly_eval_sweep", cron_schedule=cfg.sweep.cron, job=nightly_eval_sweep_job,
        execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.RUNNING,
        # Dagster 1.13 shows "Partition set: None" for every schedule (its snapshot never records one), so
        # the schedule names its partitions itself: description and metadata.
        description=f"Every grid cell of eval_sweep ({len(eval_sweep_partitions.get_partition_keys())} "
                    f"partitions: {', '.join(eval_sweep_partitions.get_partition_keys())}) at {cfg.sweep.cron} UTC.",
        metadata={"partitions_def": "eval_sweep: W_max × dataset (sweep.w_max × sweep.datasets)",
                  "partition_keys": eval_sweep_partitions.get_partition_keys()},
        owners=OWNERS,
    )
    def nightly_eval_sweep(context: dg.ScheduleEvaluationContext):
        """Every night (sweep.cron, default 02:00 UTC): one run per grid cell, keyed by the night."""
        night = context.scheduled_execution_time.strftime("%Y-%m-%d")
        return [
            dg.RunRequest(partition_key=key, run_key=f"{night}:{key}", tags={"mcx.sweep_night": night})
            for key in eval_sweep_partitions.get_partition_keys()
        ]

    demo_sweep_job = dg.define_asset_job(  # what `mcx materialize` runs as its one small sweep cell
        "mcx_demo_sweep", selection=[eval_sweep], partitions_def=eval_sweep_partitions,
        description=f"One sweep cell with {DEMO_SWEEP_SAMPLES} samples (the demo's; ops.eval_sweep.config.samples)",
    )
    return dg.Definitions(assets=[eval_sweep], jobs=[nightly_eval_sweep_job, demo_sweep_job],
                          schedules=[nightly_eval_sweep])


@dg.definitions
def sweep() -> dg.Definitions:
    return sweep_definitions(_sweep_config())
