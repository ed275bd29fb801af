"""`mcx analyze …`, `mcx profile`, `mcx compare`, `mcx explain`: the telemetry tools on the command line;
every command calls `mcx_core` (analysis, alerts, schemas, profiling, compare, explain). Exit codes: 0 fine, 2 a usage problem (one line, no traceback), 3 the tool found problems
(alerts fired, invalid telemetry)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

import click

from mcx_cli._common import (
    check_text,
    config_option,
    fail,
    focus_policy,
    load,
    text_tokens,
    token_stream,
    tokens,
)
from mcx_core.jsonutil import dumps_strict

EXIT_FOUND_PROBLEMS = 3

DESCRIPTIONS = {
    "residency": "Histogram of residency per swap (policy-chosen vs forced), from the traces.",
    "compression": "ΔNLL vs compression scatter with the acceptance line, from the evaluation table.",
    "boundary": "ΔNLL heatmap by position within the block; with --synthetic, defs placed on block boundaries.",
    "latency": "Step latency by stage vs the seed's target split, from the traces.",
    "oscillation": "Ping-pong spans (expand → collapse → expand within alerts.oscillation_window steps), DuckDB SQL.",
    "spikes": "Latency spikes and their correlation with the number of allocator actions, from the traces.",
    "drift": "Gist drift (cosine of probe gists) across the JT1 checkpoints.",
}


def _tracking_uri(cfg=None, explicit: str | None = None) -> str:
    from mcx_core.telemetry.mlflow_sink import default_tracking_uri
    from mcx_dagster.project import project_home

    return explicit or (cfg.mlflow.tracking_uri if cfg is not None else None) or os.environ.get(
        "MLFLOW_TRACKING_URI") or default_tracking_uri(cfg.root if cfg is not None else project_home())


@contextlib.contextmanager
def _sink(cfg, enabled: bool, run_name: str):
    """An MLflow run in the config's store (with `--mlflow`), else a sink that drops everything."""
    from mcx_core.telemetry.sinks import NullSink

    if not enabled:
        yield NullSink()
        return
    from mcx_core.telemetry.mlflow_sink import MLflowSink, store

    _, artifacts = store(cfg, cfg.root)
    with MLflowSink.start(_tracking_uri(cfg), cfg.mlflow.experiment or cfg.name, run_name,
                          tags={"mcx.config_name": cfg.name}, artifact_location=artifacts) as sink:
        yield sink
    click.echo(f"mlflow run: {sink.run_id}")


def _print_result(result, as_json: bool) -> None:
    if as_json:
        click.echo(dumps_strict({"name": result.name, "summary": result.summary, "metrics": result.metrics,
                                 "files": {k: str(v) for k, v in result.files.items()}}, default=str))
        return
    click.echo(f"{result.name}: {result.summary}")
    for k, v in result.metrics.items():
        click.echo(f"  {k} = {v:.4g}")
    click.echo(f"  report: {result.files['markdown']}")


# ---------------------------------------------------------------------------------------------- analyze


@click.group("analyze", context_settings={"help_option_names": ["-h", "--help"]})
def analyze():
    """Post-hoc telemetry analyses: each writes a PNG, a markdown report and a JSON under
    `<artifacts>/reports/analysis/` (and logs them to MLflow with --mlflow)."""


