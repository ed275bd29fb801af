"""The one module that talks to MLflow. Uses `MlflowClient` with explicit run ids (no global active
run), so Dagster's multi-process executor and nested runs behave."""

from __future__ import annotations

import contextlib
import json
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


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI's page of one run (`mlflow.ui_url` in the config)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_client(tracking_uri: str):
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):  # a local store: create its folder (not for http:// servers)
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


# MLflow 3 opens an experiment in its GenAI view unless this tag says it trains models (the UI's
# `ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
DEFAULT_EXPERIMENT = "Default"  # MLflow's experiment 0, created with every new store
ARTIFACTS_SUFFIX = "/mlruns/artifacts"  # the project-relative layout `default_artifact_location` writes


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created if missing: tagged as a model-training experiment, and its artifact
    location re-pointed at `artifact_location` when the project moved (`relocate_artifacts`). MLflow's own
    empty `Default` experiment is deleted, so the store lists only the project's experiments."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(name, artifact_location=artifact_location,
                                          tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        drop_empty_default_experiment(client)
        return exp_id
    if exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    if artifact_location and exp.artifact_location != artifact_location:
        relocate_artifacts(tracking_uri, exp.artifact_location, artifact_location)
    return exp.experiment_id


def drop_empty_default_experiment(client) -> None:
    """Delete MLflow's `Default` experiment (id 0) when it holds no run: every sqlite store is created with
    it, and beside a config named `default` it reads as a second, empty copy of the project's experiment."""
    exp = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    if exp is None or exp.lifecycle_stage != "active":
        return
    from mlflow.entities import ViewType

    if not client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1):
        client.delete_experiment(exp.experiment_id)


def relocate_artifacts(tracking_uri: str, old: str, new: str) -> bool:
    """A project moved (or copied) with its `mlruns/`: the sqlite store still names the old tree's
    artifact folder in every experiment, run, logged model and model version, so new artifacts would be
    written there. Rewrite that prefix to `new` — only for a local sqlite store whose old and new
    locations both have the project layout (`.../mlruns/artifacts`); an explicitly configured location
    elsewhere is left alone. Returns whether anything was rewritten."""
    import sqlite3

    if not (tracking_uri.startswith("sqlite:///") and old.rstrip("/").endswith(ARTIFACTS_SUFFIX)
            and new.rstrip("/").endswith(ARTIFACTS_SUFFIX)):
        log.warning("MLflow artifact location %s differs from %s; not relocated (not the project layout)", old, new)
        return False
    old, new = old.rstrip("/"), new.rstrip("/")
    columns = [("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
               ("model_versions", "source"), ("model_versions", "storage_location")]
    with contextlib.closing(sqlite3.connect(tracking_uri.removeprefix("sqlite:///"))) as con, con:
        for table, column in columns:
            con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE {column} = ? OR {column} LIKE ? ESCAPE '\\'",
                        (new, len(old) + 1, old, _like_prefix(old) + "/%"))
    log.info("MLflow artifacts relocated: %s -> %s", old, new)
    return True


