"""JT1 on a tiny random Llama: targets are next tokens, the base model sees the whole working context,
gradients reach GistNet only, every parameter is optimised and checkpointed exactly, training lowers
the loss, and interrupted runs / checkpoint writes resume to the same result."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import VOCAB, nan_on_call, random_ids, tiny_config

from mcx_core import checkpoints
from mcx_core.compression.drift import gist_drift
from mcx_core.compression import teacher as T
from mcx_core.compression.gistnet import Gister, load_gister, mean_pool
from mcx_core.config import parse_config
from mcx_core.eval import nll as E
from mcx_core.model.tree import MegaContextTree
from mcx_core.model.working_context import WorkingContext
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import MemorySink
from mcx_core.training import common
from mcx_core.training import gistnet as jt1

C, H = 256, 8


def _cfg(context_tokens=C, **training):
    phases = training.pop(
        "phases",
        [
            {"name": "warm", "objective": "pooling_mse", "max_steps": 2},
            {"name": "sub", "objective": "delta_nll", "max_steps": 3},
        ],
    )
    return tiny_config(
        "jt1-test",
        context_tokens,
        H,
        seed=3,
        gistnet={
            "model": {"num_layers": 1, "num_heads": 2},
            "training": {"batch_size": 2, "warmup_steps": 1, "sample_pool": 4, "phases": phases, **training},
        },
        working_context={"w_max": 64, "eval_w_max": [64, 96], "recent_tokens": 32},
    )


def _ids(n=6, length=C + H, seed=0) -> np.ndarray:
    return random_ids((n, length), seed).numpy()


def _spec(context_tokens=C, horizon=H, top_k=8) -> T.TeacherSpec:
    return T.TeacherSpec(context_tokens, horizon, 32, top_k, 4, 64, "center", 3, "test", "tiny")


def _batch(lm, ids, context_tokens=C, layers=0) -> dict:
    """The teacher fields of `ids` in memory (what a step reads from the shards)."""
    spec = _spec(context_tokens)
    out = T.teacher_fields(lm, ids, spec)
    if layers:
        out["states"] = T.encoder_states(lm, ids, spec, layers)
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    """GistNet weights of a checkpoint (or of a save_pretrained directory)."""
    d = path / checkpoints.GISTNET_DIR if (path / checkpoints.GISTNET_DIR).is_dir() else path
    return Gister.from_pretrained(d).state_dict()


# ---------------------------------------------------------------------------------------------- the objective


def test_horizon_targets_are_next_tokens_like_hf_labels(lm):
    """The copy-task trap: our horizon NLL over the full history equals HF's own shifted `labels=` loss
    restricted to the horizon tokens."""
    ids = torch.as_tensor(_ids(1))[0]
    ours = E.horizon_nll(lm, [E.full_condition(lm)(ids[:C], 0)], ids[C:].unsqueeze(0))
    labels = ids.clone()
    labels[:C] = -100  # only the horizon carries loss
    hf = lm.model(ids.unsqueeze(0), labels=labels.unsqueeze(0)).loss
    torch.testing.assert_close(ours.mean(), hf, rtol=1e-5, atol=1e-5)


def test_base_model_reads_the_whole_working_context(lm):
    """Gists sit at span centres, so position ids jump; the horizon must still attend to every entry
    (transformers would otherwise treat each run of consecutive positions as a separate sequence)."""
    ids = torch.as_tensor(_ids(1))[0]
    tree = MegaContextTree(lm.d_model, lm.embed, lambda L, x: mean_pool(x), block_size=32)
    tree.ingest(ids[:C])
    wc = WorkingContext.initial(tree, 64, recent_tokens=32)
    embeds, positions, _ = wc.assemble(lm.embed)
    assert (positions.diff() != 1).any()  # non-consecutive ids: the case under test
    base = E.horizon_nll(lm, [E.ConditionInput(embeds, positions, C)], ids[C:].unsqueeze(0))
    changed = embeds.clone()
    changed[0] = changed[0] * 3  # the oldest gist
    after = E.horizon_nll(lm, [E.ConditionInput(changed, positions, C)], ids[C:].unsqueeze(0))
    assert not torch.allclose(base, after, atol=1e-6)


def test_gradients_reach_gistnet_only(lm):
    cfg = _cfg()
    checksum = lm.weights_checksum()
    gister = Gister(lm.d_model, cfg.gistnet.model)
    with torch.no_grad():
        gister.nets[0].proj_out.weight.normal_(std=0.05)  # so the encoder is on the gradient path
    phase = cfg.gistnet.training.phases[1]
    loss, _ = jt1.delta_nll_loss(gister, lm, _batch(lm, _ids(2)), [64, 96], cfg, phase)
    loss.backward()
    lod1 = [(n, p) for n, p in gister.named_parameters() if n.startswith("nets.0.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lod1), [n for n, p in lod1 if p.grad is None]
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())
    assert lm.weights_checksum() == checksum


def test_lod2_stress_context_trains_lod2_from_detached_lod1(lm):
    """A 1024-token history never puts LOD2 in its working context; the stress context does: one LOD2
    gist for all 1024 tokens at the span's centre. Its loss reaches the LOD2 net, not the LOD1 net."""
    n_ctx = 1024
    cfg = _cfg(context_tokens=n_ctx)
    ids = torch.as_tensor(_ids(1, length=n_ctx + H))[0]
    tree = MegaContextTree(lm.d_model, lm.embed, lambda L, x: mean_pool(x), block_size=32)
    tree.ingest(ids[:n_ctx])
    for w in cfg.working_context.eval_w_max:
        wc = WorkingContext.initial(tree, w, recent_tokens=32)
        assert all(e.level < 2 for e in wc.entries)
    stress = jt1.lod2_stress_context(tree, "center")
    assert [(e.level, e.start, e.end) for e in stress.entries] == [(2, 0, n_ctx)]
    gister = Gister(lm.d_model, cfg.gistnet.model)
    g1 = gister(1, lm.embed(ids[:n_ctx]).view(32, 32, -1))  # [32, d] with grad
    cond = jt1._condition(stress, lm.embed, jt1._gist_override(gister, g1, 32), n_ctx)
    assert cond.embeds.shape == (1, lm.d_model) and cond.positions.tolist() == [511] and cond.horizon_start == n_ctx
    E.horizon_nll_grad(lm, [cond], ids[n_ctx:].unsqueeze(0)).mean().backward()
    assert gister.nets[1].proj_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in gister.nets[0].parameters())


