"""Fixed-budget peers (SPEC §7): what a user would pick instead of MegaContext, at the same W_max.

Each peer keeps exactly W_max of the C history tokens (all of them when C <= W_max), and the frozen
model re-reads the kept tokens at their original position ids — a token-selection (hard prompt) version
of the KV-cache press of the same name (NVIDIA's kvpress implements the presses but pins an older
transformers):

  newest         the newest W_max tokens, no sink;
  streaming_llm  the attention sink (the first `sink_tokens`) + the newest tokens — StreamingLLM, the same
                 selection as the `recency` baseline, so the evaluations copy recency's rows under its name
                 (the same NLLs) instead of scoring it again (`COPIED_FROM`);
  tova           the tokens the last history position attends to most (TOVA);
  h2o            heavy hitters — the most attention received, summed over every query position — plus
                 the newest tokens, `h2o_recent_share` of the budget (H2O; the paper splits half/half);
  block_select   whole `block_size` blocks the newest `block_size` tokens attend to most, the newest block
                 always, any remainder by the newest tokens left.

The attention peers choose after reading the whole history once: one forward of the base model over the
history (never the horizon — a condition receives only the history), attention averaged over heads and
then layers. That forward is shared by the three of them and by every W_max (`HistoryAttention` caches
its scores per history).

Every attention peer also keeps the sink and the last history token. The sink because every working
context and the recency baseline keep it (`working_context.sink_tokens`), so all conditions spend the same
budget on it and differ only in how they fill the rest. The published methods do not force it, and on
SmolLM2 with mid-document histories their own ranking does not always keep it (TOVA's top W_max left out
some of the first 3 tokens in each of 3 narrative samples; H2O's heavy hitters held all 3 in 2 of them).
The last token because it predicts the first horizon token (kvpress's TOVA forces it too). `newest` keeps
no sink: it shows what the sink is worth.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from mcx_core import reports
from mcx_core.config import MegaContextConfig
from mcx_core.config.sections import PEER_NAMES
from mcx_core.eval.nll import Condition, EvalRow, recency_condition
from mcx_core.model.base import BaseLM
from mcx_core.model.scoring import ConditionInput

# ---------------------------------------------------------------------------------------------- attention


@dataclass
class AttentionScores:
    """Attention over a C-token history, averaged over heads and layers; each [C] float32 on the CPU."""

    last: torch.Tensor  # received from the last history position (TOVA)
    received: torch.Tensor  # received from every query position, summed (H2O's cumulative attention)
    window: torch.Tensor  # received from the newest `window` positions, summed (block selection)


class HistoryAttention:
    """`AttentionScores` of a history from one forward of the base model with eager attention (the default
    sdpa returns no weights). Each layer's [heads, C, C] probabilities are reduced in a forward hook as
    they are computed, so no more than one layer's are alive at a time. Scores are cached per history
    (keyed by its bytes) for the peers and W_max values that share them."""

    def __init__(self, lm: BaseLM, window: int, cache_size: int = 4096):
        self.lm, self.window, self.cache_size = lm, window, cache_size
        self._cache: OrderedDict[bytes, AttentionScores] = OrderedDict()
        self.forwards = 0  # base-model forwards run (cache misses)

    def __call__(self, history: torch.Tensor) -> AttentionScores:
        key = hashlib.blake2b(history.detach().cpu().numpy().tobytes(), digest_size=16).digest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        scores = self._forward(history)
        self._cache[key] = scores
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return scores

    def _forward(self, history: torch.Tensor) -> AttentionScores:
        scores = reduced_attention(self.lm, self.window, input_ids=history.to(self.lm.device)[None])
        self.forwards += 1
        return scores


@torch.no_grad()
def reduced_attention(lm: BaseLM, window: int, **inputs) -> AttentionScores:
    """`AttentionScores` of one sequence from one eager-attention forward of the decoder (no LM head) on
    `inputs` (`input_ids`, or `inputs_embeds` with `position_ids`; batch 1). Each layer's [heads, T, T]
    probabilities are reduced in a forward hook as they are computed, so one layer's are alive at a time."""
    model = lm.model
    decoder = model.get_decoder()
    first = inputs.get("input_ids", inputs.get("inputs_embeds"))
    T = first.shape[1]
    acc = {k: torch.zeros(T, dtype=torch.float32) for k in ("last", "received", "window")}
    missing: list[int] = []

    def reduce(module, args, output):
        probs = output[1]  # [1, heads, T, T] under eager attention
        if probs is None:
            missing.append(module.layer_idx)
            return
        p = probs[0].float()
        acc["last"] += p[:, -1].mean(0).cpu()
        acc["received"] += p.sum(1).mean(0).cpu()
        acc["window"] += p[:, -window:].sum(1).mean(0).cpu()

    hooks = [layer.self_attn.register_forward_hook(reduce) for layer in decoder.layers]
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        decoder(**inputs, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
        for h in hooks:
            h.remove()
    if missing:
        raise RuntimeError(f"{type(model).__name__} returned no attention weights under eager attention (layers {missing})")
    n = len(decoder.layers)
    return AttentionScores(acc["last"] / n, acc["received"] / n, acc["window"] / n)


# ---------------------------------------------------------------------------------------------- selections
# Each takes the history length C and the budget w < C and returns the kept positions: w of them, strictly
# increasing, in [0, C).


def _top_up(kept: torch.Tensor, scores: torch.Tensor, w: int) -> torch.Tensor:
    """`kept` ([C] bool, at most w set) plus the highest-scoring other positions, w in all."""
    free = (~kept).nonzero().squeeze(1)
    need = w - int(kept.sum())
    order = torch.argsort(scores[free], descending=True, stable=True)
    kept = kept.clone()
    kept[free[order[:need]]] = True
    return kept.nonzero().squeeze(1)


def _forced(C: int, w: int, sink: int, newest: int) -> torch.Tensor:
    """[C] bool: the first `sink` and the newest `newest` positions, within the budget (sink first)."""
    kept = torch.zeros(C, dtype=torch.bool)
    s = min(sink, w)
    kept[:s] = True
    n = min(newest, w - s)
    if n:
        kept[C - n :] = True
    return kept


def newest(C: int, w: int) -> torch.Tensor:
    return torch.arange(C - w, C)


def tova(scores: AttentionScores, w: int, sink: int) -> torch.Tensor:
    C = scores.last.numel()
    return _top_up(_forced(C, w, sink, 1), scores.last, w)


def h2o(scores: AttentionScores, w: int, sink: int, recent_share: float) -> torch.Tensor:
    C = scores.received.numel()
    recent = max(1, round(recent_share * (w - min(sink, w))))
    return _top_up(_forced(C, w, sink, recent), scores.received, w)


def block_select(scores: AttentionScores, w: int, sink: int, block_size: int) -> torch.Tensor:
    """Blocks are aligned at position 0 (the tree's blocks); the newest block may be partial."""
    C = scores.window.numel()
    newest_block = C - ((C - 1) // block_size) * block_size
    kept = _forced(C, w, sink, newest_block)
    block_scores = torch.stack([scores.window[b : b + block_size].sum() for b in range(0, C, block_size)])
    for b in torch.argsort(block_scores, descending=True, stable=True).tolist():
        span = slice(b * block_size, min((b + 1) * block_size, C))
        cost = int((~kept[span]).sum())
        if 0 < cost <= w - int(kept.sum()):
            kept[span] = True
    # What no whole block fits goes to the newest tokens not yet kept.
    return _top_up(kept, torch.arange(C, dtype=torch.float32), w)


# ---------------------------------------------------------------------------------------------- conditions


def _read(lm: BaseLM, history: torch.Tensor, keep: torch.Tensor, position_scheme: str) -> ConditionInput:
    """The kept tokens at their original positions (`center`, horizon at C) or renumbered 0.. (`compact`)."""
    if position_scheme == "compact":
        return ConditionInput(lm.embed(history[keep]), torch.arange(keep.numel()), keep.numel())
    return ConditionInput(lm.embed(history[keep]), keep, history.numel())


def _selection_condition(lm: BaseLM, select, position_scheme: str) -> Condition:
    def build(history: torch.Tensor, w_max: int) -> ConditionInput:
        C = history.numel()
        keep = torch.arange(C) if C <= w_max else select(history, w_max)
        return _read(lm, history, keep, position_scheme)

    return build


def peer_conditions(
    lm: BaseLM, names: list[str], sink_tokens: int, block_size: int, position_scheme: str = "center",
    h2o_recent_share: float = 0.5, attention: HistoryAttention | None = None,
) -> dict[str, Condition]:
    """The conditions of the peers `names` (any of `PEER_NAMES`), sharing one `HistoryAttention` (`attention`,
    or a new one)."""
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise ValueError(f"evaluation.peers: unknown peer(s) {unknown}; choose from {list(PEER_NAMES)}")
    attention = attention or HistoryAttention(lm, window=block_size)
    if attention.window != block_size:
        raise ValueError(f"block selection scores by the newest {block_size} tokens; the attention's window is {attention.window}")
    selections = {
        "newest": lambda h, w: newest(h.numel(), w),
        "tova": lambda h, w: tova(attention(h), w, sink_tokens),
        "h2o": lambda h, w: h2o(attention(h), w, sink_tokens, h2o_recent_share),
        "block_select": lambda h, w: block_select(attention(h), w, sink_tokens, block_size),
    }
    return {
        n: recency_condition(lm, sink_tokens, position_scheme) if n == "streaming_llm"
        else _selection_condition(lm, selections[n], position_scheme)
        for n in names
    }


def config_peer_conditions(cfg: MegaContextConfig, lm: BaseLM) -> dict[str, Condition]:
    """`peer_conditions` for the config's `evaluation.peers` that are scored (not those of `COPIED_FROM`:
    `copied_rows` supplies their rows)."""
    wc = cfg.working_context
    return peer_conditions(lm, scored(cfg.evaluation.peers), wc.sink_tokens, cfg.dataset.block_size,
                           wc.position_scheme, cfg.evaluation.h2o_recent_share)


# Peers whose selection is exactly another condition's: their rows are that condition's, copied under the
# peer's name, which saves their forwards (StreamingLLM keeps the sink + the newest tokens, as `recency` does).
COPIED_FROM = {"streaming_llm": "recency"}


def scored(names: list[str]) -> list[str]:
    """Of the peers `names`, those whose rows must be scored."""
    return [n for n in names if n not in COPIED_FROM]


def copied_rows(rows: list[EvalRow], names: list[str], w_values: list[int]) -> list[EvalRow]:
    """The rows of the copied peers among `names` at `w_values`: their source condition's rows, renamed."""
    out = []
    for peer in (n for n in names if n in COPIED_FROM):
        source = COPIED_FROM[peer]
        out += [EvalRow(r.dataset, r.sample_id, peer, r.w_max, r.nll, list(r.token_nll), r.context_len)
                for r in rows if r.condition == source and r.w_max in w_values]
    return out


PEER_LABELS = {
    "newest": "newest-W_max",
    "streaming_llm": "StreamingLLM (sink + newest)",
    "tova": "TOVA",
    "h2o": "H2O",
    "block_select": "block selection",
}


def report_note(block_size: int, w_values: list[int]) -> str:
    """The sentences every report that shows peers carries; `w_values`: the W_max the peers are scored at."""
    return (
        "Peers keep exactly W_max history tokens, which the model re-reads at their original positions: "
        "newest-W_max (no sink), StreamingLLM (sink + newest), TOVA (attention from the last history position), "
        f"H2O (heavy hitters by cumulative attention + the newest tokens) and block selection (the {block_size}-token "
        f"blocks the newest {block_size} tokens attend to most). The attention peers choose after reading the whole "
        "history once (one forward of the base model, attention averaged over heads and layers); they keep the sink "
        "and the last history token. StreamingLLM selects exactly what recency does, so its rows are recency's "
        f"(the same NLLs, not scored twice). Peers are scored at W_max {', '.join(map(str, w_values))} "
        "(`evaluation.peer_w_max`)."
    )


def peer_table(summary: list[dict], peers: list[str], versus: str | None = None) -> tuple[list[dict], list[str], list[str]]:
    """(rows, columns, headers) of a report table, one row per dataset × W_max × peer: ΔNLL and recovery with
    their intervals, whether the peer beats recency, and with `versus` (a method, e.g. "gist") the paired
    difference NLL_versus − NLL_peer and whether `versus` beats the peer."""
    keys = {"delta_nll": "delta_nll_{p}", "recovery": "recovery_{p}", "minus_recency": "{p}_minus_recency"}
    if versus:
        keys["versus"] = f"{versus}_minus_{{p}}"
    rows = []
    for s in summary:
        for p in (p for p in peers if f"nll_{p}" in s):  # a peer not scored at this W_max has no row
            row = {"dataset": s["dataset"], "w_max": s["w_max"], "peer": PEER_LABELS[p],
                   "beats_recency": s[f"{p}_beats_recency"]}
            for new, old in keys.items():
                for suffix in ("", "_mean", "_p95", "_ci_lo", "_ci_hi"):
                    if old.format(p=p) + suffix in s:
                        row[new + suffix] = s[old.format(p=p) + suffix]
            if versus:
                row["versus_beats"] = s[f"{versus}_beats_{p}"]
            rows.append(row)
    cols = ["dataset", "w_max", "peer", "delta_nll", "delta_nll_p95", "recovery", "minus_recency", "beats_recency"]
    headers = ["dataset", "w_max", "peer", "ΔNLL", "ΔNLL p95", "recovery", "peer − recency", "beats recency"]
    if versus:
        cols += ["versus", "versus_beats"]
        headers += [f"{versus} − peer", f"{versus} beats peer"]
    return reports.with_intervals(rows, list(keys)), cols, headers