def _like_prefix(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def filter_equals(field: str, value: str) -> str:
    """An MLflow search filter clause that matches `field` (e.g. "tags.`mcx.training_loop`",
    "attributes.run_name") equal to `value`, whatever quotes or backslashes `value` holds: MLflow's filter
    grammar has no escape for a quote inside a string literal, so a plain value is quoted as is and any
    other becomes a LIKE pattern with `_` (one character) for every character that could break it. A LIKE
    pattern can match more than `value`: keep only the exact matches (`exact_matches`)."""
    import re

    if re.fullmatch(r"[\w .:/@+,=-]*", value) and "'" not in value:
        return f"{field} = '{value}'"
    return f"{field} LIKE '" + re.sub(r"[^\w .:/@+,=-]|_", "_", value) + "'"


def exact_matches(runs, value: str, tag: str | None = None, run_name: bool = False) -> list:
    """The runs whose tag `tag` (or run name) is exactly `value` (after a `filter_equals` search)."""
    if run_name:
        return [r for r in runs if r.info.run_name == value]
    return [r for r in runs if r.data.tags.get(tag) == value]


class MLflowSink(NullSink):
    """An MLflow run. Create with `MLflowSink.start(...)`, end with `.end(status)` — or use it as a context
    manager: the run ends FINISHED, or FAILED when the block raises."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = mlflow_client(tracking_uri)
        self._system = None
        self.parent_run_id: str | None = None
        self.mirrors: list = []  # other sinks that get the same metrics, params and tags (TensorBoard)

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
        key_tag: str = "mcx.training_loop",
        role: str = "training_loop",
    ) -> tuple[MLflowSink, bool]:
        """The parent run tagged `key_tag = key` (the oldest), else a new one: (sink, created). Every phase
        of every cycle of one training loop (`mcx.training_loop`), or every run of one Dagster run
        (`mcx.pipeline_run`), is a child of it, whichever process runs it. Two processes that create one
        at the same time both end up with the oldest; the other is deleted."""
        exp_id = ensure_experiment(tracking_uri, experiment, artifact_location)
        client = mlflow_client(tracking_uri)

        def oldest():  # the key escaped: a config named "bob's smoke" is a valid key
            runs = client.search_runs(
                [exp_id], filter_string=filter_equals(f"tags.`{key_tag}`", key), max_results=1000,
                order_by=["attributes.start_time ASC", "attributes.run_id ASC"],
            )
            return exact_matches(runs, key, tag=key_tag)[:1]

        found = oldest()
        if found:
            return cls(tracking_uri, found[0].info.run_id), False
        tags = {**(tags or {}), key_tag: key, "mcx.role": role}
        sink = cls.start(tracking_uri, experiment, run_name, tags=tags, artifact_location=artifact_location)
        first = oldest()[0].info.run_id
        if first != sink.run_id:  # another process won the race
            client.delete_run(sink.run_id)
            return cls(tracking_uri, first), False
        return sink, True

    def child_started(self) -> None:
        """This run is a parent and a child of it started: it is RUNNING until `child_ended`, held by this
        process (its `mcx.pid` tags: `fail_orphaned_runs`)."""
        self.client.update_run(self.run_id, status="RUNNING")
        for k, v in process_tags().items():
            self.client.set_tag(self.run_id, k, v)

    def child_ended(self, status: str = "FINISHED") -> None:
        """A child of this parent ended: the parent ends now too (its end time is at least every child's),
        FAILED once any child failed (tag `mcx.failed_children` counts them)."""
        failed = int(self.client.get_run(self.run_id).data.tags.get("mcx.failed_children", "0"))
        if status == "FAILED":
            failed += 1
            self.client.set_tag(self.run_id, "mcx.failed_children", str(failed))
        self.client.set_terminated(self.run_id, status="FAILED" if failed else status)

    def url(self, ui_url: str) -> str:
        """This run's page in the MLflow UI served at `ui_url`."""
        return run_url(ui_url, self.experiment_id, self.run_id)

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
        except Exception:  # noqa: BLE001 - system metrics are a convenience; never fail a run over them
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
        for mirror in self.mirrors:
            mirror.log_metrics(metrics, step=step)
        bad = sorted(k for k, v in metrics.items() if v is None or not math.isfinite(float(v)))
        if bad:
            self.client.set_tag(self.run_id, "nonfinite_metrics", ",".join(bad)[:5000])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        for mirror in self.mirrors:
            mirror.log_params(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))
        for mirror in self.mirrors:
            mirror.set_tags(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or folder; a markdown report also as `<name>.html` beside it, its images embedded
        (MLflow's artifact preview renders HTML but shows markdown as text, relative image links broken)."""
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
            return
        self.client.log_artifact(self.run_id, str(p), artifact_path)
        if p.suffix == ".md":
            from mcx_core.reports import markdown_to_html

            html = markdown_to_html(p.read_text(encoding="utf-8"), p.parent, title=p.stem)
            self.client.log_text(self.run_id, html, f"{artifact_path}/{p.stem}.html" if artifact_path else f"{p.stem}.html")

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, rows: dict[str, list], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=rows, artifact_file=artifact_file)

    def log_datasets(self, datasets: list[dict]) -> None:
        """Datasets this run read, as MLflow dataset inputs: each {name, digest, source, context, profile};
        `context` (train / validation / evaluation) is the `mlflow.data.context` tag the UI shows."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(d["name"], d["digest"], "local", d["source"], profile=json.dumps(d.get("profile", {}))),
                tags=[InputTag("mlflow.data.context", d["context"])],
            )
            for d in datasets
        ]
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_checkpoint_model(self, name: str, parts: dict[str, Path], step: int = 0,
                             tags: dict[str, str] | None = None) -> str:
        """A checkpoint as an MLflow logged model of this run: `parts` (artifact name -> a checkpoint's
        sub-folder or file, e.g. `gistnet`, `trainer_state.json`; never the optimizer or the base model)
        and an `MLmodel` file, with a tensor signature when a GistNet is among them. Returns the model id."""
        import shutil
        import tempfile

        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model

        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id,
                                                model_type="megacontext-checkpoint", tags=tags)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for part, path in parts.items():
                    path = Path(path)
                    if path.is_dir():
                        self.client.log_model_artifacts(model.model_id, str(path), part)
                    else:
                        shutil.copyfile(path, Path(tmp) / part)
                Model(run_id=self.run_id, model_id=model.model_id, signature=_gistnet_signature(parts),
                      metadata={"parts": sorted(parts), **(tags or {})}).save(Path(tmp) / "MLmodel")
                self.client.log_model_artifacts(model.model_id, tmp)
        except Exception:
            self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
        return model.model_id

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")

    def end(self, status: str = "FINISHED") -> None:
        if self._system is not None:
            self._finish_system_metrics()
        for mirror in self.mirrors:
            mirror.close()
        self.client.set_terminated(self.run_id, status=status)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]


def _gistnet_signature(parts: dict[str, Path]):
    """GistNet's tensor signature (blocks [n, block_size, d_model] -> gists [n, d_model]) from its
    `config.json`; None without a GistNet (LensNet and LoRA take structured inputs no tensor spec says)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    config = Path(parts["gistnet"]) / "config.json" if "gistnet" in parts else None
    if config is None or not config.is_file():
        return None
    c = json.loads(config.read_text(encoding="utf-8"))
    d, k = int(c["d_model"]), int(c["model"]["block_size"])
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype("float32"), (-1, k, d), "blocks")]),
                          outputs=Schema([TensorSpec(np.dtype("float32"), (-1, d), "gists")]))


