"""What a killed `mcx materialize` leaves in the Dagster instance: runs still STARTED whose process is gone.

The in-process runs `mcx materialize` starts carry their process's `mcx.pid` / `mcx.host` /
`mcx.pid_started` tags (`MegaContextSettings.owner_process`); nothing else would ever end them (Dagster's
run monitoring watches launched run workers, not in-process runs). Runs launched from the UI carry no
such tags and are left to run monitoring.
"""

from __future__ import annotations

import dagster as dg

from mcx_core.locking import process_alive, this_process

PID_TAG, HOST_TAG, STARTED_TAG = "mcx.pid", "mcx.host", "mcx.pid_started"
UNFINISHED = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.NOT_STARTED]


def process_run_tags() -> dict[str, str]:
    me = this_process()
    return {PID_TAG: str(me["pid"]), HOST_TAG: me["host"], STARTED_TAG: repr(me["started"])}


def fail_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Report as failed (with the reason) every unfinished run whose recorded process provably died; the
    run ids."""
    marked = []
    for run in instance.get_runs(dg.RunsFilter(statuses=UNFINISHED)):
        t = run.tags
        if PID_TAG not in t or HOST_TAG not in t:
            continue
        started = None if t.get(STARTED_TAG) in (None, "None") else float(t[STARTED_TAG])
        if process_alive(int(t[PID_TAG]), t[HOST_TAG], started):
            continue
        instance.report_run_failed(
            run, f"process {t[PID_TAG]} on {t[HOST_TAG]} ended without finishing this run (killed or crashed); "
                 "marked failed by the next writer of the project",
        )
        marked.append(run.run_id)
    return marked
