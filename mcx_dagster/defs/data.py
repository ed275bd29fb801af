"""Data assets: the tokenized, block-aligned datasets."""

import dagster as dg

from mcx_dagster.defs._meta import floats
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker


@dg.asset(group_name="data", kinds={"arrow"})
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
