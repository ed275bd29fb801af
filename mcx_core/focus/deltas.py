"""Counterfactual delta tables (SPEC §6): ΔNLL@H labels for LensNet (files: `delta_tables`).

For a working context and the H tokens after its cursor, every candidate action (each legal expand,
each legal collapse) is scored by

    delta_nll = NLL(horizon | context after the action) − NLL(horizon | context before)

(mean over the H horizon tokens, `eval.nll.horizon_nll`), so a negative delta is an action that helps.
Both the labels (`generate_delta_table`) and `OraclePolicy` go through `evaluate_candidates`, which
runs one forward per group of up to `batch_size` equal-length contexts.

Budget: an expand adds K − 1 positions. When that would overflow `w_max`, the expand is evaluated
together with the minimal extra collapse that makes room: the finest-level, oldest legal collapse that
does not touch the expanded entry (the order `WorkingContext.collapse_to_fit` uses). Its row names the
partner in `paired_block_id` and has `token_cost` 0 (the net change in cost). With a 1024-token history
and w_max 128 the most detailed context is full, so most expands are such swaps, all paired with the
same oldest collapsible block: within a context they still rank which span deserves detail most.

Contexts per training sample: the most detailed one that fits (`WorkingContext.initial`, kind
"recency", always labelled) plus `contexts_per_sample − 1` "perturbed" ones, each 1..`perturb_moves`
random legal moves away from it (a move is any legal collapse or any expand that fits the budget; the
entry a move created is not moved back at once). Ages at the current level (a LensNet feature) cannot
be known outside a runtime run: entries the walk did not touch get a random age in 0..AGE_SCALE, so the
feature spans what the runtime shows without carrying label information, and an entry created by the
walk gets the number of moves made since.

Files (`generate_delta_table(..., out_dir)`): `delta_table_path(out_dir, cycle, gistnet_checkpoint)`,
`deltas_cycle{c}_{checkpoint}.parquet`, is the delta table (Parquet, `DELTA_SCHEMA`, one row per evaluated
action; the SPEC §6 columns plus the GistNet checkpoint the labels were computed with and what JT2 and
analysis need). Labels are on-policy: one table per (cycle, GistNet), and JT2 can refuse a table made with
another GistNet. Next to it, `contexts_path(...)` (`*.contexts.arrow`, Arrow IPC, `CONTEXT_SCHEMA`, one
row per labelled context) holds what rebuilds a context exactly: the history and horizon token ids, the
entries as JSON and the ages. It is Arrow rather than Parquet so the DuckDB view `deltas`
(`deltas/**/*.parquet`) keeps one schema. Both are written to a temporary name and renamed, contexts
first, so a delta table never exists without its contexts.

Cost: one base-model sequence of |context| + H positions per row plus one per context (NLL before);
measured numbers are in the stats `generate_delta_table` returns (`deltas/seconds_per_context`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from mcx_core.artifacts import write_arrow, write_atomic
from mcx_core.compression.gistnet import tree_inputs_fn
from mcx_core.config import MegaContextConfig
from mcx_core.focus.delta_tables import (
    CONTEXT_SCHEMA,
    DELTA_SCHEMA,
    contexts_path,
    delta_table_path,
    gistnet_label,
    now,
)
from mcx_core.focus.lensnet import AGE_SCALE
from mcx_core.model.base import BaseLM
from mcx_core.model.scoring import ConditionInput, horizon_nll
from mcx_core.model.tree import EmbedFn, GistFn, MegaContextTree
from mcx_core.model.working_context import Entry, WorkingContext
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import NullSink, TelemetrySink

# ---------------------------------------------------------------------------------------------- counterfactuals


@dataclass(frozen=True)
class Candidate:
    action: str  # "expand" | "collapse"
    index: int  # entry index in the context before the action
    paired_collapse: int | None = None  # expand only: entry index collapsed first to make room


def copy_context(wc: WorkingContext) -> WorkingContext:
    return WorkingContext(wc.tree, wc.w_max, wc.recent_tokens, wc.position_scheme, wc.entries, wc.sink_tokens)


def _run(wc: WorkingContext, j: int) -> range:
    """Entry indices a collapse at j replaces (one LOD0 block, or K gists)."""
    return range(j, j + (1 if wc.entries[j].level == 0 else wc.tree.block_size))


def candidate_actions(wc: WorkingContext) -> list[Candidate]:
    """Every legal collapse and every legal expand of `wc`; an expand that would overflow `w_max` is
    paired with the finest-level, oldest legal collapse not involving it, or left out if none exists."""
    n = len(wc.entries)
    collapsible = [j for j in range(n) if wc.can_collapse(j)]
    by_priority = sorted(collapsible, key=lambda j: (wc.entries[j].level, wc.entries[j].start))
    out = [Candidate("collapse", j) for j in collapsible]
    for i in range(n):
        if not wc.can_expand(i):
            continue
        extra = wc.expand_cost(i)
        if wc.cost + extra <= wc.w_max:
            out.append(Candidate("expand", i))
            continue
        for j in by_priority:
            if i not in _run(wc, j) and wc.cost + extra - wc.collapse_saving(j) <= wc.w_max:
                out.append(Candidate("expand", i, paired_collapse=j))
                break
    return out


def apply_candidate(wc: WorkingContext, cand: Candidate) -> WorkingContext:
    """A new context: `wc` after the action (the paired collapse first, so the budget holds throughout)."""
    out = copy_context(wc)
    if cand.action == "collapse":
        out.collapse(cand.index)
        return out
    target = wc.entries[cand.index]
    if cand.paired_collapse is not None:
        out.collapse(cand.paired_collapse)
    out.expand(out.entries.index(target))  # the collapse may have shifted the target's index
    return out


def context_input(wc: WorkingContext, embed_fn: EmbedFn) -> ConditionInput:
    embeds, positions, _ = wc.assemble(embed_fn)
    start = wc.entries[-1].end if wc.position_scheme == "center" else positions.numel()
    return ConditionInput(embeds, positions, start)


def mean_horizon_nll(
    lm: BaseLM, inputs: list[ConditionInput], horizons: list[torch.Tensor], batch_size: int
) -> list[float]:
    """Mean horizon NLL of each input (`horizons[j]` [H] long): one forward per group of up to
    `batch_size` inputs of the same length (`horizon_nll` needs equal lengths; no padding)."""
    by_length: dict[int, list[int]] = {}
    for j, c in enumerate(inputs):
        by_length.setdefault(c.embeds.shape[0], []).append(j)
    out = [math.nan] * len(inputs)
    for group in by_length.values():
        for a in range(0, len(group), batch_size):
            chunk = group[a : a + batch_size]
            nll = horizon_nll(
                lm, [inputs[j] for j in chunk], torch.stack([horizons[j] for j in chunk])
            )  # [b, H]
            for j, value in zip(chunk, nll.mean(dim=1).tolist()):
                out[j] = value
    return out


def evaluate_candidates(
    lm: BaseLM,
    contexts: list[WorkingContext],
    horizons: list[torch.Tensor],
    candidates: list[list[Candidate]],
    batch_size: int,
) -> list[tuple[float, list[float]]]:
    """For each context: (NLL before, [NLL after each of its candidates]), all in shared batches."""
    inputs, owners = [], []
    for c, (wc, cands) in enumerate(zip(contexts, candidates)):
        for wc_variant in [wc] + [apply_candidate(wc, cand) for cand in cands]:
            inputs.append(context_input(wc_variant, lm.embed))
            owners.append(c)
    nll = mean_horizon_nll(lm, inputs, [horizons[c] for c in owners], batch_size)
    out, pos = [], 0
    for cands in candidates:
        out.append((nll[pos], nll[pos + 1 : pos + 1 + len(cands)]))
        pos += 1 + len(cands)
    return out


def normalised_utilities(delta_nll, floor: float) -> np.ndarray:
    """Utility u = −ΔNLL of a context's actions, divided by max(max |u|, floor): [R] -> [R] in [-1, 1].
    The floor keeps a context where nothing matters from blowing noise up to ±1."""
    u = -np.asarray(delta_nll, dtype=np.float64)
    return np.clip(u / max(float(np.abs(u).max(initial=0.0)), floor), -1.0, 1.0)


def score_targets(utility, sign, can_expand, can_collapse) -> torch.Tensor:
    """The score each action asks of its entry: +u for an expand, −u for a collapse (`sign` ±1), clamped
    to the directions the entry allows (<= 0 if it cannot expand, >= 0 if it cannot collapse). All [R]."""
    t = torch.as_tensor(sign, dtype=torch.float32) * torch.as_tensor(utility, dtype=torch.float32)
    t = torch.where(can_expand, t, t.clamp(max=0))
    return torch.where(can_collapse, t, t.clamp(min=0))


# ---------------------------------------------------------------------------------------------- sampling contexts


def perturbed_context(
    wc: WorkingContext, rng: np.random.Generator, max_moves: int
) -> tuple[WorkingContext, list[int]]:
    """`wc` after 1..max_moves random legal moves within budget, and each entry's age at its level."""
    out = copy_context(wc)
    birth = {e: -int(rng.integers(0, AGE_SCALE + 1)) for e in out.entries}  # move count when it got its level
    created: list[Entry] = []
    moves = int(rng.integers(1, max_moves + 1))
    made = 0
    for _ in range(moves):
        options = [
            c
            for c in candidate_actions(out)
            if c.paired_collapse is None and out.entries[c.index] not in created  # no immediate undo
        ]
        if not options:
            break
        before = set(out.entries)
        out = apply_candidate(out, options[int(rng.integers(len(options)))])
        made += 1
        created = [e for e in out.entries if e not in before]
        for e in created:
            birth[e] = made
    return out, [made - birth[e] for e in out.entries]


