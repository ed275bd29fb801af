"""GistNet: shapes, the mean-pool initialisation, every pooling head sees the whole block, gradients
reach every parameter, and save/load is exact and pickle-free."""

import json

import pytest
import torch

from mcx_core.compression.gistnet import CONFIG_FILE, WEIGHTS_FILE, Gister, num_parameters, profile_gister
from mcx_core.config import GistNetModelConfig
from mcx_core.eval.nll import MeanPoolGister
from mcx_core.telemetry import metrics as M

D = 48
POOLINGS = ["query", "cls", "mean"]


def _cfg(**kw) -> GistNetModelConfig:
    return GistNetModelConfig(**{"num_layers": 2, "num_heads": 4, **kw})


def _blocks(n=3, seed=0, scale=0.1) -> torch.Tensor:
    return scale * torch.randn(n, 32, D, generator=torch.Generator().manual_seed(seed))


def _trained_like(gister: Gister, seed=1) -> Gister:
    """Give the zero-initialised output projection weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in gister.nets:
            net.proj_out.weight.copy_(0.05 * torch.randn(net.proj_out.weight.shape, generator=g))
    return gister


@pytest.mark.parametrize("pooling", POOLINGS)
def test_shape_dtype_and_mean_pool_init(pooling):
    torch.manual_seed(0)
    gister = Gister(D, _cfg(pooling=pooling))
    x = _blocks()
    out = gister(1, x)
    assert out.shape == (3, D) and out.dtype == torch.float32
    # Untrained, GistNet is exactly the SPEC's mean-pool baseline (zero-initialised residual).
    torch.testing.assert_close(out, MeanPoolGister()(1, x), rtol=0, atol=1e-6)
    assert gister(2, x).shape == (3, D)
    assert gister(1, x.to(torch.bfloat16)).dtype == torch.bfloat16  # returns the caller's dtype


@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_head_sees_the_whole_block(pooling):
    """The CLS-under-a-causal-mask trap: the pooled feature must change when any slot changes, the
    last one included, and different blocks must get different gists."""
    torch.manual_seed(0)
    net = _trained_like(Gister(D, _cfg(pooling=pooling))).nets[0].eval()
    pooled = {}
    net.proj_out.register_forward_hook(lambda m, args, out: pooled.__setitem__("x", args[0].detach()))
    x = _blocks(1)
    net(x)
    before = pooled["x"].clone()
    for slot in (0, 31):
        changed = x.clone()
        changed[:, slot] = _blocks(1, seed=5)[:, slot]
        net(changed)
        assert not torch.allclose(pooled["x"], before, atol=1e-5), f"{pooling} head ignores slot {slot}"
    a, b = net(_blocks(1, seed=1)), net(_blocks(1, seed=2))
    assert not torch.allclose(a, b, atol=1e-4)
    residual = net(_blocks(2)) - MeanPoolGister()(1, _blocks(2))  # the learned part differs per block
    assert not torch.allclose(residual[0], residual[1], atol=1e-5)


def test_scale_equivariance():
    torch.manual_seed(0)
    gister = _trained_like(Gister(D, _cfg()))
    x = _blocks()
    torch.testing.assert_close(gister(1, 7.0 * x), 7.0 * gister(1, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hidden_size", ["auto", 32])
def test_gradients_reach_every_parameter(hidden_size):
    """Step 1 moves the zero-initialised output projection; from step 2 every parameter has a gradient."""
    torch.manual_seed(0)
    gister = Gister(D, _cfg(hidden_size=hidden_size, pooling="query"))
    opt = torch.optim.SGD(gister.parameters(), lr=0.1)
    x, target = _blocks(), _blocks(n=3, seed=9)[:, 0]
    for _ in range(2):
        opt.zero_grad()
        ((gister(1, x) - target) ** 2).sum().backward()
        opt.step()
    lod1 = {n for n, p in gister.named_parameters() if n.startswith("nets.0.")}
    no_grad = [n for n, p in gister.named_parameters() if n in lod1 and (p.grad is None or not p.grad.abs().sum())]
    assert no_grad == []


def test_levels_separate_or_shared():
    torch.manual_seed(0)
    separate = _trained_like(Gister(D, _cfg()))
    assert len(separate.nets) == 2 and separate.net(1) is not separate.net(2)
    x = _blocks()
    assert not torch.allclose(separate(1, x), separate(2, x))
    shared = Gister(D, _cfg(share_levels=True))
    assert len(shared.nets) == 1 and shared.net(1) is shared.net(2)
    assert num_parameters(shared) * 2 == num_parameters(separate)
    with pytest.raises(ValueError):
        separate(3, x)


@pytest.mark.parametrize("kw", [{}, {"share_levels": True, "pooling": "cls"}, {"hidden_size": 32, "pooling": "mean"}])
def test_save_load_round_trip(tmp_path, kw):
    torch.manual_seed(0)
    gister = _trained_like(Gister(D, _cfg(**kw))).eval()
    gister.save_pretrained(tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert json.loads((tmp_path / "g" / CONFIG_FILE).read_text())["model"] == gister.cfg.model_dump(mode="json")
    loaded = Gister.from_pretrained(tmp_path / "g")
    assert loaded.cfg == gister.cfg and not loaded.training
    for (n1, p1), (n2, p2) in zip(gister.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    x = _blocks()
    for level in (1, 2):
        assert torch.equal(gister(level, x), loaded(level, x))


def test_profile_reports_parameters_and_latency():
    gister = Gister(D, _cfg())
    p = profile_gister(gister, n_blocks=4, repeats=1)
    assert p[M.GISTNET_PARAMETERS] == num_parameters(gister) > 0
    assert p[M.GISTNET_LATENCY_MS] > 0 and p[M.GISTNET_LATENCY_SINGLE_MS] > 0
    assert gister.training  # profiling leaves the mode as it found it
