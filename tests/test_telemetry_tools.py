"""Telemetry tools on real files: traces written by the runtime engine (tiny random model) pass the
schema and feed the analyses, a corrupted line is named by file:line, `mcx profile` writes a Chrome
trace, `mcx compare` reads two runs of a temporary MLflow store."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from mcx_cli.telemetry import analyze, compare, profile
from mcx_core.compression.gistnet import Gister
from mcx_core.config import load_config
from mcx_core.focus.engine import run_engine
from mcx_core.focus.lensnet import LensNet
from mcx_core.focus.policies import RandomPolicy
from mcx_core.model.base import load_base_model
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.mlflow_sink import MLflowSink
from mcx_core.telemetry.schemas import validate_artifacts, validate_report_json, validate_trace_file
from mcx_core.tools import alerts, analysis

ROOT = Path(__file__).resolve().parents[1]


def _config(root: Path, artifacts: Path) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data["base_model"]["cache_dir"] = str(ROOT / ".cache" / "models")
    data["artifacts_dir"] = str(artifacts)
    path = root / f"{artifacts.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A config whose artifacts hold one real runtime trace, a JT2-shaped checkpoint and a text."""
    root = tmp_path_factory.mktemp("telemetry")
    cfg_path = _config(root, root / "artifacts")
    cfg = load_config(cfg_path)
    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    torch.manual_seed(0)
    gister = Gister(lm.d_model, cfg.gistnet.model)
    gister.save_pretrained(root / "ck" / "gistnet")
    LensNet(lm.d_model, cfg.lensnet.model).save_pretrained(root / "ck" / "lensnet")
    ids = torch.randint(0, 1000, (256 + 32 * 12 + 16,))
    trace = root / "artifacts" / "traces" / "runtime_eval" / "random_doc0.jsonl"
    run_engine(cfg, lm, gister, RandomPolicy(0), ids, 12, None, trace, prefill=256)
    text = root / "play.txt"
    text.write_text(" ".join(f"line {i} of a play, said the player." for i in range(300)))
    return {"root": root, "cfg_path": cfg_path, "cfg": cfg, "lm": lm, "gister": gister, "trace": trace, "text": text}


def _invoke(cmd, args, root):
    return CliRunner().invoke(cmd, args, env={"MCX_HOME": str(root)}, catch_exceptions=False)


def test_real_traces_pass_the_schema_and_feed_every_trace_analysis(project):
    root, cfg = project["root"], str(project["cfg_path"])
    problems, counts = validate_artifacts(root / "artifacts")
    assert problems == [] and counts["traces"] == 1
    for name in ("residency", "latency", "spikes", "oscillation"):
        res = _invoke(analyze, [name, "--config", cfg, "--json"], root)
        assert res.exit_code == 0, res.output
        out = json.loads(res.output.strip().splitlines()[-1])
        assert out["name"] == name and Path(out["files"]["markdown"]).is_file() and Path(out["files"]["plot"]).is_file()
    latency = json.loads((root / "artifacts" / "reports" / "analysis" / "latency.json").read_text())
    assert sum(p["measured"] for p in latency["parts"]) == pytest.approx(1.0)
    # The reports just written are telemetry too, and valid.
    assert validate_artifacts(root / "artifacts")[0] == []
    res = _invoke(analyze, ["schema", "--config", cfg], root)
    assert res.exit_code == 0 and "0 problems in 1 traces" in res.output


def test_schema_check_rejects_a_corrupted_line_and_names_file_and_line(project, tmp_path):
    from mcx_dagster.defs.analysis import telemetry_schema_valid
    from mcx_dagster.defs.resources import MegaContextSettings

    artifacts = tmp_path / "corrupt"
    bad = artifacts / "traces" / "runtime_eval" / "random_doc0.jsonl"
    bad.parent.mkdir(parents=True)
    lines = project["trace"].read_text().splitlines()
    lines[2] = lines[2][:40]  # line 3: cut off mid-object
    rec = json.loads(lines[4])
    rec["budget_utilization"] = "high"  # line 5: wrong type
    lines[4] = json.dumps(rec)
    rec = json.loads(lines[6])
    del rec["expanded"]  # line 7: missing key
    lines[6] = json.dumps(rec)
    bad.write_text("\n".join(lines) + "\n")
    found = [str(p) for p in validate_trace_file(bad)]
    assert found[0].startswith(f"{bad}:3: not valid JSON")
    assert any(p.startswith(f"{bad}:5: 'budget_utilization' is str") for p in found)
    assert any(p == f"{bad}:7: missing key 'expanded'" for p in found)
    assert len(found) == 3

    cfg_path = _config(tmp_path, artifacts)
    result = telemetry_schema_valid(MegaContextSettings(config_path=str(cfg_path), root=str(tmp_path)))
    assert not result.passed and f"{bad}:3:" in result.description
    assert result.metadata["problems"].value == 3
    res = _invoke(analyze, ["schema", "--config", str(cfg_path)], tmp_path)
    assert res.exit_code == 3 and f"{bad}:3: not valid JSON" in res.output

    shutil.copy(project["trace"], bad)  # repaired: the same check passes
    assert telemetry_schema_valid(MegaContextSettings(config_path=str(cfg_path), root=str(tmp_path))).passed


