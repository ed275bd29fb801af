"""Evaluation assets: ΔNLL@H reports, and their checks."""

import dagster as dg

from mcx_dagster.defs.metadata import floats, markdown_file, problems_result
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker


@dg.asset(group_name="evaluation", deps=["block_dataset", "base_model"], kinds={"parquet"})
def baseline_eval(
    context: dg.AssetExecutionContext, settings: MegaContextSettings, mlflow: MLflowTracker
) -> dg.MaterializeResult:
    """ΔNLL@H of the recency and untrained mean-pool baselines against the full history, on held-out
    samples of each dataset, for every W_max in `working_context.eval_w_max`."""
    from mcx_core import pipeline
    from mcx_core.eval import baseline

    cfg = settings.load()
    with mlflow.run(context, cfg, settings.root_dir()) as sink:
        lm, _ = pipeline.prepare_base_model(cfg)
        result = baseline.run_baseline_eval(cfg, lm, sink, force=settings.force)
    meta = {}
    for s in result["summary"]:
        meta.update(floats(s, prefix=f"{s['dataset']}/w{s['w_max']}/"))
    return dg.MaterializeResult(
        metadata={
            **meta,
            "seconds": dg.MetadataValue.float(result["seconds"]),
            "report": markdown_file(result["report"]["markdown"]),
            "table": dg.MetadataValue.path(str(result["table"])),
        }
    )


@dg.asset_check(asset="baseline_eval")
def baseline_eval_finite(settings: MegaContextSettings) -> dg.AssetCheckResult:
    """Every NLL in the baseline table is finite."""
    import json

    from mcx_core.artifacts import ArtifactPaths
    from mcx_core.telemetry.metrics import is_finite

    cfg = settings.load()
    summary = json.loads((ArtifactPaths.from_config(cfg).reports / "baseline_eval.json").read_text())
    bad = [
        f"{s['dataset']}/w{s['w_max']}: {k} = {v}"
        for s in summary
        for k, v in s.items()
        if k.startswith("nll_") and not is_finite([v])
    ]
    return problems_result(bad, "all NLLs finite")
