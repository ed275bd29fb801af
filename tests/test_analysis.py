"""Post-hoc analyses on synthetic telemetry with known answers: each planted pattern must be found,
and its absence must read as absence."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from mcx_core import checkpoints
from mcx_core.compression.gistnet import Gister
from mcx_core.config import GistNetModelConfig, load_config
from mcx_core.eval.nll import EvalRow
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import MemorySink
from mcx_core.tools import analysis as A
from mcx_core.tools import boundary as B

ROOT = Path(__file__).resolve().parents[1]
K = 32


def _action(kind, start, step, forced=False, residency=3):
    level = 1 if kind == "expand" else 0
    return {"kind": kind, "level": level, "index": start // K, "start": start, "end": start + K, "score": 0.5,
            "forced": forced, "residency": residency, "span_id": f"L{level}:{start // K:06d}"}


def write_trace(path: Path, steps: int, actions_at: dict[int, list[dict]], latency=None, stages=None):
    """A runtime-shaped trace: `actions_at[step]` are that step's actions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(steps):
        acts = actions_at.get(s, [])
        rec = {
            "step": s,
            "expanded": [a["span_id"] for a in acts if a["kind"] == "expand"],
            "collapsed": [a["span_id"] for a in acts if a["kind"] == "collapse"],
            "working_context": {"LOD0": 64, "LOD1": 4, "LOD2": 0},
            "latency_ms": latency(s, len(acts)) if latency else 10.0,
            "budget_utilization": 0.9,
            "actions": acts,
            "residency": [a["residency"] for a in acts],
            M.SWAP_RATE: len(acts) / 8,
            M.BASELINE_LATENCY_MS: 10.0,
        }
        for stage, ms in (stages or {}).items():
            rec[M.LATENCY_STAGE_PREFIX + stage] = ms
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def traces(tmp_path):
    d = tmp_path / "traces"
    # Span [64, 96) ping-pongs: expand 2, collapse 4, expand 6 (within 5 steps).
    # Span [128, 160) alternates too, but over 8 steps: not a ping-pong.
    # Span [192, 224) expands and collapses once.
    write_trace(d / "runtime_eval" / "lensnet_doc0.jsonl", 12, {
        1: [_action("expand", 128, 1)],
        2: [_action("expand", 64, 2)],
        3: [_action("expand", 192, 3)],
        4: [_action("collapse", 64, 4, residency=2)],
        5: [_action("collapse", 128, 5, residency=4)],
        6: [_action("expand", 64, 6, residency=2)],
        8: [_action("collapse", 192, 8, residency=5)],
        9: [_action("expand", 128, 9, residency=4)],
    })
    # Same span in another trace, only expand → collapse: nothing.
    write_trace(d / "compare" / "random_doc0.jsonl", 6, {0: [_action("expand", 64, 0)], 1: [_action("collapse", 64, 1)]})
    return d


def test_planted_ping_pong_is_found_and_the_slow_alternation_is_not(traces, tmp_path):
    con = A.connect_traces(traces)
    events = A.find_ping_pongs(con, window=5)
    assert [(Path(e["trace"]).name, e["span_start"], e["span_end"], e["step1"], e["step2"], e["step3"]) for e in events] == [
        ("lensnet_doc0.jsonl", 64, 96, 2, 4, 6)
    ]
    # A wider window catches the slow one too: the window is what decides.
    wide = A.find_ping_pongs(con, window=8)
    assert {(e["span_start"], e["step3"] - e["step1"]) for e in wide} == {(64, 4), (128, 8)}

    res = A.oscillation_analysis(events, A.busiest_spans(con, include=[(events[0]["trace"], 64, 96)]), tmp_path / "out", 5)
    assert res.metrics[M.ANALYSIS_OSCILLATING_SPANS] == 1 and res.metrics[M.ANALYSIS_PING_PONGS] == 1
    md = res.files["markdown"].read_text()
    assert "[64, 96)" in md and "2 → 4 → 6" in md
    assert res.files["plot"].stat().st_size > 1000


def test_no_ping_pong_in_a_calm_trace(tmp_path):
    write_trace(tmp_path / "t" / "calm.jsonl", 10, {0: [_action("expand", 0, 0)], 7: [_action("collapse", 0, 7)]})
    con = A.connect_traces(tmp_path / "t")
    assert A.find_ping_pongs(con, 5) == []
    res = A.oscillation_analysis([], A.busiest_spans(con), tmp_path / "out", 5)
    assert res.metrics[M.ANALYSIS_PING_PONGS] == 0 and "No ping-pong span found" in res.files["markdown"].read_text()


def test_traces_without_actions_are_missing_input_not_a_crash(tmp_path):
    with pytest.raises(A.MissingInput, match="no trace"):
        A.connect_traces(tmp_path / "nothing")
    write_trace(tmp_path / "t" / "idle.jsonl", 3, {})
    con = A.connect_traces(tmp_path / "t")
    assert A.find_ping_pongs(con, 5) == []  # an all-empty actions column has no struct fields


