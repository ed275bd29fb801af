"""`mcx run`: any text file streamed through the runtime engine, one trace line per step."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import shakespeare_play, untrained_checkpoint

from mcx_cli.main import main
from mcx_core.telemetry import metrics as M

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, smoke_config):
    root = tmp_path_factory.mktemp("mcxrun")
    cfg_path = smoke_config(root)
    untrained_checkpoint(root, cfg_path, lensnet=True)
    (root / "play.txt").write_text(shakespeare_play(20000), encoding="utf-8")
    return root, cfg_path


def _run(args, root):
    return CliRunner().invoke(main, args, env={"MCX_HOME": str(root)})


def test_run_streams_a_text_and_writes_one_trace_line_per_step(project):
    root, cfg = project
    trace = root / "out" / "trace.jsonl"
    res = _run(["run", "--config", str(cfg), "--checkpoint", str(root / "ck"), "--text", str(root / "play.txt"),
                "--steps", "12", "--w-max", "96", "--trace", str(trace), "--json"], root)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["steps"] == 12 and summary["policy"] == "lensnet"
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert len(lines) == 12
    for line in lines:
        assert {"step", "expanded", "collapsed", "working_context", "latency_ms", "budget_utilization"} <= set(line)
        assert line["budget_utilization"] <= 1.0
    assert summary[M.CAUSALITY_VIOLATIONS_TOTAL] == 0 and 0 < summary[M.UTILIZATION_MAX] <= 1.0


def test_run_json_is_strict_and_carries_the_focus_keys(project):
    """`mcx run --json` (issue 13): strict JSON — no NaN, null where undefined (a run no deliberate action
    was undone in has no residency sample) — with the focus keys a nightly script reads."""
    root, cfg = project
    res = _run(["run", "--config", str(cfg), "--checkpoint", str(root / "ck"), "--text", str(root / "play.txt"),
                "--steps", "6", "--w-max", "96", "--policy", "recency", "--trace", str(root / "r.jsonl"), "--json"], root)
    assert res.exit_code == 0, res.output
    line = res.output.strip().splitlines()[-1]
    summary = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {line}"))
    for key in (M.RUNTIME_LOSS_AT_H_MEAN, M.NUM_EXPANDS, M.NUM_COLLAPSES, M.NUM_FORCED_COLLAPSES,
                M.AGE_OUT_COLLAPSES, M.MEAN_RESIDENCY, M.SWAP_RATE_MEAN, M.LATENCY_OVERHEAD):
        assert key in summary, key
    # recency never acts: every collapse is the budget's, every one an age-out, no residency sample
    assert summary[M.NUM_EXPANDS] == 0 and summary[M.AGE_OUT_COLLAPSES] == summary[M.NUM_COLLAPSES] > 0
    assert summary[M.MEAN_RESIDENCY] is None and summary[M.RESIDENCY_SAMPLES] == 0


def test_run_refuses_a_jt1_checkpoint_for_the_learned_policy_and_short_texts(project, tmp_path):
    root, cfg = project
    jt1 = tmp_path / "jt1"
    (jt1 / "gistnet").mkdir(parents=True)
    res = _run(["run", "--config", str(cfg), "--checkpoint", str(jt1), "--text", str(root / "play.txt"),
                "--trace", str(tmp_path / "t.jsonl")], root)
    assert res.exit_code == 2 and "lensnet" in res.output
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.")
    res = _run(["run", "--config", str(cfg), "--checkpoint", str(root / "ck"), "--text", str(short),
                "--trace", str(tmp_path / "t.jsonl")], root)
    assert res.exit_code == 2 and "one step needs" in res.output
    assert not (tmp_path / "t.jsonl").exists()
