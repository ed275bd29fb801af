"""Model assets: the frozen base model."""

import dagster as dg

from mcx_dagster.defs.metadata import OWNERS, floats
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker


@dg.asset(group_name="models", kinds={"pytorch"}, owners=OWNERS, tags={"mcx/stage": "model"})
def base_model(
    context: dg.AssetExecutionContext, settings: MegaContextSettings, mlflow: MLflowTracker
) -> dg.MaterializeResult:
    """The frozen base LM (embedded SmolLM2-135M converted once to safetensors, a local HF dir, or
    the tiny random Llama), with its NLL on a fixed probe passage."""
    from mcx_core import pipeline

    cfg = settings.load()
    with mlflow.run(context, cfg, settings.root_dir()) as sink:
        _, info = pipeline.prepare_base_model(cfg)
        sink.log_metrics({f"model/{k}": v for k, v in info.items() if isinstance(v, int | float)}, step=0)
        sink.set_tags({"mcx.model_id": info["model_id"]})
    return dg.MaterializeResult(
        metadata={
            **floats({k: v for k, v in info.items() if k != "frozen"}),
            "model_id": info["model_id"],
            "device": info["device"],
            "dtype": info["dtype"],
            "frozen": info["frozen"],
        }
    )