def test_pooling_targets_are_norm_matched_span_means():
    hidden, embeds = torch.randn(3, 32, 8), 0.1 * torch.randn(3, 32, 8)
    t = T.pooling_targets(hidden, embeds)
    assert t.shape == (3, 8)
    torch.testing.assert_close(t.norm(dim=-1), embeds.norm(dim=-1).mean(-1))
    cos = torch.nn.functional.cosine_similarity(t, hidden.mean(1), dim=-1)
    torch.testing.assert_close(cos, torch.ones(3))


def test_pool_targets_come_from_blocks_run_alone(lm):
    ids = _ids(2, length=1024 + H)
    pool = T.teacher_fields(lm, ids, _spec(1024, top_k=VOCAB))
    assert pool["teacher_nll"].shape == (2, H) and pool["recency_nll"].shape == (2, H)
    assert pool["lod1_targets"].shape == (2, 32, lm.d_model) and pool["lod2_targets"].shape == (2, 1, lm.d_model)
    block = torch.as_tensor(ids[1, 64:96]).unsqueeze(0)  # sample 1, block 2
    hidden = lm.model.get_decoder()(input_ids=block).last_hidden_state
    expected = T.pooling_targets(hidden, lm.embed(block))[0]
    torch.testing.assert_close(pool["lod1_targets"][1, 2], expected, rtol=1e-4, atol=1e-5)
    # top-k with k = V is the whole distribution: the target token's log-prob is minus its NLL
    assert pool["topk_logprobs"].shape == pool["topk_ids"].shape == (2, H, VOCAB)
    target = torch.as_tensor(ids[0, 1024:]).unsqueeze(1)
    at_target = pool["topk_logprobs"][0].float().gather(1, pool["topk_ids"][0].long().argsort(1).gather(1, target))
    torch.testing.assert_close(-at_target.squeeze(1), pool["teacher_nll"][0], atol=2e-2, rtol=1e-3)
    # recency reads less than the full history: on average it predicts worse (random ids: a little)
    assert not torch.equal(pool["recency_nll"], pool["teacher_nll"])


