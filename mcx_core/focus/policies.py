"""Focus policies: what scores the working context's entries each step. LensNet's policy lives with
LensNet (`LensNetPolicy`); here are the references it is compared against — recency (never refocus),
random, expand-nearest, a training-free attention policy, and the oracle that peeks at the true
counterfactual ΔNLL.
Every policy goes through the same allocator (`mcx_core.focus.allocator`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from mcx_core.focus.deltas import candidate_actions, evaluate_candidates, normalised_utilities, score_targets
from mcx_core.focus.lensnet import LensNet, LensNetPolicy
from mcx_core.model.base import BaseLM
from mcx_core.model.tree import MegaContextTree
from mcx_core.model.working_context import WorkingContext


class Policy(Protocol):
    name: str

    def scores(self, wc: WorkingContext, tree: MegaContextTree, step: int) -> torch.Tensor: ...


PolicyFactory = Callable[[torch.Tensor], Policy]  # a document's token ids -> a fresh policy for it


class OraclePolicy:
    """The upper-bound `Policy`: scores entries by their *true* counterfactual ΔNLL on the upcoming horizon.

    It peeks at the future by design: `horizon_ids_fn(cursor) -> [H] long` must return the tokens that
    follow the cursor, which no real policy can know. That is what makes it the reference LensNet is
    measured against; never use it where the future is unknown. (It has no causality-violation count:
    that metric is about what LensNet reads.)

    Every legal action is evaluated with `evaluate_candidates` (the counterfactuals the delta tables hold;
    an overflowing expand is paired with a collapse), and entry i gets the score JT2 regresses LensNet
    onto: the mean over its actions of `score_targets` (utility −ΔNLL normalised by the context's largest
    |utility|, + for an expand, − for a collapse, clamped to the legal directions). An entry whose
    actions would all hurt gets 0 ("leave it"). One forward per candidate: slow, by nature.
    """

    name = "oracle"

    def __init__(self, lm: BaseLM, horizon_ids_fn, batch_size: int = 8, utility_floor: float = 0.01):
        self.lm = lm
        self.horizon_ids_fn = horizon_ids_fn
        self.batch_size = batch_size
        self.utility_floor = utility_floor

    def scores(self, wc: WorkingContext, tree: MegaContextTree, step: int) -> torch.Tensor:
        horizon = torch.as_tensor(self.horizon_ids_fn(tree.cursor), dtype=torch.long)
        scores = torch.zeros(len(wc.entries))
        cands = candidate_actions(wc)
        if horizon.numel() == 0 or not cands:
            return scores
        [(nll_before, nll_after)] = evaluate_candidates(self.lm, [wc], [horizon], [cands], self.batch_size)
        utility = normalised_utilities(np.array(nll_after) - nll_before, self.utility_floor)
        index = torch.tensor([c.index for c in cands])
        sign = torch.tensor([1.0 if c.action == "expand" else -1.0 for c in cands])
        can_expand = torch.tensor([wc.can_expand(i) for i in index.tolist()])
        can_collapse = torch.tensor([wc.can_collapse(i) for i in index.tolist()])
        targets = score_targets(utility, sign, can_expand, can_collapse)  # [n_candidates]
        counts = torch.zeros(len(wc.entries)).index_add_(0, index, torch.ones(len(cands)))
        return scores.index_add_(0, index, targets) / counts.clamp(min=1)


class RecencyPolicy:
    """Scores 0 everywhere: only the budget's forced collapses move anything (the recency baseline)."""

    name = "recency"

    def scores(self, wc: WorkingContext, tree: MegaContextTree, step: int) -> torch.Tensor:
        return torch.zeros(len(wc.entries))


