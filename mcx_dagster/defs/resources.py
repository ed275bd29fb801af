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
    """Opens one MLflow run per asset materialization, linked both ways with the Dagster run: the run is
    tagged `dagster.run_url` (`mlflow.dagster_ui_url` + `/runs/<id>`), the materialization carries
    `mlflow_run` (a URL to the run page, `mlflow.ui_url`).

    Parents: a phase of a training cycle (`cycle_run`) is a child of the training loop's parent run; any
    other run is a child of this Dagster run's parent (`mcx.pipeline_run`), so one pipeline run's
    evaluations sit together. A parent is RUNNING while a child runs and ends when its last child ends.

    Defaults: `sqlite:///<root>/mlruns/mlflow.db`, artifacts in `<root>/mlruns/artifacts` (resolved from
    the project root at every start: a moved project's store is re-pointed, `mlflow_sink.relocate_artifacts`),
    experiment named after the config. `mlflow` is imported only when a run starts (it costs seconds).
    """

    tracking_uri: str = ""
    artifact_location: str = ""

    def loop_parent(self, cfg, root: Path):
        """The MLflow parent run of this config's training loop (`cycles.training_loop_parent`)."""
        from mcx_core.training.cycles import training_loop_parent

        parent, _ = training_loop_parent(cfg, root, self.tracking_uri or None, self.artifact_location or None)
        return parent

    def pipeline_parent(self, context: dg.AssetExecutionContext, cfg, root: Path):
        """The MLflow parent run of this Dagster run (tag `mcx.pipeline_run = <run id>`), created by the
        first of its assets that opens a run."""
        from mcx_core.telemetry.mlflow_sink import MLflowSink, git_commit, store

        uri, artifacts = store(cfg, root, self.tracking_uri or None, self.artifact_location or None)
        parent, created = MLflowSink.parent(
            uri, cfg.mlflow.experiment or cfg.name, context.run_id, f"pipeline-{context.job_name}-{context.run_id[:8]}",
            tags={**self._dagster_tags(context, cfg), "mcx.config_name": cfg.name, "mcx.git_commit": git_commit(root)},
            artifact_location=artifacts, key_tag="mcx.pipeline_run", role="pipeline_run",
        )
        if created:
            parent.log_text(cfg.to_yaml(), "config/config.yaml")
        return parent

    @staticmethod
    def _dagster_tags(context, cfg) -> dict[str, str]:
        return {"dagster.run_id": context.run_id, "dagster.job": context.job_name,
                "dagster.run_url": f"{cfg.mlflow.dagster_ui_url.rstrip('/')}/runs/{context.run_id}"}

    @contextlib.contextmanager
    def cycle_run(self, context: dg.AssetExecutionContext, cfg, root: Path, phase: str) -> Iterator:
        """`run` for one phase of one cycle: a child of the training loop's parent run (its id is the
        sink's `parent_run_id`), named `cycle{c}-{phase}` and tagged `mcx.cycle` / `mcx.phase`. Logs the
        block datasets the phase reads (`log_input`) and, when it succeeds, the phase's checkpoint as a
        logged model (`jt1-gistnet`, `jt2-lensnet`, `jt3-lora`)."""
        cycle = context.partition_key
        parent = self.loop_parent(cfg, root)
        with self.run(context, cfg, root, name=f"cycle{cycle}-{phase}", parent=parent,
                      tags={"mcx.cycle": cycle, "mcx.phase": phase}) as sink:
            _log_block_datasets(sink, cfg, {"train": "train", "val": "validation"} if phase == "jt1" else {"train": "train"})
            yield sink
            if phase in _PHASE_MODELS:
                _log_phase_checkpoint(sink, cfg, phase, int(cycle))

    @contextlib.contextmanager
    def run(self, context: dg.AssetExecutionContext, cfg, root: Path, name: str | None = None,
            parent=None, tags: dict[str, str] | None = None) -> Iterator:
        """One MLflow run for this materialization, a child of `parent` (an `MLflowSink`; default: this
        Dagster run's `pipeline_parent`)."""
        from mcx_core.artifacts import ArtifactPaths
        from mcx_core.telemetry.mlflow_sink import MLflowSink, git_commit, store

        uri, artifacts = store(cfg, root, self.tracking_uri or None, self.artifact_location or None)
        parent = parent or self.pipeline_parent(context, cfg, root)
        asset = context.asset_key.to_user_string()
        tags = {
            **self._dagster_tags(context, cfg),
            "dagster.asset_key": asset,
            "mcx.config_name": cfg.name,
            "mcx.git_commit": git_commit(root),
            **(tags or {}),
        }
        if context.has_partition_key:
            tags["dagster.partition_key"] = context.partition_key
        # The run's description in the MLflow UI: a clickable link back to the Dagster run.
        tags["mlflow.note.content"] = f"`{asset}` of Dagster run [{context.run_id[:8]}]({tags['dagster.run_url']})"
        run_name = name or f"{asset}-{context.run_id[:8]}"
        t0 = time.perf_counter()
        parent.child_started()
        status = "FAILED"
        try:
            with MLflowSink.start(
                uri,
                cfg.mlflow.experiment or cfg.name,
                run_name=run_name,
                tags=tags,
                artifact_location=artifacts,
                parent_run_id=parent.run_id,
                system_metrics=cfg.mlflow.system_metrics,
            ) as sink:
                if cfg.mlflow.tensorboard:
                    from mcx_core.telemetry.tensorboard import TensorBoardSink, tensorboard_dir

                    sink.mirrors.append(TensorBoardSink(tensorboard_dir(ArtifactPaths.from_config(cfg).root, run_name)))
                sink.log_params(cfg.flat())
                sink.log_text(cfg.to_yaml(), "config/config.yaml")
                context.instance.add_run_tags(context.run_id, {f"mlflow.run_id.{asset.replace('/', '.')}": sink.run_id})
                url = sink.url(cfg.mlflow.ui_url)
                context.add_output_metadata({
                    "mlflow_run": dg.MetadataValue.url(url), "mlflow_run_id": sink.run_id, "mlflow_tracking_uri": uri,
                    "mlflow_parent_run": dg.MetadataValue.url(parent.url(cfg.mlflow.ui_url)),
                })
                context.log.info(f"{asset}: started (MLflow run {url})")
                yield sink
            status = "FINISHED"
        finally:
            parent.child_ended(status)
        context.log.info(f"{asset}: done in {time.perf_counter() - t0:.1f} s")


