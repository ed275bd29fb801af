"""Slow: the real SmolLM2-135M (embedded GGUF → cached safetensors). Run with `make test-slow`."""

import pytest
import torch

from mcx_core.config import BaseModelConfig
from mcx_core.model.base import load_base_model
from mcx_core.pipeline import PROBE_PASSAGE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm():
    return load_base_model(BaseModelConfig())


def test_real_model_is_frozen_and_plausible(lm):
    assert lm.d_model == 576
    assert 130e6 < lm.num_parameters < 140e6
    assert all(not p.requires_grad for p in lm.model.parameters()) and not lm.model.training
    ids = lm.tokenizer(PROBE_PASSAGE, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        nll = float(lm.model(ids, labels=ids).loss)
    # A real pre-trained model knows Hamlet's soliloquy; a random one sits near ln(49152) ≈ 10.8.
    assert nll < 4.0, nll


def test_real_model_loads_from_cache_identically(lm):
    again = load_base_model(BaseModelConfig())
    assert again.weights_checksum() == lm.weights_checksum()
