"""The compression levers of issue 12 on the tiny random Llama: contextual encoder input (first-k-layer
states, computed once per block and kept in the tree), the cached streamed teacher pass, the top-k KL
term, the reconstruction warm start and horizon weighting. Each objective's gradient reaches GistNet
and never the base model."""

import numpy as np
import pytest
import torch
from helpers import VOCAB, random_ids, tiny_config

from mcx_core.compression import teacher as T
from mcx_core.compression.gistnet import Gister, encoder_inputs_fn, mean_pool
from mcx_core.config import parse_config
from mcx_core.eval import nll as E
from mcx_core.model.tree import MegaContextTree
from mcx_core.training import common
from mcx_core.training import gistnet as jt1

C, H = 256, 8


def _cfg(input_layers=0, phases=None, **training):
    phases = phases or [
        {"name": "rec", "objective": "reconstruction", "max_steps": 2, "blocks_per_step": 4},
        {"name": "sub", "objective": "delta_nll", "max_steps": 2, "kl_weight": 1.0, "horizon_weighting": 1.0},
    ]
    return tiny_config(
        "levers-test", C, H, seed=3,
        gistnet={
            "model": {"num_layers": 1, "num_heads": 2, "input_layers": input_layers},
            "training": {"batch_size": 2, "warmup_steps": 1, "sample_pool": 4, "teacher_top_k": 8,
                         "teacher_shard_size": 2, "phases": phases, **training},
        },
        working_context={"w_max": 64, "eval_w_max": [64, 96], "recent_tokens": 32, "sink_tokens": 4},
    )


def _ids(n=6, seed=0) -> np.ndarray:
    return random_ids((n, C + H), seed).numpy()


def _batch(lm, cfg, ids) -> dict:
    spec = T.TeacherSpec.from_config(cfg, lm, ids)
    out = T.teacher_fields(lm, ids, spec)
    if cfg.gistnet.model.input_layers:
        out["states"] = T.encoder_states(lm, ids, spec, cfg.gistnet.model.input_layers)
    return out


def _grads_reach_gistnet_only(lm, gister, loss):
    checksum = lm.weights_checksum()
    loss.backward()
    lod1 = [(n, p) for n, p in gister.named_parameters() if n.startswith("nets.0.")]
    missing = [n for n, p in lod1 if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())
    assert lm.weights_checksum() == checksum


def _perturbed(gister):
    with torch.no_grad():  # off the zero init, so every parameter is on the gradient path
        for net in gister.nets:
            net.proj_out.weight.normal_(std=0.05)
            if net.contextual:
                net.proj_ctx.weight.normal_(std=0.05)
    return gister


# ---------------------------------------------------------------------------------------------- encoder input


@pytest.mark.parametrize("layers", [1])  # the tiny model has 2: HF normalises the last one
def test_block_states_are_the_residual_stream_of_the_block_run_alone(lm, layers):
    ids = torch.as_tensor(_ids(1))[0, :64].view(2, 32)
    states = lm.block_states(ids, layers)
    hf = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[layers]  # after layer `layers`
    torch.testing.assert_close(states, hf, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lm.block_states(ids, 0), lm.embed(ids))
    with pytest.raises(ValueError, match="input_layers"):
        lm.block_states(ids, 99)


def test_contextual_gistnet_starts_as_mean_pool_of_the_embeddings(lm):
    cfg = _cfg(input_layers=2)
    gister = Gister(lm.d_model, cfg.gistnet.model)
    assert gister.nets[0].contextual and not gister.nets[1].contextual  # LOD2 reads gists
    ids = torch.as_tensor(_ids(1))[0, :C]
    x = encoder_inputs_fn(lm, 2, 32)(ids)  # [8, 32, 2d]
    assert x.shape == (8, 32, 2 * lm.d_model)
    torch.testing.assert_close(gister(1, x), mean_pool(lm.embed(ids).view(8, 32, -1)))
    with pytest.raises(AssertionError, match="wide"):
        gister(1, lm.embed(ids).view(8, 32, -1))  # a contextual net refuses bare embeddings
    with pytest.raises(ValueError, match="share_levels"):
        parse_config({"name": "x", "gistnet": {"model": {"share_levels": True, "input_layers": 2}}})


