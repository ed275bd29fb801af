"""Data assets: the tokenized, block-aligned datasets, and their blocking checks."""

import dagster as dg

from mcx_dagster.defs.metadata import OWNERS, floats, problems_result
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker


@dg.asset(group_name="data", kinds={"arrow"}, owners=OWNERS, tags={"mcx/stage": "data"})
def block_dataset(
    context: dg.AssetExecutionContext, settings: MegaContextSettings, mlflow: MLflowTracker
) -> dg.MaterializeResult:
    """Narrative (Gutenberg plays and poems) and code (stdlib) histories cut into block-aligned
    samples of `context_tokens + horizon` tokens, split by work into train/val/test Arrow files."""
    from mcx_core import artifacts, data, pipeline

    cfg = settings.load()
    with mlflow.run(context, cfg, settings.root_dir()) as sink:
        manifest = pipeline.build_datasets(cfg)
        sizes = data.split_summary(manifest)
        counts = {f"{c}/{s}_samples": n for c, splits in sizes.items() for s, n in splits.items()}
        sink.log_metrics({f"data/{k}": v for k, v in counts.items()}, step=0)
        sink.log_artifact(artifacts.datasets_dir(cfg) / "manifest.json", "datasets")
    return dg.MaterializeResult(
        metadata={
            **floats(counts),
            "config_hash": manifest["config_hash"],
            "tokenizer": manifest["tokenizer"],
            "path": dg.MetadataValue.path(str(artifacts.datasets_dir(cfg))),
        },
        data_version=dg.DataVersion(manifest["data_version"]),
    )


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
