"""`make ui-check` (bench/ui_check.py) over a freshly materialized smoke project: the Dagster webserver
and the MLflow UI on loopback, pages rendered in headless Chromium, key elements asserted. Slow (a
materialize, two servers, a browser); needs chromium on PATH."""

import importlib.util
import shutil
from pathlib import Path

import dagster as dg
import pytest

from mcx_dagster.definitions import defs
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker
from mcx_dagster.orchestration import POST_HOC, run_materialize, step_failures

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _ui_check():
    spec = importlib.util.spec_from_file_location("ui_check", ROOT / "bench" / "ui_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not any(shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no chromium (apt-get install -y chromium)")
def test_ui_check_renders_graph_check_run_and_mlflow_run(tmp_path, monkeypatch, smoke_config):
    cfg_path = smoke_config(tmp_path, artifacts=True)
    home = tmp_path / ".dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    shutil.copy(ROOT / "workspace.yaml", tmp_path / "workspace.yaml")
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("MCX_HOME", str(tmp_path))
    resources = {"settings": MegaContextSettings(config_path=str(cfg_path), root=str(tmp_path)),
                 "mlflow": MLflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")}
    with dg.DagsterInstance.get() as instance:
        for selection in (None, POST_HOC):
            assert step_failures(run_materialize(defs(), selection, instance, resources=resources)) == []
    monkeypatch.chdir(ROOT)  # the code location is this repository's (workspace.yaml's working_directory)
    shutil.copy(ROOT / "workspace.yaml", tmp_path / "workspace.yaml")
    misses = _ui_check().check(tmp_path, tmp_path / "screens", str(cfg_path))
    assert misses == []
    assert {p.name for p in (tmp_path / "screens").glob("*.png")} >= {"asset_graph.png", "run.png", "mlflow_run.png"}
