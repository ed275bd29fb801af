"""Synthetic recall samples (mcx_core.data.recall): exact lengths, needles where the meta says, answers at the
start of the horizon, deterministic per seed, and out of reach of the recency baseline."""

import itertools
import math

import numpy as np
import pytest
import torch

from mcx_core import data
from mcx_core.config import BaseModelConfig, CorpusConfig, DatasetConfig, MegaContextConfig
from mcx_core.data import recall
from mcx_core.eval import nll as E
from mcx_core.model.base import BaseLM, freeze, tiny_llama

C, H = 256, 16


def make_cfg(out_dir, horizon: int = H, **sweep) -> MegaContextConfig:
    return MegaContextConfig(
        name="test-recall",
        seed=7,
        dataset=DatasetConfig(
            context_tokens=C,
            horizon=horizon,
            corpora={"narrative": CorpusConfig(source="embedded:shakespeare", max_documents=6)},
            split_fractions={"train": 0.6, "val": 0.2, "test": 0.2},
            output_dir=str(out_dir),
        ),
        working_context={"w_max": 96, "eval_w_max": [64, 96], "recent_tokens": 32, "sink_tokens": 32},
        sweep={"samples": 4, **sweep},
    )


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return make_cfg(tmp_path_factory.mktemp("no-datasets"))  # no manifest: filler from the documents


@pytest.fixture(scope="module")
def filler(cfg, tokenizer):
    return recall.narrative_filler(cfg, tokenizer)


@pytest.fixture(scope="module")
def built(cfg, tokenizer, filler):
    return recall.build_recall_samples(cfg, tokenizer, 6, seed=3, filler=filler)


def test_samples_have_exact_length_and_both_kinds(cfg, built):
    ids, x, metas = built
    assert x.shape == (6, C + H) and x.dtype == np.int64
    assert len(ids) == len(set(ids)) == len(metas) == 6
    assert [m["kind"] for m in metas] == ["passkey", "kv"] * 3
    assert all(m["sample_id"] == i for m, i in zip(metas, ids))


def test_needles_lie_early_in_the_history(cfg, tokenizer, built):
    _, x, metas = built
    lo = max(int(cfg.sweep.recall_needle_region[0] * C), cfg.working_context.sink_tokens)
    hi = int(cfg.sweep.recall_needle_region[1] * C)
    for row, m in zip(x, metas):
        spans = m["needle_spans"]
        assert len(spans) == (1 if m["kind"] == "passkey" else cfg.sweep.recall_pairs)
        assert all(lo <= s < e <= hi for s, e in spans), spans
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "needles overlap"
        s, e = m["needle_span"]
        assert s == m["needle_position"] and [s, e] in spans
        needle = tokenizer.decode(row[s:e].tolist())
        assert m["value"] in needle
        if m["kind"] == "kv":
            assert f"{m['query_key']}: {m['value']}" in needle


def test_answer_tokens_open_the_horizon(cfg, tokenizer, built):
    _, x, metas = built
    for row, m in zip(x, metas):
        s, e = m["answer_span"]
        assert s == C and e - s == m["answer_tokens"] > 0
        assert tokenizer.decode(row[s:e].tolist()).strip() == m["value"]
        assert recall.horizon_answer_span(m, C) == (0, m["answer_tokens"])
        question = tokenizer.decode(row[C - 12 : C].tolist())
        expected = "The pass key is" if m["kind"] == "passkey" else f"{m['query_key']}:"
        assert question.rstrip().endswith(expected), question
        # The question + answer read as one text tokenize to exactly these ids (nothing is split oddly).
        tail = row[C - 12 : e].tolist()
        assert tokenizer(tokenizer.decode(tail), add_special_tokens=False)["input_ids"] == tail


