"""The nightly evaluation sweep: partitions are the config's W_max × dataset grid and the schedule
asks for every cell once per night, at the configured cron in UTC."""

import datetime

import dagster as dg

from mcx_core.config import load_config
from mcx_core.eval.sweep import sweep_partitions
from mcx_dagster.definitions import defs
from mcx_dagster.project import project_home


def _sweep():
    """The code location's sweep partitions and nightly schedule (built when the definitions load)."""
    d = defs()
    return d.get_assets_def("eval_sweep").partitions_def, d.get_schedule_def("nightly_eval_sweep")


def test_partitions_are_the_config_grid():
    eval_sweep_partitions, _ = _sweep()
    cfg = load_config(project_home() / "configs" / "default.yaml")
    expected = {f"w{w}|{ds}" for w in cfg.sweep.w_max for ds in cfg.sweep.datasets}
    assert set(eval_sweep_partitions.get_partition_keys()) == expected == set(sweep_partitions(cfg))
    assert "recall" in {k.split("|")[1] for k in expected}


def test_nightly_schedule_requests_every_cell_once_per_night():
    eval_sweep_partitions, nightly_eval_sweep = _sweep()
    schedule = nightly_eval_sweep
    assert schedule.cron_schedule == "0 2 * * *" and schedule.execution_timezone == "UTC"
    night = datetime.datetime(2026, 11, 27, 2, 0, tzinfo=datetime.UTC)
    with dg.build_schedule_context(scheduled_execution_time=night) as context:
        requests = list(nightly_eval_sweep(context))
    assert {r.partition_key for r in requests} == set(eval_sweep_partitions.get_partition_keys())
    assert len({r.run_key for r in requests}) == len(requests)
    assert all(r.run_key.startswith("2026-11-27:") for r in requests)
    # The next night gets new run keys (a night is never skipped as a duplicate of the last).
    with dg.build_schedule_context(scheduled_execution_time=night + datetime.timedelta(days=1)) as context:
        later = {r.run_key for r in nightly_eval_sweep(context)}
    assert later.isdisjoint({r.run_key for r in requests})