def test_tree_computes_encoder_inputs_once_per_block_and_keeps_them(lm, tmp_path):
    calls = []
    inputs_fn = encoder_inputs_fn(lm, 2, 32)

    def counting(ids):
        calls.append(len(ids) // 32)
        return inputs_fn(ids)

    gister = Gister(lm.d_model, _cfg(input_layers=2).gistnet.model)
    tree = MegaContextTree(lm.d_model, lm.embed, gister, block_size=32, input_fn=counting)
    ids = torch.as_tensor(_ids(1))[0]
    tree.ingest(ids[:100])  # 3 complete blocks
    tree.ingest(ids[100:C])  # 5 more
    assert calls == [3, 5] and tree.last_ingest_seconds["encode"] > 0
    torch.testing.assert_close(tree.block_inputs(0, 8).float(), inputs_fn(ids[:C]).half().float())
    tree.rebuild_gists(_perturbed(Gister(lm.d_model, _cfg(input_layers=2).gistnet.model)))
    assert calls == [3, 5]  # rebuilt from the kept inputs: no base-model pass
    tree.save(tmp_path / "t")
    loaded = MegaContextTree.load(tmp_path / "t", lm.embed, gister, input_fn=counting)
    torch.testing.assert_close(loaded.block_inputs(0, 8), tree.block_inputs(0, 8))
    # evaluation conditions build their trees with the gister's encoder inputs
    cond = E.working_context_condition(lm, gister, 32, 32, sink_tokens=4)(ids[:C], 64)
    assert cond.embeds.shape[0] <= 64


# ---------------------------------------------------------------------------------------------- teacher cache


def test_teacher_cache_is_resumable_and_shared_across_pool_sizes(lm, tmp_path, monkeypatch):
    cfg, ids = _cfg(input_layers=1), _ids(8)
    cache = T.TeacherCache.for_config(cfg, lm, ids, tmp_path)
    small = T.pool_positions(len(ids), 2, 0)
    assert cache.ensure(lm, ids, small, layers=1, progress=False) == [0]
    # an interrupted shard write leaves no shard: the next pass recomputes exactly it
    real = T.save_file

    def half_written(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(T, "save_file", half_written)
    with pytest.raises(OSError):
        cache.ensure(lm, ids, T.pool_positions(len(ids), 4, 0), layers=1, progress=False)
    assert not cache.shard_path(1).exists() and not list(cache.dir.glob(".*tmp"))
    monkeypatch.setattr(T, "save_file", real)
    assert cache.ensure(lm, ids, T.pool_positions(len(ids), 4, 0), layers=1, progress=False) == [1]
    assert cache.ensure(lm, ids, T.pool_positions(len(ids), 4, 0), layers=1, progress=False) == []
    # rows read from the shards are the in-memory teacher fields of the same samples
    order = T.pool_order(len(ids), cfg.seed)
    got = cache.rows([3, 0], layers=1)
    want = _batch(lm, cfg, ids[order[[3, 0]]])
    for field in (*T.TEACHER_FIELDS, "states"):
        torch.testing.assert_close(got[field], want[field], rtol=1e-3, atol=1e-3)
    # another dataset (or model, or top-k) is another cache
    other = T.TeacherCache.for_config(cfg, lm, _ids(8, seed=1), tmp_path)
    assert other.dir != cache.dir and other.missing(small)


def test_cycles_draw_fresh_pools():
    a, b = T.pool_positions(100, 24, 0), T.pool_positions(100, 24, 1)
    assert len(set(a) | set(b)) == 48
    assert len(T.pool_positions(10, 24, 0)) == 10  # a pool never exceeds the split


# ---------------------------------------------------------------------------------------------- objectives


def test_topk_kl_is_a_proper_kl_exact_at_full_vocabulary():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 3, VOCAB, generator=g), torch.randn(2, 3, VOCAB, generator=g)
    t = teacher.log_softmax(-1)
    full = (t.exp() * (t - student.log_softmax(-1))).sum(-1)
    top = t.topk(VOCAB, dim=-1)
    torch.testing.assert_close(jt1.topk_kl(student, top.values, top.indices), full, rtol=1e-4, atol=1e-4)
    top8 = t.topk(8, dim=-1)
    kl8 = jt1.topk_kl(student, top8.values, top8.indices)
    assert (kl8 >= -1e-6).all() and (kl8 <= full + 1e-5).all()  # coarsening never increases a KL
    assert jt1.topk_kl(teacher, top8.values, top8.indices).abs().max() < 1e-5  # zero at the teacher


def test_reconstruction_trains_gistnet_only_and_learns(lm):
    cfg = _cfg(input_layers=1)
    phase = cfg.gistnet.training.phases[0]
    gister = _perturbed(Gister(lm.d_model, cfg.gistnet.model))
    batch = _batch(lm, cfg, _ids(2))
    loss, metrics = jt1.reconstruction_loss(gister, lm, batch, cfg, phase, step_seed=0)
    assert metrics["train/reconstruction_nll"] > 0
    _grads_reach_gistnet_only(lm, gister, loss)
    opt = common.make_optimizer(gister, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(20):
        loss, _ = jt1.reconstruction_loss(gister, lm, batch, cfg, phase, step_seed=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the random tiny model is near-uniform (NLL ≈ log V = 6.24): 0.03 nats is a clear move
    assert losses[-1] < losses[0] - 0.03, losses


def test_kl_and_weighted_delta_nll_reach_gistnet_only(lm):
    cfg = _cfg(input_layers=1)
    phase = cfg.gistnet.training.phases[1]
    gister = _perturbed(Gister(lm.d_model, cfg.gistnet.model))
    batch = _batch(lm, cfg, _ids(2))
    loss, metrics = jt1.delta_nll_loss(gister, lm, batch, [64, 96], cfg, phase)
    assert metrics["train/kl"] > 0
    plain, _ = jt1.delta_nll_loss(gister, lm, batch, [64, 96], cfg, phase.model_copy(
        update={"kl_weight": 0.0, "horizon_weighting": 0.0}))
    assert loss.item() != pytest.approx(plain.item())
    _grads_reach_gistnet_only(lm, gister, loss)


def test_horizon_weights_favour_tokens_the_history_helps():
    batch = {"teacher_nll": torch.tensor([[1.0, 1.0, 1.0, 1.0]]), "recency_nll": torch.tensor([[1.0, 3.0, 1.0, 0.5]])}
    w = jt1.horizon_weights(batch, 1.0)
    assert w.mean().item() == pytest.approx(1.0) and w[0, 1] == w.max() and w[0, 0] == w[0, 3]
    assert jt1.horizon_weights(batch, 0.0) is None


def test_train_gistnet_runs_every_lever_and_respects_a_time_budget(lm, tmp_path):
    from mcx_core.telemetry.sinks import MemorySink

    phases = [
        {"name": "rec", "objective": "reconstruction", "max_steps": 2, "blocks_per_step": 4},
        {"name": "sub", "objective": "delta_nll", "max_steps": 1000, "max_seconds": 1.0, "kl_weight": 0.5},
    ]
    result = jt1.train_gistnet(_cfg(input_layers=1, phases=phases), lm, _ids(), tmp_path / "ck", MemorySink(),
                               progress=False)
    assert 2 < result.steps < 1002 and result.nan_free
    assert list((tmp_path / "teacher").glob("*/states-k1/shard-*.safetensors"))
