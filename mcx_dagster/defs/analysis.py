"""Telemetry: post-hoc analyses of the runtime and gist evaluations, the telemetry schema check, and a
sensor that raises the critical alerts (swap rate, ΔNLL divergence, latency) while runs go on."""

import json
from pathlib import Path

import dagster as dg

from mcx_dagster.defs.metadata import NOT_CHARTED, OWNERS, code_version, floats, markdown_file, summary_json
from mcx_dagster.defs.resources import MegaContextSettings, MLflowTracker

ALERT_ASSET = "runtime_eval"  # alerts show as observations of the asset whose telemetry raised them


def _runtime_eval_mlflow_run(instance) -> tuple[str, str] | None:
    """(tracking uri, run id) of the newest runtime_eval materialization's MLflow run, if recorded."""
    event = instance.get_latest_materialization_event(dg.AssetKey(ALERT_ASSET))
    meta = event.asset_materialization.metadata if event and event.asset_materialization else {}
    run_id, uri = meta.get("mlflow_run_id"), meta.get("mlflow_tracking_uri")
    if run_id is None or uri is None:
        return None
    return str(getattr(uri, "value", uri)), str(getattr(run_id, "value", run_id))


ALERT_LEDGER = ".alerts_raised.json"  # under the artifacts root: alert keys raised so far


