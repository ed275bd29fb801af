"""JT3 on a tiny random Llama: a LoRA adapter changes the model's outputs but never its base weights, it
detaches to exactly the original model (outputs, modules, hooks, checksum), it saves and loads exactly,
only its matrices are optimised and get gradients, a few steps lower Loss@H on a fixed batch, LensNet
chooses the working contexts, and an interrupted run resumes to exactly the uninterrupted result."""

import json

import pytest
import torch
from helpers import failing_on_call, nan_on_call, random_ids, tiny_config, tiny_lm
from safetensors.torch import load_file

from mcx_core import checkpoints
from mcx_core.compression.gistnet import load_gister
from mcx_core.config import LensNetModelConfig
from mcx_core.eval import lora as lora_eval
from mcx_core.focus.lensnet import LensNet, load_lensnet
from mcx_core.model import lora as LA
from mcx_core.model.base import BaseLM
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import MemorySink
from mcx_core.training import common
from mcx_core.training import lora as jt3

C, H = 256, 8
LENSNET = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "tail_gists": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _lensnet(lm, bias: float = 0.0, seed: int = 0) -> LensNet:
    torch.manual_seed(seed)
    net = LensNet(lm.d_model, LensNetModelConfig(**LENSNET), max_level=2).eval()
    with torch.no_grad():
        net.head.bias.fill_(bias)
    return net


@pytest.fixture(scope="module")
def lensnet(lm) -> LensNet:
    return _lensnet(lm)


