"""Focus allocator (SPEC §5): per-entry focus scores -> a few legal expand/collapse actions per step.

A step, on a working context that may have outgrown its budget after an ingest (`scores[i]` belongs
to `wc.entries[i]`; positive = expand, negative = collapse, 0 = no opinion):

1. `fit(wc, scores=None)` — **forced collapses** while `wc.cost > w_max`, best first by: lowest
   score (without scores, each entry's latest one: new entries 0, an action's result inherits the
   score that chose it), finest level (a block loses less than K gists), not made by an expand (a
   deliberate focus goes last), not held by residency/cooldown, oldest. The budget forces these, so
   stability rules and `n_diff` do not apply; if nothing legal is left, `BudgetError` (history is
   never dropped). The runtime calls `fit` before scoring: a policy only sees contexts within budget.
2. `step(wc, scores)` — `fit` unless this step had one, then at most `n_diff` **voluntary actions**:
   expands where score > `tau_expand`, collapses where score < -`tau_collapse`, each legal and not
   held. Expands by descending score, collapses by ascending score (ties: expands nearest the cursor
   first, collapses oldest first), the two lists merged by |score| (a tie takes the collapse). An
   expand that does not fit is a **swap** (SPEC §5.3): it is paid for by collapses made *before* it — the
   lowest-scoring legal, unheld spans whose collapse score is below the expand's score by more than
   `swap_margin` (the hysteresis; a payer need not score below -`tau_collapse`), oldest first on ties —
   so the cost never exceeds `w_max` after any action; an expand whose payment does not fit in the
   remaining `n_diff` is skipped whole.

Stability, per entry (keyed by level and index): its *age* is the number of steps since it got its
level (it appeared in the context, or an action made it). A voluntary action needs every entry it
replaces to have age >= `min_residency`; what an action made cannot be changed back (an expand's
children collapsed, a collapse's parent expanded) for `cooldown_steps`; nothing an action made is
acted on voluntarily in the same step.

A collapse's score is the score of the first entry of its run (the entry the delta tables and
`OraclePolicy` label), unless another entry of the run scores above `tau_expand` (it wants detail):
then the run's highest score. So a run is never collapsed voluntarily, nor forced before the
uncontested ones, while part of it asks for detail — what stops a parent-wants-detail /
children-want-coarser pair of scores from flipping a span back and forth.

Causes and residency (SPEC §7). Each action has a `cause`: "voluntary" (over its threshold), "swap" (a
collapse paying for an expand), "forced" (the budget, on a span some action had placed) or "age_out"
(the budget, on a span no deliberate action ever placed: raw tokens leaving the recent window, or the
gists such collapses made, collapsed further as they age). Residency is the seed's: the steps a span
stayed at the level a deliberate action (expand, voluntary or swap collapse, forced collapse of a
placed span) put it in, before the next action on it — `Action.residency`, the youngest such entry of
the replaced run; None when no entry of the run was placed by one (an age-out, or the first action
on an aged span). Age-out collapses are counted apart (`runtime/age_out_collapses`), never as
residency samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mcx_core.config import AllocatorConfig
from mcx_core.model.working_context import BudgetError, Entry, WorkingContext

Key = tuple[int, int]  # (level, index) of an entry


@dataclass(frozen=True)
class Action:
    kind: str  # "expand" | "collapse"
    level: int  # level of the entries acted on, before the action
    index: int  # node index of the entry acted on (the first of a collapsed run)
    start: int  # token span the action changes
    end: int
    score: float  # the score that chose it (the first entry's for a collapse)
    forced: bool  # a collapse the budget forced
    residency: int | None  # steps the replaced span stayed at the level an action put it in (None: none did)
    cause: str = "voluntary"  # "voluntary" | "swap" | "forced" | "age_out" (module docstring)

    @property
    def span_id(self) -> str:
        return f"L{self.level}:{self.index:06d}"


@dataclass
class StepStats:
    step: int
    actions: list[Action] = field(default_factory=list)
    cost_before: int = 0  # cost when the step began (may exceed w_max after an ingest)
    cost_after: int = 0
    cost_trail: list[int] = field(default_factory=list)  # cost after each action, in order
    skipped_blocked: int = 0  # candidates over threshold held back by residency or cooldown
    skipped_budget: int = 0  # expands that could not be paid for within n_diff

    @property
    def num_expands(self) -> int:
        return sum(a.kind == "expand" for a in self.actions)

    @property
    def num_collapses(self) -> int:
        return sum(a.kind == "collapse" for a in self.actions)

    @property
    def num_forced(self) -> int:
        return sum(a.forced for a in self.actions)

    @property
    def num_age_outs(self) -> int:
        return sum(a.cause == "age_out" for a in self.actions)

    @property
    def num_swaps(self) -> int:
        """Expands paid for by collapses in the same step (each swap counted once, at its expand)."""
        return sum(a.kind == "expand" and a.cause == "swap" for a in self.actions)

    @property
    def residencies(self) -> list[int]:
        """The residency samples of this step (SPEC §7): actions on spans a deliberate action placed."""
        return [a.residency for a in self.actions if a.residency is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "actions": [asdict(a) | {"span_id": a.span_id} for a in self.actions],
            "num_expands": self.num_expands,
            "num_collapses": self.num_collapses,
            "num_forced": self.num_forced,
            "num_age_outs": self.num_age_outs,
            "num_swaps": self.num_swaps,
            "residencies": self.residencies,
            "cost_before": self.cost_before,
            "cost_after": self.cost_after,
            "skipped_blocked": self.skipped_blocked,
            "skipped_budget": self.skipped_budget,
        }


def _key(e: Entry) -> Key:
    return (e.level, e.index)


class FocusAllocator:
    """Stateful across steps (entry ages, what created each entry); deterministic given its inputs."""

    def __init__(self, cfg: AllocatorConfig, w_max: int):
        self.cfg = cfg
        self.w_max = w_max
        self.t = 0  # steps taken
        self._born: dict[Key, int] = {}  # step at which each current entry got its level
        self._made_by: dict[Key, str] = {}  # "expand" | "collapse" for entries an action created
        self._placed: set[Key] = set()  # entries a deliberate (not age-out) action created: residency
        self._open: StepStats | None = None  # the step `fit` opened and `step` has not finished
        # Latest score of each entry; an action's result inherits the score that chose it.
        self._last_score: dict[Key, float] = {}

    # ------------------------------------------------------------------------------------------ ages

    def settle(self, wc: WorkingContext, age: int | None = None) -> None:
        """Treat the entries now in `wc` as having sat at their levels for `age` steps (default
        `min_residency`): a prefilled history's initial context was never changed by an action, so
        minimum residency has nothing to protect in it. Call before the first step."""
        age = self.cfg.min_residency if age is None else age
        for e in wc.entries:
            self._born[_key(e)] = self.t - age

    def ages(self, wc: WorkingContext) -> torch.Tensor:
        """[N] steps each entry has been at its level (0 for entries not seen yet): LensNet's age feature."""
        return torch.tensor([self.t - self._born.get(_key(e), self.t) for e in wc.entries], dtype=torch.long)

    def _age(self, e: Entry) -> int:
        return self.t - self._born[_key(e)]

    def _blocked(self, kind: str, run: list[Entry]) -> bool:
        """Residency or cooldown forbids a voluntary `kind` on the entries `run`."""
        undo = "collapse" if kind == "expand" else "expand"  # the action that `kind` would undo
        for e in run:
            age = self._age(e)
            if age < self.cfg.min_residency or (age == 0 and _key(e) in self._made_by):
                return True
            if self._made_by.get(_key(e)) == undo and age < self.cfg.cooldown_steps:
                return True
        return False

    # ------------------------------------------------------------------------------------------ step

    def fit(self, wc: WorkingContext, scores: torch.Tensor | list[float] | None = None) -> StepStats:
        """Open a step: note new entries, then forced collapses until `wc.cost <= w_max`, ranked by
        `scores` if given, else by each entry's latest score (module docstring). Call it after an ingest
        so a policy scores a context within budget; `step` then finishes the step. Mutates `wc`."""
        if self._open is not None:
            raise RuntimeError(f"step {self.t} is already open: call step() to finish it")
        if scores is None:
            score_of = {e: self._last_score.get(_key(e), 0.0) for e in wc.entries}
        else:
            score_of = self._score_map(wc, scores)
        return self._fit(wc, score_of)

    def step(self, wc: WorkingContext, scores: torch.Tensor | list[float]) -> StepStats:
        """Finish a step: `fit` first unless it opened this step already (then `scores` are for the
        fitted context), then up to `n_diff` voluntary actions. Returns the whole step's stats."""
        score_of = self._score_map(wc, scores)
        if self._open is None:
            self._fit(wc, score_of)
        stats, self._open = self._open, None
        self._last_score.update((_key(e), score_of[e]) for e in wc.entries if e in score_of)
        self._voluntary(wc, score_of, stats)
        stats.cost_after = wc.cost
        self.t += 1
        return stats

    def _fit(self, wc: WorkingContext, score_of: dict[Entry, float]) -> StepStats:
        if wc.w_max != self.w_max:
            raise ValueError(f"working context has w_max {wc.w_max}, the allocator {self.w_max}")
        present = {_key(e) for e in wc.entries}
        self._born = {k: v for k, v in self._born.items() if k in present}
        self._made_by = {k: v for k, v in self._made_by.items() if k in present}
        self._placed &= present
        self._last_score = {k: v for k, v in self._last_score.items() if k in present}
        for e in wc.entries:
            self._born.setdefault(_key(e), self.t)
        stats = StepStats(step=self.t, cost_before=wc.cost)
        while wc.cost > self.w_max:
            j = self._forced_choice(wc, score_of)
            if j is None:
                raise BudgetError(
                    f"cost {wc.cost} > w_max {self.w_max} over {wc.tree.cursor} tokens and nothing legal "
                    f"left to collapse (newest {wc.recent_tokens} tokens stay LOD0, top level "
                    f"LOD{wc.tree.max_level})"
                )
            run = self._run(wc, j)
            cause = "forced" if any(_key(e) in self._placed for e in run) else "age_out"
            self._collapse(wc, j, self._collapse_score(run, score_of), cause, stats)
        self._open = stats
        return stats

    @staticmethod
    def _score_map(wc: WorkingContext, scores: torch.Tensor | list[float]) -> dict[Entry, float]:
        values = torch.as_tensor(scores, dtype=torch.float32).flatten().tolist()
        if len(values) != len(wc.entries):
            raise ValueError(f"{len(values)} scores for {len(wc.entries)} entries")
        return dict(zip(wc.entries, values))

    def _run(self, wc: WorkingContext, j: int) -> list[Entry]:
        return wc.entries[j : j + (1 if wc.entries[j].level == 0 else wc.tree.block_size)]

    @staticmethod
    def _starts_run(wc: WorkingContext, e: Entry) -> bool:
        """Cheap necessary condition for `wc.can_collapse` (which checks the whole run)."""
        return e.level < wc.tree.max_level and (e.level == 0 or e.index % wc.tree.block_size == 0)

    def _contested(self, run: list[Entry], score_of: dict[Entry, float]) -> bool:
        """Another entry of the run wants detail (score > tau_expand)."""
        return any(score_of.get(e, 0.0) > self.cfg.tau_expand for e in run[1:])

    def _collapse_score(self, run: list[Entry], score_of: dict[Entry, float]) -> float:
        """The first entry's score, or the run's highest score when the run is contested."""
        first = score_of.get(run[0], 0.0)
        return max(score_of.get(e, 0.0) for e in run) if self._contested(run, score_of) else first

    def _forced_choice(self, wc: WorkingContext, score_of: dict[Entry, float]) -> int | None:
        best, best_key = None, None
        for j, e in enumerate(wc.entries):
            if not (self._starts_run(wc, e) and wc.can_collapse(j)):
                continue
            run = self._run(wc, j)
            focused = any(self._made_by.get(_key(r)) == "expand" for r in run)
            key = (
                self._collapse_score(run, score_of),
                e.level,
                focused,
                self._blocked("collapse", run),
                e.start,
            )
            if best_key is None or key < best_key:
                best, best_key = j, key
        return best

    def _voluntary(self, wc: WorkingContext, score_of: dict[Entry, float], stats: StepStats) -> None:
        cfg, cursor = self.cfg, wc.tree.cursor
        expands: list[tuple[float, Entry]] = []
        collapses: list[tuple[float, Entry]] = []
        for i, e in enumerate(wc.entries):
            s = score_of.get(e)
            if s is None:  # made by this step's forced collapses, after the scores were taken
                continue
            if s > cfg.tau_expand and wc.can_expand(i):
                if self._blocked("expand", [e]):
                    stats.skipped_blocked += 1
                else:
                    expands.append((s, e))
            elif (
                s < -cfg.tau_collapse
                and self._starts_run(wc, e)
                and wc.can_collapse(i)
                and not self._contested(self._run(wc, i), score_of)
            ):
                if self._blocked("collapse", self._run(wc, i)):
                    stats.skipped_blocked += 1
                else:
                    collapses.append((s, e))
        expands.sort(key=lambda x: (-x[0], cursor - x[1].end, x[1].start))
        collapses.sort(key=lambda x: (x[0], x[1].start))  # oldest = farthest from the cursor first
        payers = None  # built on first need: (score, entry) of legal unblocked collapses with score < 0
        used: set[Entry] = set()
        cost = wc.cost  # kept up to date here: wc.cost is O(N) and there may be N candidates
        left, ei, ci = cfg.n_diff, 0, 0
        while left > 0 and (ei < len(expands) or ci < len(collapses)):
            take_collapse = ci < len(collapses) and (
                ei >= len(expands) or -collapses[ci][0] >= expands[ei][0]
            )
            if take_collapse:
                s, e = collapses[ci]
                ci += 1
                j = self._index(wc, e)
                if e in used or j is None or not wc.can_collapse(j):
                    continue
                cost -= wc.collapse_saving(j)
                self._collapse(wc, j, s, "voluntary", stats)
                used.add(e)
                left -= 1
                continue
            s, target = expands[ei]
            ei += 1
            extra = wc.tree.block_size - 1  # every expand adds K - 1 (working_context.py)
            deficit = cost + extra - self.w_max
            if deficit > 0 and (left < 2 or payers == []):
                stats.skipped_budget += 1
                continue
            if self._index(wc, target) is None:  # replaced by an earlier action of this step
                continue
            plan: list[tuple[float, Entry, int]] = []
            if deficit > 0:
                if payers is None:
                    payers = self._payers(wc, score_of)
                k = 0
                # hysteresis: a payer's score must sit more than swap_margin below the expand's
                while (k < len(payers) and deficit > 0 and len(plan) < left - 1
                       and payers[k][0] < s - cfg.swap_margin):
                    pe = payers[k][1]
                    j = self._index(wc, pe)
                    if pe in used or j is None or not wc.can_collapse(j):
                        del payers[k]  # gone for the rest of the step
                        continue
                    k += 1
                    if target not in self._run(wc, j):
                        saving = wc.collapse_saving(j)
                        plan.append((payers[k - 1][0], pe, saving))
                        deficit -= saving
            if deficit > 0:
                stats.skipped_budget += 1
                continue
            for ps, pe, saving in plan:
                self._collapse(wc, self._index(wc, pe), ps, "swap", stats)
                used.add(pe)
                cost -= saving
                left -= 1
            self._expand(wc, self._index(wc, target), s, "swap" if plan else "voluntary", stats)
            cost += extra
            left -= 1

    def _payers(self, wc: WorkingContext, score_of: dict[Entry, float]) -> list[tuple[float, Entry]]:
        """Legal, unheld, uncontested collapses that do not themselves want detail (score <= tau_expand),
        lowest score first: what a swap may pay with (its margin is checked per expand)."""
        out = []
        for j, e in enumerate(wc.entries):
            s = score_of.get(e)
            if (
                s is not None
                and s <= self.cfg.tau_expand
                and self._starts_run(wc, e)
                and wc.can_collapse(j)
                and not self._contested(self._run(wc, j), score_of)
                and not self._blocked("collapse", self._run(wc, j))
            ):
                out.append((s, e))
        return sorted(out, key=lambda x: (x[0], x[1].start))

    @staticmethod
    def _index(wc: WorkingContext, e: Entry) -> int | None:
        """Current index of entry `e` (actions shift indices), None once an action replaced it."""
        lo, hi = 0, len(wc.entries)
        while lo < hi:  # entries are sorted by start
            mid = (lo + hi) // 2
            if wc.entries[mid].start < e.start:
                lo = mid + 1
            else:
                hi = mid
        return lo if lo < len(wc.entries) and wc.entries[lo] == e else None

    # ------------------------------------------------------------------------------------------ actions

    def _retire(self, run: list[Entry]) -> int | None:
        """Forget the replaced entries; return the residency of the youngest one a deliberate action
        placed (None if no action placed any)."""
        placed = [self._age(e) for e in run if _key(e) in self._placed]
        for e in run:
            self._born.pop(_key(e), None)
            self._made_by.pop(_key(e), None)
            self._last_score.pop(_key(e), None)
            self._placed.discard(_key(e))
        return min(placed) if placed else None

    def _collapse(self, wc: WorkingContext, j: int, score: float, cause: str, stats: StepStats) -> None:
        run = self._run(wc, j)
        parent = wc.collapse(j)
        forced = cause in ("forced", "age_out")
        stats.actions.append(
            Action("collapse", run[0].level, run[0].index, parent.start, parent.end, score, forced,
                   self._retire(run), cause)
        )
        self._born[_key(parent)] = self.t
        self._made_by[_key(parent)] = "collapse"
        if cause != "age_out":
            self._placed.add(_key(parent))
        self._last_score[_key(parent)] = score
        stats.cost_trail.append(wc.cost)

    def _expand(self, wc: WorkingContext, i: int, score: float, cause: str, stats: StepStats) -> None:
        e = wc.entries[i]
        children = wc.expand(i)
        stats.actions.append(
            Action("expand", e.level, e.index, e.start, e.end, score, False, self._retire([e]), cause)
        )
        for c in children:
            self._born[_key(c)] = self.t
            self._made_by[_key(c)] = "expand"
            self._placed.add(_key(c))
            self._last_score[_key(c)] = score
        stats.cost_trail.append(wc.cost)