def test_same_seed_same_samples_other_seed_other_samples(cfg, tokenizer, filler, built):
    ids, x, metas = built
    ids2, x2, metas2 = recall.build_recall_samples(cfg, tokenizer, 6, seed=3, filler=filler)
    assert ids2 == ids and metas2 == metas
    np.testing.assert_array_equal(x2, x)
    ids3, x3, metas3 = recall.build_recall_samples(cfg, tokenizer, 6, seed=4, filler=filler)
    assert ids3 != ids
    assert [m["value"] for m in metas3] != [m["value"] for m in metas]
    assert not np.array_equal(x3, x)


def test_full_history_sees_the_needle_recency_does_not(cfg, tokenizer, built):
    _, x, metas = built
    model = freeze(tiny_llama(BaseModelConfig(source="tiny_random"), vocab_size=len(tokenizer), seed=0))
    lm = BaseLM(model=model, tokenizer=tokenizer, model_id="tiny-test")
    w = min(cfg.working_context.eval_w_max)
    full = E.full_condition(lm)
    recency = E.recency_condition(lm, cfg.working_context.sink_tokens, cfg.working_context.position_scheme)
    for row, m in zip(x, metas):
        history = torch.as_tensor(row[:C])
        s, e = m["needle_span"]
        needle = set(range(s, e))
        assert needle <= set(full(history, w).positions.tolist())
        kept = recency(history, w).positions.tolist()
        assert len(kept) == w
        assert not needle & set(kept), f"the needle {s}..{e} is inside the recency window"
        # ...but the question is: recency is asked, it just cannot know the answer.
        assert C - 1 in kept


def test_answer_metrics_use_only_the_answer_positions():
    token_nll = [0.1, 2.0, 0.5, 3.0, 0.0]
    assert recall.answer_nll(token_nll, (0, 2)) == pytest.approx(1.05)
    assert recall.answer_nll(token_nll, (2, 4)) == pytest.approx(1.75)
    assert recall.answer_accuracy(token_nll, (0, 3)) == pytest.approx(2 / 3)
    # p > 1/2 is the bar: NLL just under ln 2 counts, just over does not.
    assert recall.answer_accuracy([math.log(2) - 1e-6, math.log(2) + 1e-6], (0, 2)) == 0.5


def test_a_horizon_shorter_than_the_answer_is_refused(tokenizer, filler, tmp_path):
    cfg = make_cfg(tmp_path, horizon=4, recall_digits=6)
    with pytest.raises(ValueError, match="shorter than the answer"):
        recall.build_recall_samples(cfg, tokenizer, 1, seed=0, filler=filler)


def test_filler_is_the_held_out_split_of_the_block_dataset(cfg, tokenizer, filler, tmp_path):
    """Built block datasets are the filler when present; without them the same works are used."""
    built_cfg = make_cfg(tmp_path / "ds")
    data.build_block_datasets(built_cfg, tokenizer, progress=False)
    sources, texts = recall.narrative_filler(built_cfg, tokenizer)
    split = built_cfg.evaluation.split
    table = data.load_split(tmp_path / "ds", "narrative", split)
    assert sources == table.column("sample_id").to_pylist()
    assert all(len(t) == C + H for t in texts)
    doc_ids = {s.removeprefix("narrative/") for s in filler[0]}
    assert set(table.column("doc_id").to_pylist()) <= doc_ids
    train = set(data.load_split(tmp_path / "ds", "narrative", "train").column("doc_id").to_pylist())
    assert not doc_ids & train


def test_needles_stay_out_of_the_recency_window_of_every_swept_w_max(tokenizer, filler, tmp_path):
    """A region reaching into the newest tokens is cut where recency at the largest W_max begins."""
    cfg = make_cfg(tmp_path, w_max=[64, 160], recall_needle_region=[0.1, 0.9])
    start = recall.recency_start(cfg)
    assert start == C - (160 - cfg.working_context.sink_tokens)
    _, _, metas = recall.build_recall_samples(cfg, tokenizer, 8, seed=5, filler=filler)
    assert all(
        s >= cfg.working_context.sink_tokens and e <= start for m in metas for s, e in m["needle_spans"]
    )
