"""MLflow as its users expect it, against real sqlite stores in tmp_path: a model-training experiment with
no stray `Default` beside it, parent runs that span their children, one parent per Dagster run with links
both ways, checkpoints as logged models with a signature, a registered model whose `champion` alias
only a passing gate moves, block datasets as dataset inputs with their digest, an artifact root that
moves with the project, reports whose plots render, the README's `search_runs` query, TensorBoard, and
JT1's validation curve."""

import base64
import json
import shutil
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pytest
import torch
from helpers import random_ids, tiny_config
from mlflow import MlflowClient

from mcx_core import reports
from mcx_core.compression.gistnet import Gister
from mcx_core.config import GistNetModelConfig
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry import mlflow_sink as S
from mcx_core.telemetry.mlflow_sink import MLflowSink
from mcx_core.telemetry.sinks import MemorySink
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker

PNG = base64.b64decode(  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def _store(root: Path) -> tuple[str, str]:
    return S.default_tracking_uri(root), S.default_artifact_location(root)


def _checkpoint(root: Path, name: str, parts=("gistnet",)) -> Path:
    """A checkpoint folder as the trainers write it: modules via save_pretrained, trainer state, config."""
    ck = root / name
    torch.manual_seed(0)
    if "gistnet" in parts:
        Gister(16, GistNetModelConfig(hidden_size=8, num_heads=2, num_layers=1)).save_pretrained(ck / "gistnet")
    for part in parts:
        if part != "gistnet":
            (ck / part).mkdir(parents=True)
            (ck / part / "weights.safetensors").write_bytes(b"x" * 64)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    (ck / "config.yaml").write_text("name: t\n")
    (ck / "optimizer.pt").write_bytes(b"o" * 128)
    return ck


# ---------------------------------------------------------------------------------------------- experiments


def test_new_experiment_is_a_model_training_one_and_the_empty_default_is_gone(tmp_path):
    uri, artifacts = _store(tmp_path)
    exp_id = S.ensure_experiment(uri, "default", artifacts)
    client = MlflowClient(uri)
    assert client.get_experiment(exp_id).tags[S.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert [e.name for e in client.search_experiments()] == ["default"]  # MLflow's `Default` deleted

    # An experiment created before (untagged) is tagged when next used; a Default with runs is kept.
    other = client.create_experiment("older", artifact_location=artifacts)
    assert S.EXPERIMENT_KIND_TAG not in client.get_experiment(other).tags
    S.ensure_experiment(uri, "older", artifacts)
    assert client.get_experiment(other).tags[S.EXPERIMENT_KIND_TAG] == "custom_model_development"

    uri2 = S.default_tracking_uri(tmp_path / "second")
    S.mlflow_client(uri2).create_run("0")  # a run in MLflow's Default
    S.ensure_experiment(uri2, "default", S.default_artifact_location(tmp_path / "second"))
    assert sorted(e.name for e in MlflowClient(uri2).search_experiments()) == ["Default", "default"]


def test_parent_run_spans_its_children_and_fails_with_one(tmp_path):
    uri, artifacts = _store(tmp_path)
    parent, created = MLflowSink.parent(uri, "e", "k1", "loop", artifact_location=artifacts)
    again, created_again = MLflowSink.parent(uri, "e", "k1", "loop", artifact_location=artifacts)
    assert created and not created_again and again.run_id == parent.run_id
    children = []
    for status in ("FINISHED", "FAILED", "FINISHED"):
        parent.child_started()
        assert parent.client.get_run(parent.run_id).info.status == "RUNNING"
        child = MLflowSink.start(uri, "e", "child", parent_run_id=parent.run_id, artifact_location=artifacts)
        child.end(status)
        parent.child_ended(status)
        children.append(child.client.get_run(child.run_id).info)
    info = parent.client.get_run(parent.run_id).info
    assert info.end_time >= max(c.end_time for c in children)
    assert info.start_time <= min(c.start_time for c in children)
    assert info.status == "FAILED"  # one child failed; a later success does not hide it


def test_a_parent_created_twice_at_once_is_one_run(tmp_path):
    """Two processes that both found no parent and created one: the second to look uses the oldest."""
    uri, artifacts = _store(tmp_path)
    first = MLflowSink.start(uri, "e", "p", tags={"mcx.pipeline_run": "r1"}, artifact_location=artifacts)
    found, created = MLflowSink.parent(uri, "e", "r1", "p", artifact_location=artifacts, key_tag="mcx.pipeline_run")
    assert not created and found.run_id == first.run_id
    assert len(MlflowClient(uri).search_runs([found.experiment_id])) == 1


# ---------------------------------------------------------------------------------------------- Dagster


@pytest.fixture
def tiny_project(tmp_path, monkeypatch, smoke_config):
    cfg_path = smoke_config(tmp_path, artifacts=True)
    text = cfg_path.read_text() + "\nmlflow: {ui_url: 'http://mlflow.test:5000/', dagster_ui_url: 'http://dagster.test:3000'}\n"
    cfg_path.write_text(text)
    monkeypatch.setenv("MCX_HOME", str(tmp_path))
    return tmp_path, cfg_path


def test_one_parent_per_dagster_run_and_links_both_ways(tiny_project):
    root, cfg_path = tiny_project
    uri = S.default_tracking_uri(root)

    def asset(name: str, seconds: float):
        @dg.asset(name=name)
        def _asset(context: dg.AssetExecutionContext, settings: MegaContextSettings, mlflow: MLflowTracker):
            import time

            with mlflow.run(context, settings.load(), settings.root_dir()) as sink:
                sink.log_metrics({"x": 1.0}, step=0)
                time.sleep(seconds)

        return _asset

    resources = {"settings": MegaContextSettings(config_path=str(cfg_path), root=str(root)), "mlflow": MLflowTracker()}
    result = dg.materialize([asset("first_eval", 0.0), asset("second_eval", 0.2)], resources=resources,
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("smoke")
    runs = {r.data.tags.get("dagster.asset_key"): r for r in client.search_runs([exp.experiment_id])}
    parent = runs.pop(None)  # the pipeline run's parent carries no asset key
    assert parent.data.tags["mcx.pipeline_run"] == result.run_id
    assert set(runs) == {"first_eval", "second_eval"}
    for key, run in runs.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["dagster.run_url"] == f"http://dagster.test:3000/runs/{result.run_id}"
        assert f"(http://dagster.test:3000/runs/{result.run_id})" in run.data.tags["mlflow.note.content"]
        meta = result.asset_materializations_for_node(key)[0].metadata
        assert isinstance(meta["mlflow_run"], dg.UrlMetadataValue)
        assert meta["mlflow_run"].url == f"http://mlflow.test:5000/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time >= max(r.info.end_time for r in runs.values())
    assert [e.name for e in client.search_experiments()] == ["smoke"]


# ---------------------------------------------------------------------------------------------- models


def test_checkpoint_logged_model_has_signature_and_leaves_the_optimizer_out(tmp_path):
    uri, artifacts = _store(tmp_path)
    ck = _checkpoint(tmp_path, "JT1_cycle0_step5")
    with MLflowSink.start(uri, "e", "jt1", artifact_location=artifacts) as sink:
        model_id = sink.log_checkpoint_model(
            "jt1-gistnet", {p: ck / p for p in ("gistnet", "trainer_state.json", "config.yaml")}, step=5)
    client = MlflowClient(uri)
    model = client.get_logged_model(model_id)
    assert model.status.to_proto() == model.status.READY.to_proto() and model.source_run_id == sink.run_id
    where = Path(model.artifact_location.removeprefix("file://"))
    assert sorted(p.name for p in where.iterdir()) == ["MLmodel", "config.yaml", "gistnet", "trainer_state.json"]
    assert (where / "gistnet" / "gistnet.safetensors").is_file()
    mlmodel = (where / "MLmodel").read_text()
    assert '"shape": [-1, 32, 16]' in mlmodel and '"name": "blocks"' in mlmodel
    outputs = client.get_run(sink.run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(model_id, 5)]


def test_gate_registers_a_version_and_only_a_pass_moves_the_champion(tmp_path):
    """What `poc_acceptance` does with the evidence's checkpoint set (`log_checkpoint_set`, then
    `register_candidate`), three times: pass, fail, pass."""
    from mcx_dagster.defs.resources import log_checkpoint_set

    uri, artifacts = _store(tmp_path)
    evidence = {"cycle": 0, "checkpoints": {
        "gistnet": str(_checkpoint(tmp_path, "JT1_cycle0_step6")),
        "lensnet": str(_checkpoint(tmp_path, "JT2_cycle0_step4", parts=("gistnet", "lensnet"))),
        "lora": str(_checkpoint(tmp_path, "JT3_cycle0_step2", parts=("gistnet", "lensnet", "lora"))),
    }}
    name = S.registered_model_name("smoke")
    client = MlflowClient(uri)
    models = []

    def gate(passed: bool) -> str:
        with MLflowSink.start(uri, "smoke", "poc_acceptance", artifact_location=artifacts) as sink:
            models.append(log_checkpoint_set(sink, evidence))
            return S.register_candidate(sink, "smoke", models[-1], passed)

    assert gate(True) == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert gate(False) == "2"  # a failed gate: a candidate, the champion stays where it was
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "2"
    assert client.get_model_version(name, "2").tags["mcx.gate"] == "failed"
    assert gate(True) == "3"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    v3 = client.get_model_version(name, "3")  # the version is the gate's logged checkpoint set
    assert v3.source == f"models:/{models[-1]}"
    assert client.get_model_version_download_uri(name, "3") == client.get_logged_model(models[-1]).artifact_location
    assert mlflow.get_tracking_uri() != uri  # the registry call left the global tracking URI alone
    where = Path(client.get_logged_model(models[-1]).artifact_location.removeprefix("file://"))
    assert sorted(p.name for p in where.iterdir()) == ["MLmodel", "config.yaml", "gistnet", "lensnet", "lora"]
    assert client.get_logged_model(models[-1]).tags["mcx.checkpoint.lora"] == "JT3_cycle0_step2"


# ---------------------------------------------------------------------------------------------- datasets


def test_block_datasets_are_run_inputs_with_their_digest(tmp_path, smoke_config, tokenizer):
    from mcx_core import data
    from mcx_core.config import load_config
    from mcx_core.data import store

    cfg = load_config(smoke_config(tmp_path, artifacts=True), root=tmp_path)
    manifest = data.build_block_datasets(cfg, tokenizer, progress=False)
    out = cfg.resolve(cfg.dataset.output_dir)
    uri, artifacts = _store(tmp_path)
    with MLflowSink.start(uri, "e", "jt1", artifact_location=artifacts) as sink:
        sink.log_datasets(S.dataset_inputs(manifest, out, {"train": "train", "val": "validation"}))
    inputs = MlflowClient(uri).get_run(sink.run_id).inputs.dataset_inputs
    got = {i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"]) for i in inputs}
    want = {}
    for corpus in ("code", "narrative"):
        for split, context in (("train", "train"), ("val", "validation")):
            info = manifest["corpora"][corpus]["splits"][split]
            assert info["sha256"] == store.file_sha256(out / info["path"])  # the digest is the file's own
            want[f"smoke/{corpus}/{split}"] = (info["sha256"][:16], context)
    assert got == want  # never the test split


# ---------------------------------------------------------------------------------------------- artifact root


def test_artifact_root_moves_with_the_project(tmp_path):
    old_root, new_root = tmp_path / "old", tmp_path / "new"
    uri, artifacts = _store(old_root)
    with MLflowSink.start(uri, "default", "before", artifact_location=artifacts) as before:
        before.log_text("hello", "notes/a.txt")
    shutil.move(old_root, new_root)
    uri, artifacts = _store(new_root)
    with MLflowSink.start(uri, "default", "after", artifact_location=artifacts) as after:
        after.log_text("again", "notes/b.txt")
    client = MlflowClient(uri)
    assert client.get_experiment(after.experiment_id).artifact_location == artifacts
    for run, name in ((before, "a.txt"), (after, "b.txt")):
        uri_of_run = client.get_run(run.run_id).info.artifact_uri
        assert uri_of_run.startswith(artifacts + "/")
        assert [a.path for a in client.list_artifacts(run.run_id, "notes")] == [f"notes/{name}"]
    assert not old_root.exists()  # nothing was written into the old tree


def test_an_explicit_artifact_location_elsewhere_is_not_rewritten(tmp_path):
    uri, _ = _store(tmp_path)
    exp = S.ensure_experiment(uri, "e", (tmp_path / "somewhere").as_uri())
    S.ensure_experiment(uri, "e", S.default_artifact_location(tmp_path))
    assert MlflowClient(uri).get_experiment(exp).artifact_location == (tmp_path / "somewhere").as_uri()


# ---------------------------------------------------------------------------------------------- reports


def test_report_images_are_embedded_for_the_uis(tmp_path):
    (tmp_path / "plot.png").write_bytes(PNG)
    md = "# R\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![the plot](plot.png)\n![gone](missing.png)\n![web](https://x.test/p.png)\n"
    embedded = reports.embed_images(md, tmp_path)
    assert f"![the plot](data:image/png;base64,{base64.b64encode(PNG).decode()})" in embedded
    assert "![gone](missing.png)" in embedded and "![web](https://x.test/p.png)" in embedded
    assert reports.linked_images(md, tmp_path) == [(tmp_path / "plot.png").resolve()]
    html = reports.markdown_to_html(md, tmp_path, "R")
    assert '<img src="data:image/png;base64,' in html and "<table>" in html

    (tmp_path / "r.md").write_text(md)
    uri, artifacts = _store(tmp_path / "p")
    with MLflowSink.start(uri, "e", "eval", artifact_location=artifacts) as sink:
        sink.log_artifact(tmp_path / "r.md", "reports")
    client = MlflowClient(uri)
    assert {a.path for a in client.list_artifacts(sink.run_id, "reports")} == {"reports/r.md", "reports/r.html"}
    local = client.download_artifacts(sink.run_id, "reports/r.html", str(tmp_path / "dl"))
    assert "data:image/png;base64," in Path(local).read_text()


# ---------------------------------------------------------------------------------------------- queries


def test_readme_search_runs_query_runs_against_a_store(tmp_path, monkeypatch):
    """The README's MLflow counterpart of the seed's W&B query, verbatim, run in a project whose store
    holds one pipeline run that matches and two that do not (swap rate too high; another W_max)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- search-runs-example -->\n```python\n(.*?)```", readme, re.DOTALL)
    assert block, "README: the search_runs example block is missing"
    monkeypatch.chdir(tmp_path)
    uri, artifacts = _store(tmp_path)
    for pipeline, w, swap, delta in (("good", "128", 0.1, 0.05), ("thrashes", "128", 0.4, 0.05), ("w96", "96", 0.1, 0.05)):
        tags = {"dagster.run_id": pipeline}
        with MLflowSink.start(uri, "default", f"runtime_eval-{pipeline}", tags=tags, artifact_location=artifacts) as run:
            run.log_params({"working_context.w_max": w})
            run.log_metrics({"runtime_eval/swap_rate": swap}, step=0)
        with MLflowSink.start(uri, "default", f"gist_eval_report-{pipeline}", tags=tags, artifact_location=artifacts) as run:
            run.log_params({"working_context.w_max": w})
            run.log_metrics({f"eval/code/w{w}/delta_nll_gist_mean": delta, f"eval/narrative/w{w}/delta_nll_gist_mean": delta})
    namespace: dict = {}
    try:
        exec(block.group(1), namespace)  # noqa: S102 - the README's own snippet, verbatim
    finally:
        mlflow.set_tracking_uri(None)
    assert namespace["runs"] == ["good"]


# ---------------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_sink_writes_the_metrics_mlflow_gets(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mcx_core.telemetry.tensorboard import TensorBoardSink, tensorboard_dir

    uri, artifacts = _store(tmp_path)
    logdir = tensorboard_dir(tmp_path / "artifacts", "cycle0-jt1")
    with MLflowSink.start(uri, "e", "jt1", artifact_location=artifacts) as sink:
        sink.mirrors.append(TensorBoardSink(logdir))
        for step in range(3):
            sink.log_metrics({"train/loss": 1.0 / (step + 1), "bad": float("nan")}, step=step)
    events = EventAccumulator(str(logdir))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    assert "bad" not in events.Tags()["scalars"]
    assert [m.value for m in MlflowClient(uri).get_metric_history(sink.run_id, "train/loss")][-1] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------- JT1 curves


def test_jt1_logs_a_validation_curve_and_one_loss_per_objective(lm, tmp_path):
    from mcx_core.training import gistnet as jt1

    phases = [{"name": "warm", "objective": "pooling_mse", "max_steps": 3},
              {"name": "sub", "objective": "delta_nll", "max_steps": 3}]
    cfg = tiny_config("jt1-val", 256, 8, seed=3, working_context={"w_max": 64, "eval_w_max": [64], "recent_tokens": 32},
                      gistnet={"model": {"num_layers": 1, "num_heads": 2},
                               "training": {"batch_size": 2, "warmup_steps": 1, "sample_pool": 4, "phases": phases,
                                            "val_every": 2}})
    sink = MemorySink()
    train = random_ids((6, 264), 0).numpy()
    val = random_ids((2, 264), 1).numpy()
    jt1.train_gistnet(cfg, lm, train, tmp_path / "ckpt", sink, progress=False, val_ids=val)
    # At the start, every val_every steps and at each phase's end (steps 3 and 6).
    assert [s for s, _ in sink.history[M.VAL_DELTA_NLL_MEAN]] == [0, 2, 3, 4, 6]
    assert all(np.isfinite(v) for _, v in sink.history[M.VAL_DELTA_NLL_MEAN])
    assert len(sink.history[M.train_loss_of("pooling_mse")]) == 3 and len(sink.history[M.train_loss_of("delta_nll")]) == 3
    # The curve is the delta_nll objective on the held-out samples, gists in eval mode: recomputable.
    gister = jt1.load_gister(tmp_path / "ckpt" / "JT1_cycle0_step6", lm)
    again = jt1.validation_metrics(gister, lm, jt1.validation_batch(lm, val, cfg), cfg)
    assert again[M.VAL_DELTA_NLL_MEAN] == pytest.approx(sink.last(M.VAL_DELTA_NLL_MEAN), abs=1e-5)


# ---------------------------------------------------------------------------------------------- the real graph


def test_jt1_asset_logs_datasets_checkpoint_model_and_curves_under_a_spanning_parent(tiny_project):
    """`+gistnet_checkpoint` of the smoke config through the real definitions: the JT1 run lists the
    train and val splits as inputs, logs its checkpoint as a logged model and the validation curve; the
    training loop's parent spans it; the data/model runs sit under this Dagster run's parent."""
    from mcx_dagster.definitions import defs
    from mcx_dagster.orchestration import run_materialize, step_failures

    root, cfg_path = tiny_project
    uri = S.default_tracking_uri(root)
    resources = {"settings": MegaContextSettings(config_path=str(cfg_path), root=str(root)), "mlflow": MLflowTracker()}
    with dg.DagsterInstance.ephemeral() as instance:
        result = run_materialize(defs(), "+gistnet_checkpoint", instance, resources=resources)
        assert step_failures(result) == []
        meta = result.asset_materializations_for_node("gistnet_checkpoint")[0].metadata
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("smoke")
    assert [e.name for e in client.search_experiments()] == ["smoke"]
    assert exp.tags[S.EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    jt1 = next(r for r in runs if r.info.run_name == "cycle0-jt1")
    assert meta["mlflow_run"].url.endswith(f"/runs/{jt1.info.run_id}")

    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in jt1.inputs.dataset_inputs}
    assert contexts == {"smoke/code/train": "train", "smoke/code/val": "validation",
                        "smoke/narrative/train": "train", "smoke/narrative/val": "validation"}
    [output] = jt1.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "jt1-gistnet" and model.tags["mcx.checkpoint"] == "JT1_cycle0_step6"
    assert len(client.get_metric_history(jt1.info.run_id, M.VAL_DELTA_NLL_MEAN)) >= 3  # start + each phase end
    assert client.get_metric_history(jt1.info.run_id, M.train_loss_of("pooling_mse"))

    loop = client.get_run(jt1.data.tags["mlflow.parentRunId"])
    assert loop.data.tags["mcx.role"] == "training_loop" and loop.info.status == "FINISHED"
    assert loop.info.end_time >= jt1.info.end_time
    data_run = next(r for r in runs if r.data.tags.get("dagster.asset_key") == "block_dataset")
    pipeline = client.get_run(data_run.data.tags["mlflow.parentRunId"])
    assert pipeline.data.tags["mcx.role"] == "pipeline_run" and pipeline.info.end_time >= data_run.info.end_time
