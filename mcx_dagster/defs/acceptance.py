"""JT3 (LoRA) and the POC acceptance gate: `poc_acceptance` sits downstream of every blocking
SPEC §8 check, so it materializes only when they all pass; it records the evidence and promotes
the checkpoint set."""

import dagster as dg

from mcx_dagster.defs.metadata import floats, trained_metadata, training_finite_result
from mcx_dagster.defs.partitions import FROM_FINAL_CYCLE, cycle_of, jt_cycles
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker, log_checkpoint_set


@dg.asset(group_name="training", deps=["lensnet_checkpoint"], partitions_def=jt_cycles, kinds={"pytorch", "safetensors"})
def lora_checkpoint(
    context: dg.AssetExecutionContext, settings: MegaContextSettings, mlflow: MLflowTracker
) -> dg.MaterializeResult:
    """JT3, the last phase of a cycle: LoRA adapters (peft) on the frozen base model, trained on Loss@H
    with working contexts chosen by the cycle's LensNet + allocator (cycle c > 0 carries c − 1's adapter
    over); the base weights' checksum is verified unchanged. Closes the cycle: writes
    `cycles/cycle{c}.json` and logs the cycle's wall time and peak memory per phase to the loop's parent run."""
    from mcx_core import checkpoints, pipeline
    from mcx_core.eval.lora import run_lora_eval
    from mcx_core.telemetry.mlflow_sink import MLflowSink
    from mcx_core.training import cycles

    cfg = settings.load()
    cycle = cycle_of(context)
    with mlflow.cycle_run(context, cfg, settings.root_dir(), "jt3") as sink:
        lm, _ = pipeline.prepare_base_model(cfg)
        result, phase = cycles.phase_jt3(cfg, lm, cycle, sink)
        sink.log_artifact(result.checkpoint / checkpoints.TRAINER_STATE_FILE, "checkpoint")
        held_out = run_lora_eval(cfg, lm, result.checkpoint, sink, cycle=cycle)
        memory = {**_earlier_phases(context, cycle), "jt3": phase}
        record = cycles.write_cycle_record(cfg, cycle, memory)
        per_cycle = cycles.cycle_metrics(memory)
        MLflowSink(sink.tracking_uri, sink.parent_run_id).log_metrics(per_cycle, step=cycle)
    return dg.MaterializeResult(
        metadata={
            **trained_metadata(result, phase),
            **floats(per_cycle),
            **floats({k.removeprefix("eval/"): v for k, v in held_out.items()}),
            "cycle_record": dg.MetadataValue.path(str(cycles.cycle_record_path(cfg, cycle))),
            "cycle_nan_free": dg.MetadataValue.bool(record["nan_free"]),
        }
    )


_PHASE_ASSETS = {"jt1": "gistnet_checkpoint", "deltas": "delta_table", "jt2": "lensnet_checkpoint"}


def _earlier_phases(context: dg.AssetExecutionContext, cycle: int) -> dict[str, dict[str, float]]:
    """The `phase/*` metadata (wall time, peak memory) of this cycle's JT1, deltas and JT2 materializations."""
    from mcx_core.telemetry import metrics as M

    out = {}
    for phase, key in _PHASE_ASSETS.items():
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[str(cycle)]), limit=1
        ).records
        if records:
            meta = records[0].asset_materialization.metadata
            values = {k: float(v.value) for k, v in meta.items() if k.startswith("phase/")}
            if M.PHASE_SECONDS in values:
                out[phase] = values
    return out


@dg.asset_check(asset="lora_checkpoint", blocking=True)
def lora_training_finite(context: dg.AssetCheckExecutionContext, settings: MegaContextSettings) -> dg.AssetCheckResult:
    """Every logged JT3 step of the cycle has a finite loss and gradient norm."""
    return training_finite_result(context, settings, 3)


@dg.asset(
    group_name="acceptance",
    deps=[
        "gist_eval_report",
        "runtime_eval",
        *(dg.AssetDep(k, partition_mapping=FROM_FINAL_CYCLE) for k in ("gistnet_checkpoint", "lensnet_checkpoint", "lora_checkpoint")),
    ],
    kinds={"json"},
)
def poc_acceptance(
    context: dg.AssetExecutionContext, settings: MegaContextSettings, mlflow: MLflowTracker
) -> dg.MaterializeResult:
    """The POC gate (SPEC §8). Dagster runs it only when the blocking checks upstream passed; it
    re-evaluates every criterion from the stored evidence and registers the checkpoint set as a new
    version of the MLflow model `megacontext-<config>` (alias `candidate`). Passed: the version gets the
    `champion` alias, `artifacts/champion.json` is written (the CLI reads it) and the run is tagged
    `mcx.champion = true`. Failed: no alias moves, the version is tagged `mcx.gate = failed`, and the
    asset fails naming each miss."""
    from mcx_core.eval import champion
    from mcx_core.telemetry.mlflow_sink import register_candidate, registered_model_name

    cfg = settings.load()
    evidence = champion.acceptance_evidence(cfg)
    with mlflow.run(context, cfg, settings.root_dir()) as sink:
        model_id = log_checkpoint_set(sink, evidence)
        version = register_candidate(sink, cfg.name, model_id, evidence["passed"],
                                     tags={"mcx.summary": evidence["summary"][:5000]})
        sink.set_tags({"mcx.gate": "passed" if evidence["passed"] else "failed",
                       "mcx.registered_model": f"{registered_model_name(cfg.name)}/{version}"})
        if evidence["passed"]:
            marker = champion.promote_champion(cfg, evidence)
            sink.set_tags({"mcx.champion": "true", **{f"mcx.champion.{k}": v for k, v in evidence["checkpoints"].items()}})
            sink.log_artifact(marker, "acceptance")
    if not evidence["passed"]:
        raise dg.Failure(f"acceptance gate not met: {evidence['summary']}", metadata={"evidence": evidence["gates"]})
    return dg.MaterializeResult(
        metadata={
            **{g["name"]: dg.MetadataValue.float(float(g["value"])) for g in evidence["gates"]},
            "champion": dg.MetadataValue.path(str(marker)),
            "registered_model": f"{registered_model_name(cfg.name)} version {version} (aliases champion, candidate)",
            "summary": evidence["summary"],
        }
    )