def _unraised(root: Path, fired: list) -> list:
    """The alerts of `fired` not raised before (by `mcx materialize`'s analysis or the sensor), now
    recorded as raised: each alert (source and name, `alerts.alert_key`) is dispatched once."""
    from mcx_core.artifacts import write_json
    from mcx_core.tools.alerts import alert_key

    ledger = Path(root) / ALERT_LEDGER
    try:
        raised = set(json.loads(ledger.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        raised = set()
    new = [a for a in fired if alert_key(a) not in raised]
    if new:
        write_json(ledger, sorted(raised | {alert_key(a) for a in new}))
    return new


def _tag_mlflow_run(where: tuple[str, str] | None, alerts_: list) -> None:
    from mcx_core.telemetry.mlflow_sink import MLflowSink
    from mcx_core.tools import alerts

    if where and alerts_:
        MLflowSink(*where).set_tags(alerts.tags(alerts_))


# The analyses read what these wrote. They matter most when an acceptance check failed, and a failed
# blocking check skips what is downstream of it in the same run, so `mcx materialize` runs this asset in
# a second run of its own (job mcx_post_hoc) after the main graph; in the UI, materialize it alone.
@dg.asset(group_name="telemetry", kinds={"duckdb"}, owners=OWNERS, tags={"mcx/stage": "analysis"},
          code_version=code_version(),
          deps=["runtime_eval", "gist_eval_report", "baseline_eval", "gistnet_checkpoint"])
def telemetry_analysis(
    context: dg.AssetExecutionContext, settings: MegaContextSettings, mlflow: MLflowTracker
) -> dg.MaterializeResult:
    """Post-hoc analyses (`reports/analysis/`): residency histogram, ΔNLL vs compression, ΔNLL by
    position within the block plus a synthetic boundary test, latency by stage vs the seed's split,
    ping-pong spans (DuckDB over the traces), latency spikes vs actions, gist drift across JT1
    checkpoints. Then the critical alerts: `alert.<name>` tags on this MLflow run and on runtime_eval's,
    and `alerts.command` / `alerts.webhook_url` when configured."""
    from mcx_core.artifacts import ArtifactPaths
    from mcx_core.model.base import load_base_model
    from mcx_core.telemetry.actions import write_run_action_tables
    from mcx_core.tools import alerts, analysis

    cfg = settings.load()
    paths = ArtifactPaths.from_config(cfg)
    action_tables = write_run_action_tables(paths.traces)  # the seed's traces/run_NNN.jsonl
    with mlflow.run(context, cfg, settings.root_dir()) as sink:
        lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
        done, skipped, index = analysis.run_all(cfg, sink, lm, synthetic=True)
        fired = alerts.evaluate_artifacts(cfg.alerts, paths.traces, paths.checkpoints)
        alerts.tag_run(sink, fired)
    _tag_mlflow_run(_runtime_eval_mlflow_run(context.instance), fired)
    new = _unraised(paths.root, fired)  # raised once: not again by the sensor's first tick
    for problem in alerts.dispatch(new, cfg.alerts, {"config": cfg.name, "dagster_run_id": context.run_id}):
        context.log.warning(problem)
    for a in new:
        context.log.warning("ALERT %s: %s (%s)", a.name, a.message, a.source)
    meta = {}
    for r in done.values():
        meta.update(floats({k: v for k, v in r.metrics.items() if not NOT_CHARTED.search(k)}))
    return dg.MaterializeResult(
        metadata={
            **meta,
            "metrics": summary_json({k: r.metrics for k, r in done.items()}),
            "action_tables": dg.MetadataValue.json([str(p) for p in action_tables]),
            "alerts_fired": dg.MetadataValue.int(len(fired)),
            "alerts": dg.MetadataValue.md(alerts.markdown(fired)),
            "index": markdown_file(index),
            "skipped": dg.MetadataValue.json(skipped),
            "reports": dg.MetadataValue.path(str(index.parent)),
        }
    )


@dg.asset_check(asset="runtime_eval", blocking=True)
def telemetry_schema_valid(settings: MegaContextSettings) -> dg.AssetCheckResult:
    """Every trace line has the SPEC §6 keys with their types (steps increasing), every delta table
    passes its schema, every report JSON parses with its keys; a failure names `file:line`."""
    from mcx_core.artifacts import ArtifactPaths
    from mcx_core.telemetry.schemas import validate_artifacts

    problems, counts = validate_artifacts(ArtifactPaths.from_config(settings.load()).root)
    meta = {f"{k}_checked": dg.MetadataValue.int(v) for k, v in counts.items()}
    meta["problems"] = dg.MetadataValue.int(len(problems))
    if problems:
        meta["details"] = dg.MetadataValue.md("\n".join(f"- `{p}`" for p in problems[:20]))
    return dg.AssetCheckResult(
        passed=not problems,
        metadata=meta,
        description=f"{len(problems)} problems; first: {problems[0]}" if problems else "telemetry files valid",
    )


@dg.sensor(
    name="telemetry_alerts",
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def telemetry_alerts(
    context: dg.SensorEvaluationContext, settings: MegaContextSettings, mlflow: MLflowTracker
) -> dg.SensorResult:
    """Real-time alerts: re-reads traces that changed (runs in progress included), the JT1 cycles'
    ΔNLL and the latest MLflow metrics of the config's experiment; each new alert becomes an
    observation of runtime_eval (visible in the asset's history), an `alert.<name>` tag on its MLflow
    run, and a call of the configured hook."""
    from mcx_core.artifacts import ArtifactPaths
    from mcx_core.telemetry.mlflow_sink import store
    from mcx_core.tools import alerts

    cfg = settings.load()
    paths = ArtifactPaths.from_config(cfg)
    uri, _ = store(cfg, settings.root_dir(), mlflow.tracking_uri or None)
    scan = alerts.new_alerts(cfg.alerts, paths.traces, paths.checkpoints,
                             json.loads(context.cursor) if context.cursor else None,
                             mlflow=(uri, cfg.mlflow.experiment or cfg.name))
    fresh_keys = {alerts.alert_key(a) for a in _unraised(paths.root, [a for _, a in scan.alerts])}
    new = [(r, a) for r, a in scan.alerts if alerts.alert_key(a) in fresh_keys]
    events = []
    if new:
        fresh = [a for _, a in new]
        alerts.dispatch(fresh, cfg.alerts, {"config": cfg.name, "sensor": "telemetry_alerts"})
        _tag_mlflow_run(_runtime_eval_mlflow_run(context.instance), [a for run_id, a in new if run_id is None])
        for run_id in {r for r, _ in new if r}:
            _tag_mlflow_run((uri, run_id), [a for r, a in new if r == run_id])
        events.append(dg.AssetObservation(
            asset_key=ALERT_ASSET,
            metadata={
                "alerts_fired": dg.MetadataValue.int(len(fresh)),
                "alerts": dg.MetadataValue.md(alerts.markdown(fresh)),
                **{a.tag: dg.MetadataValue.text(a.message) for a in fresh},
            },
        ))
    summary = (f"{len(new)} new alert(s): " + "; ".join(f"{a.name} ({Path(a.source).name})" for _, a in new)
               if new else f"no new alert ({scan.changed_files} changed telemetry files)")
    return dg.SensorResult(asset_events=events, cursor=json.dumps(scan.cursor), skip_reason=summary)