def test_schema_steps_must_increase_and_reports_must_parse(tmp_path):
    good = {"expanded": [], "collapsed": ["L0:000003"], "working_context": {"LOD0": 64, "LOD1": 2},
            "latency_ms": 3.0, "budget_utilization": 0.5}
    t = tmp_path / "t.jsonl"
    t.write_text("\n".join(json.dumps({"step": s, **good}) for s in (0, 1, 1)) + "\n")
    assert [str(p) for p in validate_trace_file(t)] == [f"{t}:3: step 1 does not follow step 1"]
    t.write_text(json.dumps({"step": 0, **good, "collapsed": ["block 3"], "latency_ms": True}) + "\n")
    found = [str(p) for p in validate_trace_file(t)]
    assert len(found) == 1 and "'latency_ms' is bool" in found[0]
    r = tmp_path / "runtime_eval.json"
    r.write_text('{\n  "summary": {},\n  "seconds": 1,\n')
    assert str(validate_report_json(r)[0]).startswith(f"{r}:4: not valid JSON")
    r.write_text(json.dumps({"per_document": [], "seconds": 1.0}))
    assert "missing key(s) ['summary']" in str(validate_report_json(r)[0])
    r.write_text(json.dumps({"summary": {"loss": float("nan")}}))  # NaN: Python's JSON, allowed
    assert validate_report_json(r) == []