def test_delta_nll_steps_overfit_a_fixed_batch(lm):
    torch.manual_seed(0)
    cfg = _cfg()
    gister = Gister(lm.d_model, cfg.gistnet.model)
    batch = _batch(lm, _ids(2))
    opt = common.make_optimizer(gister, lr=1e-2, weight_decay=0.0)
    phase = cfg.gistnet.training.phases[1]
    losses = []
    for _ in range(12):
        loss, _ = jt1.delta_nll_loss(gister, lm, batch, [64, 64], cfg, phase)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


# ---------------------------------------------------------------------------------------------- the trainer


def test_train_jt1_logs_optimises_and_checkpoints_every_parameter(lm, tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    Gister(lm.d_model, cfg.gistnet.model).save_pretrained(tmp_path / "init")
    sink = MemorySink()
    checksum = lm.weights_checksum()
    result = jt1.train_gistnet(cfg, lm, _ids(), tmp_path / "ckpt", sink, progress=False, init_from=tmp_path / "init")

    assert result.nan_free and result.steps == 5
    assert result.checkpoint.name == "JT1_cycle0_step5"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["JT1_cycle0_step2", "JT1_cycle0_step5"]
    assert lm.weights_checksum() == checksum
    for name in (M.TRAIN_LOSS, M.TRAIN_GRAD_NORM, M.TRAIN_TOKENS_PER_S, M.TRAIN_LR, M.TRAIN_PHASE_INDEX):
        assert len(sink.history[name]) == 5
    assert len(sink.history[M.TRAIN_POOLING_MSE]) == 2
    for name in (M.TRAIN_DELTA_NLL_MEAN, M.TRAIN_DELTA_NLL_P95, M.TRAIN_HORIZON):
        assert len(sink.history[name]) == 3
    assert sink.last(M.TRAIN_HORIZON) == H and sink.last(M.TRAIN_PHASE_INDEX) == 1
    assert M.GISTNET_PARAMETERS in sink.history and M.GISTNET_LATENCY_MS in sink.history
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5]

    # Every parameter moved away from the initialisation and is in the checkpoint, bit for bit.
    init, trained = _state(tmp_path / "init"), _state(result.checkpoint)
    assert init.keys() == trained.keys()
    unchanged = [n for n in init if n.startswith("nets.0.") and torch.equal(init[n], trained[n])]
    assert unchanged == []
    reloaded = load_gister(result.checkpoint, lm)
    assert all(torch.equal(reloaded.state_dict()[n], trained[n]) for n in trained)

    # The rest of the checkpoint: plain optimizer state (weights_only), the config, the trainer state.
    opt_state = torch.load(result.checkpoint / checkpoints.OPTIMIZER_FILE, weights_only=True)
    n_opt = sum(len(g["params"]) for g in opt_state["optimizer"]["param_groups"])
    assert n_opt == len(list(reloaded.parameters()))
    assert opt_state["scheduler"]["last_epoch"] == 3
    assert parse_config(yaml.safe_load((result.checkpoint / checkpoints.CONFIG_FILE).read_text())) == cfg
    state = checkpoints.read_state(result.checkpoint)
    assert state["global_step"] == 5 and state["phase_index"] == 1 and state["nan_free"] is True
    assert state["base_model"] == {"id": "tiny-test", "weights_checksum": checksum}


def test_missing_parameter_is_caught():
    gister = Gister(16, _cfg().gistnet.model)
    opt = torch.optim.AdamW(gister.nets[0].parameters())
    with pytest.raises(AssertionError, match="nets.1"):
        common.assert_all_in_optimizer(gister, opt)


class _Interrupt(Exception):
    pass


class _InterruptingSink(MemorySink):
    def __init__(self, at_step: int):
        super().__init__()
        self.at_step = at_step

    def log_metrics(self, metrics, step=None):
        if step == self.at_step and M.TRAIN_LOSS in metrics:
            raise _Interrupt
        super().log_metrics(metrics, step)


