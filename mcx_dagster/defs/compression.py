"""Compression assets: the trained GistNet (JT1) and its ΔNLL@H evaluation."""

import dagster as dg

from mcx_dagster.defs.metadata import (
    floats,
    gates_result,
    markdown_file,
    problems_result,
    stage_data_version,
    trained_metadata,
    training_finite_result,
)
from mcx_dagster.defs.partitions import FROM_FINAL_CYCLE, cycle_of, jt_cycles
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker


@dg.asset(
    group_name="compression", deps=["block_dataset", "base_model"], partitions_def=jt_cycles,
    kinds={"pytorch", "safetensors"},
)
def jt1_teacher(context: dg.AssetExecutionContext, settings: MegaContextSettings) -> dg.MaterializeResult:
    """The JT1 teacher pass of one cycle's training pool (partition = cycle): the frozen base model's
    full-history horizon NLL, top-k log-probs (KL targets), recency NLL, pooling targets and — for a
    contextual GistNet — the blocks' first-k-layer states, as safetensors shards under
    `artifacts/teacher/<fingerprint>/`. Computed once per dataset version, resumable shard by shard;
    JT1 streams it instead of holding the pool in memory."""
    from mcx_core import pipeline
    from mcx_core.compression.teacher import run_teacher_pass

    cfg = settings.load()
    lm, _ = pipeline.prepare_base_model(cfg)
    out = run_teacher_pass(cfg, lm, cycle_of(context))
    context.log.info("teacher pass: %d of %d shards computed", out["shards_computed"], out["shards"])
    return dg.MaterializeResult(
        metadata={
            "directory": dg.MetadataValue.path(str(out["directory"])),
            "fingerprint": out["fingerprint"],
            "samples": out["samples"],
            "shards": out["shards"],
            "shards_computed": out["shards_computed"],
            "input_layers": out["input_layers"],
            "size_mb": dg.MetadataValue.float(out["bytes"] / 2**20),
            "seconds": dg.MetadataValue.float(out["seconds"]),
        }
    )


@dg.asset(
    group_name="compression", deps=["block_dataset", "base_model", "jt1_teacher"], partitions_def=jt_cycles,
    kinds={"pytorch", "safetensors"},
)
def gistnet_checkpoint(
    context: dg.AssetExecutionContext, settings: MegaContextSettings, mlflow: MLflowTracker
) -> dg.MaterializeResult:
    """JT1 of one cycle (partition = cycle): GistNet trained through the config's phases (pooling_mse
    warm start, then ΔNLL substitution through the frozen base model); cycle c > 0 starts from cycle
    c − 1's GistNet. Resumes from the newest complete checkpoint of the cycle."""
    from mcx_core import checkpoints, pipeline
    from mcx_core.compression.drift import drift_from_previous
    from mcx_core.training import cycles

    cfg = settings.load()
    with mlflow.cycle_run(context, cfg, settings.root_dir(), "jt1") as sink:
        lm, _ = pipeline.prepare_base_model(cfg)
        result, phase = cycles.phase_jt1(cfg, lm, cycle_of(context), sink)
        drift, previous = drift_from_previous(cfg, lm, result.checkpoint)
        if drift is not None:
            sink.log_metrics({"jt1/gist_drift_cosine": drift}, step=result.steps)
        sink.log_artifact(result.checkpoint / checkpoints.TRAINER_STATE_FILE, "checkpoint")
    return dg.MaterializeResult(
        metadata={
            **trained_metadata(result, phase),
            "gist_drift_cosine": dg.MetadataValue.float(drift) if drift is not None else dg.MetadataValue.text(
                "no previous checkpoint"
            ),
            "previous_checkpoint": str(previous) if previous else "",
        }
    )


