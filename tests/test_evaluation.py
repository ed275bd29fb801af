"""ΔNLL@H evaluation on a tiny random Llama: targets are next tokens, conditions respect W_max, and the
summary arithmetic matches the metric definitions."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_ids

from mcx_core.eval import nll as E
from mcx_core.telemetry import metrics as M

ROOT = Path(__file__).resolve().parents[1]

def test_horizon_targets_are_next_tokens(lm):
    """The copy-task pitfall: horizon token j is predicted from position C-1+j, as HF's own loss does."""
    C, H = 96, 16
    ids = random_ids(C + H)
    ours = E.horizon_nll(lm, [E.full_condition(lm)(ids[:C], 0)], ids[C:].unsqueeze(0))[0]
    logits = lm.model(ids.unsqueeze(0)).logits[0]
    reference = torch.nn.functional.cross_entropy(logits[C - 1 : C + H - 1], ids[C:], reduction="none")
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    # Scoring the token *at* each position instead would give a different number.
    copy = torch.nn.functional.cross_entropy(logits[C : C + H], ids[C:], reduction="none")
    assert not torch.allclose(ours, copy)


def test_recency_keeps_sink_and_newest_tokens(lm):
    C, w = 256, 96
    ids = random_ids(C)
    c = E.recency_condition(lm, sink_tokens=32)(ids, w)
    assert c.embeds.shape[0] == w
    assert c.positions.tolist() == list(range(32)) + list(range(C - 64, C))
    assert c.horizon_start == C
    torch.testing.assert_close(c.embeds[40], lm.embed(ids[C - 64 + 8]))
    compact = E.recency_condition(lm, sink_tokens=32, position_scheme="compact")(ids, w)
    assert compact.positions.tolist() == list(range(w)) and compact.horizon_start == w
    short = E.recency_condition(lm, sink_tokens=32)(ids[:50], w)
    assert short.positions.tolist() == list(range(50))


def test_meanpool_gister_is_norm_matched_mean():
    x = torch.randn(3, 32, 8) * torch.arange(1, 9)
    g = E.MeanPoolGister()(1, x)
    assert g.shape == (3, 8)
    torch.testing.assert_close(g.norm(dim=-1), x.norm(dim=-1).mean(dim=1))
    cos = torch.nn.functional.cosine_similarity(g, x.mean(dim=1), dim=-1)
    torch.testing.assert_close(cos, torch.ones(3))


def test_working_context_condition_fits_budget(lm):
    C, w = 512, 64
    ids = random_ids(C)
    cond = E.working_context_condition(lm, E.MeanPoolGister(), block_size=32, recent_tokens=32)
    c = cond(ids, w)
    assert c.embeds.shape[0] <= w
    assert c.horizon_start == C
    # The newest recent tokens are raw, at their absolute positions.
    assert c.positions[-32:].tolist() == list(range(C - 32, C))
    torch.testing.assert_close(c.embeds[-1], lm.embed(ids[-1]))


def test_evaluate_and_summarize(lm):
    C, H = 256, 16
    data = {"narr": ([f"s{i}" for i in range(3)], np.stack([random_ids(C + H, seed=i).numpy() for i in range(3)]))}
    conditions = {
        "full": E.full_condition(lm),
        "recency": E.recency_condition(lm, 32),
        "meanpool": E.working_context_condition(lm, E.MeanPoolGister(), 32, 32),
    }
    rows = E.evaluate(lm, data, conditions, [64, 96], C, H, batch_size=2, progress=False)
    assert len(rows) == 3 * (1 + 2 + 2)
    assert all(len(r.token_nll) == H and np.isfinite(r.nll) for r in rows)
    (s64, s96) = E.summarize(rows, methods=["meanpool"])
    assert (s64["w_max"], s96["w_max"]) == (64, 96)
    nll = {(r.condition, r.w_max, r.sample_id): r.nll for r in rows}
    full = np.array([nll[("full", 0, f"s{i}")] for i in range(3)])
    rec = np.array([nll[("recency", 64, f"s{i}")] for i in range(3)])
    mp = np.array([nll[("meanpool", 64, f"s{i}")] for i in range(3)])
    assert s64["delta_nll_recency_mean"] == pytest.approx((rec - full).mean())
    assert s64["delta_nll_meanpool_p95"] == pytest.approx(np.percentile(mp - full, 95))
    assert s64["recovery_meanpool"] == pytest.approx((rec.mean() - mp.mean()) / (rec.mean() - full.mean()))
    # Every ΔNLL and recovery carries its paired interval; "beats" is decided by the paired difference.
    for prefix, point in [("delta_nll_recency", "delta_nll_recency_mean"), ("delta_nll_meanpool", "delta_nll_meanpool_mean"),
                          ("recovery_meanpool", "recovery_meanpool")]:
        assert s64[f"{prefix}_ci_lo"] <= s64[point] <= s64[f"{prefix}_ci_hi"], prefix
    assert s64["meanpool_minus_recency_mean"] == pytest.approx((mp - rec).mean())
    assert s64["meanpool_beats_recency"] == (s64["meanpool_minus_recency_ci_hi"] < 0)
    assert [x.tolist() for x in E.condition_nlls(rows, "narr", 64, ["recency", "full"])] == [rec.tolist(), full.tolist()]
    table = E.rows_to_table(rows)
    assert table.num_rows == len(rows) and table.column("token_nll").type.value_type.bit_width == 32


