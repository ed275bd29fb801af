"""Synthetic recall samples: a fact planted early in long held-out narrative text, asked for at the end.

Two tasks, used in turn (`sweep.recall_kinds`):
  passkey — "The pass key is 48213. Remember it. 48213 is the pass key." planted once;
  kv      — `sweep.recall_pairs` lines "falcon: 7291" planted at separate places, one key asked for.

A sample has exactly `context_tokens + horizon` tokens. The history (C tokens) is filler text with the
needles inside `sweep.recall_needle_region` (never in the attention sink) and ends with the question
("... The pass key is"); the horizon starts with the answer's tokens ("48213"), then the text goes on.
So the NLL of the first `answer_tokens` horizon positions measures recall alone. Needles also stay out
of the recency baseline's window at every swept W_max (when the region leaves room), so dropping
history loses them and only the compressed history can recall them. Same seed -> the same samples.

Filler is held-out narrative text: the evaluation split of the narrative block dataset when it is built
with this tokenizer, else the same split of the narrative corpus's documents, assigned by work exactly
as the block-dataset builder assigns them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from mcx_core import data
from mcx_core.config import CorpusConfig, MegaContextConfig
from mcx_core.model.base import tokenizer_id

log = logging.getLogger(__name__)

PASSKEY_NEEDLE = "\nThe pass key is {value}. Remember it. {value} is the pass key.\n"
PASSKEY_QUERY = "\nWhat is the pass key? The pass key is"
KV_NEEDLE = "\n{key}: {value}\n"
KV_QUERY = "\nWhat was the number for {key}?\n{key}:"
ANSWER_END = {"passkey": ".\n", "kv": "\n"}
KV_KEYS = (
    "apple", "river", "candle", "falcon", "violet", "copper", "meadow", "lantern", "harbor", "thistle",
    "saddle", "marble", "pepper", "willow", "anchor", "velvet", "ember", "orchid", "quartz", "raven",
    "tulip", "walnut", "cobalt", "juniper",
)  # fmt: skip
LINE_SEARCH = 32  # a needle moves at most this many tokens forward to start on a new line
CORRECT_NLL = math.log(2.0)  # p > 1/2: the token is certainly the model's top choice


# ---------------------------------------------------------------------------------------------- filler


def narrative_filler(cfg: MegaContextConfig, tokenizer) -> tuple[list[str], list[np.ndarray]]:
    """Held-out narrative text as (source ids, token arrays [n_tokens]), each one sample long or more."""
    split = cfg.evaluation.split
    built = _block_dataset_filler(cfg, tokenizer, split)
    if built is not None:
        return built
    corpora = [(n, c) for n, c in sorted(cfg.dataset.corpora.items()) if c.kind == "narrative"]
    name, corpus = corpora[0] if corpora else ("narrative", CorpusConfig(source="embedded:shakespeare"))
    docs = list(data.iter_documents(name, corpus, root=cfg.root))
    min_tokens = cfg.dataset.min_document_tokens or cfg.dataset.sample_tokens
    kept = [
        (d, ids)
        for d, ids in zip(docs, data.tokenize_texts(tokenizer, [d.text for d in docs]))
        if len(ids) >= min_tokens
    ]
    # The builder's assignment: by work, over the documents long enough to keep.
    split_of = data.assign_splits((d.work_id for d, _ in kept), cfg.dataset.split_fractions, cfg.seed)
    held_out = [(d, ids) for d, ids in kept if split_of[d.work_id] == split]
    if not held_out:
        raise ValueError(
            f"no narrative document of at least {min_tokens} tokens in split {split!r} of {name!r}"
        )
    return [f"{name}/{d.doc_id}" for d, _ in held_out], [ids.astype(np.int64) for _, ids in held_out]


def _block_dataset_filler(cfg: MegaContextConfig, tokenizer, split: str):

    out = cfg.resolve(cfg.dataset.output_dir)
    if not (Path(out) / data.MANIFEST).is_file():
        return None
    manifest = data.load_manifest(out)
    same_tokens = manifest["tokenizer"] == tokenizer_id(tokenizer)
    if manifest["sample_tokens"] != cfg.dataset.sample_tokens or not same_tokens:
        return None
    for name, entry in sorted(manifest["corpora"].items()):
        if entry["kind"] == "narrative" and entry["splits"].get(split, {}).get("samples"):
            ids = data.load_samples(out, name, split)
            return data.load_split(out, name, split).column("sample_id").to_pylist(), list(ids)
    return None


# ---------------------------------------------------------------------------------------------- samples


def build_recall_samples(
    cfg: MegaContextConfig,
    tokenizer,
    n: int,
    seed: int,
    filler: tuple[list[str], list[np.ndarray]] | None = None,
) -> tuple[list[str], np.ndarray, list[dict]]:
    """`n` recall samples: (sample ids, token ids [n, C+H] int64, one meta dict per sample).

    meta: kind, value (the answer text), query_key (kv), needle_position (first token of the asked
    needle), needle_span / needle_spans ([start, end) in the sample), answer_span ([start, end) in the
    sample; starts at C), answer_tokens, source (filler id) and source_offset.
    """
    C, H = cfg.dataset.context_tokens, cfg.dataset.horizon
    sources, texts = filler if filler is not None else narrative_filler(cfg, tokenizer)
    kinds = cfg.sweep.recall_kinds
    ids, metas = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        row, meta = _build_one(kinds[i % len(kinds)], rng, tokenizer, cfg, sources, texts)
        assert row.shape == (C + H,), row.shape
        ids.append(row)
        metas.append({"sample_id": f"recall/{meta['kind']}/s{seed}/{i:04d}", **meta})
    recent = recency_start(cfg)
    seen = sum(m["needle_spans"][-1][1] > recent for m in metas) if recent is not None else 0
    if seen:
        log.warning(
            "%d of %d recall samples have a needle inside the recency window of W_max %d (history %d): "
            "sweep.recall_needle_region leaves no room before it",
            seen, n, max(cfg.sweep.w_max), C,
        )  # fmt: skip
    return [m["sample_id"] for m in metas], np.stack(ids), metas


def recency_start(cfg: MegaContextConfig) -> int | None:
    """The first non-sink history position the recency baseline keeps at the largest swept W_max below
    the history length (None when every W_max holds the whole history)."""
    C, sink = cfg.dataset.context_tokens, cfg.working_context.sink_tokens
    windows = [w for w in cfg.sweep.w_max if w < C]
    return C - (max(windows) - min(sink, max(windows))) if windows else None


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _split_answer(tokenizer, query: str, value: str) -> tuple[list[int], list[int]]:
    """Query and answer ids whose concatenation is how the tokenizer reads "query value" as one text.
    The space goes with the query when that keeps the tokenization (digit-splitting tokenizers read
    " 48213" as a space token + digits, and the space alone says nothing about recall)."""
    joint = _encode(tokenizer, f"{query} {value}")
    for q, a in ((f"{query} ", value), (query, f" {value}")):
        q_ids, a_ids = _encode(tokenizer, q), _encode(tokenizer, a)
        if a_ids and q_ids + a_ids == joint:
            return q_ids, a_ids
    return _encode(tokenizer, query), _encode(tokenizer, f" {value}")


def _line_start(tokenizer, filler: np.ndarray, p: int, limit: int) -> int:
    """The first position at or after `p` (and before `limit`) that follows a newline, else `p`."""
    for q in range(p, min(p + LINE_SEARCH, limit)):
        if q == 0 or tokenizer.decode([int(filler[q - 1])]).endswith("\n"):
            return q
    return p


def _query_on_new_line(tokenizer, text: np.ndarray, offset: int, m: int, need: int) -> int:
    """A filler offset at or after `offset` whose m-th token ends a line (so the question starts one)."""
    for q in range(offset, min(offset + LINE_SEARCH, len(text) - need + 1)):
        if tokenizer.decode([int(text[q + m - 1])]).endswith("\n"):
            return q
    return offset


def _build_one(kind: str, rng: np.random.Generator, tokenizer, cfg: MegaContextConfig, sources, texts):
    C, H = cfg.dataset.context_tokens, cfg.dataset.horizon
    sw = cfg.sweep
    if kind == "passkey":
        value = str(int(rng.integers(10 ** (sw.recall_digits - 1), 10**sw.recall_digits)))
        needles = [_encode(tokenizer, PASSKEY_NEEDLE.format(value=value))]
        target, key, query = 0, None, PASSKEY_QUERY
    else:
        keys = [str(k) for k in rng.choice(KV_KEYS, size=sw.recall_pairs, replace=False)]
        values = [str(int(v) + 1000) for v in rng.choice(9000, size=sw.recall_pairs, replace=False)]
        needles = [_encode(tokenizer, KV_NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
        target = int(rng.integers(sw.recall_pairs))
        key, value = keys[target], values[target]
        query = KV_QUERY.format(key=key)
    query_ids, answer_ids = _split_answer(tokenizer, query, value)
    end_ids = _encode(tokenizer, ANSWER_END[kind])
    if len(answer_ids) > H:
        raise ValueError(f"the horizon ({H}) is shorter than the answer ({len(answer_ids)} tokens)")
    n_needle = sum(len(x) for x in needles)
    m = C - n_needle - len(query_ids)  # filler tokens in the history
    tail = max(0, H - len(answer_ids) - len(end_ids))  # filler tokens in the horizon
    lo = max(int(sw.recall_needle_region[0] * C), cfg.working_context.sink_tokens)
    end = min(int(sw.recall_needle_region[1] * C), C - len(query_ids))  # the last needle ends by then
    recent = recency_start(cfg)
    if recent is not None and recent - n_needle - lo >= len(needles):
        end = min(end, recent)  # out of reach of recency at every swept W_max, so only memory recalls it
    hi = end - n_needle
    if hi - lo < len(needles):
        raise ValueError(
            f"no room for {len(needles)} needle(s) of {n_needle} tokens in history positions [{lo}, {hi + n_needle}) "
            f"of a {C}-token history (sweep.recall_needle_region)"
        )
    eligible = [j for j, t in enumerate(texts) if len(t) >= m + tail]
    if not eligible:
        raise ValueError(f"no filler text of at least {m + tail} tokens")
    j = eligible[int(rng.integers(len(eligible)))]
    offset = int(rng.integers(len(texts[j]) - (m + tail) + 1))
    offset = _query_on_new_line(tokenizer, texts[j], offset, m, m + tail)
    filler = np.asarray(texts[j][offset : offset + m + tail], dtype=np.int64)
    points = sorted(int(p) for p in rng.choice(np.arange(lo, hi), size=len(needles), replace=False))
    points = sorted(_line_start(tokenizer, filler, p, hi) for p in points)

    pieces, spans, prev = [], [], 0
    for p, needle in zip(points, needles):
        pieces.append(filler[prev:p])
        start = sum(len(x) for x in pieces)
        spans.append([start, start + len(needle)])
        pieces.append(np.asarray(needle, dtype=np.int64))
        prev = p
    pieces += [filler[prev:m], np.asarray(query_ids, dtype=np.int64)]
    history = np.concatenate(pieces)
    horizon = np.concatenate([answer_ids, end_ids, filler[m:]]).astype(np.int64)[:H]
    meta = {
        "kind": kind,
        "value": value,
        "query_key": key,
        "needle_position": spans[target][0],
        "needle_span": spans[target],
        "needle_spans": spans,
        "answer_span": [C, C + len(answer_ids)],
        "answer_tokens": len(answer_ids),
        "source": sources[j],
        "source_offset": offset,
    }
    return np.concatenate([history, horizon]), meta


# ---------------------------------------------------------------------------------------------- metrics


def horizon_answer_span(meta: dict, context_tokens: int) -> tuple[int, int]:
    """The answer's [start, end) in horizon positions (0 = the first horizon token)."""
    start, end = meta["answer_span"]
    return start - context_tokens, end - context_tokens


def answer_nll(token_nll, span: tuple[int, int]) -> float:
    """Mean NLL of the answer tokens, from the per-position horizon NLLs [H]."""
    return float(np.mean(np.asarray(token_nll, dtype=np.float64)[span[0] : span[1]]))


def answer_accuracy(token_nll, span: tuple[int, int]) -> float:
    """Share of answer tokens the model gives p > 1/2 (NLL < ln 2). Such a token is the greedy choice,
    so this is a lower bound on greedy token accuracy that needs only the NLLs."""
    return float(np.mean(np.asarray(token_nll, dtype=np.float64)[span[0] : span[1]] < CORRECT_NLL))
