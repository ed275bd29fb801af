"""LensNet: non-causal over the working context, blind to everything after the cursor, scores in [-1, 1]
with illegal directions masked, inputs built from the right vectors, save/load exact and pickle-free."""

import pytest
import torch
from helpers import random_ids

from mcx_core.config import LensNetModelConfig
from mcx_core.eval.nll import MeanPoolGister
from mcx_core.focus.lensnet import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LensNet,
    LensNetPolicy,
    collate,
    entry_inputs,
    mask_scores,
    spans_read,
)
from mcx_core.model.tree import MegaContextTree
from mcx_core.model.working_context import WorkingContext, entry_for
from mcx_core.telemetry import metrics as M

K = 32
pytestmark = pytest.mark.usefixtures("one_thread")


def _tree(lm, n_tokens, seed=0) -> MegaContextTree:
    tree = MegaContextTree(lm.d_model, lm.embed, MeanPoolGister(), block_size=K)
    tree.ingest(random_ids(n_tokens, seed))
    return tree


def _net(lm, seed=0, tail_gists=2) -> LensNet:
    """A LensNet whose scores spread over [-1, 1] (the untrained head starts near 0 on purpose)."""
    torch.manual_seed(seed)
    net = LensNet(
        lm.d_model, LensNetModelConfig(hidden_size=32, num_layers=2, num_heads=4, tail_gists=tail_gists)
    )
    torch.nn.init.normal_(net.head.weight, std=0.15)
    return net.eval()


def _mixed_context(tree) -> WorkingContext:
    """1120 tokens: 32 LOD1 gists (the first collapsible to LOD2), LOD1 block 32, LOD0 blocks 33-34.
    Legality: L1:0 both ways; L1:1..32 expand only; L0:33 collapse only; L0:34 (newest) neither."""
    entries = [entry_for(tree, 1, b) for b in range(33)] + [entry_for(tree, 0, 33), entry_for(tree, 0, 34)]
    wc = WorkingContext(tree, w_max=128, recent_tokens=32, entries=entries)
    wc.check_invariants()
    return wc


def _scores(net, inputs) -> torch.Tensor:
    with torch.no_grad():
        return net(*collate([inputs]))[0]


def test_scores_in_range_and_illegal_directions_masked(lm):
    tree = _tree(lm, 35 * K)
    wc = _mixed_context(tree)
    inputs = entry_inputs(wc, lm.embed, tail_gists=2)
    masks = inputs[3]
    assert masks["can_expand"].tolist() == [True] * 33 + [False, False]
    assert masks["can_collapse"].tolist() == [True] + [False] * 32 + [True, False]
    clamped = 0
    for seed in range(4):
        net = _net(lm, seed)
        with torch.no_grad():
            raw = net.raw_scores(*collate([inputs]))[0]
        scores = _scores(net, inputs)
        assert scores.abs().max() <= 1
        assert (scores[~masks["can_expand"]] <= 0).all()
        assert (scores[~masks["can_collapse"]] >= 0).all()
        assert scores[34] == 0  # neither direction is legal for the newest block
        legal = masks["can_expand"] & masks["can_collapse"]
        torch.testing.assert_close(scores[legal], raw[legal])
        clamped += int((scores != raw).sum())
    assert clamped > 0  # the raw scores did point in illegal directions, and were masked

    raw = torch.tensor([[0.7, -0.7, 0.7, -0.7, 0.3]])
    m = {
        "entry": torch.tensor([[True, True, True, True, False]]),
        "can_expand": torch.tensor([[False, False, True, True, True]]),
        "can_collapse": torch.tensor([[True, True, False, False, True]]),
    }
    torch.testing.assert_close(mask_scores(raw, m), torch.tensor([[0.0, -0.7, 0.7, 0.0, 0.0]]))


def test_non_causal_a_later_entry_changes_an_earlier_score(lm):
    """The causal-LensNet trap: every entry sees every entry, so changing the *last* entry (or the tail)
    must change the *first* entry's score."""
    tree = _tree(lm, 35 * K)
    inputs = entry_inputs(_mixed_context(tree), lm.embed, tail_gists=2)
    net = _net(lm)
    with torch.no_grad():
        before = net.raw_scores(*collate([inputs]))[0]
        embeds = inputs[0].clone()
        embeds[-1] += torch.randn(embeds.shape[1], generator=torch.Generator().manual_seed(1))
        later_changed = net.raw_scores(*collate([(embeds, *inputs[1:])]))[0]
        tail = inputs[2] + torch.randn(inputs[2].shape, generator=torch.Generator().manual_seed(2))
        tail_changed = net.raw_scores(*collate([(inputs[0], inputs[1], tail, inputs[3])]))[0]
    assert (later_changed[0] - before[0]).abs() > 1e-4
    assert (tail_changed[0] - before[0]).abs() > 1e-4
    # ...and padding (a second, shorter context in the batch) changes nothing.
    short = entry_inputs(
        WorkingContext.initial(_tree(lm, 8 * K, seed=3), 96, recent_tokens=32), lm.embed, tail_gists=2
    )
    with torch.no_grad():
        padded = net.raw_scores(*collate([inputs, short]))
    torch.testing.assert_close(padded[0], before, rtol=1e-5, atol=1e-5)


