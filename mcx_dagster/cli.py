"""`mcx` — the command line. It lives beside the Dagster definitions because `mcx materialize` runs
them; every other command calls `mcx_core` directly. Errors a user can fix print one line, no traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click


def _fail(message: str, code: int = 2):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _load(config_path: str, check: bool = True):
    from mcx_core.config import ConfigError, check_files
    from mcx_dagster.project import load_project_config

    try:
        cfg = load_project_config(config_path)
    except ConfigError as err:
        for p in err.problems:
            click.echo(f"error: {err.source}: {p}", err=True)
        sys.exit(2)
    if check:
        problems = check_files(cfg)
        for p in problems:
            click.echo(f"error: {config_path}: {p}", err=True)
        if problems:
            sys.exit(2)
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """MegaContext: learned context compression and dynamic focus for frozen LLMs."""


@main.command("validate-config")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--no-file-checks", is_flag=True, help="Only check the shape, not the files it names.")
def validate_config(path: str, no_file_checks: bool):
    """Validate a config; print the resolved config, or one line per problem (exit 2)."""
    cfg = _load(path, check=not no_file_checks)
    click.echo(f"# {path}: valid")
    click.echo(cfg.to_yaml(), nl=False)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Experiment YAML.")
@click.option(
    "--select", "selection", default=None,
    help="Dagster asset selection, e.g. 'baseline_eval' or '+baseline_eval' (default: everything).",
)
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--force", is_flag=True, help="Recompute evaluations even when their inputs have not changed.")
def materialize(config_path: str, selection: str | None, log_level: str, force: bool):
    """Materialize the asset graph in-process, with the same definitions the Dagster UI loads.

    Exit 0: everything materialized and every check passed; 3: everything ran but an asset check
    (an acceptance criterion) failed; 1: a step failed."""
    cfg = _load(config_path)
    root = cfg.root
    # The code location's config, for the Dagster process this command starts (the sweep's partitions).
    os.environ["MCX_CONFIG"] = str(Path(config_path).resolve())
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(root / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and (root / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text((root / "dagster.yaml").read_text())

    import dagster as dg

    from mcx_dagster.definitions import defs

    definitions = defs()
    instance = dg.DagsterInstance.get()
    from mcx_dagster.defs.resources import MegaContextSettings

    settings = {"settings": MegaContextSettings(config_path=str(Path(config_path).resolve()), root=str(root), force=force)}
    result = run_materialize(definitions, selection, instance, resources=settings, log_level=log_level)
    _print_outcome(result)
    failed = _failed_checks(result)
    if step_failures(result):
        sys.exit(1)
    if selection is None:  # second pass: the post-hoc analyses, which must run even when a gate failed
        analysis = run_materialize(definitions, POST_HOC, instance, resources=settings, log_level=log_level)
        _print_outcome(analysis)
        if step_failures(analysis):
            sys.exit(1)
    if failed:
        for ev in failed:
            click.echo(f"check failed: {ev.asset_key.to_user_string()}:{ev.check_name}: {ev.description or ''}", err=True)
        sys.exit(EXIT_CHECKS_FAILED)


@main.command("register-cycles")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Experiment YAML.")
def register_cycles_command(config_path: str):
    """Add the config's training-cycle partitions (0 … training_loop.n_cycles − 1) to the Dagster
    instance at $DAGSTER_HOME, so the UI can materialize each cycle (`make dev` runs this)."""
    cfg = _load(config_path, check=False)
    import dagster as dg

    from mcx_dagster.defs._meta import register_cycles

    with dg.DagsterInstance.get() as instance:
        keys = register_cycles(instance, cfg)
    click.echo(f"jt_cycle partitions: {', '.join(keys)} (DAGSTER_HOME={os.environ.get('DAGSTER_HOME')})")


EXIT_CHECKS_FAILED = 3
POST_HOC = ["telemetry_analysis"]


class Materialized:
    """The runs one `mcx materialize` made, read as one result: with `training_loop.n_cycles` > 1 the
    cycle-partitioned training assets need one Dagster run per cycle (run c: cycle c's JT1 → deltas →
    JT2 → JT3; the first also builds what training reads, the last also evaluates and gates)."""

    def __init__(self, results: list) -> None:
        self.results = results

    @property
    def success(self) -> bool:
        return all(r.success for r in self.results)

    @property
    def run_id(self) -> str:
        return self.results[-1].run_id

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.results]

    @property
    def all_events(self) -> list:
        return [e for r in self.results for e in r.all_events]

    def get_asset_check_evaluations(self) -> list:
        return [e for r in self.results for e in r.get_asset_check_evaluations()]

    def get_asset_materialization_events(self) -> list:
        return [e for r in self.results for e in r.get_asset_materialization_events()]

    def asset_materializations_for_node(self, node: str) -> list:
        return [m for r in self.results for m in r.asset_materializations_for_node(node)]


def cycle_plan(definitions, selection, cfg) -> list[tuple[str | None, set]]:
    """[(partition key, asset keys)] — the runs that materialize `selection` (all assets when None).
    Without cycle-partitioned assets in it: one run. With them: one run per cycle, in order."""
    import dagster as dg

    from mcx_dagster.defs._meta import JT_CYCLES, cycle_keys

    graph = definitions.resolve_asset_graph()
    if selection is None:  # everything but other partitioned assets (the sweep runs per partition: its schedule)
        sel = dg.AssetSelection.all() - dg.AssetSelection.assets(*POST_HOC)
    else:
        sel = dg.AssetSelection.from_coercible(selection)
    selected = set(sel.resolve(graph))
    cycle_assets, other_partitioned = set(), set()
    for a in definitions.assets or []:
        pd = getattr(a, "partitions_def", None)
        if pd is None:
            continue
        (cycle_assets if getattr(pd, "name", None) == JT_CYCLES else other_partitioned).update(a.keys)
    if selection is None:
        selected -= other_partitioned
    cyc = selected & cycle_assets
    if not cyc:
        return [(None, selected)]
    before = selected & set(dg.AssetSelection.assets(*cyc).upstream().resolve(graph)) - cyc
    after = selected - cyc - before
    keys = cycle_keys(cfg)
    return [
        (key, cyc | (before if i == 0 else set()) | (after if i == len(keys) - 1 else set()))
        for i, key in enumerate(keys)
    ]


def run_materialize(definitions, selection, instance, resources: dict | None = None,
                    log_level: str = "INFO") -> Materialized:
    """Materialize `selection` (all assets when None) of `definitions`; never raises on step failure.
    `resources` replaces bound resources by key (tests point them at temporary stores). Registers the
    config's cycle partitions, then runs the cycles in order and stops after a cycle whose run failed a
    step or a check (a later cycle would start from an unchecked one)."""
    import dagster as dg

    from mcx_dagster.defs._meta import register_cycles

    resources = {**(definitions.resources or {}), **(resources or {})}
    cfg = resources["settings"].load()
    register_cycles(instance, cfg)
    assets = list(definitions.assets or []) + list(definitions.asset_checks or [])
    results = []
    for key, keys in cycle_plan(definitions, selection, cfg):
        result = dg.materialize(
            assets,
            instance=instance,
            resources=resources,
            selection=dg.AssetSelection.assets(*keys),
            partition_key=key,
            raise_on_error=False,
            tags={"mcx.cycle": key} if key is not None else None,
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        )
        results.append(result)
        if step_failures(result) or _failed_checks(result) or any(e.is_step_skipped for e in result.all_events):
            break
    return Materialized(results)


def step_failures(result) -> list[str]:
    """Steps that failed for a reason other than a failed blocking check (which is a result, not an
    error: the check reports by how much the criterion was missed)."""
    failed_checks = {ev.check_name for ev in _failed_checks(result)}
    return [
        e.step_key for e in result.all_events
        if e.is_step_failure and not any(name in e.step_key for name in failed_checks)
    ]


def _failed_checks(result) -> list:
    return [e for e in result.get_asset_check_evaluations() if not e.passed]


def _print_outcome(outcome: Materialized) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for result in outcome.results:
        partition = result.dagster_run.tags.get("dagster/partition")
        table = Table(title=f"dagster run {result.run_id}" + (f" (cycle {partition})" if partition else ""))
        table.add_column("kind")
        table.add_column("name")
        table.add_column("result")
        for mat in result.get_asset_materialization_events():
            name = mat.asset_key.to_user_string() + (f"[{mat.partition}]" if mat.partition else "")
            table.add_row("asset", name, "[green]materialized[/]")
        for ev in result.get_asset_check_evaluations():
            status = "[green]passed[/]" if ev.passed else "[red]FAILED[/]"
            table.add_row("check", f"{ev.asset_key.to_user_string()}:{ev.check_name}", status)
        failed_steps = set(step_failures(result))  # not the steps of failed checks: their rows say it
        for ev in result.all_events:
            if ev.is_step_failure and ev.step_key in failed_steps:
                table.add_row("step", ev.step_key, "[red]failed[/]")
            elif ev.is_step_skipped:
                table.add_row("step", ev.step_key, "[yellow]skipped[/]")
        console.print(table)


@main.command("eval-text")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Experiment YAML.")
@click.option("--checkpoint", required=True, type=click.Path(), help="A JT1 checkpoint directory.")
@click.option("--text", "text_path", required=True, type=click.Path(), help="Any UTF-8 text file.")
@click.option("--w-max", type=click.IntRange(min=1), default=None, help="Working budget (default: working_context.w_max).")
@click.option("--horizon", type=click.IntRange(min=1), default=None, help="Horizon H (default: dataset.horizon).")
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True, help="At most this many samples.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (default: a table).")
def eval_text(config_path, checkpoint, text_path, w_max, horizon, samples, as_json):
    """ΔNLL@H of a checkpoint's gists vs full history, recency and mean-pool on any text file."""
    from mcx_core.eval import gists as gist_eval

    cfg = _load(config_path)
    text = _read_text(text_path)
    ck = Path(checkpoint)
    if not (ck / "gistnet").is_dir():
        _fail(f"{ck} is not a JT1 checkpoint (no gistnet/ inside); see artifacts/checkpoints/JT1_cycle*_step*")
    w = w_max or cfg.working_context.w_max
    H = horizon or cfg.dataset.horizon
    if w < cfg.working_context.recent_tokens + cfg.dataset.block_size:
        _fail(f"--w-max {w} leaves no room for gists beside the {cfg.working_context.recent_tokens} recent tokens")

    from mcx_core.compression.gistnet import load_gister
    from mcx_core.model.base import load_base_model

    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    try:
        out = gist_eval.evaluate_text(cfg, lm, load_gister(ck, lm), text, w, H, samples, progress=not as_json)
    except gist_eval.TextError as err:
        _fail(str(err))
    _print_summary(out, as_json, f"{text_path}: ΔNLL@{H}, W_max={w}", "{:.4f}")