def _cfg(lora=None, allocator=None, **training):
    return tiny_config(
        "jt3-test",
        C,
        H,
        seed=5,
        working_context={"w_max": 96, "eval_w_max": [64, 96], "recent_tokens": 32},
        runtime={"refocus_every": 32},
        allocator=allocator or {},
        lora={
            "rank": 4,
            "alpha": 8,
            "refocus_steps": 4,
            "without_adapter_every": 2,
            **(lora or {}),
            "training": {"batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "max_steps": 3, **training},
        },
    )


def _ids(n=6, seed=0) -> torch.Tensor:
    return random_ids((n, C + H), seed)


PROBE = random_ids((2, 40), seed=9)


@torch.no_grad()
def _logits(lm: BaseLM) -> torch.Tensor:
    return lm.model(input_ids=PROBE).logits


def _perturb(adapter, seed=1) -> None:
    """Non-zero LoRA matrices (a fresh adapter has lora_B = 0: the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------- the adapter


def test_adapter_changes_outputs_and_detaches_to_the_original_model(lm):
    before, checksum, structure = _logits(lm), lm.weights_checksum(), LA._structure(lm.model)
    with LA.lora_adapter(lm, _cfg().lora, seed=0) as adapter:
        assert LA.has_adapter(lm)
        assert torch.equal(_logits(lm), before)  # lora_B = 0: a fresh adapter is the identity
        _perturb(adapter)
        adapted = _logits(lm)
        assert (adapted - before).abs().max() > 1e-3  # lm.model itself now runs the adapter
        with adapter.disable_adapter():
            assert torch.equal(_logits(lm), before)
        assert torch.equal(_logits(lm), adapted)
        assert not any(p.requires_grad for n, p in lm.model.named_parameters() if "lora_" not in n)
        with pytest.raises(RuntimeError, match="already has an adapter"), LA.lora_adapter(lm, _cfg().lora):
            pass
    assert not LA.has_adapter(lm)
    assert torch.equal(_logits(lm), before)
    assert lm.weights_checksum() == checksum
    assert LA._structure(lm.model) == structure


def test_a_changed_base_model_is_caught():
    lm = tiny_lm()
    changed = pytest.raises(LA.BaseModelChanged, match="weights changed")
    with changed, LA.lora_adapter(lm, _cfg().lora), torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    lm = tiny_lm()
    hooked = pytest.raises(LA.BaseModelChanged, match="modules, hooks or flags")
    with hooked, LA.lora_adapter(lm, _cfg().lora):
        lm.model.get_input_embeddings().register_forward_hook(lambda m, i, o: None)
    assert not LA.has_adapter(lm)


def test_adapter_save_load_round_trip(lm, tmp_path):
    before = _logits(lm)
    with LA.lora_adapter(lm, _cfg().lora) as adapter:
        _perturb(adapter)
        adapted = _logits(lm)
        LA.save_adapter(adapter, tmp_path / "lora")
    saved = load_file(str(tmp_path / "lora" / LA.ADAPTER_WEIGHTS))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # adapter weights only
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [LA.ADAPTER_CONFIG, LA.ADAPTER_WEIGHTS]
    with LA.load_lora(lm, tmp_path) as adapter:  # a directory holding lora/ works like a checkpoint
        assert torch.equal(_logits(lm), adapted)
        with adapter.disable_adapter():
            assert torch.equal(_logits(lm), before)
    with LA.lora_adapter(lm, _cfg().lora, seed=3) as adapter:
        LA.load_adapter_weights(adapter, tmp_path / "lora", _cfg().lora)
        assert torch.equal(_logits(lm), adapted)
    with (
        LA.lora_adapter(lm, _cfg({"rank": 2}).lora) as adapter,
        pytest.raises(ValueError, match="does not match"),
    ):
        LA.load_adapter_weights(adapter, tmp_path / "lora", _cfg({"rank": 2}).lora)
    assert torch.equal(_logits(lm), before)


# ---------------------------------------------------------------------------------------------- the objective


def test_lensnet_chooses_the_working_context(lm, gister):
    """A LensNet that wants everything coarser makes the allocator collapse; a neutral one leaves the
    budget-filling context alone. Either way every invariant holds and nothing after the cursor is read.
    (min_residency 0: with 8-block histories nothing else stays long enough to be acted on.)"""
    cfg = _cfg(allocator={"min_residency": 0})
    history = _ids(1)[0, :C]
    neutral, n_neutral = jt3.focused_context(cfg, lm, gister, _lensnet(lm), history, 96)
    coarse, n_coarse = jt3.focused_context(cfg, lm, gister, _lensnet(lm, bias=-3.0), history, 96)
    assert neutral.tree.cursor == coarse.tree.cursor == C
    assert n_neutral == 0 and n_coarse > 0
    assert coarse.cost < neutral.cost <= 96
    coarse.check_invariants()
    again, _ = jt3.focused_context(cfg, lm, gister, _lensnet(lm, bias=-3.0), history, 96)
    assert again.entries == coarse.entries


def test_only_adapter_parameters_are_optimised_and_get_gradients(lm, gister, lensnet):
    cfg = _cfg()
    samples = jt3.build_samples(cfg, lm, gister, lensnet, _ids(2), [96, 64])
    assert [s.horizon.tolist() for s in samples] == _ids(2)[:, C:].tolist()
    with LA.lora_adapter(lm, cfg.lora) as adapter:
        named = LA.lora_parameters(adapter)
        opt = common.make_optimizer(adapter, 1e-3, 0.0)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert in_opt == {id(p) for _, p in named}
        assert len(named) == 2 * 2 * len(cfg.lora.target_modules)  # A and B per target per layer
        loss, metrics = jt3.jt3_loss(lm, samples)
        loss.backward()
        for name, p in named:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert all(p.grad.abs().sum() > 0 for n, p in named if ".lora_B." in n)  # (A's is 0 while B = 0)
        assert all(p.grad is None for n, p in lm.model.named_parameters() if "lora_" not in n)
        opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in gister.parameters()) and all(
        p.grad is None for p in lensnet.parameters()
    )
    assert metrics[M.TRAIN_LORA_LOSS] == pytest.approx(loss.item())
    assert metrics[M.TRAIN_LORA_ACTIVE_TOKENS] == pytest.approx((samples[0].cost + samples[1].cost) / 2)


def test_a_few_steps_lower_loss_at_h_on_a_fixed_batch(lm, gister, lensnet):
    cfg = _cfg()
    samples = jt3.build_samples(cfg, lm, gister, lensnet, _ids(2), [96, 96])
    losses = []
    with LA.lora_adapter(lm, cfg.lora) as adapter:
        opt = torch.optim.Adam([p for _, p in LA.lora_parameters(adapter)], lr=3e-2)
        for _ in range(15):
            loss, _ = jt3.jt3_loss(lm, samples)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad(), adapter.disable_adapter():
            base = jt3.sample_nll(lm, samples).mean().item()
    # q/v adapters of rank 4 on a random 2-layer model: 6.33 -> 5.86 nats in 15 steps (measured)
    assert base == pytest.approx(losses[0], abs=1e-5)
    assert losses[-1] < losses[0] - 0.3, losses


# ---------------------------------------------------------------------------------------------- training


def test_train_jt3_logs_checkpoints_and_leaves_the_base_model_as_it_was(lm, gister, lensnet, tmp_path):
    before, checksum = _logits(lm), lm.weights_checksum()
    sink = MemorySink()
    result = jt3.train_lora(_cfg(), lm, gister, lensnet, _ids(), tmp_path, sink, progress=False)
    assert result.steps == 3 and result.nan_free and result.checkpoint.name == "JT3_cycle0_step3"
    assert not LA.has_adapter(lm)
    assert torch.equal(_logits(lm), before) and lm.weights_checksum() == checksum

    ck = result.checkpoint
    for f in ("lora/adapter_model.safetensors", "lora/adapter_config.json", "optimizer.pt", "config.yaml"):
        assert (ck / f).is_file(), f
    state = checkpoints.read_state(ck)
    assert state["trainer"] == "JT3" and state["base_model"]["weights_checksum"] == checksum
    adapter_keys = load_file(str(ck / "lora" / LA.ADAPTER_WEIGHTS))
    optimizer = torch.load(ck / checkpoints.OPTIMIZER_FILE, weights_only=True)
    assert len(optimizer["optimizer"]["state"]) == len(adapter_keys)  # Adam state for every LoRA matrix
    assert all(v.abs().sum() > 0 for k, v in adapter_keys.items() if ".lora_B." in k)  # it trained
    for k, v in gister.state_dict().items():  # the frozen nets travel with the checkpoint, unchanged
        assert torch.equal(load_gister(ck, lm).state_dict()[k], v), k
    for k, v in lensnet.state_dict().items():
        assert torch.equal(load_lensnet(ck).state_dict()[k], v), k
    assert json.loads((ck / "lora" / LA.ADAPTER_CONFIG).read_text())["r"] == 4

    assert [s for s, _ in sink.history[M.TRAIN_LORA_LOSS]] == [1, 2, 3]
    # every `without_adapter_every` = 2 steps, from the first
    assert [s for s, _ in sink.history[M.TRAIN_LORA_LOSS_WITHOUT_ADAPTER]] == [1, 3]
    assert [s for s, _ in sink.history[M.TRAIN_LORA_GAIN]] == [1, 3]
    for m in (M.TRAIN_LOSS_AT_H, M.TRAIN_LORA_GRAD_NORM, M.TRAIN_LORA_LR, M.TRAIN_LORA_TOKENS_PER_S):
        assert m in result.history[-1], m
    assert result.metrics["jt3/steps"] == 3

    # Held-out: the adapter is on, then off, on the same contexts; "off" is exactly the plain base model.
    cfg, held = _cfg(), _ids(3, seed=4)
    out = lora_eval.evaluate_lora(cfg, lm, gister, lensnet, ck, held)
    samples = jt3.build_samples(cfg, lm, gister, lensnet, held, [cfg.working_context.w_max] * 3)
    with torch.no_grad():
        plain = jt3.sample_nll(lm, samples).mean().item()
    assert out[M.EVAL_LORA_LOSS_AT_H_WITHOUT_ADAPTER] == pytest.approx(plain, rel=1e-6)
    assert out[M.EVAL_LORA_LOSS_AT_H] != out[M.EVAL_LORA_LOSS_AT_H_WITHOUT_ADAPTER]
    assert out[M.EVAL_LORA_DELTA_LOSS + "_mean"] == pytest.approx(
        out[M.EVAL_LORA_LOSS_AT_H] - out[M.EVAL_LORA_LOSS_AT_H_WITHOUT_ADAPTER]
    )
    assert out[M.EVAL_LORA_SAMPLES] == 3
    assert torch.equal(_logits(lm), before) and not LA.has_adapter(lm)


class _Interrupted(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(lm, gister, lensnet, tmp_path, monkeypatch):
    cfg = _cfg({"dropout": 0.1}, max_steps=4, checkpoint_every=2)  # dropout: the per-step seed matters
    before = _logits(lm)
    torch.manual_seed(0)
    full = jt3.train_lora(cfg, lm, gister, lensnet, _ids(), tmp_path / "a", MemorySink(), progress=False)

    real_loss = jt3.jt3_loss
    monkeypatch.setattr(jt3, "jt3_loss", failing_on_call(real_loss, 3, _Interrupted))
    with pytest.raises(_Interrupted):
        jt3.train_lora(cfg, lm, gister, lensnet, _ids(), tmp_path / "b", MemorySink(), progress=False)
    assert checkpoints.latest_checkpoint(tmp_path / "b", 3, 0).name == "JT3_cycle0_step2"
    assert not LA.has_adapter(lm) and torch.equal(_logits(lm), before)  # detached on the way out
    monkeypatch.setattr(jt3, "jt3_loss", real_loss)
    torch.manual_seed(123)  # a resumed process does not share the first one's global RNG state
    resumed = jt3.train_lora(cfg, lm, gister, lensnet, _ids(), tmp_path / "b", MemorySink(), progress=False)

    assert resumed.steps == full.steps == 4 and resumed.checkpoint.name == "JT3_cycle0_step4"
    a = load_file(str(full.checkpoint / "lora" / LA.ADAPTER_WEIGHTS))
    b = load_file(str(resumed.checkpoint / "lora" / LA.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h[M.TRAIN_LORA_LOSS] for h in resumed.history] == [h[M.TRAIN_LORA_LOSS] for h in full.history]
    # A finished run returns at once; one trained with another LensNet is not resumed.
    again = jt3.train_lora(cfg, lm, gister, lensnet, _ids(), tmp_path / "b", MemorySink(), progress=False)
    assert again.steps == 4 and again.checkpoint == resumed.checkpoint
    with pytest.raises(ValueError, match="another GistNet/LensNet"):
        jt3.train_lora(
            cfg, lm, gister, _lensnet(lm, seed=1), _ids(), tmp_path / "b", MemorySink(), progress=False
        )
    assert torch.equal(_logits(lm), before)


def test_non_finite_loss_stops_training_without_applying_the_step(lm, gister, lensnet, tmp_path, monkeypatch):
    monkeypatch.setattr(jt3, "jt3_loss", nan_on_call(jt3.jt3_loss, 2))
    sink = MemorySink()
    result = jt3.train_lora(_cfg(), lm, gister, lensnet, _ids(), tmp_path, sink, progress=False)
    assert not result.nan_free and result.steps == 1 and sink.last(M.TRAIN_NAN) == 1.0
    assert result.checkpoint.name == "JT3_cycle0_step1" and not LA.has_adapter(lm)
