"""What a post-hoc analysis returns and leaves behind: its result (summary, metrics, files, the rows
behind its plot), the markdown report and JSON written next to the plots, and `MissingInput` when an
artifact it reads has not been materialized yet."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mcx_core import artifacts
from mcx_core.config import MegaContextConfig
from mcx_core.telemetry.sinks import NullSink, TelemetrySink


class MissingInput(FileNotFoundError):
    """An analysis's input artifact does not exist yet; the message names what to materialize."""


@dataclass
class AnalysisResult:
    name: str
    summary: str  # one line
    metrics: dict[str, float]
    files: dict[str, Path]
    data: dict[str, Any] = field(default_factory=dict)  # the rows behind the plot (also in the JSON)


def output_dir(cfg: MegaContextConfig) -> Path:
    from mcx_core.artifacts import ArtifactPaths

    return ArtifactPaths.from_config(cfg).reports / "analysis"


def write_findings(name: str, out: Path, summary: str, metrics: dict[str, float], plots: dict[str, Path],
            sections: list[str], data: dict[str, Any], sink: TelemetrySink | None) -> AnalysisResult:
    """Write `<name>.md` and `<name>.json` next to the plots; log finite metrics and the files."""
    md = artifacts.write_text(out / f"{name}.md", "\n\n".join(sections) + "\n")
    js = artifacts.write_json(out / f"{name}.json", {"summary": summary, "metrics": metrics, **data})
    files = {"markdown": md, "json": js, **plots}
    sink = sink or NullSink()
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
    if finite:
        sink.log_metrics(finite)
    for p in files.values():
        sink.log_artifact(p, "analysis")
    return AnalysisResult(name, summary, metrics, files, data)


def nanmean(values) -> float:
    a = np.asarray(list(values), dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def pearson(x, y) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])
