"""Fixed-budget peers on the tiny random Llama: each keeps exactly W_max history positions (all of them when
the history fits), chooses from the history alone, and the attention peers choose by the attention the
model actually pays; summaries, gates and reports carry every peer."""

import copy
import json

import numpy as np
import pytest
import torch
from helpers import VOCAB, random_ids, tiny_config

from mcx_core.config import ConfigError
from mcx_core.config.sections import PEER_NAMES
from mcx_core.eval import acceptance
from mcx_core.eval import gists as G
from mcx_core.eval import nll as E
from mcx_core.eval import peers as P

pytestmark = pytest.mark.usefixtures("one_thread")

C, K, SINK = 256, 32, 3


@pytest.fixture(scope="module")
def attention(lm):
    return P.HistoryAttention(lm, window=K)


@pytest.fixture(scope="module")
def conditions(lm, attention):
    return P.peer_conditions(lm, list(PEER_NAMES), SINK, K, attention=attention)


@pytest.mark.parametrize("name", PEER_NAMES)
def test_each_peer_keeps_exactly_w_max_positions_of_the_history(lm, conditions, name):
    ids = random_ids(C, seed=1)
    for w in (1, SINK, K + 1, 64, 96, 100, 131, C - 1):
        c = conditions[name](ids, w)
        pos = c.positions
        assert pos.numel() == c.embeds.shape[0] == w, (name, w)
        assert bool((pos[1:] > pos[:-1]).all()) and 0 <= int(pos[0]) and int(pos[-1]) < C, (name, w)
        assert c.horizon_start == C
        torch.testing.assert_close(c.embeds, lm.embed(ids[pos]))  # each kept token at its own position
        if w > SINK and name != "newest":
            assert pos[:SINK].tolist() == list(range(SINK)) and int(pos[-1]) == C - 1, (name, w)
    for w in (C, C + 50):  # the history fits: every token, as the full history
        assert conditions[name](ids, w).positions.tolist() == list(range(C))
    compact = P.peer_conditions(lm, [name], SINK, K, "compact")[name](ids, 96)
    assert compact.positions.tolist() == list(range(96)) and compact.horizon_start == 96


def test_newest_and_streaming_llm_are_the_recency_windows(lm, conditions):
    ids = random_ids(C, seed=2)
    assert conditions["newest"](ids, 64).positions.tolist() == list(range(C - 64, C))
    recency = E.recency_condition(lm, SINK)(ids, 64)
    assert conditions["streaming_llm"](ids, 64).positions.tolist() == recency.positions.tolist()