def test_a_method_absent_at_a_w_max_has_no_keys_there_and_widths_are_hi_minus_lo():
    rng = np.random.default_rng(1)
    rows = []
    for i in range(6):
        full = 3.0 + rng.normal(0, 0.3)
        rows.append(E.EvalRow("narr", f"s{i}", "full", 0, full, [full], 256))
        for w in (64, 96):
            for cond, gap in (("recency", 0.2), ("meanpool", 0.1), ("peer", 0.15)):
                if cond == "peer" and w == 64:
                    continue  # scored at W_max 96 only (evaluation.peer_w_max)
                v = full + gap + rng.normal(0, 0.05)
                rows.append(E.EvalRow("narr", f"s{i}", cond, w, v, [v], w))
    s64, s96 = E.summarize(rows, methods=["meanpool", "peer"])
    assert not [k for k in s64 if "peer" in k] and "nll_meanpool" in s64
    assert s96["peer_beats_recency"] in (True, False) and np.isfinite(s96["recovery_peer"])
    for s, methods in ((s64, ["recency", "meanpool"]), (s96, ["recency", "meanpool", "peer"])):
        assert s["meanpool_minus_recency_ci_width"] == pytest.approx(
            s["meanpool_minus_recency_ci_hi"] - s["meanpool_minus_recency_ci_lo"])
        widths = [s[f"delta_nll_{m}_ci_hi"] - s[f"delta_nll_{m}_ci_lo"] for m in methods]
        assert s["delta_nll_ci_width_median"] == pytest.approx(np.median(widths))
    assert M.ci_width((-0.25, 0.05)) == pytest.approx(0.3)
    assert M.decidable_difference(0.3) == pytest.approx(0.15)
    assert M.median_width({"a_ci_lo": 0.0, "a_ci_hi": 1.0, "b_ci_lo": 0.0, "b_ci_hi": 3.0}, ["a", "b", "c"]) == 2.0
    assert np.isnan(M.median_width({}, ["a"]))


def test_paired_intervals_decide_who_beats_whom():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.5, 40)  # per-sample NLLs: samples differ far more than the methods do
    better = base - 0.05 + rng.normal(0, 0.01, 40)
    noisy = base + rng.normal(0, 0.2, 40)
    lo, hi = M.mean_ci(base)
    assert lo < base.mean() < hi and hi - lo < 0.5  # the mean's interval is wide (sample spread) ...
    d_lo, d_hi = M.difference_ci(better, base)
    assert d_lo < -0.05 < d_hi < 0  # ... but the paired difference is narrow and excludes 0
    assert M.beats(better, base) and not M.beats(base, better)
    assert not M.beats(noisy, base) and not M.beats(base, base)
    assert M.difference_ci(better, base) == M.difference_ci(better, base)  # seeded: the same interval twice
    full = base - 1.0
    r = M.recovery(base.mean(), better.mean(), full.mean())
    r_lo, r_hi = M.recovery_ci(base, better, full)
    assert r_lo <= r <= r_hi
    assert np.isnan(M.mean_ci([1.0])[0]) and M.mean_ci([2.0, 2.0]) == (2.0, 2.0)
    with pytest.raises(ValueError, match="differ in length"):
        M.difference_ci([1.0, 2.0], [1.0])


def test_metric_definitions():
    assert M.delta_nll([2.0, 3.0], [1.5, 1.0]).tolist() == [0.5, 2.0]
    assert M.recovery(nll_recency=3.0, nll_method=2.5, nll_full=2.0) == pytest.approx(0.5)
    assert M.recovery(3.0, 3.5, 2.0) == pytest.approx(-0.5)
    assert np.isnan(M.recovery(2.0, 2.0, 2.0))
    assert M.swap_rate(2, 1, 12) == pytest.approx(0.25)
    assert M.budget_utilization(96, 128) == pytest.approx(0.75)
    assert M.latency_overhead(110.0, 100.0) == pytest.approx(0.10)
    assert M.p95(list(range(101))) == pytest.approx(95.0)
    with pytest.raises(ValueError):
        M.delta_nll([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        M.mean([])