@main.command("run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Experiment YAML.")
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A JT2 checkpoint (gistnet/ + lensnet/), or a JT1 one with a non-learned --policy.")
@click.option("--text", "text_path", required=True, type=click.Path(), help="Any UTF-8 text file.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Refocus steps (default: runtime.steps).")
@click.option("--w-max", type=click.IntRange(min=1), default=None, help="Working budget (default: working_context.w_max).")
@click.option("--policy", default="lensnet", show_default=True,
              type=click.Choice(["lensnet", "recency", "random", "expand_nearest"]))
@click.option("--prefill", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens ingested before the first step.")
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False), help="JSONL trace to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as one JSON object.")
def run_text(config_path, checkpoint, text_path, steps, w_max, policy, prefill, trace_path, as_json):
    """Stream a text file through the runtime engine (ingest → focus → forward every
    `runtime.refocus_every` tokens) and write one trace line per step."""
    cfg = _load(config_path)
    text = _read_text(text_path)
    ck = Path(checkpoint)
    if not (ck / "gistnet").is_dir():
        _fail(f"{ck} is not a JT checkpoint (no gistnet/ inside); see artifacts/checkpoints/")
    if policy == "lensnet" and not (ck / "lensnet").is_dir():
        _fail(f"{ck} holds no lensnet/ (a JT1 checkpoint?): give a JT2 checkpoint or another --policy")

    import torch

    from mcx_core.compression.gistnet import load_gister
    from mcx_core.focus import engine as runtime
    from mcx_core.model.base import load_base_model

    lm = load_base_model(cfg.base_model, cfg.dataset, seed=cfg.seed, root=cfg.root)
    ids = torch.as_tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    need = prefill + cfg.runtime.refocus_every + cfg.dataset.horizon
    if len(ids) < need:
        _fail(f"{text_path} has {len(ids)} tokens; one step needs {need} (prefill + refocus_every + horizon)")
    if policy == "lensnet":
        from mcx_core.focus.lensnet import LensNetPolicy, load_lensnet

        pol = LensNetPolicy(load_lensnet(ck, lm.device), lm.embed)
    else:
        pol = runtime.standard_policies(lm, cfg.dataset.horizon, seed=cfg.seed, oracle=False)[policy](ids)
    try:
        res = runtime.run_engine(
            cfg, lm, load_gister(ck, lm), pol, ids, steps, w_max, Path(trace_path), prefill=prefill,
            progress=not as_json,
        )
    except ValueError as err:
        _fail(str(err))
    summary = {"policy": policy, "trace": str(res.trace_path), **res.summary}
    _print_summary(summary, as_json, f"{text_path}: {int(res.summary['steps'])} steps, policy {policy}", "{:.4g}")


