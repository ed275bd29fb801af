"""The project lock: one writer at a time under an artifacts root.

`artifacts/.lock` is a small JSON file naming who holds the root: a list of holders (pid, host, the
process's start time, the command, since when, the Dagster run id if any). It is only ever read and
rewritten under a kernel lock (`fcntl.flock` on `artifacts/.lock.mutex`, held for milliseconds), which
the kernel drops when its process dies, so nothing can stay stuck on it. A holder whose process is gone
(its pid no longer runs, or runs a process started at another time: a reused pid) is dropped on the
next acquire, so a `kill -9` never blocks the project. Acquiring again from the same process (the CLI
takes the lock, then the in-process Dagster run's resource takes it) or from another step process of
the same Dagster run joins the holders; anyone else waits up to `wait_s` seconds and then gets
`ProjectLocked`, one line naming the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

LOCK_FILE = ".lock"
MUTEX_FILE = ".lock.mutex"
POLL_SECONDS = 0.25


class ProjectLocked(RuntimeError):
    """Another live process holds the artifacts root."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: float  # the process's start time (psutil), to tell a reused pid from the holder
    command: str
    since: str
    run_id: str | None
    token: str

    def describe(self) -> str:
        run = f", Dagster run {self.run_id}" if self.run_id else ""
        return f"pid {self.pid} on {self.host} ({self.command}{run}, since {self.since})"


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when it does not run (zombies count
    as gone: they hold nothing any more)."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def process_alive(pid: int, host: str, started: float | None) -> bool:
    """Whether the process recorded as (pid, host, started) still runs. A process on another host cannot
    be checked and counts as alive."""
    if host != socket.gethostname():
        return True
    now = process_start_time(int(pid))
    return now is not None and (started is None or abs(now - float(started)) < 1.0)


def this_process() -> dict:
    """pid, host and start time of this process: what a lock entry, a Dagster run tag or an MLflow run tag
    records so a later start can tell whether that process is gone."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": process_start_time(pid)}


@contextlib.contextmanager
def _mutex(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / MUTEX_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read(root: Path) -> list[Holder]:
    try:
        raw = json.loads((root / LOCK_FILE).read_text(encoding="utf-8"))
        return [Holder(**h) for h in raw["holders"]]
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # absent, or torn by a crash: nobody holds it
        return []


def _write(root: Path, holders: list[Holder]) -> None:
    path = root / LOCK_FILE
    if not holders:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps({"holders": [h.__dict__ for h in holders]}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def holders(root: Path) -> list[Holder]:
    """The live holders of `root` (dead ones are left for the next acquire to drop)."""
    return [h for h in _read(Path(root)) if process_alive(h.pid, h.host, h.started)]


def dead_holders(root: Path) -> list[Holder]:
    """Entries of `root`'s lock whose process is gone (a crashed writer)."""
    return [h for h in _read(Path(root)) if not process_alive(h.pid, h.host, h.started)]


def try_acquire(root: Path, command: str, run_id: str | None = None) -> tuple[Holder | None, list[Holder], list[Holder]]:
    """One attempt: (my entry or None, the live holders in the way, the dead entries dropped)."""
    root = Path(root)
    me = this_process()
    with _mutex(root):
        entries = _read(root)
        live = [h for h in entries if process_alive(h.pid, h.host, h.started)]
        dropped = [h for h in entries if h not in live]
        blocking = [h for h in live if not (h.pid == me["pid"] and h.host == me["host"])
                    and not (run_id is not None and h.run_id == run_id)]
        if blocking:
            if dropped:
                _write(root, live)
            return None, blocking, dropped
        mine = Holder(me["pid"], me["host"], me["started"], command,
                      datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"), run_id, uuid.uuid4().hex)
        _write(root, [*live, mine])
        return mine, [], dropped


def release(root: Path, holder: Holder) -> None:
    root = Path(root)
    with _mutex(root):
        _write(root, [h for h in _read(root) if h.token != holder.token])


@contextlib.contextmanager
def project_lock(root: Path, command: str, wait_s: float = 0.0, run_id: str | None = None,
                 on_dead=None) -> Iterator[Holder]:
    """Hold the artifacts root `root` for `command`; wait up to `wait_s` seconds for another holder, then
    raise `ProjectLocked` naming it. `on_dead(holders)` is called with the entries of crashed writers
    that were dropped (the caller sweeps what they left)."""
    root = Path(root)
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        mine, blocking, dropped = try_acquire(root, command, run_id)
        if dropped and on_dead is not None:
            on_dead(dropped)
        if mine is not None:
            break
        if time.monotonic() >= deadline:
            waited = f" after waiting {wait_s:g} s" if wait_s > 0 else ""
            raise ProjectLocked(
                f"{root} is in use by {blocking[0].describe()}{waited}; wait for it to finish "
                f"(or pass a longer --lock-wait)"
            )
        time.sleep(POLL_SECONDS)
    try:
        yield mine
    finally:
        release(root, mine)