def on_policy_context(
    history: torch.Tensor, make_tree, wcc, allocator_cfg, refocus_every: int, steps: int, seed: int
) -> tuple[WorkingContext, list[int]]:
    """A context the allocator itself reaches: the history but its last `steps` × `refocus_every` tokens
    ingested, its recency context, then those tokens streamed `refocus_every` at a time through
    `FocusAllocator` (forced collapses, stability rules, swaps) with seeded uniform scores in [-1, 1] as the
    policy. Returns the final context (its tree holds the whole history) and the allocator's true ages."""
    from mcx_core.focus.allocator import FocusAllocator

    C = len(history)
    start = max(C - steps * refocus_every, min(C, wcc.recent_tokens + wcc.sink_tokens + 1))
    tree = make_tree()
    tree.ingest(history[:start])
    wc = WorkingContext.initial(tree, wcc.w_max, wcc.recent_tokens, wcc.position_scheme, wcc.sink_tokens)
    alloc = FocusAllocator(allocator_cfg, wcc.w_max)
    alloc.settle(wc)  # as the runtime engine does after a prefill
    gen = torch.Generator().manual_seed(seed)
    for lo in range(start, C, refocus_every):
        tree.ingest(history[lo : min(lo + refocus_every, C)])
        wc.sync()
        alloc.fit(wc)
        alloc.step(wc, torch.rand(len(wc.entries), generator=gen) * 2 - 1)
    return wc, alloc.ages(wc).tolist()


