"""What a Dagster user sees after `mcx materialize` (issue 15): named jobs, the demo's one small sweep
as its own table kind (the gate's schema check passes), the seed's per-action table, reuse that is
visible and keeps downstream in sync (data versions from input fingerprints), plots inside the
markdown reports, only headline numbers charted, owners and code versions, alerts raised once.
One real smoke materialize against a temporary instance and MLflow store."""

import json
import re

import dagster as dg
import pyarrow.parquet as pq
import pytest

from mcx_core.telemetry.schemas import table_kind, validate_artifacts
from mcx_dagster.definitions import defs
from mcx_dagster.defs.analysis import ALERT_LEDGER, telemetry_alerts
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker
from mcx_dagster.defs.sweep import DEMO_SWEEP_SAMPLES
from mcx_dagster.orchestration import POST_HOC, run_materialize, step_failures


@pytest.fixture(scope="module")
def done(tmp_path_factory, smoke_config):
    root = tmp_path_factory.mktemp("ux")
    cfg_path = smoke_config(root, artifacts=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("MCX_HOME", str(root))
    mp.setenv("DAGSTER_HOME", str(root / "dagster_home"))
    (root / "dagster_home").mkdir()
    resources = {"settings": MegaContextSettings(config_path=str(cfg_path), root=str(root)),
                 "mlflow": MLflowTracker(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")}
    with dg.DagsterInstance.get() as instance:
        main = run_materialize(defs(), None, instance, resources=resources)
        post = run_materialize(defs(), POST_HOC, instance, resources=resources)
        again = run_materialize(defs(), ["baseline_eval"], instance, resources=resources)
        yield {"root": root, "art": root / "artifacts", "instance": instance, "main": main, "post": post,
               "again": again, "resources": resources}
    mp.undo()


def test_cli_runs_are_named_jobs_and_the_demo_writes_one_small_sweep(done):
    assert step_failures(done["main"]) == [] and step_failures(done["post"]) == []
    jobs = [done["instance"].get_run_by_id(r).job_name for r in [*done["main"].run_ids, *done["post"].run_ids]]
    assert jobs == ["mcx_pipeline", "mcx_demo_sweep", "mcx_post_hoc"]
    assert {j.name for j in defs().jobs} >= {"mcx_pipeline", "mcx_post_hoc", "mcx_demo_sweep"}
    table = done["art"] / "deltas" / "eval_sweep.parquet"
    assert table_kind(table) == "eval_sweep"
    rows = pq.read_table(table).to_pylist()
    assert len(rows) == DEMO_SWEEP_SAMPLES and all(r["compression_ratio"] > 1 for r in rows)


def test_the_sweep_does_not_touch_the_gate_and_has_its_own_view(done):
    problems, counts = validate_artifacts(done["art"])
    assert problems == [] and counts["sweep_tables"] == 1 and counts["delta_tables"] >= 1
    assert counts["action_tables"] == len(list((done["art"] / "traces" / "runtime_eval").glob("*.jsonl")))
    from mcx_core.tools.query import connect

    con = connect(done["art"])
    assert con.execute("SELECT count(*) FROM deltas WHERE filename LIKE '%eval_sweep%'").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM deltas WHERE action IS NULL").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM eval_sweep WHERE compression_ratio > 1").fetchone()[0] == DEMO_SWEEP_SAMPLES
    n_actions = con.execute("SELECT count(*) FROM actions").fetchone()[0]
    per_step = con.execute("SELECT coalesce(sum(len(actions)), 0) FROM traces WHERE filename LIKE '%runtime_eval%'")
    assert n_actions == per_step.fetchone()[0]  # one row per expand/collapse of the run traces


def _mat(result, asset):
    return result.asset_materializations_for_node(asset)[0]


def test_reuse_is_visible_and_keeps_the_data_version(done):
    first, second = _mat(done["main"], "baseline_eval"), _mat(done["again"], "baseline_eval")
    assert first.metadata["reused"].value is False and second.metadata["reused"].value is True
    assert second.metadata["seconds"].value < first.metadata["computed_seconds"].value + 60
    assert second.metadata["computed_seconds"].value == pytest.approx(first.metadata["computed_seconds"].value)
    record = json.loads((done["art"] / ".stages" / "baseline_eval.json").read_text())
    versions = {m.tags["dagster/data_version"] for m in (first, second)}
    assert versions == {record["fingerprint"]}  # unchanged inputs: the same version, downstream in sync


def test_reports_embed_their_plots_and_only_headline_numbers_are_charted(done):
    meta = _mat(done["main"], "baseline_eval").metadata
    assert "data:image/png;base64," in meta["report"].value
    assert any(k.startswith("plot/") for k in meta)
    charted = {k for k, v in meta.items() if isinstance(v, dg.FloatMetadataValue)}
    assert "narrative/w64/delta_nll_recency_mean" in charted
    assert not [k for k in charted if k.endswith(("_ci_lo", "_ci_hi", "n_samples", "/w_max"))]
    assert isinstance(meta["summary"], dg.JsonMetadataValue)
    assert "data:image/png;base64," in _mat(done["main"], "gist_eval_report").metadata["report"].value


def test_owners_code_versions_tags_and_the_attached_analysis():
    graph = defs().resolve_asset_graph()
    for key in ("baseline_eval", "eval_sweep", "telemetry_analysis"):
        node = graph.get(dg.AssetKey(key))
        assert node.owners == ["team:megacontext"] and node.code_version.startswith("code-"), key
    assert "+cfg-" in graph.get(dg.AssetKey("eval_sweep")).code_version
    assert graph.get(dg.AssetKey("eval_sweep")).automation_condition is not None
    assert {"runtime_eval", "gist_eval_report"} <= {k.to_user_string() for k in graph.get(dg.AssetKey("telemetry_analysis")).parent_keys}


def test_alerts_are_raised_once_between_the_cli_run_and_the_sensor(done):
    from mcx_core.artifacts import ArtifactPaths
    from mcx_core.tools import alerts

    cfg = done["resources"]["settings"].load()
    paths = ArtifactPaths.from_config(cfg)
    assert not [f for f in alerts.trace_files(paths.traces) if "compare" in f.parts or f.name.startswith("run_")]
    ledger = done["art"] / ALERT_LEDGER
    before = set(json.loads(ledger.read_text())) if ledger.is_file() else set()
    # Everything the CLI run's analysis found is in the ledger ...
    assert {alerts.alert_key(a) for a in alerts.evaluate_artifacts(cfg.alerts, paths.traces, paths.checkpoints)} <= before
    # ... so the sensor's first tick (no cursor: it reads every trace again) raises only what is not.
    with dg.build_sensor_context(instance=done["instance"], resources=done["resources"]) as ctx:
        tick = telemetry_alerts(ctx)
    observed = [e for e in tick.asset_events if isinstance(e, dg.AssetObservation)]
    shown = "".join(e.metadata["alerts"].value for e in observed)
    again = {f"{src}|{name}" for name, src in re.findall(r"- \*\*([^*]+)\*\* \((.+?)\): ", shown)}
    assert not again & before


def test_an_alert_is_dispatched_once(tmp_path):
    from mcx_core.tools.alerts import Alert
    from mcx_dagster.defs.analysis import _unraised

    a = Alert("latency", "3x baseline", 3.0, 1.5, str(tmp_path / "traces" / "runtime_eval" / "x.jsonl"))
    b = Alert("swap_rate", "0.6 > 0.25", 0.6, 0.25, str(tmp_path / "traces" / "runtime_eval" / "x.jsonl"))
    assert _unraised(tmp_path, [a]) == [a]
    assert _unraised(tmp_path, [a, b]) == [b]  # a: raised before (by the CLI run or the sensor)
    assert _unraised(tmp_path, [a, b]) == []