def _rows(spike: float, H: int = 64, n: int = 4, w: int = 96):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        full = rng.uniform(2.0, 4.0, H)
        gist = full + 0.02 + np.array([spike if h % K == 0 else 0.0 for h in range(H)])
        rows.append(EvalRow("code", f"s{i}", "full", 0, float(full.mean()), full.tolist(), 256))
        rows.append(EvalRow("code", f"s{i}", "gist", w, float(gist.mean()), gist.tolist(), 72))
    return rows


def test_planted_boundary_spike_shows_in_the_heatmap(tmp_path):
    from mcx_core.eval.gists import delta_by_position

    grid = B.position_grid(delta_by_position(_rows(0.5), "gist", 96)["code"], K)
    assert grid.shape == (2, K)
    assert np.allclose(grid[:, 0], 0.52) and np.allclose(grid[:, 1:], 0.02)
    assert B.boundary_excess(grid) == pytest.approx(0.25)  # edges (0 and 31) average 0.27 vs interior 0.02
    res = A.boundary_analysis({"code": grid}, tmp_path / "out", K, "planted")
    assert res.metrics[M.ANALYSIS_BOUNDARY_EXCESS] == pytest.approx(0.25)
    assert "| code | +0.250 | 0 |" in res.files["markdown"].read_text()  # worst position: 0
    assert res.files["plot"].stat().st_size > 1000

    calm = B.position_grid(delta_by_position(_rows(0.0), "gist", 96)["code"], K)
    assert abs(B.boundary_excess(calm)) < 1e-9


def test_position_grid_pads_a_horizon_that_is_not_a_whole_number_of_blocks():
    g = B.position_grid(list(range(40)), K)
    assert g.shape == (2, K) and g[1, 7] == 39 and np.isnan(g[1, 8:]).all()


def test_boundary_samples_put_every_definition_on_the_requested_offset(tokenizer):
    funcs = B.stdlib_functions(limit=40)
    assert len(funcs) >= 20 and all(f.lstrip().startswith(("def ", "async def ")) for f in funcs)
    for shift in (0, 16):
        ids, starts = B.boundary_samples(tokenizer, funcs, 3, 320, K, shift)
        assert ids.shape == (3, 320)
        for row, at in zip(ids, starts):
            assert len(at) >= 2 and all(s % K == shift for s in at)
            for s in at:
                assert tokenizer.decode(row[s : s + 2]).lstrip().startswith(("def", "async"))
    a, _ = B.boundary_samples(tokenizer, funcs, 2, 320, K, 0)
    assert not np.array_equal(a[0], a[1])  # samples start from different functions


def test_compression_scatter_counts_points_within_acceptance(tmp_path):
    rows = []
    for i, (d_gist, d_rec) in enumerate([(0.05, 0.3), (0.08, 0.4), (0.2, 0.5), (0.02, 0.09)]):
        rows += [EvalRow("code", f"s{i}", "full", 0, 3.0, [3.0], 256),
                 EvalRow("code", f"s{i}", "gist", 96, 3.0 + d_gist, [3.0 + d_gist], 72),
                 EvalRow("code", f"s{i}", "recency", 96, 3.0 + d_rec, [3.0 + d_rec], 96)]
    res = A.compression_analysis(rows, tmp_path, 0.1, 16)
    assert res.metrics[M.ANALYSIS_COMPRESSION_WITHIN] == pytest.approx(0.75)
    series = {r["series"]: r for r in res.data["series"]}
    assert series["gist (code)"]["compression_median"] == pytest.approx(256 / 72)
    assert series["recency (code)"]["within_acceptance"] == pytest.approx(0.25)
    assert (tmp_path / "compression.png").is_file() and "acceptance ΔNLL ≤ 0.1" in res.files["markdown"].read_text()


def test_residency_histogram_separates_forced_collapses(traces, tmp_path):
    rows = A.residency_rows(A.connect_traces(traces))
    assert len(rows) == 10
    rows.append({"residency": 1, "forced": True, "kind": "collapse"})
    res = A.residency_analysis(rows, tmp_path, 3.0)
    chosen = [3, 3, 3, 2, 4, 2, 5, 4, 3, 3]
    assert res.metrics[M.ANALYSIS_RESIDENCY_MEAN] == pytest.approx(np.mean(chosen))
    assert res.metrics[M.ANALYSIS_RESIDENCY_BELOW_MIN] == pytest.approx(0.2)
    assert res.metrics[M.ANALYSIS_FORCED_RESIDENCY_MEAN] == 1.0
    assert {r["residency"]: (r["chosen"], r["forced"]) for r in res.data["histogram"]}[1] == (0, 1)


