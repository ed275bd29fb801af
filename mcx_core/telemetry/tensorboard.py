"""An optional TensorBoard view beside MLflow (the seed names it as the live view during training):
`TensorBoardSink` writes the same metrics as event files, one folder per run, for
`tensorboard --logdir <artifacts>/tensorboard`. Enabled by `mlflow.tensorboard: true`; needs the
`tensorboard` package (`pip install tensorboard`, in the `dev` extra), imported only when a sink opens."""

from __future__ import annotations

import math
from pathlib import Path

from mcx_core.telemetry.sinks import NullSink

TENSORBOARD_DIR = "tensorboard"  # under the artifacts root


def tensorboard_dir(artifacts_root: Path, run_name: str) -> Path:
    return Path(artifacts_root) / TENSORBOARD_DIR / run_name.replace("/", "_")


class TensorBoardSink(NullSink):
    """Scalars per metric (step = the logged step), params and tags as text. `close()` flushes."""

    def __init__(self, logdir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch's writer needs the tensorboard package
            raise ImportError("mlflow.tensorboard: true needs the `tensorboard` package (pip install tensorboard)") from err
        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            if v is not None and math.isfinite(float(v)):
                self.writer.add_scalar(k, float(v), global_step=step or 0)

    def log_params(self, params):
        rows = "\n".join(f"| {k} | {str(v)[:200]} |" for k, v in sorted(params.items()))
        self.writer.add_text("params", "| param | value |\n|---|---|\n" + rows)

    def set_tags(self, tags):
        for k, v in tags.items():
            self.writer.add_text(f"tags/{k}", str(v))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