def test_attention_scores_are_the_models_own_attention_averaged_over_heads_and_layers(lm):
    ids = random_ids(C, seed=3)
    scores = P.HistoryAttention(lm, window=K)(ids)
    model = lm.model
    assert model.config._attn_implementation == "sdpa"  # restored after the eager forward
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(ids[None], output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation("sdpa")
    a = torch.stack([x[0] for x in att]).float()  # [layers, heads, C, C]
    torch.testing.assert_close(scores.last, a[:, :, -1].mean((0, 1)))
    torch.testing.assert_close(scores.received, a.sum(2).mean((0, 1)))
    torch.testing.assert_close(scores.window, a[:, :, -K:].sum(2).mean((0, 1)))


def _scores(C: int, **peaks) -> P.AttentionScores:
    out = {k: torch.zeros(C) for k in ("last", "received", "window")}
    for field, positions in peaks.items():
        for rank, p in enumerate(positions):
            out[field][p] = float(len(positions) - rank)  # all positive, the first highest
    return P.AttentionScores(**out)


def test_selections_keep_what_the_scores_rank_highest():
    s = _scores(128, last=[50, 10, 70, 90], received=[5, 6, 7, 8, 9], window=list(range(32, 64)) + [3])
    assert P.tova(s, 6, sink=2).tolist() == [0, 1, 10, 50, 70, 127]  # sink, top 3 by the last row, last token
    # H2O: sink 2, recent round(0.5 * 8) = 4, the 4 heaviest hitters.
    assert P.h2o(s, 10, sink=2, recent_share=0.5).tolist() == [0, 1, 5, 6, 7, 8, 124, 125, 126, 127]
    assert P.h2o(s, 10, sink=2, recent_share=1.0).tolist() == [0, 1, *range(120, 128)]
    # Blocks: sink + newest block + block 1 (the most attended); block 0 (next) costs 30 > the 5 left, so the
    # remainder goes to the newest tokens not yet kept.
    kept = P.block_select(s, 2 + 32 + 32 + 5, sink=2, block_size=32).tolist()
    assert kept == [0, 1, *range(32, 64), *range(91, 128)]
    assert P.block_select(s, 2 + 32 + 32 + 30, sink=2, block_size=32).tolist() == [*range(64), *range(96, 128)]
    # Under a budget smaller than sink + newest block: the sink, then the newest tokens.
    assert P.block_select(s, 10, sink=2, block_size=32).tolist() == [0, 1, *range(120, 128)]
    assert P.block_select(s, 1, sink=2, block_size=32).tolist() == [0]


MAGNET = VOCAB - 1


def magnet_model(lm):
    """A copy of the tiny model in which every query attends to the token MAGNET: a constant feature in
    every embedding drives the queries, MAGNET's own feature its key, both in the slowest rotary pair
    (head dim 7 / 15), so the score barely depends on distance."""
    m = copy.deepcopy(lm)
    m.model = copy.deepcopy(lm.model)
    with torch.no_grad():
        emb = m.model.get_input_embeddings().weight
        emb[:, 1] = 1.0
        emb[MAGNET] = 0.0
        emb[MAGNET, :2] = 1.0
        for layer in m.model.get_decoder().layers:
            att = layer.self_attn
            d = att.head_dim
            att.q_proj.weight.zero_()
            att.k_proj.weight.zero_()
            for h in range(att.q_proj.weight.shape[0] // d):
                att.q_proj.weight[h * d + d // 2 - 1, 1] = 3.0
                att.k_proj.weight[h * d + d // 2 - 1, 0] = 3.0
    return m


def test_attention_peers_keep_the_token_every_query_attends_to_where_recency_drops_it(lm):
    magnet = magnet_model(lm)
    ids = random_ids(C, seed=4, vocab=VOCAB - 1)
    ids[100] = MAGNET  # block 3, far outside the newest tokens
    peers = P.peer_conditions(magnet, list(PEER_NAMES), SINK, K)
    w = 96
    assert 100 not in peers["streaming_llm"](ids, w).positions.tolist()
    assert 100 not in peers["newest"](ids, w).positions.tolist()
    for name in ("tova", "h2o"):
        assert 100 in peers[name](ids, w).positions.tolist(), name
    assert set(range(96, 128)) <= set(peers["block_select"](ids, w).positions.tolist())
    # Without the magnet (the same token ids otherwise) the attention peers no longer single out position 100.
    plain = ids.clone()
    plain[100] = ids[99]
    assert 100 not in peers["tova"](plain, 3 + 1 + 3).positions.tolist()


def test_peers_choose_from_the_history_alone_and_share_one_attention_forward(lm):
    H, n = 8, 3
    ids = np.stack([random_ids(C + H, seed=10 + i).numpy() for i in range(n)])
    other = ids.copy()
    other[:, C:] = (other[:, C:] + 1) % VOCAB  # another horizon, the same histories
    attention = P.HistoryAttention(lm, window=K)
    seen: dict[tuple, list[int]] = {}

    def recorded(name, cond):
        def build(history, w):
            c = cond(history, w)
            seen.setdefault((name, w, bytes(history.numpy())), []).append(tuple(c.positions.tolist()))
            return c
        return build

    conds = {n_: recorded(n_, c) for n_, c in P.peer_conditions(lm, list(PEER_NAMES), SINK, K, attention=attention).items()}
    ids_ = [f"s{i}" for i in range(n)]
    rows = E.evaluate(lm, {"a": (ids_, ids)}, conds, [64, 96], C, H, batch_size=2, progress=False)
    rows_other = E.evaluate(lm, {"a": (ids_, other)}, conds, [64, 96], C, H, batch_size=2, progress=False)
    assert len(rows) == len(rows_other) == n * len(PEER_NAMES) * 2
    assert all(len(v) == 2 and v[0] == v[1] for v in seen.values())  # the same selection under either horizon
    assert {r.nll for r in rows} != {r.nll for r in rows_other}  # while the horizons did differ
    assert attention.forwards == n  # one attention forward per history, for 3 peers × 2 W_max × 2 runs
    assert all(r.context_len == r.w_max for r in rows)


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(
        "peers", context_tokens=C, horizon=8,
        working_context={"w_max": 96, "eval_w_max": [64, 96], "recent_tokens": 32, "sink_tokens": SINK},
        evaluation={"distance_probe_samples": 0},
    )


@pytest.fixture(scope="module")
def samples():
    return {"narrative": ([f"n{i}" for i in range(3)], np.stack([random_ids(C + 8, seed=20 + i).numpy() for i in range(3)]))}


def test_gist_summaries_carry_every_peer_and_reuse_the_baseline_peer_rows(cfg, lm, gister, samples):
    result = G.evaluate_gists(cfg, lm, gister, samples, progress=False)
    for s in result["summary"]:
        for p in PEER_NAMES:
            for key in (f"nll_{p}", f"delta_nll_{p}_mean", f"delta_nll_{p}_ci_lo", f"recovery_{p}",
                        f"gist_minus_{p}_mean", f"gist_minus_{p}_ci_hi"):
                assert np.isfinite(s[key]), (p, key)
            assert s[f"gist_beats_{p}"] == (s[f"gist_minus_{p}_ci_hi"] < 0)
            assert s[f"gist_minus_{p}_ci_lo"] <= s[f"gist_minus_{p}_mean"] <= s[f"gist_minus_{p}_ci_hi"]
            gist, peer = E.condition_nlls(result["rows"], s["dataset"], s["w_max"], ["gist", p])
            assert s[f"gist_minus_{p}_mean"] == pytest.approx((gist - peer).mean())
        assert s["nll_streaming_llm"] == pytest.approx(s["nll_recency"])
    # Baseline rows that already hold the peers are reused, not rescored: shifted NLLs come back shifted.
    shifted = [E.EvalRow(r.dataset, r.sample_id, r.condition, r.w_max, r.nll + (1.0 if r.condition == "tova" else 0.0),
                         r.token_nll, r.context_len)
               for r in result["rows"] if r.condition in ("full", "recency", "meanpool", *PEER_NAMES)]
    again = G.evaluate_gists(cfg, lm, gister, samples, progress=False, baseline_rows=shifted)
    for s0, s1 in zip(result["summary"], again["summary"]):
        assert s1["nll_tova"] == pytest.approx(s0["nll_tova"] + 1.0)
        assert s1["nll_h2o"] == pytest.approx(s0["nll_h2o"])


def test_report_shows_the_peers_and_says_they_read_the_history_first(cfg, lm, gister, samples, tmp_path):
    result = G.evaluate_gists(cfg, lm, gister, samples, progress=False)
    md = G.write_report(cfg, result, tmp_path, "ck")["markdown"].read_text()
    assert "choose after reading the whole history once" in md
    for label in P.PEER_LABELS.values():
        assert md.count(f"| {label} |") == 2, label  # one row per W_max
    assert "gist − peer" in md and "gist beats peer" in md


def test_peer_gates_fail_by_how_much_while_a_peer_is_not_beaten(cfg):
    row = {"dataset": "narrative", "w_max": 96}
    for p in PEER_NAMES:
        row.update({f"gist_minus_{p}_mean": -0.2, f"gist_minus_{p}_ci_lo": -0.3, f"gist_minus_{p}_ci_hi": -0.1})
    row.update({"gist_minus_tova_mean": 0.01, "gist_minus_tova_ci_lo": -0.02, "gist_minus_tova_ci_hi": 0.04})
    gates = acceptance.peer_gates(cfg, [row, {**row, "w_max": 64}])
    assert len(gates) == len(PEER_NAMES)  # at working_context.w_max only
    failed = [g for g in gates if not g.passed]
    assert [g.name for g in failed] == ["narrative/w96/gist_minus_tova_ci_hi"]
    assert "misses by 0.04" in acceptance.verdict(gates) and "tova" in acceptance.verdict(gates)
    lenient = cfg.model_copy(update={"acceptance": cfg.acceptance.model_copy(update={"gist_minus_peer_max": 0.05})})
    assert all(g.passed for g in acceptance.peer_gates(lenient, [row]))
    tie = {**row, "gist_minus_tova_ci_hi": 0.0}  # an interval that touches 0 is no win
    assert not all(g.passed for g in acceptance.peer_gates(cfg, [tie]))
    with pytest.raises(ValueError, match="no scores of the peer"):
        acceptance.peer_gates(cfg, [{"dataset": "narrative", "w_max": 96}])


def test_config_peers_default_to_all_and_unknown_names_name_the_field():
    assert tiny_config("p").evaluation.peers == list(PEER_NAMES)
    assert tiny_config("p", evaluation={"peers": ["tova"]}).evaluation.peers == ["tova"]
    with pytest.raises(ConfigError, match=r"evaluation\.peers\[1\]: Input should be 'newest'"):
        tiny_config("p", evaluation={"peers": ["tova", "snapkv"]})
    with pytest.raises(ConfigError, match=r"evaluation\.peers: names a peer twice"):
        tiny_config("p", evaluation={"peers": ["h2o", "h2o"]})
    with pytest.raises(ConfigError, match=r"evaluation\.h2o_recent_share"):
        tiny_config("p", evaluation={"h2o_recent_share": 1.5})


def test_streaming_llm_is_not_scored_but_copies_the_recency_rows(cfg, lm, gister, samples):
    assert "streaming_llm" not in P.config_peer_conditions(cfg, lm)  # its forwards are saved
    result = G.evaluate_gists(cfg, lm, gister, samples, progress=False)
    by = {(r.condition, r.w_max, r.sample_id): r for r in result["rows"]}
    copies = [r for r in result["rows"] if r.condition == "streaming_llm"]
    assert len(copies) == 3 * 2  # every sample at both W_max
    for r in copies:
        rec = by[("recency", r.w_max, r.sample_id)]
        assert (r.nll, r.token_nll, r.context_len) == (rec.nll, rec.token_nll, rec.context_len)
    for s in result["summary"]:
        assert s["nll_streaming_llm"] == s["nll_recency"]
        assert s["delta_nll_streaming_llm_mean"] == s["delta_nll_recency_mean"]
    assert P.copied_rows(result["rows"], ["tova"], [64, 96]) == []
    assert {r.w_max for r in P.copied_rows(result["rows"], list(PEER_NAMES), [96])} == {96}


def test_peer_w_max_restricts_where_the_peers_are_scored(lm, gister, samples, tmp_path):
    cfg = tiny_config(
        "peers", context_tokens=C, horizon=8,
        working_context={"w_max": 96, "eval_w_max": [64, 96], "recent_tokens": 32, "sink_tokens": SINK},
        evaluation={"distance_probe_samples": 0, "peer_w_max": [96]},
    )
    result = G.evaluate_gists(cfg, lm, gister, samples, progress=False)
    for p in PEER_NAMES:
        assert {r.w_max for r in result["rows"] if r.condition == p} == {96}, p
    assert {r.w_max for r in result["rows"] if r.condition == "gist"} == {64, 96}  # the rest at every W_max
    s64, s96 = sorted(result["summary"], key=lambda s: s["w_max"])
    assert not [k for k in s64 if any(p in k for p in PEER_NAMES)]  # no peer keys where no peer was scored
    assert np.isfinite(s64["delta_nll_gist_mean"]) and "gist_minus_recency_ci_width" in s64
    for p in PEER_NAMES:
        assert np.isfinite(s96[f"gist_minus_{p}_ci_hi"]) and s96[f"gist_beats_{p}"] in (True, False)
    md = G.write_report(cfg, result, tmp_path, "ck")["markdown"].read_text()
    for label in P.PEER_LABELS.values():
        assert md.count(f"| {label} |") == 1, label  # at W_max 96 only
    assert "Peers are scored at W_max 96" in md
    assert len(acceptance.peer_gates(cfg, result["summary"])) == len(PEER_NAMES)
    with pytest.raises(ValueError, match=r"scored at W_max \[96\] \(evaluation.peer_w_max\), not at W_max=64"):
        acceptance.peer_gates(cfg, result["summary"], w_max=64)
    # Baseline rows that hold the peers at W_max 64 too: only the W_max 96 ones are used.
    extra = [E.EvalRow(r.dataset, r.sample_id, "tova", 64, r.nll, r.token_nll, r.context_len)
             for r in result["rows"] if r.condition == "recency" and r.w_max == 64]
    again = G.evaluate_gists(cfg, lm, gister, samples, progress=False, baseline_rows=result["rows"] + extra)
    assert {r.w_max for r in again["rows"] if r.condition == "tova"} == {96}


def test_summaries_and_reports_state_how_wide_the_intervals_are(cfg, lm, gister, samples, tmp_path):
    result = G.evaluate_gists(cfg, lm, gister, samples, progress=False)
    for s in result["summary"]:
        lo, hi = s["gist_minus_recency_ci_lo"], s["gist_minus_recency_ci_hi"]
        assert s["gist_minus_recency_ci_width"] == pytest.approx(hi - lo)
        widths = [s[f"gist_minus_{p}_ci_hi"] - s[f"gist_minus_{p}_ci_lo"] for p in PEER_NAMES]
        assert [s[f"gist_minus_{p}_ci_width"] for p in PEER_NAMES] == pytest.approx(widths)
        assert s["gist_minus_peer_ci_width_median"] == pytest.approx(np.median(widths))
        methods = ["recency", "meanpool", *PEER_NAMES, "gist"]
        assert s["delta_nll_ci_width_median"] == pytest.approx(
            np.median([s[f"delta_nll_{m}_ci_hi"] - s[f"delta_nll_{m}_ci_lo"] for m in methods]))
    G.write_report(cfg, result, tmp_path, "ck")
    stored = json.loads((tmp_path / "gist_eval.json").read_text())["summary"]
    assert all("gist_minus_recency_ci_width" in s and "gist_minus_peer_ci_width_median" in s for s in stored)
    md = (tmp_path / "gist_eval.md").read_text()
    assert "## How wide the intervals are" in md and "with 3 samples per dataset" in md
    assert "cannot be decided with this many samples" in md
    (s96,) = [s for s in result["summary"] if s["w_max"] == 96]
    half = s96["gist_minus_recency_ci_width"] / 2
    row = next(line for line in md.splitlines() if line.startswith("| narrative | 3 | "))
    assert f"{s96['gist_minus_recency_ci_width']:.3f}" in row and f"{half:.3f}" in row


def test_baseline_eval_scores_the_peers_at_peer_w_max_and_states_its_interval_widths(tmp_path, monkeypatch,
                                                                                     smoke_config):
    import pyarrow.parquet as pq

    from mcx_core import pipeline
    from mcx_core.config import load_config
    from mcx_core.eval import baseline

    monkeypatch.setenv("MCX_HOME", str(tmp_path))
    cfg = load_config(smoke_config(tmp_path, artifacts=True), root=tmp_path, overrides={"evaluation.peer_w_max": [96]})
    pipeline.build_datasets(cfg, progress=False)
    lm, _ = pipeline.prepare_base_model(cfg)
    out = baseline.run_baseline_eval(cfg, lm, progress=False)
    rows = E.rows_from_table(pq.read_table(out["table"]))
    for p in PEER_NAMES:
        assert {r.w_max for r in rows if r.condition == p} == {96}, p
    assert {r.w_max for r in rows if r.condition == "meanpool"} == {64, 96}
    rec = {(r.dataset, r.sample_id, r.w_max): r.nll for r in rows if r.condition == "recency"}
    copies = [r for r in rows if r.condition == "streaming_llm"]
    assert copies and all(r.nll == rec[(r.dataset, r.sample_id, r.w_max)] for r in copies)
    by_w = {w: [s for s in out["summary"] if s["w_max"] == w] for w in (64, 96)}
    assert all("nll_tova" not in s and "peer_minus_recency_ci_width_median" not in s for s in by_w[64])
    for s in by_w[96]:
        widths = [s[f"{p}_minus_recency_ci_hi"] - s[f"{p}_minus_recency_ci_lo"] for p in PEER_NAMES]
        assert s["peer_minus_recency_ci_width_median"] == pytest.approx(np.median(widths))
        assert s["meanpool_minus_recency_ci_width"] == pytest.approx(
            s["meanpool_minus_recency_ci_hi"] - s["meanpool_minus_recency_ci_lo"])
        assert np.isfinite(s["delta_nll_ci_width_median"])
    md = out["report"]["markdown"].read_text()
    for label in P.PEER_LABELS.values():
        assert md.count(f"| {label} |") == 2, label  # W_max 96 only, one row per dataset
    assert "## How wide the intervals are" in md and "decidable mean-pool − recency ≳" in md
    stored = [s for s in json.loads(out["report"]["json"].read_text()) if s["w_max"] == 96]
    assert stored and all(s["peer_minus_recency_ci_width_median"] >= 0 for s in stored)