class RandomPolicy:
    """Uniform scores in [-1, 1] from a seeded generator: what chance focus does."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, wc: WorkingContext, tree: MegaContextTree, step: int) -> torch.Tensor:
        return torch.rand(len(wc.entries), generator=self.generator) * 2 - 1


class ExpandNearestPolicy:
    """More detail just behind the recent tokens: every gist wants detail, the nearest most (from +1 for the
    nearest down to +0.5 for the oldest), raw tokens score -0.1 (under the collapse threshold, but enough to
    pay for a swap). Scoring every gist, not only the nearest, matters: the nearest gist is the block
    that just aged out of the recent window, and minimum residency holds it, so the allocator takes the
    nearest gist it may expand."""

    name = "expand_nearest"

    def scores(self, wc: WorkingContext, tree: MegaContextTree, step: int) -> torch.Tensor:
        out = torch.full((len(wc.entries),), -0.1)
        gists = [i for i, e in enumerate(wc.entries) if e.level > 0]
        for rank, i in enumerate(reversed(gists)):  # nearest first
            out[i] = 1.0 - 0.5 * rank / max(len(gists) - 1, 1)
        return out


class AttentionPolicy:
    """Training-free focus: expand the gists the newest tokens attend to most, pay with the spans they
    attend to least. One eager-attention forward of the frozen model over the assembled working context
    (heads and layers averaged, `eval.peers.reduced_attention`); each entry's *unit* — a gist, or a whole
    raw block outside the recent window — gets the attention mass the newest `window` positions give it,
    and its entries the score tanh(log(mass / median mass)): above the median positive (a gist there
    wants detail), below negative (a span there may pay for a swap). The recent window and the sink
    score 0. It reads only the working context (no causality violation) and costs one forward a step."""

    name = "attention"

    def __init__(self, lm: BaseLM, window: int = 32):
        self.lm, self.window = lm, window

    def scores(self, wc: WorkingContext, tree: MegaContextTree, step: int) -> torch.Tensor:
        from mcx_core.eval.peers import reduced_attention

        n = len(wc.entries)
        embeds, positions, owner = wc.assemble(self.lm.embed)
        att = reduced_attention(self.lm, self.window, inputs_embeds=embeds[None], position_ids=positions[None]).window
        owner = owner.cpu()
        keep = owner >= 0
        mass = torch.zeros(n).index_add_(0, owner[keep], att[keep])  # [n] attention per entry
        K, recent_start = tree.block_size, wc.tree.cursor - wc.recent_tokens
        unit = torch.arange(n)  # entries of one raw block share a unit (the block), a gist is its own
        for i, e in enumerate(wc.entries):
            if e.level == 0 and i > 0 and wc.entries[i - 1].level == 0 and wc.entries[i - 1].start // K == e.start // K:
                unit[i] = unit[i - 1]
        unit_mass = torch.zeros(n).index_add_(0, unit, mass)[unit]  # [n] each entry's unit's mass
        scored = torch.tensor([e.end <= recent_start for e in wc.entries])
        out = torch.zeros(n)
        if scored.sum() < 2:
            return out
        units = torch.unique(unit[scored])
        median = torch.zeros(n).index_add_(0, unit, mass)[units].median().clamp(min=1e-12)
        out[scored] = torch.tanh(torch.log(unit_mass[scored].clamp(min=1e-12) / median))
        return out


def standard_policies(
    lm: BaseLM, horizon: int, seed: int = 0, lensnet: LensNet | None = None, oracle: bool = True
) -> dict[str, PolicyFactory]:
    """Factories for compare_policies: recency, random, expand_nearest, attention, oracle (optional),
    lensnet."""
    out: dict[str, PolicyFactory] = {
        "recency": lambda doc: RecencyPolicy(),
        "random": lambda doc: RandomPolicy(seed),
        "expand_nearest": lambda doc: ExpandNearestPolicy(),
        "attention": lambda doc: AttentionPolicy(lm),
    }
    if oracle:
        out["oracle"] = lambda doc: OraclePolicy(lm, _horizon_fn(doc, horizon))
    if lensnet is not None:
        out["lensnet"] = lambda doc: LensNetPolicy(lensnet, lm.embed)
    return out


def _horizon_fn(doc: torch.Tensor, horizon: int) -> Callable[[int], torch.Tensor]:
    ids = torch.as_tensor(doc, dtype=torch.long)
    return lambda cursor: ids[cursor : cursor + horizon]