def choose_candidates(
    cands: list[Candidate], max_candidates: int, rng: np.random.Generator
) -> list[Candidate]:
    """A random subset of at most `max_candidates`, half collapses when there are enough of them."""
    if len(cands) <= max_candidates:
        return cands
    expands = [c for c in cands if c.action == "expand"]
    collapses = [c for c in cands if c.action == "collapse"]
    expands = [expands[i] for i in rng.permutation(len(expands))]
    collapses = [collapses[i] for i in rng.permutation(len(collapses))]
    n_collapse = min(len(collapses), max(max_candidates // 2, max_candidates - len(expands)))
    return sorted(collapses[:n_collapse] + expands[: max_candidates - n_collapse], key=lambda c: c.index)


# ---------------------------------------------------------------------------------------------- tables


def generate_delta_table(
    cfg: MegaContextConfig,
    lm: BaseLM,
    gister: GistFn,
    gistnet_checkpoint: str | os.PathLike,
    train_ids: np.ndarray,
    out_dir: str | os.PathLike,
    sink: TelemetrySink | None = None,
    progress: bool = True,
    *,
    cycle: int = 0,
    run_id: str | None = None,
    sample_ids: list[str] | None = None,
    doc_ids: list[str] | None = None,
    w_max: int | None = None,
) -> tuple[Path, dict[str, float]]:
    """Label `deltas.samples` training samples (a seeded choice per cycle) × `deltas.contexts_per_sample`
    contexts (the recency one always among them) with the counterfactual ΔNLL of their candidate actions.

    Kinds of context: "recency" (always), `deltas.on_policy_contexts` "on_policy" ones (`on_policy_context`:
    where the allocator's own trajectory leads, with true ages) and the rest "perturbed".

    `gister` must be the GistNet of `gistnet_checkpoint` (a checkpoint directory or an id; its name is
    stored in every row). `train_ids` [N, >= C + H]; `sample_ids` name its rows (default `train-{row}`),
    `doc_ids` their documents (default: each sample its own; JT2 holds out whole documents); with
    `w_max` the contexts have that budget and histories are the rows of `train_ids` but the horizon;
    `run_id` defaults to the config's name. Writes `delta_table_path(out_dir, cycle, gistnet_checkpoint)`
    and its contexts file atomically and returns (that path, stats). The stats (`deltas/*` metric names)
    are also logged to `sink` at step `cycle`.
    """
    dcfg, wcc = cfg.deltas, cfg.working_context
    if w_max is not None:
        wcc = wcc.model_copy(update={"w_max": w_max})
    H, K = cfg.dataset.horizon, cfg.dataset.block_size
    train_ids = np.asarray(train_ids)
    C = train_ids.shape[1] - H if train_ids.ndim == 2 and w_max is not None else cfg.dataset.context_tokens
    if train_ids.ndim != 2 or train_ids.shape[1] < C + H:
        raise ValueError(
            f"train_ids must be [N, >= {C + H}] (context_tokens + horizon), got {train_ids.shape}"
        )
    sample_ids = sample_ids if sample_ids is not None else [f"train-{i:06d}" for i in range(len(train_ids))]
    if len(sample_ids) != len(train_ids):
        raise ValueError(f"{len(sample_ids)} sample ids for {len(train_ids)} samples")
    doc_ids = doc_ids if doc_ids is not None else list(sample_ids)
    if len(doc_ids) != len(train_ids):
        raise ValueError(f"{len(doc_ids)} document ids for {len(train_ids)} samples")
    n_on_policy = min(dcfg.on_policy_contexts, dcfg.contexts_per_sample - 1)
    n_perturbed = dcfg.contexts_per_sample - 1 - n_on_policy
    run_id = run_id or cfg.name
    ckpt = gistnet_label(gistnet_checkpoint)
    rng = np.random.default_rng([cfg.seed, cycle])
    chosen = np.sort(rng.permutation(len(train_ids))[: dcfg.samples])
    ids = torch.as_tensor(train_ids[chosen], dtype=torch.long)
    rows: list[dict] = []
    context_rows: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(chosen) * dcfg.contexts_per_sample, desc="delta table", unit="context", disable=not progress
    )
    for s, row_ids in zip(chosen.tolist(), ids):
        sample_id = sample_ids[s]
        history, horizon = row_ids[:C], row_ids[C : C + H]
        def make_tree():
            return MegaContextTree(lm.d_model, lm.embed, gister, block_size=K, input_fn=tree_inputs_fn(lm, gister, K))

        tree = make_tree()
        tree.ingest(history)
        recency = WorkingContext.initial(tree, wcc.w_max, wcc.recent_tokens, wcc.position_scheme, wcc.sink_tokens)
        contexts = [(recency, "recency", [0] * len(recency.entries))]
        for _ in range(n_perturbed):
            wc, ages = perturbed_context(recency, rng, dcfg.perturb_moves)
            contexts.append((wc, "perturbed", ages))
        for _ in range(n_on_policy):
            wc, ages = on_policy_context(history, make_tree, wcc, cfg.allocator, cfg.runtime.refocus_every,
                                         dcfg.trajectory_steps, int(rng.integers(2**31)))
            contexts.append((wc, "on_policy", ages))
        cands = [choose_candidates(candidate_actions(wc), dcfg.max_candidates, rng) for wc, _, _ in contexts]
        results = evaluate_candidates(
            lm, [wc for wc, _, _ in contexts], [horizon] * len(contexts), cands, dcfg.batch_size
        )
        stamp = now()
        for c, ((wc, kind, ages), context_cands, (nll_before, nll_after)) in enumerate(
            zip(contexts, cands, results)
        ):
            context_id = f"{run_id}/c{cycle}/{sample_id}/{c}"
            context_rows.append(
                {
                    "context_id": context_id,
                    "run_id": run_id,
                    "cycle": cycle,
                    "sample_id": sample_id,
                    "kind": kind,
                    "w_max": wc.w_max,
                    "recent_tokens": wc.recent_tokens,
                    "sink_tokens": wc.sink_tokens,
                    "position_scheme": wc.position_scheme,
                    "block_size": K,
                    "max_level": tree.max_level,
                    "cursor": tree.cursor,
                    "entries": json.dumps([asdict(e) for e in wc.entries]),
                    "ages": ages,
                    "history_ids": history.tolist(),
                    "horizon_ids": horizon.tolist(),
                    "nll_before": nll_before,
                    "gistnet_checkpoint": ckpt,
                    "doc_id": doc_ids[s],
                }
            )
            for cand, after in zip(context_cands, nll_after):
                e = wc.entries[cand.index]
                paired = None if cand.paired_collapse is None else wc.entries[cand.paired_collapse].span_id
                rows.append(
                    {
                        "run_id": run_id,
                        "cycle": cycle,
                        "sample_id": sample_id,
                        "block_id": e.span_id,
                        "level": e.level,
                        "action": cand.action,
                        "delta_nll": after - nll_before,
                        "token_cost": apply_candidate(wc, cand).cost - wc.cost,
                        "distance_to_cursor": tree.cursor - e.end,
                        "horizon": H,
                        "timestamp": stamp,
                        "gistnet_checkpoint": ckpt,
                        "context_id": context_id,
                        "entry_index": cand.index,
                        "w_max": wc.w_max,
                        "span_start": e.start,
                        "span_end": e.end,
                        "nll_before": nll_before,
                        "nll_after": after,
                        "paired_block_id": paired,
                    }
                )
        bar.update(len(contexts))
        bar.set_postfix(rows=len(rows), s=f"{time.perf_counter() - t0:.0f}")
    bar.close()
    out_path = delta_table_path(out_dir, cycle, gistnet_checkpoint)
    contexts_table = pa.Table.from_pylist(context_rows, schema=CONTEXT_SCHEMA)
    write_atomic(contexts_path(out_path), lambda p: write_arrow(contexts_table, p))
    table = pa.Table.from_pylist(rows, schema=DELTA_SCHEMA)
    write_atomic(out_path, lambda p: pq.write_table(table, p))
    stats = delta_table_stats(rows, len(context_rows), len(chosen), time.perf_counter() - t0)
    (sink or NullSink()).log_metrics(stats, step=cycle)
    return out_path, stats


def delta_table_stats(rows: list[dict], n_contexts: int, n_samples: int, seconds: float) -> dict[str, float]:
    """What a delta-table run cost and what its labels look like (`deltas/*` metric names)."""
    delta = np.array([r["delta_nll"] for r in rows], dtype=np.float64)
    action = np.array([r["action"] for r in rows])

    def mean_of(mask: np.ndarray) -> float:
        return float(delta[mask].mean()) if mask.any() else math.nan

    return {
        M.DELTAS_SAMPLES: float(n_samples),
        M.DELTAS_CONTEXTS: float(n_contexts),
        M.DELTAS_ROWS: float(len(rows)),
        M.DELTAS_SECONDS: seconds,
        M.DELTAS_SECONDS_PER_CONTEXT: seconds / max(n_contexts, 1),
        M.DELTAS_ROWS_PER_CONTEXT: len(rows) / max(n_contexts, 1),
        M.DELTAS_SEQUENCES: float(
            len(rows) + n_contexts
        ),  # base-model sequences scored (before + each action)
        M.DELTAS_HELPFUL_FRACTION: float((delta < 0).mean()) if len(rows) else math.nan,
        M.DELTAS_EXPAND_DELTA_NLL_MEAN: mean_of(action == "expand"),
        M.DELTAS_COLLAPSE_DELTA_NLL_MEAN: mean_of(action == "collapse"),
    }


# ---------------------------------------------------------------------------------------------- oracle


