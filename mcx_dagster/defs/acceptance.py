"""JT3 (LoRA) and the POC acceptance gate: `poc_acceptance` sits downstream of every blocking
SPEC §8 check, so it materializes only when they all pass; it records the evidence and promotes
the checkpoint set."""

import dagster as dg

from mcx_dagster.defs._meta import floats, problems_result
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker


@dg.asset(group_name="training", deps=["lensnet_checkpoint"], kinds={"pytorch", "safetensors"})
def lora_checkpoint(
    context: dg.AssetExecutionContext, settings: MegaContextSettings, mlflow: MLflowTracker
) -> dg.MaterializeResult:
    """JT3: LoRA adapters (peft) on the frozen base model, trained on Loss@H with working contexts
    chosen by the current LensNet + allocator; the base weights' checksum is verified unchanged."""
    from mcx_core import pipeline

    cfg = settings.load()
    with mlflow.run(context, cfg, settings.root_dir()) as sink:
        lm, _ = pipeline.prepare_base_model(cfg)
        result = pipeline.train_lora(cfg, lm, sink)
        sink.log_artifact(result.checkpoint / "trainer_state.json", "checkpoint")
        held_out = pipeline.evaluate_lora(cfg, lm, result.checkpoint, sink)
    return dg.MaterializeResult(
        metadata={
            **floats(result.metrics),
            **floats({k.removeprefix("eval/"): v for k, v in held_out.items()}),
            "checkpoint": dg.MetadataValue.path(str(result.checkpoint)),
            "steps": dg.MetadataValue.int(result.steps),
            "nan_free": dg.MetadataValue.bool(result.nan_free),
        }
    )


@dg.asset_check(asset="lora_checkpoint", blocking=True)
def lora_training_finite(settings: MegaContextSettings) -> dg.AssetCheckResult:
    """Every logged JT3 step has a finite loss and gradient norm."""
    from mcx_core import pipeline

    problems, meta = pipeline.check_training_finite(pipeline.jt3_checkpoint(settings.load()))
    return problems_result(problems, "all logged JT3 steps finite", **floats(meta))


@dg.asset(
    group_name="acceptance",
    deps=["gist_eval_report", "runtime_eval", "gistnet_checkpoint", "lensnet_checkpoint", "lora_checkpoint"],
    kinds={"json"},
)
def poc_acceptance(
    context: dg.AssetExecutionContext, settings: MegaContextSettings, mlflow: MLflowTracker
) -> dg.MaterializeResult:
    """The POC gate (SPEC §8). Dagster runs it only when the blocking checks upstream passed; it
    re-evaluates every criterion from the stored evidence, fails naming each miss, and otherwise
    writes `artifacts/champion.json` and tags the MLflow run `mcx.champion = true`."""
    from mcx_core import pipeline

    cfg = settings.load()
    evidence = pipeline.acceptance_evidence(cfg)
    if not evidence["passed"]:
        raise dg.Failure(f"acceptance gate not met: {evidence['summary']}", metadata={"evidence": evidence["gates"]})
    with mlflow.run(context, cfg, settings.root_dir()) as sink:
        marker = pipeline.promote_champion(cfg, evidence)
        sink.set_tags({"mcx.champion": "true", **{f"mcx.champion.{k}": v for k, v in evidence["checkpoints"].items()}})
        sink.log_artifact(marker, "acceptance")
    return dg.MaterializeResult(
        metadata={
            **{g["name"]: dg.MetadataValue.float(float(g["value"])) for g in evidence["gates"]},
            "champion": dg.MetadataValue.path(str(marker)),
            "summary": evidence["summary"],
        }
    )
