"""FocusAllocator (SPEC §5): a hard budget after every action, legality, n_diff, cooldown, minimum
residency, no oscillation under constant scores, forced collapses instead of truncation, determinism."""

import itertools
from collections import defaultdict

import pytest
import torch
from helpers import D, embed, mean_gist, random_tokens
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mcx_core.config import AllocatorConfig
from mcx_core.focus.allocator import Action, FocusAllocator, StepStats
from mcx_core.model.tree import MegaContextTree
from mcx_core.model.working_context import BudgetError, Entry, WorkingContext, entry_for

K = 32


def make_tree(n: int, seed: int = 0) -> MegaContextTree:
    tree = MegaContextTree(D, embed, mean_gist, block_size=K, max_level=2)
    tree.ingest(random_tokens(n, seed))
    return tree


def assert_full_coverage(wc: WorkingContext) -> None:
    """Every token of the history covered exactly once, nothing dropped, within budget."""
    wc.check_invariants()
    assert wc.cost <= wc.w_max
    assert [t for e in wc.entries for t in range(e.start, e.end)] == list(range(wc.tree.cursor))


class Ledger:
    """An independent record of when each entry got its level and what created it, to check the
    allocator's stability rules from its actions alone."""

    def __init__(self, cfg: AllocatorConfig):
        self.cfg = cfg
        self.born: dict[tuple[int, int], int] = {}
        self.made: dict[tuple[int, int], str] = {}
        self.placed: set[tuple[int, int]] = set()  # made by a deliberate (not age-out) action
        self.events: dict[tuple[int, int], list[tuple[int, str]]] = defaultdict(
            list
        )  # span -> [(step, kind)]

    def see(self, wc: WorkingContext, t: int) -> None:
        for e in wc.entries:
            self.born.setdefault((e.level, e.index), t)

    @staticmethod
    def replaced(a: Action) -> list[tuple[int, int]]:
        if a.kind == "expand" or a.level == 0:
            return [(a.level, a.index)]
        return [(a.level, a.index + j) for j in range(K)]

    @staticmethod
    def created(a: Action) -> list[tuple[int, int]]:
        if a.kind == "collapse":
            return [(a.level + 1, a.index if a.level == 0 else a.index // K)]
        if a.level == 1:
            return [(0, a.index)]
        return [(a.level - 1, a.index * K + j) for j in range(K)]

    def record(self, stats: StepStats, t: int) -> None:
        assert sum(not a.forced for a in stats.actions) <= self.cfg.n_diff
        for a in stats.actions:
            keys = self.replaced(a)
            ages = [t - self.born[k] for k in keys]
            placed = [age for k, age in zip(keys, ages) if k in self.placed]
            # SPEC §7: residency only for spans a deliberate action placed; age-outs counted apart
            assert a.residency == (min(placed) if placed else None)
            assert (a.cause == "age_out") == (a.forced and not placed), a
            assert a.forced == (a.cause in ("forced", "age_out"))
            if not a.forced:
                undo = "collapse" if a.kind == "expand" else "expand"
                for k, age in zip(keys, ages):
                    assert age >= self.cfg.min_residency, f"{a} at step {t}: residency {age}"
                    assert not (self.made.get(k) == undo and age < self.cfg.cooldown_steps), f"{a}: cooldown"
                    assert not (age == 0 and k in self.made), f"{a}: acted on something made this step"
            for k in keys:
                self.born.pop(k)
                self.made.pop(k, None)
                self.placed.discard(k)
            for k in self.created(a):
                self.born[k] = t
                self.made[k] = a.kind
                if a.cause != "age_out":
                    self.placed.add(k)
            self.events[(a.start, a.end)].append((t, a.kind))


def check_cost_trail(stats: StepStats, w_max: int, final_cost: int) -> None:
    """The budget holds after every voluntary action; forced collapses only lower the cost."""
    forced = [c for a, c in zip(stats.actions, stats.cost_trail) if a.forced]
    voluntary = [c for a, c in zip(stats.actions, stats.cost_trail) if not a.forced]
    assert len(stats.cost_trail) == len(stats.actions)
    assert forced == sorted(forced, reverse=True) and all(c < stats.cost_before for c in forced)
    assert all(c <= w_max for c in voluntary)
    assert (stats.cost_trail[-1] if stats.cost_trail else stats.cost_before) == final_cost


def oscillations(ledger: Ledger) -> list:
    """Spans that were expanded, then collapsed, then expanded again."""
    out = []
    for span, events in ledger.events.items():
        kinds = [k for _, k in events]
        for i in range(len(kinds) - 2):
            if kinds[i : i + 3] == ["expand", "collapse", "expand"]:
                out.append((span, events))
    return out


# ---------------------------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_tokens=st.integers(40, 2300),
    w_max=st.integers(70, 300),
    recent=st.sampled_from([0, 32, 64]),
    n_diff=st.integers(1, 6),
    cooldown=st.integers(0, 3),
    residency=st.integers(0, 4),
    tau=st.floats(0.0, 0.6),
    growth=st.lists(st.integers(0, 80), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_random_scores_never_break_budget_or_invariants(
    n_tokens, w_max, recent, n_diff, cooldown, residency, tau, growth, seed
):
    tree = make_tree(n_tokens, seed)
    try:
        wc = WorkingContext.initial(tree, w_max, recent_tokens=recent)
    except BudgetError:
        assume(False)
    cfg = AllocatorConfig(
        tau_expand=tau, tau_collapse=tau, n_diff=n_diff, cooldown_steps=cooldown, min_residency=residency
    )
    alloc, ledger = FocusAllocator(cfg, w_max), Ledger(cfg)
    gen = torch.Generator().manual_seed(seed)
    for t, extra in enumerate(growth):
        tree.ingest(random_tokens(extra, seed + t + 1))
        wc.sync()
        ledger.see(wc, t)
        scores = torch.rand(len(wc.entries), generator=gen) * 2 - 1
        try:
            stats = alloc.step(wc, scores)
        except BudgetError:
            # Only when no legal context fits at all: the plain oldest-first fit fails too.
            with pytest.raises(BudgetError):
                WorkingContext(tree, w_max, recent_tokens=recent).collapse_to_fit()
            return
        assert_full_coverage(wc)
        check_cost_trail(stats, w_max, wc.cost)
        ledger.record(stats, t)
        assert stats.num_forced == 0 or stats.cost_before > w_max


def test_same_inputs_same_actions():
    def run():
        tree = make_tree(1500, seed=3)
        wc = WorkingContext.initial(tree, 160, recent_tokens=64)
        alloc = FocusAllocator(AllocatorConfig(min_residency=1, cooldown_steps=1), 160)
        gen = torch.Generator().manual_seed(9)
        out = []
        for t in range(12):
            tree.ingest(random_tokens(20, t))
            wc.sync()
            out.append(alloc.step(wc, torch.rand(len(wc.entries), generator=gen) * 2 - 1).to_dict())
        return out, list(wc.entries)

    assert run() == run()


# ---------------------------------------------------------------------------------------------- selection


def _gist_context(
    n_blocks: int, w_max: int | None = None, lod0: frozenset[int] = frozenset()
) -> WorkingContext:
    """Blocks as LOD1 gists except `lod0` and the newest two (recent_tokens = 64); w_max None = full."""
    tree = make_tree(n_blocks * K)
    keep = set(lod0) | {n_blocks - 2, n_blocks - 1}
    entries = [entry_for(tree, 0 if b in keep else 1, b) for b in range(n_blocks)]
    wc = WorkingContext(tree, 0, recent_tokens=64, entries=entries)
    wc.w_max = wc.cost if w_max is None else w_max
    wc.check_invariants()
    return wc


def _settled(cfg: AllocatorConfig, wc: WorkingContext) -> FocusAllocator:
    """An allocator that has watched `wc` long enough for every entry to pass min_residency."""
    alloc = FocusAllocator(cfg, wc.w_max)
    for _ in range(cfg.min_residency):
        alloc.step(wc, torch.zeros(len(wc.entries)))
    return alloc


def test_thresholds_and_n_diff():
    cfg = AllocatorConfig(n_diff=2, min_residency=0, cooldown_steps=0)
    wc = _gist_context(12, w_max=400)
    alloc = FocusAllocator(cfg, 400)
    alloc.step(wc, torch.zeros(len(wc.entries)))
    inside = torch.full((len(wc.entries),), 0.19)  # below tau_expand = 0.2: nothing moves
    assert alloc.step(wc, inside).actions == []
    scores = torch.tensor([0.3, 0.9, 0.5, 0.9] + [0.25] * (len(wc.entries) - 4))
    stats = alloc.step(wc, scores)
    assert [(a.kind, a.index) for a in stats.actions] == [("expand", 3), ("expand", 1)]  # ties: nearer first
    assert_full_coverage(wc)


def test_expand_is_paid_for_by_a_collapse_first():
    """SPEC §5.3: under a full budget an expand is a swap, paid for by a collapse made before it."""
    cfg = AllocatorConfig(min_residency=0, cooldown_steps=0, swap_margin=0.2)
    wc = _gist_context(12, lod0=frozenset({3}))  # full: any expand needs a collapse first
    alloc = FocusAllocator(cfg, wc.w_max)
    alloc.step(wc, torch.zeros(len(wc.entries)))
    scores = torch.zeros(len(wc.entries))
    scores[7] = 0.9  # expand L1:7
    scores[3] = -0.1  # L0:3 is the only legal collapse; above -tau, but far enough below 0.9 to pay
    stats = alloc.step(wc, scores)
    assert [(a.kind, a.level, a.index, a.cause) for a in stats.actions] == [
        ("collapse", 0, 3, "swap"), ("expand", 1, 7, "swap")]
    assert stats.num_swaps == 1 and stats.num_forced == 0
    check_cost_trail(stats, wc.w_max, wc.cost)
    assert_full_coverage(wc)

    # The payment cannot exceed n_diff.
    wc2 = _gist_context(12, lod0=frozenset({3}))
    alloc2 = FocusAllocator(cfg.model_copy(update={"n_diff": 1}), wc2.w_max)
    alloc2.step(wc2, torch.zeros(len(wc2.entries)))
    stats = alloc2.step(wc2, scores)
    assert stats.actions == [] and stats.skipped_budget == 1
    # No opinion (0) or a mild wish for detail (0.1) still pays, the gap to 0.9 exceeds the margin ...
    for payer in (0.0, 0.1):
        scores[3] = payer
        wc3 = _gist_context(12, lod0=frozenset({3}))
        stats = FocusAllocator(cfg, wc3.w_max).step(wc3, scores)
        assert [(a.kind, a.index) for a in stats.actions] == [("collapse", 3), ("expand", 7)]
    # ... but not within the hysteresis margin, nor a span that itself wants detail (> tau_expand).
    for payer, margin in ((0.75, 0.2), (0.0, 0.95), (0.3, 0.2)):
        scores[3] = payer
        wc3 = _gist_context(12, lod0=frozenset({3}))
        stats = FocusAllocator(cfg.model_copy(update={"swap_margin": margin}), wc3.w_max).step(wc3, scores)
        assert stats.actions == [] and stats.skipped_budget == 1, (payer, margin)


def test_swaps_under_a_full_budget_keep_every_invariant():
    """Random scores on a full context over a long, growing history: every step's expands are swaps (or
    forced collapses made room), and the budget and every invariant hold after each action."""
    cfg = AllocatorConfig(min_residency=1, cooldown_steps=1, n_diff=4, swap_margin=0.1)
    tree = make_tree(2048)
    wc = WorkingContext.initial(tree, 256, 64, sink_tokens=3)
    alloc, ledger = FocusAllocator(cfg, wc.w_max), Ledger(cfg)
    gen = torch.Generator().manual_seed(0)
    swaps = 0
    for t in range(40):
        tree.ingest(random_tokens(32, 100 + t))
        wc.sync()
        ledger.see(wc, t)
        stats = alloc.step(wc, torch.rand(len(wc.entries), generator=gen) * 2 - 1)
        ledger.record(stats, t)
        check_cost_trail(stats, wc.w_max, wc.cost)
        assert_full_coverage(wc)
        swaps += stats.num_swaps
        for a in stats.actions:
            if a.kind == "expand" and a.cause == "swap":
                assert any(b.cause == "swap" and b.kind == "collapse" for b in stats.actions)
    assert swaps > 0


@pytest.mark.parametrize("residency,cooldown", [(3, 2), (0, 2), (2, 0), (0, 0), (4, 4)])
def test_cooldown_and_residency_bound_how_often_a_span_moves(residency, cooldown):
    """Contradictory scores (every gist wants detail, every block wants to be a gist) would flip the
    same spans every step; residency and cooldown space the flips out."""
    cfg = AllocatorConfig(min_residency=residency, cooldown_steps=cooldown, n_diff=3)
    wc = _gist_context(16, w_max=16 * K)
    alloc, ledger = FocusAllocator(cfg, wc.w_max), Ledger(cfg)
    for t in range(16):
        ledger.see(wc, t)
        scores = torch.tensor([0.9 if e.level > 0 else -0.9 for e in wc.entries])
        stats = alloc.step(wc, scores)
        ledger.record(stats, t)
        assert_full_coverage(wc)
    gaps = [b[0] - a[0] for events in ledger.events.values() for a, b in itertools.pairwise(events)]
    assert gaps, "the scores should make spans move"
    assert min(gaps) >= max(residency, cooldown, 1)
    assert min(gaps) == max(residency, cooldown, 1)  # and no slower than the rules require


# ---------------------------------------------------------------------------------------------- stability


def _run_fixed_scores(score_fn, n_tokens: int, w_max: int, steps: int, stream: int = 0) -> Ledger:
    """Runtime-style steps (ingest, fit, score, step) with scores that depend only on each entry."""
    cfg = AllocatorConfig()
    tree = make_tree(n_tokens)
    wc = WorkingContext.initial(tree, w_max, recent_tokens=64)
    alloc, ledger = FocusAllocator(cfg, w_max), Ledger(cfg)
    for t in range(steps):
        tree.ingest(random_tokens(stream, t + 100))
        wc.sync()
        ledger.see(wc, t)
        fitted = alloc.fit(wc)
        stats = alloc.step(wc, torch.tensor([score_fn(e) for e in wc.entries]))
        assert stats is fitted
        ledger.record(stats, t)
        assert_full_coverage(wc)
    return ledger


@pytest.mark.parametrize("stream", [0, 32])
@pytest.mark.parametrize("c", [-0.9, -0.3, 0.0, 0.3, 0.9])
def test_constant_scores_cause_no_oscillation(c, stream):
    ledger = _run_fixed_scores(lambda e: c, 1200, 160, 24, stream)
    assert oscillations(ledger) == []
    if c < -0.2:  # everything wants to be coarser: collapses happen, expands never
        kinds = {k for events in ledger.events.values() for _, k in events}
        assert kinds == {"collapse"}


@pytest.mark.parametrize("stream", [0, 32])
def test_consistent_focus_field_causes_no_oscillation(stream):
    """Detail wanted on one region of the history, coarseness everywhere else: spans move once."""

    def field(e: Entry) -> float:
        return 0.8 if e.start < 480 and e.end > 320 else -0.8

    ledger = _run_fixed_scores(field, 1200, 200, 30, stream)
    kinds = [k for events in ledger.events.values() for _, k in events]
    assert "expand" in kinds and "collapse" in kinds
    assert oscillations(ledger) == []


def test_forced_collapses_protect_what_was_expanded():
    """After an expand, the budget's forced collapses take the newest blocks leaving the recent window,
    not the deliberately expanded span, even when the policy no longer scores it (all scores 0)."""
    cfg = AllocatorConfig(min_residency=0, cooldown_steps=0)
    tree = make_tree(20 * K)
    wc = WorkingContext.initial(tree, 140, recent_tokens=64)
    alloc = FocusAllocator(cfg, 140)
    alloc.step(wc, torch.zeros(len(wc.entries)))
    scores = torch.full((len(wc.entries),), -0.05)  # anything may pay for the expand
    target = next(i for i, e in enumerate(wc.entries) if e.level == 1 and e.index == 4)
    scores[target] = 0.9
    stats = alloc.step(wc, scores)
    assert ("expand", 1, 4) in [(a.kind, a.level, a.index) for a in stats.actions]
    for t in range(6):
        tree.ingest(random_tokens(K, t))
        wc.sync()
        stats = alloc.fit(wc)
        alloc.step(wc, torch.zeros(len(wc.entries)))
        assert stats.num_forced >= 1
        assert entry_for(tree, 0, 4) in wc.entries
        assert_full_coverage(wc)


# ---------------------------------------------------------------------------------------------- budget


def test_history_outgrowing_the_budget_forces_collapses_never_truncation():
    w_max = 128
    tree = MegaContextTree(D, embed, mean_gist, block_size=K, max_level=2)
    wc = WorkingContext(tree, w_max, recent_tokens=64)
    alloc = FocusAllocator(AllocatorConfig(), w_max)
    forced = 0
    for t in range(4 * w_max // 16):  # 4 x W_max tokens, 16 at a time (partial tail blocks included)
        tree.ingest(random_tokens(16, t))
        wc.sync()
        stats = alloc.step(wc, torch.zeros(len(wc.entries)))
        forced += stats.num_forced
        assert_full_coverage(wc)
        assert wc.entries[0].start == 0 and wc.entries[-1].end == tree.cursor == 16 * (t + 1)
        assert all(a.kind == "collapse" and a.forced for a in stats.actions)
    assert forced >= (4 * w_max - w_max) // (K - 1)
    assert wc.cost > 0.75 * w_max  # the budget is used, not emptied


def test_budget_that_cannot_hold_the_recent_tokens_raises():
    tree = make_tree(200)
    wc = WorkingContext(tree, 80, recent_tokens=96)
    with pytest.raises(BudgetError):
        FocusAllocator(AllocatorConfig(), 80).step(wc, torch.zeros(len(wc.entries)))


def test_scores_must_match_entries():
    wc = _gist_context(6, w_max=400)
    alloc = FocusAllocator(AllocatorConfig(), 400)
    with pytest.raises(ValueError, match="scores"):
        alloc.step(wc, torch.zeros(len(wc.entries) + 1))
    with pytest.raises(ValueError, match="w_max"):
        FocusAllocator(AllocatorConfig(), 300).step(wc, torch.zeros(len(wc.entries)))


def test_ages_count_steps_at_the_current_level():
    cfg = AllocatorConfig(min_residency=0, cooldown_steps=0)
    wc = _gist_context(8, w_max=400)
    alloc = FocusAllocator(cfg, 400)
    for _ in range(3):
        alloc.step(wc, torch.zeros(len(wc.entries)))
    assert alloc.ages(wc).tolist() == [3] * len(wc.entries)
    scores = torch.zeros(len(wc.entries))
    scores[2] = 0.9
    alloc.step(wc, scores)
    ages = alloc.ages(wc).tolist()
    assert wc.entries[2] == entry_for(wc.tree, 0, 2) and ages[2] == 1 and ages[0] == 4


def test_residency_counts_only_spans_an_action_placed_and_age_outs_apart():
    """A scripted trajectory (SPEC §7): blocks gisted as they leave the recent window are age-out
    collapses, not residency samples; a span an expand put in detail and collapsed again 4 steps later
    is one residency sample of 4."""
    cfg = AllocatorConfig(min_residency=2, cooldown_steps=2, n_diff=4, swap_margin=0.2)
    tree = make_tree(12 * K)
    wc = WorkingContext.initial(tree, 8 + 4 * K, 64)  # 8 gists + 4 raw blocks: 2 outside the recent window
    alloc = FocusAllocator(cfg, wc.w_max)
    causes, residencies = [], []

    def step(scores=None):
        tree.ingest(random_tokens(K, len(causes)))
        wc.sync()
        stats = alloc.step(wc, torch.zeros(len(wc.entries)) if scores is None else scores(wc))
        causes.append([(a.kind, a.cause) for a in stats.actions])
        residencies.extend(stats.residencies)
        assert_full_coverage(wc)
        return stats

    for _ in range(3):  # recency: only the budget acts, every collapse an age-out
        stats = step()
        assert stats.num_collapses >= 1 and stats.num_age_outs == stats.num_collapses
        assert stats.residencies == []
    oldest_gist = next(i for i, e in enumerate(wc.entries) if e.level == 1)
    target = wc.entries[oldest_gist]

    def want_detail(wc):
        s = torch.zeros(len(wc.entries))
        s[wc.entries.index(target)] = 0.9
        return s

    stats = step(want_detail)  # the age-out, then a swap: the expand paid by collapsing a raw block
    kinds = [(a.kind, a.cause) for a in stats.actions]
    assert ("expand", "swap") in kinds and ("collapse", "swap") in kinds
    assert stats.residencies == []  # neither the gist nor the paying block had been placed by an action
    placed_start = target.start
    for _ in range(3):
        step()  # the expanded block stays (forced collapses take the lowest-scoring, unfocused spans)
    assert any(e.level == 0 and e.start == placed_start for e in wc.entries)

    def collapse_it(wc):
        s = torch.zeros(len(wc.entries))
        s[next(i for i, e in enumerate(wc.entries) if e.level == 0 and e.start == placed_start)] = -0.9
        return s

    stats = step(collapse_it)
    mine = [a for a in stats.actions if a.kind == "collapse" and a.start == placed_start]
    # (the budget takes it first, at the lowest score: a forced collapse of a placed span is a sample)
    assert len(mine) == 1 and mine[0].cause in ("voluntary", "forced") and mine[0].residency == 4
    assert residencies == [4]  # the only residency sample of the run
    assert sum(c == ("collapse", "age_out") for cs in causes for c in cs) >= 7


def test_settle_lets_a_prefilled_context_act_at_once():
    """A prefilled history's initial context was never acted on: after `settle`, minimum residency does
    not hold its entries (without it every entry is age 0 and blocked for min_residency steps)."""
    cfg = AllocatorConfig(min_residency=3, cooldown_steps=2)
    scores_for = lambda wc: torch.tensor([0.9 if e.level == 1 else -0.5 for e in wc.entries])
    fresh_wc, settled_wc = _gist_context(12, lod0=frozenset({3})), _gist_context(12, lod0=frozenset({3}))
    fresh, settled = FocusAllocator(cfg, fresh_wc.w_max), FocusAllocator(cfg, settled_wc.w_max)
    settled.settle(settled_wc)
    assert fresh.step(fresh_wc, scores_for(fresh_wc)).actions == []
    stats = settled.step(settled_wc, scores_for(settled_wc))
    assert [a.kind for a in stats.actions][-1] == "expand" and stats.num_swaps == 1
    assert_full_coverage(settled_wc)
    assert settled.ages(settled_wc).max() == cfg.min_residency + 1
