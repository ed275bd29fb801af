"""Where telemetry goes. Library code logs through a `TelemetrySink`; the caller decides whether that
is MLflow (`mlflow_sink.MLflowSink`), memory (tests: `MemorySink`) or nothing (`NullSink`)."""

from __future__ import annotations

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


class OffsetSink(NullSink):
    """Shifts every step by `offset` (several runs logged one after another under the same names)."""

    def __init__(self, sink: TelemetrySink, offset: int) -> None:
        self.sink, self.offset = sink, offset

    def log_metrics(self, metrics, step=None):
        self.sink.log_metrics(metrics, step=None if step is None else step + self.offset)
