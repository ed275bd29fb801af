"""`mcx materialize`, `mcx register-cycles`, `mcx train-cycles`: the pipeline, through Dagster (the same
definitions the UI loads, run in-process) or as the bare alternating training loop (also under
`accelerate launch -m mcx_cli train-cycles …`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import click

from mcx_cli._common import EXIT_USAGE, condensed_dagster_logs, config_option, debug_enabled, fail, load

EXIT_STEP_FAILED = 1
EXIT_CHECKS_FAILED = 3

log = logging.getLogger("mcx_cli.train_cycles")


def lock_wait_option():
    """`--lock-wait SECONDS`: how long a writing command waits for another writer of the same artifacts."""
    return click.option("--lock-wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
                        help="Seconds to wait when another process is writing this config's artifacts "
                             "(then exit 2 naming it).")


@contextlib.contextmanager
def project_writer(cfg, command: str, wait_s: float = 0.0, dagster_instance=None, tracking_uri: str | None = None):
    """Hold the project lock of `cfg`'s artifacts root for `command` (one `error:` line naming the holder
    and exit 2 when another process keeps it past `wait_s`), then clear what crashed writers left: temp
    files of dead processes, MLflow runs (of `tracking_uri`) and Dagster runs (of `dagster_instance`)
    left RUNNING/STARTED by a process that is gone."""
    from mcx_core.artifacts import ArtifactPaths, sweep_temp
    from mcx_core.locking import ProjectLocked, project_lock

    root = ArtifactPaths.from_config(cfg).root
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(project_lock(root, command, wait_s))
        except ProjectLocked as err:
            fail(str(err))
        for p in sweep_temp(root):
            log.warning("removed %s (left by a writer that is gone)", p)
        if tracking_uri is not None:
            from mcx_core.telemetry.mlflow_sink import fail_orphaned_runs

            for run_id in fail_orphaned_runs(tracking_uri):
                log.warning("MLflow run %s was left RUNNING by a process that is gone: marked FAILED", run_id)
        if dagster_instance is not None:
            from mcx_dagster.leftovers import fail_dead_runs

            for run_id in fail_dead_runs(dagster_instance):
                log.warning("Dagster run %s was left STARTED by a process that is gone: marked failed", run_id)
        yield


@click.command()
@config_option()
@click.option(
    "--select", "selection", default=None,
    help="Dagster asset selection, e.g. 'baseline_eval' or '+baseline_eval' (default: everything).",
)
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--force", is_flag=True, help="Recompute evaluations even when their inputs have not changed.")
@lock_wait_option()
def materialize(config_path: str, selection: str | None, log_level: str, force: bool, lock_wait: float):
    """Materialize the asset graph in-process, with the same definitions the Dagster UI loads.

    Exit 0: everything materialized and every check passed; 3: everything ran but an asset check
    (an acceptance criterion) failed; 1: a step failed; 2: another process is writing the artifacts."""
    cfg = load(config_path)
    from mcx_core.telemetry.mlflow_sink import store
    from mcx_dagster import orchestration as orch
    from mcx_dagster.definitions import defs
    from mcx_dagster.defs.resources import MegaContextSettings

    instance = orch.project_instance(cfg.root)
    definitions = defs()
    _check_selection(orch, definitions, selection, cfg)
    settings = {"settings": MegaContextSettings(config_path=str(Path(config_path).resolve()), root=str(cfg.root),
                                                force=force, owner_process=True)}
    with project_writer(cfg, "mcx materialize", lock_wait, instance, store(cfg, cfg.root)[0]):
        with condensed_dagster_logs(debug_enabled()):
            result = orch.run_materialize(definitions, selection, instance, resources=settings, log_level=log_level)
        _print_outcome(result)
        failed = orch.failed_checks(result)
        if orch.step_failures(result):
            _exit_step_failed(orch, result)
        if selection is None:  # second pass: the post-hoc analyses, which must run even when a gate failed
            with condensed_dagster_logs(debug_enabled()):
                analysis = orch.run_materialize(definitions, orch.POST_HOC, instance, resources=settings,
                                                log_level=log_level)
            _print_outcome(analysis)
            if orch.step_failures(analysis):
                _exit_step_failed(orch, analysis)
    if failed:
        for ev in failed:
            click.echo(f"check failed: {ev.asset_key.to_user_string()}:{ev.check_name}: {ev.description or ''}", err=True)
        sys.exit(EXIT_CHECKS_FAILED)


def _check_selection(orch, definitions, selection: str | None, cfg) -> None:
    """A --select that does not parse, names an unknown asset or matches nothing: one line, exit 2."""
    if selection is None:
        return
    try:
        plan = orch.cycle_plan(definitions, selection, cfg)
    except Exception as err:  # Dagster's selection errors (their classes are not public API)
        if type(err).__name__ not in ("DagsterInvalidSubsetError", "DagsterInvalidAssetSelectionError"):
            raise
        fail(f"--select {selection!r}: {str(err).splitlines()[0]}")
    if not any(keys for _, keys in plan):
        fail(f"--select {selection!r} matches no asset")


# Errors inside a step that are the environment's (a full disk, permissions), not the pipeline's: exit 2.
_ENV_ERRORS = ("OSError", "PermissionError", "FileNotFoundError", "IsADirectoryError", "NotADirectoryError",
               "FileExistsError", "BlockingIOError")


def _exit_step_failed(orch, outcome) -> None:
    """One line per failed step (its error's innermost cause), then exit 1 — or 2 when every failure is an
    environment error (no space left, permission denied, read-only file system)."""
    env = True
    for result in outcome.results:
        failed = set(orch.step_failures(result))
        for ev in result.all_events:
            if not (ev.is_step_failure and ev.step_key in failed):
                continue
            err = ev.step_failure_data.error
            while err is not None and err.cause is not None:
                err = err.cause
            name = err.cls_name if err is not None else "error"
            text = (err.message.strip().splitlines() or [""])[0] if err is not None else ""
            env = env and name in _ENV_ERRORS
            click.echo(f"error: step {ev.step_key} failed: {text}", err=True)
    sys.exit(EXIT_USAGE if env else EXIT_STEP_FAILED)


def _print_outcome(outcome) -> None:
    """One table per Dagster run: materialized assets, check results, failed and skipped steps."""
    from rich.console import Console
    from rich.table import Table

    from mcx_dagster.orchestration import step_failures

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


@click.command("register-cycles")
@config_option()
def register_cycles(config_path: str):
    """Add the config's training-cycle partitions (0 … training_loop.n_cycles − 1) to the Dagster
    instance at $DAGSTER_HOME, so the UI can materialize each cycle (`make dev` runs this)."""
    cfg = load(config_path, check=False)
    import dagster as dg

    from mcx_dagster.defs.partitions import register_cycles as register

    with dg.DagsterInstance.get() as instance:
        keys = register(instance, cfg)
    click.echo(f"jt_cycle partitions: {', '.join(keys)} (DAGSTER_HOME={os.environ.get('DAGSTER_HOME')})")


@click.command("train-cycles")
@click.option("--config", "config_path", required=True, help="experiment YAML (configs/*.yaml)")
@click.option("--cycles", type=int, default=None, help="default: training_loop.n_cycles")
@click.option("--no-mlflow", is_flag=True, help="log nowhere (default: MLflow parent + child runs)")
@click.option("--no-progress", is_flag=True)
@lock_wait_option()
def train_cycles(config_path: str, cycles: int | None, no_mlflow: bool, no_progress: bool, lock_wait: float):
    """The alternating training loop without Dagster: `n_cycles` × (JT1 → deltas → JT2 → JT3), each cycle
    from the previous cycle's checkpoints; finished cycles are skipped. Prints one JSON summary per cycle."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _pin_device()
    cfg = load(config_path, check=False)

    from mcx_core.checkpoints import CheckpointError
    from mcx_core.telemetry.mlflow_sink import store
    from mcx_core.training import distributed

    # Under `accelerate launch` every rank runs this: the main process holds the lock, the others follow it.
    writer = (project_writer(cfg, "mcx train-cycles", lock_wait, None, None if no_mlflow else store(cfg, cfg.root)[0])
              if distributed.is_main_process() else contextlib.nullcontext())
    with writer:
        try:
            _train_cycles(cfg, cycles, no_mlflow, no_progress)
        except CheckpointError as err:
            fail(str(err))


def _train_cycles(cfg, cycles: int | None, no_mlflow: bool, no_progress: bool) -> None:
    from mcx_core import pipeline
    from mcx_core.training import distributed
    from mcx_core.training.cycles import cycle_metrics, mlflow_sinks, null_sinks, run_cycles

    main_process = distributed.is_main_process()
    progress = not no_progress and main_process
    with distributed.main_process_first():  # datasets built and the base model converted once, by rank 0
        pipeline.build_datasets(cfg, progress=progress)
        lm, info = pipeline.prepare_base_model(cfg)
    log.info("base model %s on %s (process %d of %d)", info["model_id"], info["device"],
             distributed.process_index(), distributed.world_size())
    # One MLflow parent run, logged by the main process; the trainers average metrics over ranks first.
    factory, parent = (null_sinks, None) if no_mlflow or not main_process else mlflow_sinks(cfg, cfg.root)
    with parent or contextlib.nullcontext():
        summaries = run_cycles(cfg, lm, factory, n_cycles=cycles, progress=progress)
        for s in summaries if parent is not None else []:  # per-cycle time and peak memory (step = cycle)
            if not s["skipped"] and s.get("memory"):
                parent.log_metrics(cycle_metrics(s["memory"]), step=s["cycle"])
    distributed.wait_for_everyone()
    if main_process:
        from mcx_core.jsonutil import dumps_strict

        click.echo(dumps_strict([{k: s[k] for k in ("cycle", "checkpoints", "seconds", "skipped")} for s in summaries],
                              indent=2))


def _pin_device() -> None:
    """Under `accelerate launch` (RANK / WORLD_SIZE / LOCAL_RANK set) every process trains the same model
    data-parallel (mcx_core.training.distributed): one config, one artifacts directory, one set of
    checkpoints, written by the main process. One process per GPU, each pinned to its own device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ:
        log.warning("launched by `accelerate launch --cpu` without mpirun: ONE process. For N CPU processes on one "
                    "machine use `accelerate launch --multi_gpu --num_processes N` with no GPU visible")
