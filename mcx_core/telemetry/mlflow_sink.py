"""The one module that talks to MLflow. Uses `MlflowClient` with explicit run ids (no global active
run), so Dagster's multi-process executor and nested runs behave."""

from __future__ import annotations

import logging
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Self

from mcx_core.telemetry.sinks import NullSink

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000
SYSTEM_METRICS_INTERVAL_S = 5.0


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"


def default_artifact_location(root: Path) -> str:
    return (root / "mlruns" / "artifacts").resolve().as_uri()


def store(cfg, root: Path, tracking_uri: str | None = None, artifact_location: str | None = None) -> tuple[str, str]:
    """(tracking URI, artifact location) for a config: an explicit override, else the config's
    `mlflow:` section, else the project's local sqlite store and artifact folder."""
    uri = tracking_uri or cfg.mlflow.tracking_uri or default_tracking_uri(root)
    return uri, artifact_location or cfg.mlflow.artifact_location or default_artifact_location(root)


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def process_tags() -> dict[str, str]:
    """`mcx.pid` / `mcx.host` / `mcx.pid_started` of this process: a run left RUNNING by a process that is
    gone can be told apart from a live one (`fail_orphaned_runs`)."""
    from mcx_core.locking import this_process

    me = this_process()
    return {"mcx.pid": str(me["pid"]), "mcx.host": me["host"], "mcx.pid_started": repr(me["started"])}


def fail_orphaned_runs(tracking_uri: str) -> list[str]:
    """Mark FAILED (tag `mcx.failure_reason`) every run left RUNNING by a process that provably died: its
    `mcx.pid` tags name this host and a pid that no longer runs (or runs a later process). Only local
    sqlite stores that exist are looked at (nothing is created or contacted). The run ids marked."""
    from mcx_core.locking import process_alive

    if not tracking_uri.startswith("sqlite:///") or not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return []
    client = mlflow_client(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    marked = []
    for run in client.search_runs(exps, filter_string="attributes.status = 'RUNNING'", max_results=5000) if exps else []:
        t = run.data.tags
        if "mcx.pid" not in t or "mcx.host" not in t:
            continue
        started = None if t.get("mcx.pid_started") in (None, "None") else float(t["mcx.pid_started"])
        if process_alive(int(t["mcx.pid"]), t["mcx.host"], started):
            continue
        client.set_tag(run.info.run_id, "mcx.failure_reason",
                       f"process {t['mcx.pid']} on {t['mcx.host']} ended without closing the run (killed or crashed)")
        client.set_terminated(run.info.run_id, status="FAILED")
        marked.append(run.info.run_id)
    return marked


def mlflow_client(tracking_uri: str):
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):  # a local store: create its folder (not for http:// servers)
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None) -> str:
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


class MLflowSink(NullSink):
    """An MLflow run. Create with `MLflowSink.start(...)`, end with `.end(status)` — or use it as a context
    manager: the run ends FINISHED, or FAILED when the block raises."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = mlflow_client(tracking_uri)
        self._system = None
        self.parent_run_id: str | None = None

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        tags: dict[str, str] | None = None,
        artifact_location: str | None = None,
        parent_run_id: str | None = None,
        system_metrics: bool = False,
    ) -> MLflowSink:
        exp_id = ensure_experiment(tracking_uri, experiment, artifact_location)
        tags = {**process_tags(), **(tags or {})}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow_client(tracking_uri).create_run(exp_id, tags=tags, run_name=run_name)
        sink = cls(tracking_uri, run.info.run_id)
        sink.parent_run_id = parent_run_id
        if system_metrics:
            sink._start_system_metrics()
        return sink

    @classmethod
    def parent(
        cls,
        tracking_uri: str,
        experiment: str,
        key: str,
        run_name: str,
        tags: dict[str, str] | None = None,
        artifact_location: str | None = None,
    ) -> tuple[MLflowSink, bool]:
        """The parent run tagged `mcx.training_loop = key` (the newest), else a new one: (sink, created).
        Every phase of every cycle of one training loop is a child of it, whichever process runs it."""
        exp_id = ensure_experiment(tracking_uri, experiment, artifact_location)
        found = mlflow_client(tracking_uri).search_runs(
            [exp_id], filter_string=f"tags.`mcx.training_loop` = '{key}'", max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if found:
            return cls(tracking_uri, found[0].info.run_id), False
        tags = {**(tags or {}), "mcx.training_loop": key, "mcx.role": "training_loop"}
        return cls.start(tracking_uri, experiment, run_name, tags=tags, artifact_location=artifact_location), True

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def _start_system_metrics(self) -> None:
        """MLflow's `system/*` metrics (CPU, memory, disk, network; GPU when pynvml sees one) for this run,
        sampled every SYSTEM_METRICS_INTERVAL_S seconds unless `mlflow.set_system_metrics_sampling_interval`
        says otherwise. The monitor must be given this store's URI: by default it writes to the global
        tracking URI (a `mlflow.db` in the working directory), not to the run's store."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(
                self.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, samples_before_logging=1,
                tracking_uri=self.tracking_uri,
            )  # fmt: skip
            self._system.start()
        except Exception:  # system metrics are a convenience; never fail a run over them
            self._system = None

    def _finish_system_metrics(self) -> None:
        """Stop the monitor and log one last sample, so a run shorter than the sampling interval still
        has its system metrics (the monitor drops the sample it was waiting on when stopped)."""
        monitor, self._system = self._system, None
        try:
            monitor.finish()
            if not any(m._metrics for m in monitor.monitors):
                monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as err:  # noqa: BLE001 - as above: a convenience, never a failed run
            log.warning("system metrics: last sample not logged: %s", err)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), ts, step or 0)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)
        bad = sorted(k for k, v in metrics.items() if v is None or not math.isfinite(float(v)))
        if bad:
            self.client.set_tag(self.run_id, "nonfinite_metrics", ",".join(bad)[:5000])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, rows: dict[str, list], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=rows, artifact_file=artifact_file)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")

    def end(self, status: str = "FINISHED") -> None:
        if self._system is not None:
            self._finish_system_metrics()
        self.client.set_terminated(self.run_id, status=status)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