def _analysis_command(name: str):
    @config_option()
    @click.option("--mlflow", "to_mlflow", is_flag=True, help="Log metrics and files to an MLflow run.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def command(config_path: str, to_mlflow: bool, as_json: bool, synthetic: bool = False):
        from mcx_core.tools import analysis

        cfg = load(config_path, check=False)
        try:
            with _sink(cfg, to_mlflow, f"analyze-{name}") as sink:
                result = analysis.run_analysis(cfg, name, sink, synthetic=synthetic, progress=not as_json)
        except analysis.MissingInput as err:
            fail(str(err))
        _print_result(result, as_json)

    if name == "boundary":
        command = click.option("--synthetic/--no-synthetic", default=True, show_default=True,
                               help="Also run the synthetic boundary test (loads the base model).")(command)
    return analyze.command(name, help=DESCRIPTIONS[name])(command)


for _name in DESCRIPTIONS:
    _analysis_command(_name)


@analyze.command("all")
@config_option()
@click.option("--mlflow", "to_mlflow", is_flag=True, help="Log metrics and files to an MLflow run.")
@click.option("--synthetic/--no-synthetic", default=True, show_default=True, help="Run the synthetic boundary test.")
def analyze_all(config_path: str, to_mlflow: bool, synthetic: bool):
    """Every analysis whose inputs exist, plus an index report."""
    from mcx_core.tools import analysis

    cfg = load(config_path, check=False)
    with _sink(cfg, to_mlflow, "analyze-all") as sink:
        done, skipped, index = analysis.run_all(cfg, sink, synthetic=synthetic, progress=True)
    for r in done.values():
        click.echo(f"{r.name}: {r.summary}")
    for name, why in skipped.items():
        click.echo(f"{name}: skipped — {why}")
    click.echo(f"index: {index}")


@analyze.command("alerts")
@config_option()
@click.option("--notify/--no-notify", default=True, show_default=True,
              help="Run alerts.command / POST to alerts.webhook_url when alerts fire.")
@click.option("--mlflow", "to_mlflow", is_flag=True, help="Tag an MLflow run alert.<name>.")
@click.option("--json", "as_json", is_flag=True, help="Print the alerts as JSON.")
def analyze_alerts(config_path: str, notify: bool, to_mlflow: bool, as_json: bool):
    """Evaluate the critical alerts (swap rate, ΔNLL divergence, latency) over every trace, including
    runs still in progress, and the JT1 cycles. Exit 3 when any fires."""
    from mcx_core import artifacts
    from mcx_core.artifacts import ArtifactPaths
    from mcx_core.tools import alerts
    from mcx_core.tools.analysis import output_dir

    cfg = load(config_path, check=False)
    paths = ArtifactPaths.from_config(cfg)
    fired = alerts.evaluate_artifacts(cfg.alerts, paths.traces, paths.checkpoints)
    out = output_dir(cfg)
    artifacts.write_text(out / "alerts.md", f"# Alerts — config `{cfg.name}`\n\n{alerts.markdown(fired)}\n")
    artifacts.write_json(out / "alerts.json", alerts.payload(fired, {"config": cfg.name}))
    with _sink(cfg, to_mlflow, "alerts") as sink:
        alerts.tag_run(sink, fired)
    problems = alerts.dispatch(fired, cfg.alerts, {"config": cfg.name}) if notify else []
    if as_json:
        click.echo(dumps_strict(alerts.payload(fired, {"config": cfg.name, "hook_problems": problems}), default=str))
    else:
        click.echo(alerts.markdown(fired))
        for p in problems:
            click.echo(f"warning: {p}", err=True)
    if fired:
        sys.exit(EXIT_FOUND_PROBLEMS)


@analyze.command("schema")
@config_option()
def analyze_schema(config_path: str):
    """Validate every trace line, delta table and report JSON; print `file:line: problem`. Exit 3 on any."""
    from mcx_core.artifacts import ArtifactPaths
    from mcx_core.telemetry.schemas import validate_artifacts

    cfg = load(config_path, check=False)
    problems, counts = validate_artifacts(ArtifactPaths.from_config(cfg).root)
    for p in problems:
        click.echo(str(p))
    click.echo(f"{len(problems)} problems in {counts['traces']} traces, {counts['delta_tables']} delta tables, "
               f"{counts['reports']} report JSONs")
    if problems:
        sys.exit(EXIT_FOUND_PROBLEMS)


# ---------------------------------------------------------------------------------------------- profile


def _default_checkpoint(cfg) -> Path:
    from mcx_core import artifacts, checkpoints

    for find in (checkpoints.jt2_checkpoint, checkpoints.jt1_checkpoint):
        with contextlib.suppress(FileNotFoundError):
            return find(cfg)
    fail(f"no JT2 or JT1 checkpoint under {artifacts.ArtifactPaths.from_config(cfg).checkpoints}; give --checkpoint")


def _profile_tokens(cfg, lm, text_path: str | None, need: int):
    """Token ids of `--text`, else of the first document of the config's corpora with `need` tokens."""
    from mcx_core import data

    if text_path:
        _, ids = text_tokens(lm, text_path, need)  # read only the tokens profiling needs
        if len(ids) >= need:
            return ids
        fail(f"--text {text_path} has {len(ids)} tokens; profiling needs {need}")
    else:
        texts = (d.text for name, c in cfg.dataset.corpora.items() for d in data.iter_documents(name, c, root=cfg.root))
    for text in texts:
        ids = tokens(lm, text)
        if len(ids) >= need:
            return ids
    fail(f"no {'--text' if text_path else 'corpus document'} with the {need} tokens profiling needs")


@click.command("profile")
@config_option()
@click.option("--checkpoint", type=click.Path(), default=None,
              help="A JT2 (gistnet/ + lensnet/) or JT1 checkpoint (default: the newest JT2, else JT1).")
@click.option("--text", "text_path", type=click.Path(), default=None,
              help="Text to stream (default: the first long-enough document of the config's corpora).")
@click.option("--prefill", type=click.IntRange(min=0), default=None, help="History tokens (default: runtime.prefill_tokens).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed steps first.")
@click.option("--policy", default="auto", show_default=True,
              type=click.Choice(["auto", "lensnet", "recency", "random", "expand_nearest"]),
              help="auto: LensNet when the checkpoint has one, else recency.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Trace folder (default: <artifacts>/traces/profile).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics and files as JSON.")
def profile(config_path, checkpoint, text_path, prefill, warmup, policy, out_dir, as_json):
    """Profile one runtime step (MegaContextEngine.step) with torch.profiler: a Chrome trace, a memory
    snapshot (CUDA) or RSS timeline (CPU), and a report."""
    cfg = load(config_path, check=False)
    from mcx_core.artifacts import ArtifactPaths
    from mcx_core.compression.gistnet import load_gister
    from mcx_core.model.base import load_base_model
    from mcx_core.tools import profiling
    from mcx_core.tools.analysis import output_dir

    ck = Path(checkpoint) if checkpoint else _default_checkpoint(cfg)
    if not (ck / "gistnet").is_dir():
        fail(f"{ck} is not a JT checkpoint (no gistnet/ inside)")
    if policy == "auto":
        policy = "lensnet" if (ck / "lensnet").is_dir() else "recency"
    if policy == "lensnet" and not (ck / "lensnet").is_dir():
        fail(f"{ck} holds no lensnet/: give a JT2 checkpoint or another --policy")
    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    R, H = cfg.runtime.refocus_every, cfg.dataset.horizon
    pre = cfg.runtime.prefill_tokens if prefill is None else prefill
    ids = _profile_tokens(cfg, lm, text_path, (warmup + 2) * R + H + (1 if text_path else pre))
    traces = Path(out_dir) if out_dir else ArtifactPaths.from_config(cfg).traces / "profile"
    try:  # a corrupt checkpoint is a CheckpointError (a ValueError): one line
        pol = focus_policy(policy, ck, lm, H, cfg.seed, ids)
        res = profiling.profile_runtime_step(cfg, lm, load_gister(ck, lm), pol, ids, traces, output_dir(cfg),
                                             prefill=prefill, warmup_steps=warmup)
    except ValueError as err:
        fail(str(err))
    files = {k: str(v) for k, v in res.files.items()}
    if as_json:
        click.echo(dumps_strict({"metrics": res.metrics, "laps": res.laps, "files": files, "checkpoint": str(ck),
                                 "policy": policy}))
        return
    click.echo(f"profiled one step ({policy}, {ck.name}): {res.metrics}")
    for k, v in files.items():
        click.echo(f"  {k}: {v}")


# ---------------------------------------------------------------------------------------------- compare


@click.command("compare")
@click.argument("run_a")
@click.argument("run_b")
@config_option(required=False, default=None, help="Experiment YAML: its MLflow store and artifacts folder.")
@click.option("--tracking-uri", default=None, help="MLflow store (default: the config's, else sqlite:///<MCX_HOME>/mlruns/mlflow.db).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Report folder (default: <artifacts>/reports/compare/<A>_vs_<B>).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def compare(run_a, run_b, config_path, tracking_uri, out_dir, as_json):
    """Compare two MLflow runs (ids or run names): config differences, a metric table, overlaid curves."""
    from mcx_core.tools.compare import RunNotFound, compare_runs
    from mcx_dagster.project import project_home

    cfg = load(config_path, check=False) if config_path else None
    uri = _tracking_uri(cfg, tracking_uri)
    safe = lambda s: re.sub(r"[^\w.-]+", "_", s)[:40]
    artifacts = cfg.resolve(cfg.artifacts_dir) if cfg else project_home() / "artifacts"
    out = Path(out_dir) if out_dir else artifacts / "reports" / "compare" / f"{safe(run_a)}_vs_{safe(run_b)}"
    try:
        result = compare_runs(uri, run_a, run_b, out)
    except RunNotFound as err:
        fail(str(err))
    if as_json:
        click.echo(dumps_strict({k: v for k, v in result.items() if k != "files"} | {
            "files": {k: str(v) for k, v in result["files"].items()}}, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    a, b = result["a"], result["b"]
    for note in result["notes"]:
        console.print(f"note: {note}")
    params = Table(title=f"config differences: A {a['name']} ({a['run_id'][:8]}) vs B {b['name']} ({b['run_id'][:8]})")
    for c in ("param", "A", "B"):
        params.add_column(c)
    for r in result["params"]:
        params.add_row(r["param"], str(r["a"]), str(r["b"]))
    console.print(params)
    metrics = Table(title="metrics (last value)")
    for c in ("metric", "A", "B", "B − A"):
        metrics.add_column(c)
    for r in result["metrics"]:
        metrics.add_row(r["metric"], *(f"{r[k]:.4g}" for k in ("a", "b", "b − a")))
    console.print(metrics)
    for k, v in result["files"].items():
        console.print(f"{k}: {v}")


# ---------------------------------------------------------------------------------------------- explain


@click.command("explain")
@config_option()
@click.option("--checkpoint", required=True, type=click.Path(), help="A JT2 checkpoint (gistnet/ + lensnet/).")
@click.option("--text", "text_path", required=True, type=click.Path(), help="Any UTF-8 text file.")
@click.option("--w-max", type=click.IntRange(min=1), default=None, help="Working budget (default: working_context.w_max).")
@click.option("--at", "query_at", type=click.IntRange(min=1), default=None,
              help="Cursor token: explain the focus there (default: the text's tokens minus the horizon).")
@click.option("--top", "top_k", type=click.IntRange(min=1), default=8, show_default=True,
              help="Expand / collapse candidates to list.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Report folder (default: <artifacts>/reports/explain).")
@click.option("--json", "as_json", is_flag=True, help="Print the top spans and files as one JSON object.")
def explain(config_path, checkpoint, text_path, w_max, query_at, top_k, out_dir, as_json):
    """Which spans LensNet wants in more detail (expand) or less (collapse) at one cursor of a text: the
    text highlighted by score (explain.html), a markdown report, a focus heatmap (explain.png)."""
    cfg = load(config_path, check=False)
    ck = Path(checkpoint)
    if not (ck / "gistnet").is_dir() or not (ck / "lensnet").is_dir():
        fail(f"{ck} is not a JT2 checkpoint (needs gistnet/ and lensnet/ inside)")
    check_text(text_path)
    from mcx_core.tools.explain import check_budget

    try:  # an infeasible budget fails here, before the model loads or the text is read
        check_budget(cfg, w_max)
    except ValueError as err:
        fail(str(err))

    from mcx_core.compression.gistnet import load_gister
    from mcx_core.focus.lensnet import load_lensnet
    from mcx_core.model.base import load_base_model
    from mcx_core.tools.explain import explain_text, write_reports

    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    ids = token_stream(lm, text_path)  # read lazily: up to --at, or to the end for the default cursor
    try:
        result = explain_text(cfg, lm, load_gister(ck, lm), load_lensnet(ck, lm.device), ids, w_max=w_max,
                              query_at=query_at, top_k=top_k, progress=not as_json)
    except ValueError as err:
        fail(str(err))
    out = Path(out_dir) if out_dir else cfg.resolve(cfg.artifacts_dir) / "reports" / "explain"
    files = {k: str(v) for k, v in write_reports(result, out).items()}
    if as_json:
        click.echo(dumps_strict({k: v for k, v in result.items() if k != "entries"} | {"files": files}))
        return
    from mcx_core.tools.explain import summary_line

    click.echo(summary_line(result))
    for title, items in (("expand (highest-scored gists)", result["expand"]),
                         ("collapse (lowest-scored entries)", result["collapse"])):
        click.echo(f"{title}:")
        for e in items:
            click.echo(f"  {e['score']:+.3f}  {e['span_id']:>8}  LOD{e['level']} [{e['start']}, {e['end']})  "
                       f"{e['snippet']}")
        if not items:
            click.echo("  (none)")
    for k, v in files.items():
        click.echo(f"  {k}: {v}")