def dataset_inputs(manifest: dict, out_dir: Path, splits: dict[str, str]) -> list[dict]:
    """`log_datasets` entries for block-dataset splits (split -> context, e.g. {"train": "train", "val":
    "validation"}) of every corpus in a block-dataset manifest: named `<dataset>/<corpus>/<split>`, digest
    = the split file's sha256 (first 16 hex digits; the manifest's fingerprint), source = the file."""
    out = []
    for corpus, entry in sorted(manifest["corpora"].items()):
        for split, context in splits.items():
            info = entry["splits"].get(split)
            if info is None:
                continue
            path = Path(out_dir) / info["path"]
            out.append({
                "name": f"{manifest.get('dataset_name', 'blocks')}/{corpus}/{split}", "digest": info["sha256"][:16],
                "source": path.resolve().as_uri(), "context": context,
                "profile": {"samples": info["samples"], "tokens": info["tokens"], "sha256": info["sha256"],
                            "data_version": manifest.get("data_version"), "config_hash": manifest.get("config_hash")},
            })
    return out


# ---------------------------------------------------------------------------------------------- registry

CHAMPION_ALIAS = "champion"
CANDIDATE_ALIAS = "candidate"


def registered_model_name(config_name: str) -> str:
    return f"megacontext-{config_name}"


def register_candidate(sink: MLflowSink, config_name: str, model_id: str, passed: bool,
                       tags: dict[str, str] | None = None) -> str:
    """One version of the config's registered model (`megacontext-<config>`) for a gated checkpoint set
    (`model_id`, a logged model of `sink`'s run): always aliased `candidate`; aliased `champion` only
    when the acceptance gate `passed` — a failed gate leaves the champion where it was. The version's
    `mcx.gate` tag says `passed` or `failed`. Returns the version."""
    from mlflow.exceptions import MlflowException

    client, name = sink.client, registered_model_name(config_name)
    try:
        client.create_registered_model(name, description=f"MegaContext checkpoint sets (GistNet, LensNet, LoRA) "
                                                         f"of config {config_name!r}, one version per gated candidate")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with _global_tracking_uri(sink.tracking_uri):
        version = client.create_model_version(
            name, source=f"models:/{model_id}", run_id=sink.run_id, model_id=model_id,
            tags={"mcx.gate": "passed" if passed else "failed", **(tags or {})},
        ).version
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, version)
    if passed:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    return str(version)


@contextlib.contextmanager
def _global_tracking_uri(uri: str):
    """MLflow's registry resolves a `models:/<model id>` source through the *global* tracking URI (a TODO
    in its sqlalchemy store), not the client's: point it at this store for the call, then restore it."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous = utils._tracking_uri  # None when never set (the default resolution)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
