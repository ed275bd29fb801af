"""Shared fixtures. The tokenizer is the real embedded one (SmolLM2's), extracted once per machine."""

import os
from pathlib import Path

import pytest

from mcx_core.config import BaseModelConfig
from mcx_core.model.base import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch):
    """Code under test points these at the project it serves (`MegaContextSettings.load` sets MCX_HOME,
    `mcx materialize` MCX_CONFIG / MCX_FORCE / DAGSTER_HOME); each test gets them back as they were."""
    for var in ("MCX_HOME", "MCX_CONFIG", "MCX_FORCE", "DAGSTER_HOME"):
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(BaseModelConfig(source="tiny_random", cache_dir=str(REPO / ".cache" / "models")))


@pytest.fixture(scope="session")
def smoke_config():
    """`write(root, artifacts=False) -> Path`: a copy of configs/smoke.yaml at `root/smoke.yaml`, its model
    cache shared with the repository; with `artifacts`, its artifacts and datasets live under `root`
    (otherwise they resolve against $MCX_HOME)."""
    import yaml

    def write(root: Path, artifacts: bool = False) -> Path:
        data = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
        data["base_model"]["cache_dir"] = str(REPO / ".cache" / "models")
        if artifacts:
            data["artifacts_dir"] = str(root / "artifacts")
            data["dataset"]["output_dir"] = str(root / "artifacts" / "datasets")
        path = root / "smoke.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write