def test_latency_breakdown_against_the_target_split(tmp_path):
    stages = {"ingest": 5.0, "fit": 1.0, "lensnet": 30.0, "allocator": 9.0, "checks": 0.0, "assemble": 5.0, "forward": 50.0}
    write_trace(tmp_path / "t" / "a.jsonl", 4, {}, stages=stages)
    sink = MemorySink()
    res = A.latency_analysis(A.stage_latency(A.connect_traces(tmp_path / "t")), tmp_path / "out", sink)
    share = {k.removeprefix(M.ANALYSIS_LATENCY_SHARE_PREFIX): v for k, v in res.metrics.items()}
    assert share == pytest.approx({"lensnet_scoring": 0.3, "focus_allocator": 0.1, "base_model_forward": 0.5,
                                   "context_reconstruction": 0.1, "invariant_checks": 0.0})
    assert sink.last(M.ANALYSIS_LATENCY_SHARE_PREFIX + "base_model_forward") == pytest.approx(0.5)


def test_latency_spikes_correlate_with_planted_actions(tmp_path):
    busy = {s: [_action("collapse", 32 * i, s, forced=True) for i in range(4)] for s in (3, 7, 11)}
    write_trace(tmp_path / "t" / "a.jsonl", 14, busy, latency=lambda s, n: 10.0 + 15.0 * n)
    res = A.spikes_analysis(A.step_latencies(A.connect_traces(tmp_path / "t")), tmp_path / "out", 2.0)
    assert res.metrics[M.ANALYSIS_SPIKE_STEPS] == 3
    assert res.metrics[M.ANALYSIS_SPIKE_ACTIONS_CORR] == pytest.approx(1.0)
    assert res.metrics[M.ANALYSIS_SPIKE_ACTIONS_MEAN] == 4 and res.metrics[M.ANALYSIS_CALM_ACTIONS_MEAN] == 0
    assert [r["step"] for r in res.data["spikes"]] == [3, 7, 11]

    write_trace(tmp_path / "flat" / "a.jsonl", 10, {}, latency=lambda s, n: 10.0)
    flat = A.spikes_analysis(A.step_latencies(A.connect_traces(tmp_path / "flat")), tmp_path / "out2", 2.0)
    assert flat.metrics[M.ANALYSIS_SPIKE_STEPS] == 0 and math.isnan(flat.metrics[M.ANALYSIS_SPIKE_ACTIONS_CORR])


def _checkpoint(root: Path, name: str, gister: Gister) -> Path:
    d = root / name
    gister.save_pretrained(d / "gistnet")
    (d / "trainer_state.json").write_text("{}")
    return d


def test_gist_drift_across_checkpoints(tmp_path):
    torch.manual_seed(0)
    g = Gister(64, GistNetModelConfig(num_heads=4, num_layers=1))
    _checkpoint(tmp_path, "JT1_cycle0_step3", g)
    _checkpoint(tmp_path, "JT1_cycle0_step10", g)  # same weights, later step
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.5 * torch.randn_like(p))
    _checkpoint(tmp_path, "JT1_cycle1_step2", g)
    (tmp_path / "JT1_cycle2_step1").mkdir()  # incomplete: no trainer state
    cks = checkpoints.list_checkpoints(tmp_path, 1)
    assert [c.name for c in cks] == ["JT1_cycle0_step3", "JT1_cycle0_step10", "JT1_cycle1_step2"]
    lm = SimpleNamespace(device=torch.device("cpu"), d_model=64, model_id=None)  # checkpoints validated against it
    rows = A.drift_rows(cks, lm, torch.randn(6, K, 64))
    assert rows[1]["cosine_to_first"] == pytest.approx(1.0, abs=1e-5)
    assert rows[2]["cosine_to_first"] < 0.99 and rows[2]["cosine_to_previous"] == pytest.approx(rows[2]["cosine_to_first"])
    res = A.drift_analysis(rows, tmp_path / "out")
    assert res.metrics[M.ANALYSIS_DRIFT_MIN_COSINE] == pytest.approx(rows[2]["cosine_to_first"])
    assert (tmp_path / "out" / "drift.png").is_file()


def test_run_analysis_reads_the_configs_artifacts_and_names_missing_inputs(tmp_path, traces, monkeypatch):
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data["artifacts_dir"] = str(tmp_path)  # `traces` lives at tmp_path/traces
    cfg_path = tmp_path / "smoke.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("MCX_HOME", str(tmp_path))
    cfg = load_config(cfg_path)
    res = A.run_analysis(cfg, "oscillation")
    assert res.metrics[M.ANALYSIS_PING_PONGS] == 1
    assert res.files["markdown"] == tmp_path / "reports" / "analysis" / "oscillation.md"
    with pytest.raises(A.MissingInput, match="gist_eval_report"):
        A.run_analysis(cfg, "compression")
    with pytest.raises(A.MissingInput, match="gistnet_checkpoint"):
        A.run_analysis(cfg, "drift")
    done, skipped, index = A.run_all(cfg, synthetic=False)
    assert {"residency", "oscillation", "spikes"} <= set(done) and {"compression", "drift"} <= set(skipped)
    assert "oscillation.md" in index.read_text() and "skipped" in index.read_text()
