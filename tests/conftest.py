"""Shared fixtures. The tokenizer is the real embedded one (SmolLM2's), extracted once per machine."""

import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_lm

from mcx_core.compression.gistnet import Gister
from mcx_core.config import BaseModelConfig, GistNetModelConfig
from mcx_core.model.base import BaseLM, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch):
    """Tests point MCX_HOME at their project, and `mcx materialize` sets MCX_CONFIG and DAGSTER_HOME for the
    Dagster process it starts; each test gets them back as they were."""
    for var in ("MCX_HOME", "MCX_CONFIG", "DAGSTER_HOME"):
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): on tiny
    tensors it is faster, and immune to the spin-wait slowdown of 2 threads on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm() -> BaseLM:
    """The tiny random Llama (helpers.tiny_lm), one per module: a module's tests may attach adapters to it."""
    return tiny_lm()


@pytest.fixture(scope="module")
def gister(lm) -> Gister:
    """An untrained, trainable GistNet for `lm` (seeded)."""
    torch.manual_seed(0)
    return Gister(lm.d_model, GistNetModelConfig(hidden_size=32, num_heads=4, num_layers=1)).eval()


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
