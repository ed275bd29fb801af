"""Evaluation assets: ΔNLL@H reports, and their checks."""

import time
from pathlib import Path

import dagster as dg

from mcx_dagster.defs.metadata import (
    OWNERS,
    charted,
    code_version,
    images,
    markdown_file,
    problems_result,
    reuse_metadata,
    stage_data_version,
    summary_json,
)
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker


@dg.asset(group_name="evaluation", deps=["block_dataset", "base_model"], kinds={"parquet"}, owners=OWNERS,
          tags={"mcx/stage": "evaluation"}, code_version=code_version())
def baseline_eval(
    context: dg.AssetExecutionContext, settings: MegaContextSettings, mlflow: MLflowTracker
) -> dg.MaterializeResult:
    """ΔNLL@H of the recency and untrained mean-pool baselines against the full history, on held-out
    samples of each dataset, for every W_max in `working_context.eval_w_max`."""
    from mcx_core import pipeline
    from mcx_core.eval import baseline

    cfg = settings.load()
    t0 = time.perf_counter()
    with mlflow.run(context, cfg, settings.root_dir()) as sink:
        lm, _ = pipeline.prepare_base_model(cfg)
        result = baseline.run_baseline_eval(cfg, lm, sink, force=settings.force)
    meta = {}
    for s in result["summary"]:
        meta.update(charted(s, prefix=f"{s['dataset']}/w{s['w_max']}/"))
    report = Path(result["report"]["markdown"])
    return dg.MaterializeResult(
        metadata={
            **meta,
            **reuse_metadata(result, time.perf_counter() - t0),
            "summary": summary_json(result["summary"]),
            "report": markdown_file(report),
            **images(sorted(report.parent.glob(f"{report.stem}*.png"))),
            "table": dg.MetadataValue.path(str(result["table"])),
        },
        data_version=stage_data_version(cfg, "baseline_eval"),
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
