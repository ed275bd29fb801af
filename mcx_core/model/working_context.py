"""Working context: what the base model reads (SPEC §2 invariants, §5 legality).

A contiguous, time-ordered cover of the history [0, tree.cursor) by entries of mixed level:

    LOD0 entry   one whole block of K tokens (fewer for the partial tail), cost = its tokens
    gist entry   one level-L tree node (L >= 1), covering K**L tokens, cost = 1

Because LOD0 entries are whole blocks, a block entry is exactly the K children of its LOD1 gist, so
collapsing an LOD0 entry replaces that one entry by its gist; collapsing level-L gists (L >= 1) needs
the K aligned siblings as K consecutive entries. Expanding does the reverse. Every expand/collapse
changes the cost by K - 1.

Positions (`position_scheme`): "center" keeps each LOD0 token's absolute position id and gives a gist
the position of the middle token of its span, (start + end - 1) // 2 (the lower middle for even
spans, so it always lies inside the span: [0, 32) -> 15, [0, 1024) -> 511); "compact" numbers the
assembled positions 0..T-1.

Attention sink (SPEC §2.7): the first `sink_tokens` raw tokens of the history lead what the base model
reads, at positions 0…, because a frozen model rests attention on its first input. The sink is a
fixed prefix *outside* the cover: the entries still cover [0, cursor) exactly once (coverage is checked
over them), and the sink's positions are always reserved in the budget (`cost` includes them), so every
expand and collapse still changes the cost by K − 1. While the first entry is block 0 at LOD0 its own
first tokens are the sink, and the prefix is not repeated (the reserved positions stay unused).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mcx_core.model.tree import EmbedFn, MegaContextTree, span_id

POSITION_SCHEMES = ("center", "compact")

GistOverride = Callable[[int, torch.Tensor], torch.Tensor]  # (level, indices [n] long) -> gists [n, d]


class InvariantViolation(AssertionError):
    """A working context breaks one of the SPEC §2 invariants (the message names which and where)."""


class IllegalAction(ValueError):
    """An expand/collapse that SPEC §2.4-2.5 forbids."""


class BudgetError(ValueError):
    """An action, or a history, that cannot be made to fit `w_max`."""


@dataclass(frozen=True)
class Entry:
    level: int
    index: int  # node index at this level (LOD0: block index)
    start: int
    end: int  # exclusive
    cost: int  # positions it takes in the working context

    @property
    def span_id(self) -> str:
        return span_id(self.level, self.index)


def entry_for(tree: MegaContextTree, level: int, index: int) -> Entry:
    """The entry for tree node (level, index), spanning exactly what that node covers."""
    node = tree.node(level, index)
    return Entry(level, index, node.start, node.end, node.end - node.start if level == 0 else 1)


class WorkingContext:
    def __init__(
        self,
        tree: MegaContextTree,
        w_max: int,
        recent_tokens: int = 64,
        position_scheme: str = "center",
        entries: list[Entry] | None = None,
        sink_tokens: int = 0,
    ):
        """`entries=None` gives the full-detail cover (every block LOD0), which may exceed `w_max`;
        `initial` gives the most detailed one that fits. Hand-built entries are taken as given (so
        `check_invariants` can be tested on broken ones)."""
        if position_scheme not in POSITION_SCHEMES:
            raise ValueError(f"position_scheme must be one of {POSITION_SCHEMES}, got {position_scheme!r}")
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
        self.tree = tree
        self.w_max = w_max
        self.recent_tokens = recent_tokens
        self.position_scheme = position_scheme
        self.sink_tokens = sink_tokens
        self.entries: list[Entry] = list(entries) if entries is not None else []
        if entries is None:
            self.sync()

    @classmethod
    def initial(
        cls, tree: MegaContextTree, w_max: int, recent_tokens: int = 64, position_scheme: str = "center",
        sink_tokens: int = 0,
    ) -> WorkingContext:
        """The most detailed context within budget: the newest blocks LOD0, older ones LOD1, the oldest
        LOD2 (and so on up to max_level) when LOD1 alone does not fit. Built directly, but equal to
        starting from all-LOD0 and running `collapse_to_fit` (tested)."""
        K = tree.block_size
        # Only complete blocks that end before the newest `recent_tokens` may become gists.
        gistable_end = K * min(tree.num_nodes(1), max(tree.cursor - recent_tokens, 0) // K)
        taken = [0] * (tree.max_level + 1)  # taken[L]: level-L nodes, counted from token 0, made gists
        cost = tree.cursor + min(sink_tokens, tree.cursor)
        for level in range(1, tree.max_level + 1):
            if cost <= w_max:
                break
            # Each level-L gist replaces K level-(L-1) entries (a block, or K gists): saves K - 1.
            available = gistable_end // tree.span_tokens(level)
            taken[level] = min(available, -(-(cost - w_max) // (K - 1)))
            cost -= taken[level] * (K - 1)
        if cost > w_max:
            raise BudgetError(
                f"a history of {tree.cursor} tokens cannot fit w_max={w_max}: its coarsest legal working "
                f"context ({min(sink_tokens, tree.cursor)} sink tokens, newest {recent_tokens} tokens LOD0, the "
                f"rest gists up to LOD{tree.max_level}) costs {cost}"
            )
        entries: list[Entry] = []
        pos = 0  # tokens covered so far, oldest first: coarsest level first
        for level in range(tree.max_level, 0, -1):
            span = tree.span_tokens(level)
            entries += [entry_for(tree, level, i) for i in range(pos // span, taken[level])]
            pos = max(pos, taken[level] * span)
        entries += [entry_for(tree, 0, b) for b in range(pos // K, tree.num_nodes(0))]
        return cls(tree, w_max, recent_tokens, position_scheme, entries, sink_tokens)

    # ------------------------------------------------------------------------------------------ state

    @property
    def sink_cost(self) -> int:
        """Positions reserved for the attention sink (the history's first `sink_tokens` tokens)."""
        return min(self.sink_tokens, self.tree.cursor)

    @property
    def sink_assembled(self) -> bool:
        """Whether `assemble` prepends the sink: not while block 0 is LOD0 (its own first tokens are the sink)."""
        return self.sink_cost > 0 and not (self.entries and self.entries[0].level == 0 and self.entries[0].start == 0)

    @property
    def cost(self) -> int:
        """Positions this context takes of `w_max`: the sink's plus every entry's."""
        return self.sink_cost + sum(e.cost for e in self.entries)

    @property
    def assembled_positions(self) -> int:
        """Positions `assemble` returns: `cost`, less the sink's while block 0 is raw and is its own sink."""
        return self.cost - (0 if self.sink_assembled else self.sink_cost)

    @property
    def utilization(self) -> float:
        return self.cost / self.w_max

    @property
    def _recent_start(self) -> int:
        """First token of the newest `recent_tokens`: entries ending after it must stay LOD0."""
        return self.tree.cursor - self.recent_tokens

    def level_counts(self) -> dict[str, int]:
        """{"LOD0": tokens, "LOD1": gists, "LOD2": gists, ...}"""
        counts = {f"LOD{L}": 0 for L in range(self.tree.max_level + 1)}
        for e in self.entries:
            counts[f"LOD{e.level}"] += e.cost
        return counts

    def sync(self) -> None:
        """Extend coverage to `tree.cursor` after an ingest: new tokens arrive as LOD0 blocks and a partial
        tail block is rebuilt at its new length. Does not enforce the budget (see `collapse_to_fit`)."""
        K = self.tree.block_size
        if self.entries and self.entries[-1].level == 0 and self.entries[-1].cost < K:
            self.entries.pop()
        covered = self.entries[-1].end if self.entries else 0
        self.entries += [entry_for(self.tree, 0, b) for b in range(covered // K, self.tree.num_nodes(0))]

    # ------------------------------------------------------------------------------------------ actions

    def can_expand(self, i: int) -> bool:
        """Legality only; whether the budget allows it is `cost + expand_cost(i) <= w_max`."""
        return self._expand_problem(i) is None

    def can_collapse(self, i: int) -> bool:
        return self._collapse_problem(i) is None

    def expand_cost(self, i: int) -> int:
        """Budget increase of `expand(i)` (K - 1)."""
        self._require(self._expand_problem(i), "expand", i)
        return sum(c.cost for c in self._children(self.entries[i])) - self.entries[i].cost

    def collapse_saving(self, i: int) -> int:
        """Budget decrease of `collapse(i)` (K - 1)."""
        self._require(self._collapse_problem(i), "collapse", i)
        return sum(e.cost for e in self.entries[i : i + self._run_length(i)]) - 1

    def expand(self, i: int) -> list[Entry]:
        """Replace gist entry i by its K children (LOD1 -> its LOD0 block; LOD2 -> K LOD1 gists).
        Raises IllegalAction, or BudgetError when the result would exceed `w_max`."""
        self._require(self._expand_problem(i), "expand", i)
        e = self.entries[i]
        children = self._children(e)
        extra = sum(c.cost for c in children) - e.cost
        if self.cost + extra > self.w_max:
            raise BudgetError(
                f"expanding entry {i} ({e.span_id}) adds {extra}: {self.cost} + {extra} > w_max {self.w_max}"
            )
        self.entries[i : i + 1] = children
        return children

    def collapse(self, i: int) -> Entry:
        """Replace the K aligned siblings starting at entry i by their parent (an LOD0 block entry is
        already all K children of its LOD1 gist)."""
        self._require(self._collapse_problem(i), "collapse", i)
        e = self.entries[i]
        parent = entry_for(self.tree, e.level + 1, self._parent_index(e))
        self.entries[i : i + self._run_length(i)] = [parent]
        return parent

    def collapse_to_fit(self) -> list[Entry]:
        """Forced collapses until cost <= w_max, finest level first (a block loses less detail than K
        gists for the same saving) and oldest first within a level. Returns the parents created; raises
        BudgetError when nothing legal is left to collapse. Never drops history."""
        made = []
        cost = self.cost
        while cost > self.w_max:
            i = self._oldest_collapsible()
            if i is None:
                raise BudgetError(
                    f"cost {cost} > w_max {self.w_max} over {self.tree.cursor} tokens and nothing left to "
                    f"collapse (newest {self.recent_tokens} tokens stay LOD0, top level LOD{self.tree.max_level})"
                )
            cost -= self.collapse_saving(i)
            made.append(self.collapse(i))
        return made

    def _oldest_collapsible(self) -> int | None:
        for level in range(self.tree.max_level):
            for i, e in enumerate(self.entries):
                if e.level == level and self.can_collapse(i):
                    return i
        return None

    def _children(self, e: Entry) -> list[Entry]:
        if e.level == 1:
            return [entry_for(self.tree, 0, e.index)]
        K = self.tree.block_size
        return [entry_for(self.tree, e.level - 1, e.index * K + j) for j in range(K)]

    def _parent_index(self, e: Entry) -> int:
        return e.index if e.level == 0 else e.index // self.tree.block_size

    def _run_length(self, i: int) -> int:
        """Entries that collapse together starting at i: one LOD0 block, or K gists."""
        return 1 if self.entries[i].level == 0 else self.tree.block_size

    def _expand_problem(self, i: int) -> str | None:
        if not 0 <= i < len(self.entries):
            return f"no entry {i} (the context has {len(self.entries)})"
        if self.entries[i].level == 0:
            return f"{self.entries[i].span_id} is LOD0 (nothing finer to expand to)"
        return None

    def _collapse_problem(self, i: int) -> str | None:
        if not 0 <= i < len(self.entries):
            return f"no entry {i} (the context has {len(self.entries)})"
        e, K = self.entries[i], self.tree.block_size
        if e.level >= self.tree.max_level:
            return f"{e.span_id} is at the top level (LOD{self.tree.max_level})"
        if e.level == 0 and e.cost < K:
            return f"{e.span_id} is the partial tail block ({e.cost} of {K} tokens), which is never gisted"
        run = self.entries[i : i + self._run_length(i)]
        if e.level > 0 and (
            e.index % K
            or len(run) < K
            or any(r.level != e.level or r.index != e.index + j for j, r in enumerate(run))
        ):
            return f"{e.span_id} does not start {K} aligned level-{e.level} siblings present as consecutive entries"
        if run[-1].end > self._recent_start:
            return (
                f"[{e.start}, {run[-1].end}) overlaps the newest {self.recent_tokens} tokens, which stay LOD0"
            )
        if self._parent_index(e) >= self.tree.num_nodes(e.level + 1):
            return f"parent {span_id(e.level + 1, self._parent_index(e))} is not in the tree"
        return None

    @staticmethod
    def _require(problem: str | None, action: str, i: int) -> None:
        if problem is not None:
            raise IllegalAction(f"cannot {action} entry {i}: {problem}")

    # ------------------------------------------------------------------------------------------ checks

    def check_invariants(self) -> None:
        """Raise InvariantViolation naming the first broken invariant: budget, coverage/contiguity,
        alignment (incl. the gist being the tree node for exactly its span), cost, legality."""
        tree = self.tree
        cost = self.cost
        if cost > self.w_max:
            raise InvariantViolation(f"budget: cost {cost} > w_max {self.w_max} (sink {self.sink_cost} included)")
        if self.sink_tokens > tree.block_size:
            raise InvariantViolation(f"sink: {self.sink_tokens} sink tokens reach past the first block ({tree.block_size})")
        expected_start = 0
        for i, e in enumerate(self.entries):
            where = f"entry {i} ({e.span_id} [{e.start}, {e.end}))"
            if e.start != expected_start:
                raise InvariantViolation(
                    f"coverage: {where} starts at {e.start}, expected {expected_start} "
                    "(entries must be contiguous and in time order)"
                )
            if not 0 <= e.level <= tree.max_level:
                raise InvariantViolation(f"{where}: level {e.level} outside 0..{tree.max_level}")
            span = tree.span_tokens(e.level)
            if e.start % span or e.index != e.start // span:
                raise InvariantViolation(
                    f"alignment: {where}: a level-{e.level} entry must start at a multiple of {span} "
                    f"and have index start // {span} = {e.start // span}"
                )
            if not 0 <= e.index < tree.num_nodes(e.level):
                raise InvariantViolation(
                    f"{where}: node not in the tree (level {e.level} has {tree.num_nodes(e.level)} nodes)"
                )
            node = tree.node(e.level, e.index)
            if (node.start, node.end) != (e.start, e.end):
                raise InvariantViolation(
                    f"alignment: {where} is not the span of tree node {node.span_id} [{node.start}, {node.end})"
                )
            if e.cost != (e.end - e.start if e.level == 0 else 1):
                raise InvariantViolation(f"{where}: cost {e.cost} is wrong for level {e.level}")
            if e.level > 0 and e.end > self._recent_start:
                raise InvariantViolation(
                    f"legality: {where} is a gist among the newest {self.recent_tokens} tokens, which stay LOD0"
                )
            expected_start = e.end
        if expected_start != tree.cursor:
            raise InvariantViolation(
                f"coverage: entries end at {expected_start}, the cursor is at {tree.cursor}"
            )

    # ------------------------------------------------------------------------------------------ assembly

    def assemble(
        self, embed_fn: EmbedFn, gist_override: GistOverride | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> inputs_embeds [T, d], position_ids [T] long, entry_of_position [T] long (-1 for sink slots),
        with T = cost (T = cost − sink_cost while block 0 is LOD0 and is its own sink).

        `embed_fn` gets CPU long token ids and sets the device and dtype of the result; gists are cast
        to them. `gist_override(level, indices)` supplies gists with grad (training); default: the tree's.
        """
        self.check_invariants()
        tree = self.tree
        level = torch.tensor([e.level for e in self.entries], dtype=torch.long)  # [n]
        index = torch.tensor([e.index for e in self.entries], dtype=torch.long)  # [n]
        start = torch.tensor([e.start for e in self.entries], dtype=torch.long)  # [n]
        end = torch.tensor([e.end for e in self.entries], dtype=torch.long)  # [n]
        cost = torch.tensor([e.cost for e in self.entries], dtype=torch.long)  # [n]
        T = int(cost.sum())
        # slot t belongs to the first entry whose cumulative cost exceeds t
        entry_of_position = torch.searchsorted(cost.cumsum(0), torch.arange(T), right=True)  # [T]
        slot_in_entry = torch.arange(T) - (cost.cumsum(0) - cost)[entry_of_position]  # [T]
        absolute = start[entry_of_position] + slot_in_entry  # [T], the token position for LOD0 slots
        level_at = level[entry_of_position]  # [T]
        if self.position_scheme == "center":
            centre = ((start + end - 1) // 2)[entry_of_position]
            position_ids = torch.where(level_at == 0, absolute, centre)
        else:
            position_ids = torch.arange(T)

        token_slots = (level_at == 0).nonzero().squeeze(1)
        token_embeds = embed_fn(tree.tokens[absolute[token_slots]].long())  # [n_tokens, d]
        out = token_embeds.new_zeros(T, tree.d_model)
        out = out.index_copy(0, token_slots.to(out.device), token_embeds)
        for L in range(1, tree.max_level + 1):
            slots = (level_at == L).nonzero().squeeze(1)
            if len(slots) == 0:
                continue
            ids = index[entry_of_position[slots]]
            gists = gist_override(L, ids) if gist_override is not None else tree.gists(L, ids)  # [n, d]
            out = out.index_copy(0, slots.to(out.device), gists.to(out.device, out.dtype))
        if self.sink_assembled:  # the first raw tokens lead, at positions 0.. (both position schemes)
            s = self.sink_cost
            out = torch.cat([embed_fn(tree.tokens[:s].long()).to(out.dtype), out])
            position_ids = torch.cat([torch.arange(s), position_ids + (s if self.position_scheme == "compact" else 0)])
            entry_of_position = torch.cat([torch.full((s,), -1, dtype=torch.long), entry_of_position])
        return out, position_ids.to(out.device), entry_of_position.to(out.device)

    # ------------------------------------------------------------------------------------------ traces

    def to_dict(self) -> dict[str, Any]:
        return {
            "w_max": self.w_max,
            "recent_tokens": self.recent_tokens,
            "position_scheme": self.position_scheme,
            "sink_tokens": self.sink_tokens,
            "cursor": self.tree.cursor,
            "cost": self.cost,
            "level_counts": self.level_counts(),
            "entries": [asdict(e) for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], tree: MegaContextTree) -> WorkingContext:
        entries = [Entry(**e) for e in data["entries"]]
        return cls(tree, data["w_max"], data["recent_tokens"], data["position_scheme"], entries,
                   data.get("sink_tokens", 0))

    def __repr__(self) -> str:
        levels = ", ".join(f"{k}={v}" for k, v in self.level_counts().items())
        return f"WorkingContext(cost={self.cost}/{self.w_max}, cursor={self.tree.cursor}, {levels})"
