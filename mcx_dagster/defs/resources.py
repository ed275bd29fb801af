"""Resources, bound in one place: the experiment config and MLflow."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from mcx_dagster.project import DEFAULT_CONFIG, load_project_config, project_home


class MegaContextSettings(dg.ConfigurableResource):
    """Which experiment config the assets run, and the project root its relative paths resolve against.

    Every run (from `mcx materialize` or the UI) holds the project lock of the config's artifacts root
    while its steps run (`mcx_core.locking`; re-entrant for the process and the run): a second writer
    waits `lock_wait_s` seconds, then its step fails naming the holder."""

    config_path: str = DEFAULT_CONFIG
    root: str = ""
    force: bool = False  # recompute evaluations even when their inputs have not changed (`--force`)
    lock_wait_s: float = 0.0
    owner_process: bool = False  # the process that starts the run executes it (`mcx materialize`): tag the run with its pid
    _lock: contextlib.ExitStack | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if context.dagster_run is None:  # a sensor or schedule reading the config: writes nothing
            return
        from mcx_core.artifacts import ArtifactPaths
        from mcx_core.locking import project_lock

        stack = contextlib.ExitStack()
        stack.enter_context(project_lock(ArtifactPaths.from_config(self.load()).root,
                                         f"dagster run {context.run_id}", self.lock_wait_s, run_id=context.run_id))
        self._lock = stack
        if self.owner_process and context.instance is not None:
            from mcx_dagster.leftovers import process_run_tags

            context.instance.add_run_tags(context.run_id, process_run_tags())

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


    def root_dir(self) -> Path:
        return Path(self.root).resolve() if self.root else project_home()

    def load(self):
        return load_project_config(self.config_path, self.root_dir())


class MLflowTracker(dg.ConfigurableResource):
    """Opens one MLflow run per asset materialization, tagged both ways with the Dagster run.

    Defaults: `sqlite:///<root>/mlruns/mlflow.db`, artifacts in `<root>/mlruns/artifacts`, experiment
    named after the config. `mlflow` is imported only when a run starts (it costs seconds).
    """

    tracking_uri: str = ""
    artifact_location: str = ""

    def loop_parent(self, cfg, root: Path):
        """The MLflow parent run of this config's training loop (`cycles.training_loop_parent`); created
        here it is ended at once — a container the cycles' phase runs attach to."""
        from mcx_core.training.cycles import training_loop_parent

        parent, created = training_loop_parent(cfg, root, self.tracking_uri or None, self.artifact_location or None)
        if created:
            parent.end("FINISHED")
        return parent

    @contextlib.contextmanager
    def cycle_run(self, context: dg.AssetExecutionContext, cfg, root: Path, phase: str) -> Iterator:
        """`run` for one phase of one cycle: a child of the training loop's parent run (its id is the
        sink's `parent_run_id`), named `cycle{c}-{phase}` and tagged `mcx.cycle` / `mcx.phase`."""
        cycle = context.partition_key
        parent = self.loop_parent(cfg, root)
        with self.run(context, cfg, root, name=f"cycle{cycle}-{phase}", parent_run_id=parent.run_id,
                      tags={"mcx.cycle": cycle, "mcx.phase": phase}) as sink:
            yield sink

    @contextlib.contextmanager
    def run(self, context: dg.AssetExecutionContext, cfg, root: Path, name: str | None = None,
            parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> Iterator:
        from mcx_core.telemetry.mlflow_sink import MLflowSink, git_commit, store

        uri, artifacts = store(cfg, root, self.tracking_uri or None, self.artifact_location or None)
        asset = context.asset_key.to_user_string()
        tags = {
            "dagster.run_id": context.run_id,
            "dagster.asset_key": asset,
            "dagster.job": context.job_name,
            "mcx.config_name": cfg.name,
            "mcx.git_commit": git_commit(root),
            **(tags or {}),
        }
        if context.has_partition_key:
            tags["dagster.partition_key"] = context.partition_key
        t0 = time.perf_counter()
        with MLflowSink.start(
            uri,
            cfg.mlflow.experiment or cfg.name,
            run_name=name or f"{asset}-{context.run_id[:8]}",
            tags=tags,
            artifact_location=artifacts,
            parent_run_id=parent_run_id,
            system_metrics=cfg.mlflow.system_metrics,
        ) as sink:
            sink.log_params(cfg.flat())
            sink.log_text(cfg.to_yaml(), "config/config.yaml")
            context.instance.add_run_tags(context.run_id, {f"mlflow.run_id.{asset.replace('/', '.')}": sink.run_id})
            context.add_output_metadata({"mlflow_run_id": sink.run_id, "mlflow_tracking_uri": uri})
            context.log.info(f"{asset}: started (MLflow run {sink.run_id}, experiment {cfg.mlflow.experiment or cfg.name})")
            yield sink
        context.log.info(f"{asset}: done in {time.perf_counter() - t0:.1f} s")


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "settings": MegaContextSettings(config_path=os.environ.get("MCX_CONFIG", DEFAULT_CONFIG)),
            "mlflow": MLflowTracker(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", "")),
        }
    )