def _print_summary(values: dict, as_json: bool, title: str, float_format: str) -> None:
    """One JSON object, or a metric/value table."""
    if as_json:
        click.echo(json.dumps(values))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value")
    for k, v in values.items():
        table.add_row(k, float_format.format(v) if isinstance(v, float) else str(v))
    Console().print(table)


def _read_text(text_path: str) -> str:
    """The text file's contents, or one `error:` line and exit 2."""
    from mcx_core.eval import gists as gist_eval

    try:
        return gist_eval.read_text_file(Path(text_path))
    except gist_eval.TextError as err:
        _fail(str(err))


@main.command()
@click.argument("sql")
@click.option("--param", "params", multiple=True, help="A value bound to the next `?` (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--artifacts", default="artifacts", show_default=True, type=click.Path(file_okay=False))
def query(sql: str, params: tuple[str, ...], as_json: bool, artifacts: str):
    """Query the artifacts with DuckDB (views: deltas, traces, eval tables, samples_*)."""
    import duckdb

    from mcx_core.tools.query import connect, run_query

    con = connect(Path(artifacts))
    try:
        columns, rows = run_query(con, sql, list(params))
    except duckdb.Error as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    if as_json:
        click.echo(json.dumps([dict(zip(columns, r)) for r in rows], default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r))
    Console().print(table)



def _register_telemetry_commands() -> None:
    from mcx_dagster.cli_telemetry import analyze, compare, explain, profile

    for command in (analyze, profile, compare, explain):
        main.add_command(command)


_register_telemetry_commands()


if __name__ == "__main__":
    main()
