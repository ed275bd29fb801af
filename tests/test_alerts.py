"""The critical alerts: they fire on a planted bad run, stay quiet on a good one, reach their hooks, and
a failing hook never raises. The Dagster sensor raises each new alert once."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import dagster as dg
import pytest
import yaml

from mcx_core.config import AlertsConfig
from mcx_core.telemetry import metrics as M
from mcx_core.telemetry.sinks import MemorySink
from mcx_core.tools import alerts

ROOT = Path(__file__).resolve().parents[1]
CFG = AlertsConfig()


def records(swap_rates, latency, baseline=10.0):
    return [
        {"step": s, "latency_ms": latency, M.SWAP_RATE: r, M.BASELINE_LATENCY_MS: baseline}
        for s, r in enumerate(swap_rates)
    ]


def test_alerts_fire_on_a_bad_run_and_stay_quiet_on_a_good_one():
    bad = alerts.evaluate_records(records([0.1] * 5 + [0.8] * 12, latency=31.0), CFG, "bad.jsonl")
    assert {a.name for a in bad} == {alerts.SWAP_RATE, alerts.LATENCY}
    swap = next(a for a in bad if a.name == alerts.SWAP_RATE)
    assert swap.value == pytest.approx(0.8) and swap.threshold == 0.5 and swap.step == 14
    lat = next(a for a in bad if a.name == alerts.LATENCY)
    assert lat.value == pytest.approx(3.1) and "3.10×" in lat.message and lat.tag == "alert.latency"

    assert alerts.evaluate_records(records([0.1] * 17, latency=14.0), CFG, "good.jsonl") == []
    # One busy step in a calm run is not thrashing; the windowed mean decides.
    assert alerts.evaluate_records(records([0.1] * 8 + [1.0] + [0.1] * 8, latency=10.0), CFG, "x") == []
    # Just over the thresholds fires, just under does not.
    assert alerts.latency_alert([15.1] * 3, [10.0] * 3, CFG, "x") is not None
    assert alerts.latency_alert([14.9] * 3, [10.0] * 3, CFG, "x") is None
    assert alerts.swap_rate_alert([0.51] * 10, CFG, "x") is not None
    assert alerts.swap_rate_alert([0.49] * 10, CFG, "x") is None


def test_latency_alert_uses_medians_so_a_slow_first_step_is_not_an_alert():
    assert alerts.latency_alert([500.0, 11, 12, 11, 12], [10.0] * 5, CFG, "x") is None


def test_delta_nll_divergence_across_cycles(tmp_path):
    for cycle, value in enumerate([0.30, 0.20, 0.28]):
        d = tmp_path / f"JT1_cycle{cycle}_step5"
        d.mkdir()
        (d / "trainer_state.json").write_text(json.dumps({"metrics": {M.TRAIN_DELTA_NLL_MEAN: value}}))
    older = tmp_path / "JT1_cycle2_step1"  # an earlier step of cycle 2 does not count
    older.mkdir()
    (older / "trainer_state.json").write_text(json.dumps({"metrics": {M.TRAIN_DELTA_NLL_MEAN: 0.9}}))
    cycles = alerts.cycle_delta_nll(tmp_path)
    assert cycles == [(0, 0.30), (1, 0.20), (2, 0.28)]
    a = alerts.delta_nll_alert([v for _, v in cycles], CFG, "ck", [f"cycle {c}" for c, _ in cycles])
    assert a is not None and a.value == pytest.approx(0.08) and "cycle 1" in a.message and "cycle 2" in a.message
    assert alerts.delta_nll_alert([0.30, 0.20, 0.24], CFG, "ck") is None  # rose 0.04 <= 0.05
    assert alerts.delta_nll_alert([0.30, 0.25, 0.20], CFG, "ck") is None  # improving
    assert alerts.delta_nll_alert([0.3], CFG, "ck") is None


def test_metric_histories_smooth_training_noise():
    sink = MemorySink()
    for s in range(40):  # decreasing, with noise of ±0.1 on single steps
        sink.log_metrics({M.TRAIN_DELTA_NLL_MEAN: 0.5 - 0.005 * s + (0.1 if s % 7 == 0 else 0.0)}, step=s)
    assert alerts.evaluate_metric_history(sink.history, CFG, "run") == []
    for s in range(40, 60):  # then it climbs back up
        sink.log_metrics({M.TRAIN_DELTA_NLL_MEAN: 0.5}, step=s)
    fired = alerts.evaluate_metric_history(sink.history, CFG, "run")
    assert [a.name for a in fired] == [alerts.DELTA_NLL_DIVERGENCE] and "step 59" in fired[0].message

    run = MemorySink()
    for s in range(20):
        run.log_metrics({M.SWAP_RATE: 0.75, M.LATENCY_MS: 12.0, M.BASELINE_LATENCY_MS: 10.0}, step=s)
    assert [a.name for a in alerts.evaluate_metric_history(run.history, CFG, "run")] == [alerts.SWAP_RATE]


def test_in_progress_traces_are_read_up_to_their_last_complete_line(tmp_path):
    tmp = tmp_path / "traces" / "runtime_eval" / ".lensnet_doc0.jsonl.tmp"
    tmp.parent.mkdir(parents=True)
    tmp.write_text("\n".join(json.dumps(r) for r in records([0.9] * 12, 10.0)) + '\n{"step": 12, "lat')
    assert alerts.trace_files(tmp_path / "traces") == [tmp]
    fired = alerts.evaluate_artifacts(CFG, tmp_path / "traces", tmp_path / "checkpoints")
    assert [a.name for a in fired] == [alerts.SWAP_RATE]
    with pytest.raises(ValueError, match=r"\.tmp:13"):
        alerts.read_trace(tmp)  # a finished trace may not end mid-line


def test_new_alerts_raise_each_alert_once_across_scans(tmp_path):
    """The sensor's logic without Dagster: only files written since the last scan are read, and an alert
    already raised (an in-progress trace and the finished one are the same source) is not raised again."""
    traces, ckpts = tmp_path / "traces" / "runtime_eval", tmp_path / "checkpoints"
    traces.mkdir(parents=True)
    ckpts.mkdir()
    (traces / "good.jsonl").write_text("\n".join(json.dumps(r) for r in records([0.1] * 12, 10.0)) + "\n")
    no_store = (f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}", "smoke")  # no MLflow store yet: nothing to read
    first = alerts.new_alerts(CFG, traces.parent, ckpts, None, mlflow=no_store)
    assert first.alerts == [] and first.changed_files == 1

    tmp = traces / ".bad.jsonl.tmp"
    tmp.write_text("\n".join(json.dumps(r) for r in records([0.9] * 12, 40.0)) + "\n")
    second = alerts.new_alerts(CFG, traces.parent, ckpts, json.loads(json.dumps(first.cursor)), mlflow=no_store)
    assert sorted(a.name for _, a in second.alerts) == [alerts.LATENCY, alerts.SWAP_RATE]
    assert all(run is None for run, _ in second.alerts) and second.changed_files == 1

    tmp.rename(traces / "bad.jsonl")  # the run finished: same alerts, same source
    third = alerts.new_alerts(CFG, traces.parent, ckpts, second.cursor)
    assert third.alerts == [] and third.changed_files == 1
    assert alerts.new_alerts(CFG, traces.parent, ckpts, third.cursor).changed_files == 0

    for cycle, value in enumerate([0.30, 0.20, 0.28]):  # a JT1 checkpoint written: ΔNLL across cycles
        d = ckpts / f"JT1_cycle{cycle}_step5"
        d.mkdir()
        (d / "trainer_state.json").write_text(json.dumps({"metrics": {M.TRAIN_DELTA_NLL_MEAN: value}}))
    fourth = alerts.new_alerts(CFG, traces.parent, ckpts, third.cursor)
    assert [a.name for _, a in fourth.alerts] == [alerts.DELTA_NLL_DIVERGENCE]


def test_tags_name_each_alert_for_the_mlflow_run():
    bad = alerts.evaluate_records(records([0.9] * 12, 40.0), CFG, "/x/traces/a.jsonl")
    bad += alerts.evaluate_records(records([0.9] * 12, 10.0), CFG, "/x/traces/b.jsonl")
    sink = MemorySink()
    alerts.tag_run(sink, bad)
    assert set(sink.tags) == {"alert.swap_rate", "alert.latency"}
    assert "a.jsonl" in sink.tags["alert.swap_rate"] and "b.jsonl" in sink.tags["alert.swap_rate"]
    assert sink.last(M.ALERTS_FIRED) == 3
    quiet = MemorySink()
    alerts.tag_run(quiet, [])
    assert quiet.tags == {} and quiet.last(M.ALERTS_FIRED) == 0


class _Capture(BaseHTTPRequestHandler):
    bodies: ClassVar[list] = []

    def do_POST(self):
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_hooks_receive_the_alert_json_and_failures_are_logged_not_raised(tmp_path, caplog):
    fired = alerts.evaluate_records(records([0.9] * 12, 10.0), CFG, "bad.jsonl")
    out = tmp_path / "alert.json"
    server = HTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = AlertsConfig(command=f"cat > {out}", webhook_url=f"http://127.0.0.1:{server.server_port}/hook")
        assert alerts.dispatch(fired, cfg, {"config": "smoke"}) == []
    finally:
        server.shutdown()
    sent = json.loads(out.read_text())
    assert sent["config"] == "smoke" and sent["alerts"][0]["name"] == "swap_rate"
    assert _Capture.bodies[-1] == sent

    broken = AlertsConfig(command="exit 7", webhook_url="http://127.0.0.1:9/nothing-listens", hook_timeout_s=2)
    problems = alerts.dispatch(fired, broken)
    assert len(problems) == 2 and "exited 7" in problems[0] and "nothing-listens" in problems[1]
    assert "alert hook" in caplog.text
    assert alerts.dispatch([], broken) == []  # nothing to say, nothing run


def test_sensor_raises_each_new_alert_once(tmp_path, monkeypatch):
    from mcx_dagster.defs.analysis import telemetry_alerts
    from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker

    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data["artifacts_dir"] = "artifacts"
    data["alerts"] = {"command": f"cat >> {tmp_path / 'hook.jsonl'}; echo >> {tmp_path / 'hook.jsonl'}"}
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("MCX_HOME", str(tmp_path))
    traces = tmp_path / "artifacts" / "traces" / "runtime_eval"
    traces.mkdir(parents=True)
    (traces / "good.jsonl").write_text("\n".join(json.dumps(r) for r in records([0.1] * 12, 10.0)) + "\n")
    resources = {
        "settings": MegaContextSettings(config_path=str(tmp_path / "smoke.yaml"), root=str(tmp_path)),
        "mlflow": MLflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"),
    }
    def tick(instance, cursor=None):  # resources with setup/teardown (the project lock) need the context manager
        with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as ctx:
            return telemetry_alerts(ctx)

    with dg.instance_for_test() as instance:
        first = tick(instance)
        assert first.asset_events == [] and "no new alert" in first.skip_reason.skip_message

        (traces / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in records([0.9] * 12, 40.0)) + "\n")
        second = tick(instance, first.cursor)
        (obs,) = second.asset_events
        assert obs.asset_key == dg.AssetKey("runtime_eval")
        assert obs.metadata["alerts_fired"].value == 2
        assert {"alert.swap_rate", "alert.latency"} <= set(obs.metadata)
        assert "bad.jsonl" in obs.metadata["alerts"].value
        hook = [json.loads(x) for x in (tmp_path / "hook.jsonl").read_text().splitlines() if x.strip()]
        assert len(hook) == 1 and {a["name"] for a in hook[0]["alerts"]} == {"swap_rate", "latency"}

        (traces / "bad.jsonl").touch()  # re-read, same alerts: not raised again
        third = tick(instance, second.cursor)
        assert third.asset_events == [] and len((tmp_path / "hook.jsonl").read_text().split("\n\n")) == 1