# phase -> (logged model name, checkpoint phase number, the checkpoint parts it holds)
_PHASE_MODELS = {
    "jt1": ("jt1-gistnet", 1, ("gistnet",)),
    "jt2": ("jt2-lensnet", 2, ("lensnet",)),
    "jt3": ("jt3-lora", 3, ("lora",)),
}


def _log_phase_checkpoint(sink, cfg, phase: str, cycle: int) -> str:
    """The phase's newest checkpoint of `cycle` as a logged model: its own module (never the optimizer
    state, never the base model), the trainer state and the config."""
    from mcx_core import checkpoints

    name, number, parts = _PHASE_MODELS[phase]
    ck = checkpoints.jt_checkpoint(cfg, number, cycle)
    files = {p: ck / p for p in (*parts, checkpoints.TRAINER_STATE_FILE, checkpoints.CONFIG_FILE) if (ck / p).exists()}
    state = checkpoints.read_state(ck)
    return sink.log_checkpoint_model(name, files, step=int(state.get("global_step", 0)),
                                     tags={"mcx.checkpoint": ck.name, "mcx.cycle": str(cycle), "mcx.phase": phase})


def _log_block_datasets(sink, cfg, splits: dict[str, str]) -> None:
    """The block-dataset splits a run reads (split -> MLflow context) as dataset inputs with their digest."""
    from mcx_core import data
    from mcx_core.telemetry.mlflow_sink import dataset_inputs

    out = cfg.resolve(cfg.dataset.output_dir)
    sink.log_datasets(dataset_inputs(data.load_manifest(out), out, splits))


def log_checkpoint_set(sink, evidence: dict) -> str:
    """The gated checkpoint set (the final cycle's GistNet, LensNet and LoRA adapter) as one logged model
    `checkpoint-set`; returns its model id (what the registered model's version points at)."""
    from mcx_core import checkpoints

    cks = {k: Path(v) for k, v in evidence["checkpoints"].items()}
    parts = {part: cks[part] / part for part in ("gistnet", "lensnet", "lora")}
    parts[checkpoints.CONFIG_FILE] = cks["lora"] / checkpoints.CONFIG_FILE
    return sink.log_checkpoint_model("checkpoint-set", parts, tags={
        "mcx.cycle": str(evidence["cycle"]), **{f"mcx.checkpoint.{k}": v.name for k, v in cks.items()}})


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "settings": MegaContextSettings(config_path=os.environ.get("MCX_CONFIG", DEFAULT_CONFIG)),
            "mlflow": MLflowTracker(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", "")),
        }
    )
