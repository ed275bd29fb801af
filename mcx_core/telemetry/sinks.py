"""Where telemetry goes. Library code logs through a `TelemetrySink`; the caller decides whether that
is MLflow, a JSONL archive under `artifacts/`, both, or nothing (tests)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol


class TelemetrySink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_table(self, rows: dict[str, list], artifact_file: str) -> None: ...


class NullSink:
    def log_metrics(self, metrics, step=None):
        pass

    def log_params(self, params):
        pass

    def set_tags(self, tags):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_table(self, rows, artifact_file):
        pass


class MemorySink(NullSink):
    """Keeps every metric in memory: `history[name] == [(step, value), ...]`."""

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int | None, float]]] = {}
        self.params: dict[str, Any] = {}
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((step, float(v)))

    def log_params(self, params):
        self.params.update(params)

    def set_tags(self, tags):
        self.tags.update(tags)

    def last(self, name: str) -> float:
        return self.history[name][-1][1]


class JsonlSink(NullSink):
    """File-based archive: one JSON object per `log_metrics` call (the seed's File-Based Logging)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log_metrics(self, metrics, step=None):
        row = {"time": round(time.time(), 3), "step": step}
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class MultiSink(NullSink):
    def __init__(self, *sinks: TelemetrySink) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def log_metrics(self, metrics, step=None):
        for s in self.sinks:
            s.log_metrics(metrics, step)

    def log_params(self, params):
        for s in self.sinks:
            s.log_params(params)

    def set_tags(self, tags):
        for s in self.sinks:
            s.set_tags(tags)

    def log_artifact(self, path, artifact_path=None):
        for s in self.sinks:
            s.log_artifact(path, artifact_path)

    def log_table(self, rows, artifact_file):
        for s in self.sinks:
            s.log_table(rows, artifact_file)


class OffsetSink(NullSink):
    """Shifts every step by `offset` (several runs logged one after another under the same names)."""

    def __init__(self, sink: TelemetrySink, offset: int) -> None:
        self.sink, self.offset = sink, offset

    def log_metrics(self, metrics, step=None):
        self.sink.log_metrics(metrics, step=None if step is None else step + self.offset)