def test_resume_after_interruption_matches_uninterrupted_run(lm, tmp_path, monkeypatch):
    phases = [
        {"name": "warm", "objective": "pooling_mse", "max_steps": 1},
        {"name": "sub", "objective": "delta_nll", "max_steps": 4},
    ]
    cfg = _cfg(checkpoint_every=2, phases=phases)
    torch.manual_seed(0)
    full = jt1.train_gistnet(cfg, lm, _ids(), tmp_path / "a", MemorySink(), progress=False)

    torch.manual_seed(123)  # a resumed process does not share the first one's global RNG state
    with pytest.raises(_Interrupt):
        jt1.train_gistnet(cfg, lm, _ids(), tmp_path / "b", _InterruptingSink(at_step=4), progress=False)
    assert checkpoints.latest_checkpoint(tmp_path / "b", 1, 0).name == "JT1_cycle0_step2"  # mid delta_nll phase
    torch.manual_seed(0)
    resumed = jt1.train_gistnet(cfg, lm, _ids(), tmp_path / "b", MemorySink(), progress=False)

    assert resumed.steps == full.steps == 5
    a, b = _state(full.checkpoint), _state(resumed.checkpoint)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5]
    # A finished run resumes to itself without training further, and without the teacher pass.
    def no_teacher(*a, **k):
        raise AssertionError("a finished run must not run the teacher pass")

    monkeypatch.setattr(T.TeacherCache, "ensure", no_teacher)
    again = jt1.train_gistnet(cfg, lm, _ids(), tmp_path / "b", MemorySink(), progress=False)
    assert again.steps == 5 and again.checkpoint == resumed.checkpoint


def test_interrupted_checkpoint_write_leaves_no_complete_dir(lm, tmp_path, monkeypatch):
    def broken(path, *args):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "save_optimizer", broken)
    with pytest.raises(OSError):
        jt1.train_gistnet(_cfg(), lm, _ids(), tmp_path, MemorySink(), progress=False)
    assert list(tmp_path.iterdir()) == []
    # A directory with the right name but no trainer_state.json is not a checkpoint either.
    (tmp_path / "JT1_cycle0_step9" / checkpoints.GISTNET_DIR).mkdir(parents=True)
    assert checkpoints.latest_checkpoint(tmp_path, 1, 0) is None


def test_non_finite_loss_stops_the_phase_and_marks_the_checkpoint(lm, tmp_path, monkeypatch):
    monkeypatch.setattr(jt1, "pooling_mse_loss", nan_on_call(jt1.pooling_mse_loss, 2))
    sink = MemorySink()
    result = jt1.train_gistnet(_cfg(), lm, _ids(), tmp_path, sink, progress=False)
    assert not result.nan_free
    assert result.steps == 1 + 3  # one good pooling_mse step, then the delta_nll phase in full
    assert sink.last(M.TRAIN_NAN) == 1.0
    state = checkpoints.read_state(result.checkpoint)
    assert state["nan_free"] is False and state["healthy"] is False and state["run"]["nan_phases"] == [0]
    assert all(torch.isfinite(p).all() for p in _state(result.checkpoint).values())


def test_sampling_depends_only_on_seed_and_step():
    a = common.sample_step(3, 7, 10, 4, [64, 96])
    b = common.sample_step(3, 7, 10, 4, [64, 96])
    c = common.sample_step(3, 8, 10, 4, [64, 96])
    assert a[0].tolist() == b[0].tolist() and a[1] == b[1]
    assert a[0].tolist() != c[0].tolist() or a[1] != c[1]
    assert len(set(a[0].tolist())) == 4  # no sample twice in a batch


def test_gist_drift(lm):
    torch.manual_seed(0)
    g = Gister(lm.d_model, _cfg().gistnet.model)
    probe = lm.embed(torch.as_tensor(_ids(1))[0, :C]).view(-1, 32, lm.d_model)
    assert gist_drift(g, g, probe) == pytest.approx(1.0)
    other = Gister(lm.d_model, _cfg().gistnet.model)
    with torch.no_grad():
        other.nets[0].proj_out.weight.normal_(std=0.5)
    assert gist_drift(g, other, probe) < 0.99
