"""Where a config's artifacts live, how they are written, and the stage cache that reuses them.

Every file is written under a temporary name unique to the writing process (`temp_path`) and renamed
last (`write_atomic`), so a reader never sees half a file and two writers never share one; a directory
is replaced by renaming the old one aside, the new one in, then deleting the old (`swap_dir`). Temp
names carry their writer's pid, so a later writer sweeps what a crashed one left (`sweep_temp`).

A stage (an evaluation, a delta table) stores its result with a fingerprint of its inputs and the
size and sha256 of each file it wrote; the same fingerprint and the same files later mean the stored
result is still the answer (`load_stage`). A file that changed is reported and the stage recomputes.
A stage owns its output folders: files there it did not write this time are deleted (`save_stage`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mcx_core.config import MegaContextConfig
from mcx_core.locking import process_alive

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class ArtifactPaths:
    root: Path

    @classmethod
    def from_config(cls, cfg: MegaContextConfig) -> ArtifactPaths:
        return cls(cfg.resolve(cfg.artifacts_dir))

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def deltas(self) -> Path:
        return self.root / "deltas"

    @property
    def traces(self) -> Path:
        return self.root / "traces"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def stages(self) -> Path:
        return self.root / ".stages"


def datasets_dir(cfg: MegaContextConfig) -> Path:
    return cfg.resolve(cfg.dataset.output_dir)


# ---------------------------------------------------------------------------------------------- writing


def temp_path(path: Path, suffix: str = "") -> Path:
    """A hidden name beside `path` that only this process (and this call) writes:
    `.NAME.PID-TOKEN.tmp` (+ `suffix`, for writers that infer a format from it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` for a temporary name beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def swap_dir(new: Path, final: Path) -> Path:
    """Put the complete directory `new` at `final`: the old one is renamed aside, `new` renamed in, then
    the old one deleted — at every instant `final` is the old directory or the new one, never a mix."""
    final = Path(final)
    old = None
    if final.exists():
        old = temp_path(final, ".old")
        final.rename(old)
    try:
        Path(new).rename(final)
    except BaseException:
        if old is not None and not final.exists():
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# Temp names of every writer here: `.N.PID-TOKEN.tmp[.old|.sfx]` (temp_path), `.N.PID.tmp` (older writers),
# `.N.tmp-PID` / `.N.old-PID` (the tree), `.STEM.tmpPID.SFX` (plots), `.N.tmp` (traces before pids).
_TEMP = re.compile(r"^\..+?(?:\.(\d+)-[0-9a-f]{8}\.tmp(?:\.\w+)?|\.(\d+)\.tmp|\.(?:tmp|old)-(\d+)|\.tmp(\d+)\.\w+|\.jsonl\.tmp)$")


def is_temp(name: str) -> bool:
    """Whether a file or directory name is a writer's temp name (never a finished artifact)."""
    return _TEMP.match(name) is not None


_ASIDE = re.compile(r"^\.(.+)\.\d+-[0-9a-f]{8}\.tmp\.old$")  # swap_dir's old directory, renamed aside


def sweep_temp(root: Path) -> list[Path]:
    """Delete the temp files and directories under `root` whose writer is gone (a crash, a `kill -9`);
    a directory `swap_dir` had renamed aside goes back to its name when nothing took its place. Call it
    holding the project lock, so no live writer of another process is mid-write. Returns what it deleted."""
    import socket

    host = socket.gethostname()
    gone = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            m = _TEMP.match(name)
            if not m:
                continue
            pid = next((int(g) for g in m.groups() if g), None)
            if pid is not None and pid == os.getpid() or pid is not None and process_alive(pid, host, None):
                continue
            p = Path(dirpath) / name
            aside = _ASIDE.match(name)
            if aside and not (Path(dirpath) / aside.group(1)).exists():
                p.rename(Path(dirpath) / aside.group(1))  # killed mid-swap: the old directory goes back
                log.warning("restored %s (a swap was interrupted)", Path(dirpath) / aside.group(1))
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
        dirnames[:] = [d for d in dirnames if not _TEMP.match(d)]
    return gone


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> Path:
    """Strict JSON (NaN/inf written as null: `mcx_core.jsonutil`), atomically."""
    from mcx_core.jsonutil import dumps_strict

    return write_text(path, dumps_strict(data, indent=2, sort_keys=True, default=str) + "\n")


def write_arrow(table, path: Path) -> None:
    """An Arrow IPC file (what the block datasets and delta contexts are stored as)."""
    import pyarrow as pa
    from pyarrow import ipc

    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- stage cache


def stage_fingerprint(cfg: MegaContextConfig, sections: list[str], *extra) -> str:
    """Identity of a stage's inputs: the config sections it reads plus anything else it depends on
    (dataset hash, checkpoint ids). Same fingerprint → the stored result is still the answer."""
    dump = cfg.model_dump(mode="json")
    payload = {"sections": {k: dump.get(k) for k in sections}, "extra": [str(e) for e in extra]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _stage_file(cfg: MegaContextConfig, name: str) -> Path:
    return ArtifactPaths.from_config(cfg).stages / f"{name}.json"


def file_digest(path: Path) -> dict:
    """{"size": bytes, "sha256": hex} of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"size": Path(path).stat().st_size, "sha256": h.hexdigest()}


def stage_problems(stored: dict) -> list[str]:
    """Why a stored stage record no longer vouches for its files: each one missing, or whose size or
    sha256 differs from what the stage wrote (a record without digests vouches for nothing)."""
    files = stored.get("files")
    if not isinstance(files, dict):
        return ["the stage record holds no file sizes and hashes (written by an older version)"]
    out = []
    for f, want in files.items():
        p = Path(f)
        if not p.is_file():
            out.append(f"{p} is missing")
            continue
        if p.stat().st_size != want.get("size"):
            out.append(f"{p} has {p.stat().st_size} bytes, the stage wrote {want.get('size')}")
        elif file_digest(p)["sha256"] != want.get("sha256"):
            out.append(f"{p} changed since the stage wrote it (sha256 differs)")
    return out


def load_stage(cfg: MegaContextConfig, name: str, fingerprint: str, force: bool = False) -> dict | None:
    """The stored result of stage `name` when its fingerprint matches and every file it wrote is still
    there with the size and sha256 it had; None otherwise (logged when a file is why), or when `force`
    (`mcx materialize --force`). A recomputed stage's result carries `recomputed_because`."""
    path = _stage_file(cfg, name)
    if force or not path.is_file():
        return None
    try:
        stored = read_json(path)
    except (ValueError, OSError) as err:
        log.warning("stage %s: record %s unreadable (%s); recomputing", name, path, err)
        return None
    if stored.get("fingerprint") != fingerprint:
        return None
    problems = stage_problems(stored)
    if problems:
        log.warning("stage %s: %s; recomputing", name, "; ".join(problems))
        _RECOMPUTED[(str(path), fingerprint)] = problems
        return None
    return {**{k: v for k, v in stored["result"].items() if k != "recomputed_because"}, "cached": True}


# (record, fingerprint) -> why its files did not verify: the recomputed result says so (`save_stage`).
_RECOMPUTED: dict[tuple[str, str], list[str]] = {}


def save_stage(cfg: MegaContextConfig, name: str, fingerprint: str, result: dict, files: list,
               owns: list[Path] = ()) -> None:
    """Record stage `name`'s result and the size and sha256 of each file it wrote. `owns`: the folders
    the stage alone writes; any file in them not among `files` is left from an earlier run (fewer
    documents or policies) and is deleted, so nothing downstream reads it. When the stage was recomputed
    because a stored file did not verify, `result["recomputed_because"]` says why."""
    files = [Path(f) for f in files]
    keep = {f.resolve() for f in files}
    for folder in owns:
        for f in sorted(Path(folder).rglob("*")) if Path(folder).is_dir() else []:
            if f.is_file() and f.resolve() not in keep and not _TEMP.match(f.name):
                log.info("stage %s: deleting %s (not written by this run)", name, f)
                f.unlink(missing_ok=True)
    why = _RECOMPUTED.pop((str(_stage_file(cfg, name)), fingerprint), None)
    if why:
        result["recomputed_because"] = why
    write_json(
        _stage_file(cfg, name),
        {"fingerprint": fingerprint, "files": {str(f): file_digest(f) for f in files}, "result": _jsonable(result)},
    )


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    return x