def test_profile_writes_a_chrome_trace_and_a_memory_timeline(project):
    root = project["root"]
    res = _invoke(profile, ["--config", str(project["cfg_path"]), "--checkpoint", str(root / "ck"), "--text",
                            str(project["text"]), "--prefill", "128", "--json"], root)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    chrome = Path(out["files"]["chrome_trace"])
    assert chrome == root / "artifacts" / "traces" / "profile" / "runtime_profile.json"
    events = json.loads(chrome.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {f"mcx/{s}" for s in ("ingest", "fit", "lensnet", "allocator", "checks", "assemble", "forward")} <= names
    assert any(str(n).startswith("aten::") for n in names)
    assert out["policy"] == "lensnet" and out["metrics"][M.PROFILE_STEP_MS] > 0
    timeline = json.loads(Path(out["files"]["memory"]).read_text())
    assert len(timeline["samples"]) > 1 and out["metrics"][M.PROFILE_PEAK_RSS_MB] > 10
    report = Path(out["files"]["markdown"]).read_text()
    assert "Top operators" in report and "runtime_profile.json" in report
    assert not any(hasattr(o, "__dict__") and "forward" in o.__dict__ for o in [project["lm"].model])


def test_synthetic_boundary_test_on_the_tiny_model(project, tmp_path):
    cfg, lm = project["cfg"], project["lm"]
    found = analysis.synthetic_boundary_test(cfg, lm, project["gister"], n_samples=2)
    assert set(found["grids"]) == {"aligned", "shifted"}
    K = cfg.dataset.block_size
    assert found["grids"]["aligned"].shape == (math.ceil(cfg.dataset.horizon / K), K)
    assert all(math.isfinite(v) for v in found["delta_nll_mean"].values())
    res = analysis.boundary_analysis({}, tmp_path, K, "synthetic only", found)
    assert set(res.metrics) >= {M.ANALYSIS_BOUNDARY_ALIGNED, M.ANALYSIS_BOUNDARY_SHIFTED}
    assert "Synthetic boundary test" in res.files["markdown"].read_text()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temporary MLflow store with two runs that differ in one param, and one thrashing run."""
    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    art = (d / "artifacts").as_uri()
    runs = {}
    for name, tau, slope in (("run-a", "0.2", 0.01), ("run-b", "0.3", 0.02)):
        sink = MLflowSink.start(uri, "smoke", name, artifact_location=art)
        sink.log_params({"allocator.tau_expand": tau, "allocator.n_diff": 4})
        for s in range(5):
            sink.log_metrics({M.SWAP_RATE: 0.1 + slope * s, M.LATENCY_MS: 10.0 + s}, step=s)
        sink.log_metrics({"only/" + name: 1.0})
        sink.end()
        runs[name] = sink.run_id
    bad = MLflowSink.start(uri, "smoke", "thrashing", artifact_location=art)
    for s in range(12):
        bad.log_metrics({M.SWAP_RATE: 0.9}, step=s)
    runs["thrashing"] = bad.run_id  # left RUNNING: a run in progress
    return uri, runs


def test_compare_reports_the_changed_param_and_both_runs_metrics(store, tmp_path):
    uri, runs = store
    out = tmp_path / "cmp"
    res = _invoke(compare, ["run-a", runs["run-b"], "--tracking-uri", uri, "--out", str(out), "--json"], tmp_path)
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.strip().splitlines()[-1])
    assert result["params"] == [{"param": "allocator.tau_expand", "a": "0.2", "b": "0.3"}]
    metrics = {r["metric"]: r for r in result["metrics"]}
    assert metrics[M.SWAP_RATE]["a"] == pytest.approx(0.14) and metrics[M.SWAP_RATE]["b"] == pytest.approx(0.18)
    # A metric one run lacks is undefined there: null in strict JSON (never NaN, which is not JSON).
    assert metrics["only/run-a"]["b"] is None and metrics["only/run-b"]["a"] is None
    assert set(result["curves"]) == {M.SWAP_RATE, M.LATENCY_MS}
    md = (out / "compare.md").read_text()
    assert "allocator.tau_expand" in md and "run-a" in md and "run-b" in md and (out / "compare_curves.png").is_file()

    text = _invoke(compare, ["run-a", "run-b", "--tracking-uri", uri, "--out", str(out)], tmp_path)
    assert text.exit_code == 0 and "allocator.tau_expand" in text.output and "0.3" in text.output
    missing = _invoke(compare, ["run-a", "no-such-run", "--tracking-uri", uri, "--out", str(out)], tmp_path)
    assert missing.exit_code == 2 and "no-such-run" in missing.output


def test_mlflow_alerts_find_the_thrashing_run_and_tag_it(store):
    from mlflow import MlflowClient

    from mcx_dagster.defs.analysis import _tag_mlflow_run

    uri, runs = store
    found, newest = alerts.mlflow_alerts(uri, "smoke", alerts.AlertsConfig())
    assert [(run_id, [a.name for a in a_list]) for run_id, a_list in found] == [(runs["thrashing"], ["swap_rate"])]
    _tag_mlflow_run((uri, runs["thrashing"]), found[0][1])
    tags = MlflowClient(tracking_uri=uri).get_run(runs["thrashing"]).data.tags
    assert "swap rate 0.900" in tags["alert.swap_rate"]
    assert "alert.swap_rate" not in MlflowClient(tracking_uri=uri).get_run(runs["run-a"]).data.tags
    # Finished runs older than the cursor are not re-read.
    again, _ = alerts.mlflow_alerts(uri, "smoke", alerts.AlertsConfig(), since_ms=newest)
    assert [r for r, _ in again] == [runs["thrashing"]]  # still running


def test_analyze_alerts_exits_3_on_a_planted_bad_trace(project, tmp_path):
    artifacts = tmp_path / "alerting"
    trace = artifacts / "traces" / "runtime_eval" / "bad.jsonl"
    trace.parent.mkdir(parents=True)
    recs = [json.loads(x) for x in project["trace"].read_text().splitlines()]
    for r in recs:
        r[M.SWAP_RATE] = 0.95
    trace.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    cfg_path = _config(tmp_path, artifacts)
    res = _invoke(analyze, ["alerts", "--config", str(cfg_path), "--json", "--no-notify"], tmp_path)
    assert res.exit_code == 3
    sent = json.loads(res.output.strip().splitlines()[-1])
    assert "swap_rate" in {a["name"] for a in sent["alerts"]}
    assert (artifacts / "reports" / "analysis" / "alerts.md").is_file()
    shutil.copy(project["trace"], trace)  # the engine's own run: calm
    calm = _invoke(analyze, ["alerts", "--config", str(cfg_path), "--json", "--no-notify"], tmp_path)
    names = {a["name"] for a in json.loads(calm.output.strip().splitlines()[-1])["alerts"]}
    assert "swap_rate" not in names
    assert np.isfinite(float(calm.exit_code))


def test_telemetry_analysis_asset_writes_reports_and_tags_its_mlflow_run(project, tmp_path, monkeypatch):
    import dagster as dg
    from mlflow import MlflowClient

    from mcx_dagster.defs.analysis import telemetry_analysis
    from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker

    artifacts = tmp_path / "artifacts"
    shutil.copytree(project["root"] / "artifacts" / "traces", artifacts / "traces", ignore=shutil.ignore_patterns("profile"))
    recs = [json.loads(x) for x in project["trace"].read_text().splitlines()]
    for r in recs:
        r[M.SWAP_RATE] = 0.95
    (artifacts / "traces" / "runtime_eval" / "thrashing.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    cfg_path = _config(tmp_path, artifacts)
    monkeypatch.setenv("MCX_HOME", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [telemetry_analysis], instance=instance,
            resources={"settings": MegaContextSettings(config_path=str(cfg_path), root=str(tmp_path)),
                       "mlflow": MLflowTracker(tracking_uri=uri, artifact_location=(tmp_path / "art").as_uri())},
        )
        assert result.success
        (mat,) = result.get_asset_materialization_events()
        meta = mat.materialization.metadata
    assert meta["alerts_fired"].value >= 1 and "thrashing.jsonl" in meta["alerts"].value
    assert {"residency", "latency", "oscillation", "spikes", "boundary"} <= {
        p.stem for p in (artifacts / "reports" / "analysis").glob("*.md")}
    assert set(meta["skipped"].value) == {"compression", "drift"}  # no evaluation table, no JT1 checkpoint
    tags = MlflowClient(tracking_uri=uri).get_run(meta["mlflow_run_id"].value).data.tags
    assert "thrashing.jsonl" in tags["alert.swap_rate"] and "random_doc0.jsonl" not in tags["alert.swap_rate"]