def test_cannot_see_past_the_cursor(lm):
    """Tokens (and the gists they complete) ingested after the cursor, with the working context not
    synced, change nothing LensNet reads, and no entry it reads ends after the cursor."""
    tree = _tree(lm, 35 * K)
    # recent_tokens=0 keeps legality independent of the tree's cursor (with recent_tokens > 0 the newest
    # blocks legitimately become collapsible once newer tokens exist; the runtime syncs before scoring).
    wc = WorkingContext.initial(tree, w_max=128, recent_tokens=0)
    net = _net(lm)
    policy = LensNetPolicy(net, lm.embed)
    inputs = entry_inputs(wc, lm.embed, tail_gists=2)
    scores = policy.scores(wc, tree, step=0)
    n_gists = tree.num_nodes(1)

    tree.ingest(random_ids(200, seed=9))  # the future: 6 new blocks and their LOD1 gists
    assert tree.num_nodes(1) > n_gists
    after = entry_inputs(wc, lm.embed, tail_gists=2)
    for a, b in zip(inputs[:3], after[:3]):
        assert torch.equal(a, b)
    assert all(torch.equal(inputs[3][k], after[3][k]) for k in inputs[3])
    assert torch.equal(policy.scores(wc, tree, step=1), scores)
    assert policy.causality_violations == 0


def test_causality_violations_are_counted(lm):
    big = _tree(lm, 35 * K)
    small = _tree(lm, 32 * K)  # the same first 1024 tokens: its cursor is 1024
    wc = _mixed_context(big)
    assert M.causality_violations(wc.entries, big.cursor) == 0
    read = spans_read(wc, 2)
    expected = sum(1 for s in read if s.end > small.cursor)
    assert expected > 0
    assert M.causality_violations(read, small.cursor) == expected
    policy = LensNetPolicy(_net(lm), lm.embed)
    policy.scores(wc, big, step=0)
    assert policy.last_causality_violations == 0
    policy.scores(wc, small, step=1)  # a context reaching past the cursor it is scored against
    assert policy.last_causality_violations == expected
    assert policy.causality_violations == expected


def test_inputs_are_the_right_vectors(lm):
    tree = _tree(lm, 35 * K)
    wc = _mixed_context(tree)
    ages = torch.arange(len(wc.entries))
    embeds, features, tail, masks = entry_inputs(wc, lm.embed, ages=ages, tail_gists=3)
    assert embeds.shape == (35, lm.d_model) and features.shape == (35, 9) and tail.shape == (3, lm.d_model)
    torch.testing.assert_close(embeds[5], tree.gist(1, 5))
    torch.testing.assert_close(embeds[33], lm.embed(tree.tokens[33 * K : 34 * K].long()).mean(0))
    torch.testing.assert_close(tail, tree.gists(1, [32, 33, 34]))  # the newest complete blocks
    level = features[:, :3].argmax(1)
    assert level.tolist() == [1] * 33 + [0, 0]
    distance = features[:, 4]
    assert distance[-1] == 0 and (distance[:-1] > distance[1:]).all()  # older = further from the cursor
    assert (features[1:, 6] > features[:-1, 6]).all()  # age feature grows with age
    assert features[:, 7].bool().tolist() == masks["can_expand"].tolist()


def test_policy_reads_ages(lm):
    tree = _tree(lm, 35 * K)
    wc = _mixed_context(tree)
    young = LensNetPolicy(_net(lm), lm.embed, ages_fn=lambda wc: torch.zeros(len(wc.entries)))
    old = LensNetPolicy(_net(lm), lm.embed, ages_fn=lambda wc: torch.full((len(wc.entries),), 50))
    assert young.name == "lensnet"
    s_young, s_old = young.scores(wc, tree, 0), old.scores(wc, tree, 0)
    assert s_young.shape == (len(wc.entries),)
    assert not torch.allclose(s_young, s_old)


def test_save_load_roundtrip_is_exact_and_pickle_free(lm, tmp_path):
    tree = _tree(lm, 35 * K)
    inputs = entry_inputs(_mixed_context(tree), lm.embed, tail_gists=2)
    net = _net(lm)
    net.save_pretrained(tmp_path / "lensnet")
    assert sorted(p.name for p in (tmp_path / "lensnet").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = LensNet.from_pretrained(tmp_path / "lensnet")
    assert loaded.cfg == net.cfg and loaded.max_level == net.max_level
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(_scores(net, inputs), _scores(loaded, inputs))
