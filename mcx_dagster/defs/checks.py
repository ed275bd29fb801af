"""Asset checks. Blocking ones stop everything downstream when they fail."""

import dagster as dg

from mcx_dagster.defs._meta import problems_result
from mcx_dagster.defs.resources import MegaContextSettings


@dg.asset_check(asset="block_dataset", blocking=True)
def block_dataset_deterministic(settings: MegaContextSettings) -> dg.AssetCheckResult:
    """Re-read the source documents of sampled rows, re-tokenize them, and compare the tokens."""
    from mcx_core import pipeline

    return problems_result(pipeline.check_dataset_determinism(settings.load()), "re-tokenized samples match")


@dg.asset_check(asset="block_dataset", blocking=True)
def block_dataset_no_cross_document(settings: MegaContextSettings) -> dg.AssetCheckResult:
    """Every sample lies inside one document and starts on a block boundary."""
    from mcx_core import pipeline

    return problems_result(pipeline.check_dataset_boundaries(settings.load()), "all samples inside one document")


@dg.asset_check(asset="block_dataset", blocking=True)
def block_dataset_split_sizes(settings: MegaContextSettings) -> dg.AssetCheckResult:
    """Every corpus has train, val and test samples (at least `acceptance.split_min_samples`)."""
    from mcx_core import pipeline

    return problems_result(pipeline.check_dataset_split_sizes(settings.load()), "every split is populated")


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