@dg.asset(
    group_name="compression",
    deps=[dg.AssetDep("gistnet_checkpoint", partition_mapping=FROM_FINAL_CYCLE), "baseline_eval"],
    kinds={"parquet"},
)
def gist_eval_report(
    context: dg.AssetExecutionContext, settings: MegaContextSettings, mlflow: MLflowTracker
) -> dg.MaterializeResult:
    """ΔNLL@H of learned gists at 32× (every W_max) and 1024×, against full history, recency and
    mean-pool gists on held-out narrative and code; by horizon position and by gisted-block distance.
    Reads the final cycle's GistNet."""
    from mcx_core import checkpoints, pipeline
    from mcx_core.eval import gists as gist_eval

    cfg = settings.load()
    checkpoint = checkpoints.jt1_checkpoint(cfg)
    with mlflow.run(context, cfg, settings.root_dir()) as sink:
        lm, _ = pipeline.prepare_base_model(cfg)
        result = gist_eval.run_gist_eval(cfg, lm, checkpoint, sink, force=settings.force)
    return dg.MaterializeResult(
        metadata={
            **floats({k.removeprefix("eval/"): v for k, v in result["metrics"].items()}),
            "checkpoint": dg.MetadataValue.path(str(checkpoint)),
            "report": markdown_file(result["report"]["markdown"]),
            "table": dg.MetadataValue.path(str(result["table"])),
            "reused": dg.MetadataValue.bool(bool(result.get("cached"))),
        },
        data_version=stage_data_version(cfg, "gist_eval"),  # the inputs' fingerprint: unchanged → in sync
    )


# ---------------------------------------------------------------------------------------------- checks


@dg.asset_check(asset="gistnet_checkpoint", blocking=True)
def gistnet_training_finite(context: dg.AssetCheckExecutionContext, settings: MegaContextSettings) -> dg.AssetCheckResult:
    """Every logged JT1 step of the cycle has a finite loss, ΔNLL and gradient norm, and no phase stopped on NaN/inf."""
    return training_finite_result(context, settings, 1)


@dg.asset_check(asset="gist_eval_report", blocking=True)
def gist_delta_nll_within_threshold(settings: MegaContextSettings) -> dg.AssetCheckResult:
    """Learned 32× gists: ΔNLL@H ≤ `acceptance.delta_nll_max` on every dataset at `working_context.w_max`."""
    from mcx_core.eval import acceptance
    from mcx_core.eval import gists as gist_eval

    cfg = settings.load()
    result = gist_eval.read_gist_eval(cfg)
    return gates_result(acceptance.gist_delta_nll_gates(cfg, result["summary"]))


@dg.asset_check(asset="gist_eval_report", blocking=True)
def gist_stress_1024x_within_threshold(settings: MegaContextSettings) -> dg.AssetCheckResult:
    """Maximum compression (one LOD2 gist per 1024 tokens): ΔNLL@H ≤ `acceptance.delta_nll_1024x_max`."""
    from mcx_core.eval import acceptance
    from mcx_core.eval import gists as gist_eval

    cfg = settings.load()
    result = gist_eval.read_gist_eval(cfg)
    if not result["stress"]:
        return dg.AssetCheckResult(
            passed=True,
            description=f"not applicable: {cfg.dataset.context_tokens}-token histories hold no 1024-token span",
        )
    return gates_result(acceptance.stress_gates(cfg, result["stress"]))


@dg.asset_check(asset="gist_eval_report")
def gist_beats_peers(settings: MegaContextSettings) -> dg.AssetCheckResult:
    """Learned gists beat every fixed-budget peer of `evaluation.peers` (newest-W_max, StreamingLLM, TOVA, H2O,
    block selection) on every dataset at `working_context.w_max`: the paired 95 % interval of NLL_gist − NLL_peer
    lies below `acceptance.gist_minus_peer_max`. Not blocking: beating the peers is not a SPEC §8 criterion,
    so a miss shows here (by how much) without gating `poc_acceptance`."""
    from mcx_core.eval import acceptance
    from mcx_core.eval import gists as gist_eval

    cfg = settings.load()
    if not cfg.evaluation.peers:
        return dg.AssetCheckResult(passed=True, description="not applicable: evaluation.peers is empty")
    try:
        gates = acceptance.peer_gates(cfg, gist_eval.read_gist_eval(cfg)["summary"])
    except ValueError as err:
        return problems_result([str(err)], "")
    return gates_result(gates)
