"""WorkingContext (mcx_core.model.working_context): SPEC §2 invariants and §5 legality under every action."""

import json

import pytest
import torch
from helpers import D, embed, mean_gist, random_tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mcx_core.model.tree import MegaContextTree
from mcx_core.model.working_context import (
    BudgetError,
    Entry,
    IllegalAction,
    InvariantViolation,
    WorkingContext,
    entry_for,
)


def make_tree(n_tokens: int, block_size: int = 32, max_level: int = 2, seed: int = 0) -> MegaContextTree:
    tree = MegaContextTree(D, embed, mean_gist, block_size=block_size, max_level=max_level)
    tree.ingest(random_tokens(n_tokens, seed))
    return tree


def assert_context_ok(wc: WorkingContext) -> None:
    """The invariants, checked independently of `check_invariants` (which must agree), plus assembly:
    every assembled row is the token embedding or tree gist of exactly the span its entry covers."""
    wc.check_invariants()
    tree, K = wc.tree, wc.tree.block_size
    assert wc.cost == min(wc.sink_tokens, tree.cursor) + sum(e.cost for e in wc.entries) <= wc.w_max
    covered = [t for e in wc.entries for t in range(e.start, e.end)]
    assert covered == list(range(tree.cursor))
    for e in wc.entries:
        node = tree.node(e.level, e.index)
        assert (node.start, node.end) == (e.start, e.end)
        if e.level > 0:
            assert e.start % K**e.level == 0 and e.end - e.start == K**e.level
            assert e.end <= tree.cursor - wc.recent_tokens  # the newest tokens stay LOD0

    embeds, positions, entry_of_position = wc.assemble(embed)
    assert positions.dtype == entry_of_position.dtype == torch.long
    rows, pos, owner = [torch.empty(0, D)], [], []
    s = min(wc.sink_tokens, tree.cursor)
    if s and not (wc.entries[0].level == 0 and wc.entries[0].start == 0):
        # the attention sink: the first raw tokens lead at positions 0.., outside the cover
        rows.append(embed(tree.tokens[:s].long()))
        pos += range(s)
        owner += [-1] * s
    for i, e in enumerate(wc.entries):
        if e.level == 0:
            rows.append(embed(tree.tokens[e.start : e.end].long()))
            pos += range(e.start, e.end)
        else:
            rows.append(tree.gist(e.level, e.index)[None])
            pos.append((e.start + e.end - 1) // 2)
        owner += [i] * e.cost
    assert torch.equal(embeds, torch.cat(rows))
    assert positions.tolist() == pos and entry_of_position.tolist() == owner


def mixed_context(w_max: int = 1000, tail: int = 10) -> WorkingContext:
    """3072 + `tail` tokens: L2 0-1, L1 64-93, LOD0 blocks 94.. (the newest 64 tokens among them)."""
    tree = make_tree(3072 + tail)
    entries = [entry_for(tree, 2, 0), entry_for(tree, 2, 1)]
    entries += [entry_for(tree, 1, i) for i in range(64, 94)]
    entries += [entry_for(tree, 0, b) for b in range(94, tree.num_nodes(0))]
    return WorkingContext(tree, w_max, recent_tokens=64, entries=entries)


# ---------------------------------------------------------------------------------------------- initial


@pytest.mark.parametrize("w_max", [128, 256])
@pytest.mark.parametrize("multiple", [4, 64])
def test_initial_fits_long_histories_with_full_coverage(w_max, multiple):
    tree = make_tree(multiple * w_max)
    wc = WorkingContext.initial(tree, w_max)
    assert_context_ok(wc)
    assert wc.cost > w_max - 31  # the most detailed that fits: one more expand would not
    assert not any(wc.can_expand(i) and wc.cost + wc.expand_cost(i) <= w_max for i in range(len(wc.entries)))
    levels = [e.level for e in wc.entries]
    assert levels == sorted(levels, reverse=True)  # oldest coarsest, newest LOD0
    counts = wc.level_counts()
    assert counts["LOD0"] >= 64 and counts["LOD1"] > 0
    assert (counts["LOD2"] > 0) == (multiple == 64)  # LOD2 only when LOD1 alone does not fit


@settings(max_examples=60, deadline=None)
@given(
    history=st.tuples(st.just((32, 2)), st.integers(0, 3000)) | st.tuples(st.just((4, 3)), st.integers(0, 400)),
    w_max=st.integers(1, 300),
    recent=st.sampled_from([0, 6, 40, 64]),
)
def test_initial_equals_greedy_forced_collapses(history, w_max, recent):
    (block_size, max_level), n_tokens = history
    tree = make_tree(n_tokens, block_size, max_level)
    greedy = WorkingContext(tree, w_max, recent)  # every block LOD0, possibly over budget
    try:
        greedy.collapse_to_fit()
    except BudgetError:
        with pytest.raises(BudgetError, match="cannot fit"):
            WorkingContext.initial(tree, w_max, recent)
        return
    wc = WorkingContext.initial(tree, w_max, recent)
    assert wc.entries == greedy.entries
    wc.check_invariants()


def test_initial_raises_when_even_the_coarsest_context_does_not_fit():
    tree = make_tree(64 * 1024)  # 64 LOD2 gists at best, plus the recent tokens
    with pytest.raises(BudgetError, match="cannot fit w_max=100"):
        WorkingContext.initial(tree, 100)
    assert WorkingContext.initial(tree, 200).cost <= 200


# ---------------------------------------------------------------------------------------------- assembly


@pytest.mark.parametrize("scheme", ["center", "compact"])
def test_the_sink_leads_every_context_and_is_counted_in_the_budget(scheme):
    tree = make_tree(1024)
    wc = WorkingContext.initial(tree, 128, recent_tokens=64, position_scheme=scheme, sink_tokens=4)
    plain = WorkingContext.initial(tree, 128, recent_tokens=64, position_scheme=scheme)
    assert wc.cost <= 128 and wc.sink_cost == 4 and wc.entries[0].level > 0  # block 0 is a gist: the sink leads
    assert plain.cost <= 128 and sum(e.cost for e in wc.entries) <= 128 - 4
    embeds, positions, owner = wc.assemble(embed)
    assert embeds.shape[0] == wc.cost  # every reserved position is used
    assert torch.equal(embeds[:4], embed(tree.tokens[:4].long())) and positions[:4].tolist() == [0, 1, 2, 3]
    assert owner[:4].tolist() == [-1] * 4 and (owner[4:] >= 0).all()
    if scheme == "compact":
        assert positions.tolist() == list(range(wc.cost))
    assert_context_ok(wc) if scheme == "center" else wc.check_invariants()
    # Coverage is over the entries: still every history token exactly once.
    assert [t for e in wc.entries for t in range(e.start, e.end)] == list(range(1024))


def test_the_sink_is_not_repeated_while_block_0_is_raw():
    tree = make_tree(100)  # fits uncompressed: block 0 is LOD0 and is its own sink
    wc = WorkingContext.initial(tree, 128, recent_tokens=64, sink_tokens=4)
    assert wc.entries[0] == entry_for(tree, 0, 0) and wc.cost == 4 + 100
    embeds, positions, _ = wc.assemble(embed)
    assert embeds.shape[0] == 100 and positions.tolist() == list(range(100))  # no token twice
    with pytest.raises(BudgetError, match="4 sink tokens"):
        WorkingContext.initial(make_tree(4096), 70, recent_tokens=64, sink_tokens=4)
    with pytest.raises(InvariantViolation, match="sink"):
        WorkingContext.initial(tree, 200, recent_tokens=64, sink_tokens=33).check_invariants()


def test_positions_center_and_compact():
    wc = mixed_context(w_max=200, tail=40)  # LOD0 blocks 94..97 = tokens [3008, 3112)
    assert_context_ok(wc)
    _, positions, entry_of_position = wc.assemble(embed)
    assert positions[:3].tolist() == [511, 1535, 2063]  # LOD2 [0,1024), LOD2 [1024,2048), LOD1 [2048,2080)
    assert torch.equal(positions[32:], torch.arange(3008, 3112))  # LOD0 keeps absolute positions
    assert torch.equal(entry_of_position[:32], torch.arange(32))
    assert entry_of_position[32:].tolist() == [32] * 32 + [33] * 32 + [34] * 32 + [35] * 8

    compact = WorkingContext(wc.tree, 200, 64, "compact", wc.entries)
    embeds_c, positions_c, eop_c = compact.assemble(embed)
    assert torch.equal(positions_c, torch.arange(compact.cost))
    embeds, _, _ = wc.assemble(embed)
    assert torch.equal(embeds_c, embeds) and torch.equal(eop_c, entry_of_position)
    with pytest.raises(ValueError, match="position_scheme"):
        WorkingContext(wc.tree, 200, 64, "start")


def test_gist_override_gets_the_right_indices_and_carries_gradients():
    wc = mixed_context(w_max=200)
    shift = torch.nn.Parameter(torch.zeros(D))
    calls = {}

    def override(level, indices):
        calls[level] = indices.tolist()
        return wc.tree.gists(level, indices) + shift  # [n, D] with grad

    embeds, _, entry_of_position = wc.assemble(embed, gist_override=override)
    assert calls == {1: list(range(64, 94)), 2: [0, 1]}
    assert torch.equal(embeds.detach(), wc.assemble(embed)[0])
    embeds.sum().backward()
    assert torch.equal(shift.grad, torch.full((D,), 32.0))  # one row per gist entry reaches it


def test_assemble_refuses_a_broken_context():
    wc = mixed_context()
    wc.entries[2], wc.entries[3] = wc.entries[3], wc.entries[2]
    with pytest.raises(InvariantViolation):
        wc.assemble(embed)


# ---------------------------------------------------------------------------------------------- actions


def test_expand_then_collapse_restores_the_context():
    wc = mixed_context(w_max=200)
    original, cost = list(wc.entries), wc.cost

    assert wc.can_expand(0) and wc.expand_cost(0) == 31
    children = wc.expand(0)  # LOD2 -> 32 LOD1 gists
    assert [(c.level, c.index) for c in children] == [(1, i) for i in range(32)]
    assert wc.entries[:32] == children and wc.cost == cost + 31
    assert_context_ok(wc)
    assert wc.can_collapse(0) and wc.collapse_saving(0) == 31
    assert wc.collapse(0) == original[0]
    assert wc.entries == original

    i = 2  # LOD1 64 -> its LOD0 block
    assert wc.expand(i) == [Entry(0, 64, 2048, 2080, 32)]
    assert_context_ok(wc)
    assert wc.collapse(i) == original[i] and wc.entries == original


def test_illegal_actions_raise_and_change_nothing():
    wc = mixed_context(w_max=200)  # entries: 0-1 LOD2, 2-31 LOD1 64..93, 32-34 LOD0 blocks 94..96
    original = list(wc.entries)
    cases = [
        ("expand", 33, "LOD0"),  # LOD0 cannot expand
        ("collapse", 0, "top level"),  # the top level cannot collapse
        ("collapse", 32, "newest 64"),  # a recent block stays LOD0
        ("collapse", 34, "partial tail"),  # the partial tail is never gisted
        ("collapse", 3, "aligned"),  # LOD1 65: not the first of its siblings
        ("collapse", 2, "aligned"),  # LOD1 64: only 30 of its 32 siblings are gists (94, 95 are LOD0)
        ("expand", 35, "no entry"),
        ("collapse", -1, "no entry"),
    ]
    for action, i, reason in cases:
        assert not getattr(wc, f"can_{action}")(i)
        with pytest.raises(IllegalAction, match=reason):
            getattr(wc, action)(i)
        with pytest.raises(IllegalAction):
            (wc.expand_cost if action == "expand" else wc.collapse_saving)(i)
        assert wc.entries == original

    tight = WorkingContext(wc.tree, wc.cost + 30, 64, entries=original)
    assert tight.can_expand(0)
    with pytest.raises(BudgetError, match="w_max"):
        tight.expand(0)  # legal, but 31 more would break the budget
    assert tight.entries == original


def test_collapse_needs_every_sibling_at_the_same_level():
    tree = make_tree(2048 + 64)
    entries = [entry_for(tree, 1, i) for i in range(64)] + [entry_for(tree, 0, b) for b in (64, 65)]
    wc = WorkingContext(tree, 300, 64, entries=entries)
    assert wc.can_collapse(0) and wc.can_collapse(32)
    wc.expand(40)  # LOD1 40 -> LOD0 block: group 32..63 is no longer complete
    assert wc.can_collapse(0) and not wc.can_collapse(32)
    assert wc.can_collapse(40)  # the expanded block itself can collapse back
    wc.collapse(40)
    assert wc.collapse(32) == Entry(2, 1, 1024, 2048, 1)
    assert_context_ok(wc)


# ---------------------------------------------------------------------------------------------- invariants


def _replace(entries, i, new):
    return entries[:i] + new + entries[i + 1 :]


BROKEN = {
    # the misaligned-gist pitfall: an LOD2 gist placed at a span it does not summarise
    "wrong node at a span": (lambda t, es: _replace(es, 1, [Entry(2, 0, 1024, 2048, 1)]), "alignment"),
    "gist off a boundary": (
        lambda t, es: [entry_for(t, 1, 0), Entry(2, 0, 32, 1056, 1)] + [entry_for(t, 1, i) for i in range(33, 64)]
        + es[2:],
        "alignment",
    ),
    "LOD0 entry not a block": (lambda t, es: es[:32] + [Entry(0, 94, 3008, 3072, 64)] + es[34:], "not the span"),
    "gap": (lambda t, es: es[:5] + es[6:], "coverage"),
    "out of order": (lambda t, es: es[:2] + [es[3], es[2]] + es[4:], "coverage"),
    "stops before the cursor": (lambda t, es: es[:-1], "cursor"),
    "empty": (lambda t, es: [], "cursor"),
    "gist among the newest tokens": (lambda t, es: _replace(es, 32, [entry_for(t, 1, 94)]), "legality"),
    "gist of the partial tail": (lambda t, es: _replace(es, 34, [Entry(1, 96, 3072, 3104, 1)]), "not in the tree"),
    "wrong cost": (lambda t, es: _replace(es, 33, [Entry(0, 95, 3040, 3072, 1)]), "cost"),
    "level above max_level": (lambda t, es: _replace(es, 0, [Entry(3, 0, 0, 1024, 1)]), "level 3"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_check_invariants_catches(case):
    wc = mixed_context()
    wc.check_invariants()  # the unbroken context passes
    build, message = BROKEN[case]
    broken = WorkingContext(wc.tree, wc.w_max, 64, entries=build(wc.tree, wc.entries))
    with pytest.raises(InvariantViolation, match=message):
        broken.check_invariants()


def test_check_invariants_catches_a_budget_overrun():
    wc = mixed_context()
    over = WorkingContext(wc.tree, wc.cost - 1, 64, entries=wc.entries)
    with pytest.raises(InvariantViolation, match="budget"):
        over.check_invariants()


# ---------------------------------------------------------------------------------------------- streaming


def test_streaming_history_of_many_budgets_keeps_every_invariant():
    # W_max 256 so that 64 x W_max tokens fit at any cursor: the coarsest legal context can cost up to
    # 95 (newest 64 tokens over 3 blocks) + 31 (LOD1 remainder) + history / 1024 (LOD2).
    tree = make_tree(0)
    wc = WorkingContext(tree, 256)
    stream = random_tokens(64 * 256)
    sizes = torch.randint(1, 200, (1000,), generator=torch.Generator().manual_seed(1)).tolist()
    pos, overran, step = 0, 0, 0
    while pos < len(stream):
        n = sizes[step]
        tree.ingest(stream[pos : pos + n])
        pos, step = pos + n, step + 1
        wc.sync()
        assert wc.entries[-1].end == tree.cursor  # covered at once, as LOD0
        overran += wc.cost > wc.w_max  # sync alone does not enforce the budget...
        wc.collapse_to_fit()  # ...the forced collapses do, without dropping history
        wc.check_invariants()
    assert overran > 0 and wc.level_counts()["LOD2"] > 0
    assert_context_ok(wc)


def test_sync_grows_the_partial_tail_in_place():
    tree = make_tree(70)
    wc = WorkingContext(tree, 500)
    assert wc.entries[-1] == Entry(0, 2, 64, 70, 6)
    tree.ingest(random_tokens(5, seed=1))
    wc.sync()
    assert wc.entries[-1] == Entry(0, 2, 64, 75, 11) and len(wc.entries) == 3
    tree.ingest(random_tokens(30, seed=2))
    wc.sync()
    assert wc.entries[-2:] == [Entry(0, 2, 64, 96, 32), Entry(0, 3, 96, 105, 9)]
    assert_context_ok(wc)


def test_collapse_to_fit_raises_when_nothing_is_left_to_collapse():
    tree = make_tree(400, block_size=4, max_level=1)  # at best 98 LOD1 gists + 8 recent tokens
    wc = WorkingContext(tree, 50, recent_tokens=8)
    with pytest.raises(BudgetError, match="nothing left to collapse"):
        wc.collapse_to_fit()


def test_trace_round_trip():
    wc = mixed_context(w_max=200)
    data = json.loads(json.dumps(wc.to_dict()))
    assert data["level_counts"] == {"LOD0": 74, "LOD1": 30, "LOD2": 2} and data["cost"] == 106
    back = WorkingContext.from_dict(data, wc.tree)
    assert back.entries == wc.entries
    assert (back.w_max, back.recent_tokens, back.position_scheme) == (200, 64, "center")
    assert back.utilization == pytest.approx(106 / 200)


# ---------------------------------------------------------------------------------------------- stateful


class WorkingContextMachine(RuleBasedStateMachine):
    """Random ingest / expand / collapse sequences: every invariant holds after every single action."""

    BLOCK, MAX_LEVEL, W_MAX, RECENT, MAX_TOKENS, MAX_INGEST = 4, 3, 40, 8, 600, 40
    SINK = 0

    def __init__(self):
        super().__init__()
        self.tree = MegaContextTree(D, embed, mean_gist, block_size=self.BLOCK, max_level=self.MAX_LEVEL)
        self.wc = WorkingContext(self.tree, self.W_MAX, self.RECENT, sink_tokens=self.SINK)

    def _draw(self, data, ok) -> int | None:
        """An entry index drawn from those where `ok(i)`; None where there is none."""
        legal = [i for i in range(len(self.wc.entries)) if ok(i)]
        return data.draw(st.sampled_from(legal)) if legal else None

    @precondition(lambda self: self.tree.cursor < self.MAX_TOKENS)
    @rule(size=st.integers(1, 40), seed=st.integers(0, 2**16))
    def ingest(self, size, seed):
        self.tree.ingest(random_tokens(max(1, size * self.MAX_INGEST // 40), seed))
        self.wc.sync()
        self.wc.collapse_to_fit()  # the histories here always fit: this must never raise

    @rule(data=st.data())
    def expand(self, data):
        wc = self.wc
        if (i := self._draw(data, wc.can_expand)) is None:
            return
        before, entry = list(wc.entries), wc.entries[i]
        extra = wc.expand_cost(i)
        if wc.cost + extra > wc.w_max:
            with pytest.raises(BudgetError):
                wc.expand(i)
            assert wc.entries == before
            return
        children = wc.expand(i)
        assert sum(e.cost for e in wc.entries) == sum(e.cost for e in before) + extra == wc.cost - wc.sink_cost
        assert all(c.level == entry.level - 1 for c in children)
        assert (children[0].start, children[-1].end) == (entry.start, entry.end)
        assert wc.cost <= wc.w_max

    @rule(data=st.data())
    def collapse(self, data):
        wc = self.wc
        if (i := self._draw(data, wc.can_collapse)) is None:
            return
        before = wc.cost
        saving = wc.collapse_saving(i)
        first = wc.entries[i]
        parent = wc.collapse(i)
        assert wc.cost == before - saving and parent.level == first.level + 1 and parent.start == first.start
        assert parent.start % self.BLOCK**parent.level == 0

    @rule(data=st.data())
    def swap(self, data):
        """An allocator-like step: a collapse makes room, then an expand that fits uses it."""
        wc = self.wc
        if (i := self._draw(data, wc.can_collapse)) is not None:
            wc.collapse(i)
            assert wc.cost <= wc.w_max

        def fits(i):
            return wc.can_expand(i) and wc.cost + wc.expand_cost(i) <= wc.w_max

        if (i := self._draw(data, fits)) is not None:
            wc.expand(i)
            assert wc.cost <= wc.w_max

    @rule(data=st.data())
    def illegal(self, data):
        wc = self.wc
        before = list(wc.entries)
        i = data.draw(st.integers(-1, len(wc.entries)))
        if not wc.can_expand(i):
            with pytest.raises(IllegalAction):
                wc.expand(i)
        if not wc.can_collapse(i):
            with pytest.raises(IllegalAction):
                wc.collapse(i)
        assert wc.entries == before

    @invariant()
    def invariants_hold(self):
        assert_context_ok(self.wc)


class WorkingContextMachineK32(WorkingContextMachine):
    BLOCK, MAX_LEVEL, W_MAX, RECENT, MAX_TOKENS, MAX_INGEST = 32, 2, 160, 64, 5000, 400


class WorkingContextMachineSink(WorkingContextMachine):
    SINK = 2


class WorkingContextMachineK32Sink(WorkingContextMachineK32):
    SINK = 4


TestWorkingContextMachine = WorkingContextMachine.TestCase
TestWorkingContextMachine.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestWorkingContextMachineK32 = WorkingContextMachineK32.TestCase
TestWorkingContextMachineK32.settings = settings(max_examples=25, stateful_step_count=40, deadline=None)
TestWorkingContextMachineSink = WorkingContextMachineSink.TestCase
TestWorkingContextMachineSink.settings = settings(max_examples=25, stateful_step_count=40, deadline=None)
TestWorkingContextMachineK32Sink = WorkingContextMachineK32Sink.TestCase
TestWorkingContextMachineK32Sink.settings = settings(max_examples=15, stateful_step_count=40, deadline=None)
