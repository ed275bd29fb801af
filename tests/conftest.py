"""Shared fixtures. The tokenizer is the real embedded one (SmolLM2's), extracted once per machine."""

from pathlib import Path

import pytest

from mcx_core.config import BaseModelConfig
from mcx_core.model import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(BaseModelConfig(source="tiny_random", cache_dir=str(REPO / ".cache" / "models")))
