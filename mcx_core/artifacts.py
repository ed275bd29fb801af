"""Where a config's artifacts live, how they are written, and the stage cache that reuses them.

Every file is written under a temporary name and renamed last (`write_atomic`), so a reader never
sees half a file. A stage (an evaluation, a delta table) stores its result with a fingerprint of its
inputs; the same fingerprint later means the stored result is still the answer (`load_stage`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mcx_core.config import MegaContextConfig

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


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` for a temporary name beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


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


def load_stage(cfg: MegaContextConfig, name: str, fingerprint: str, force: bool = False) -> dict | None:
    """The stored result of stage `name` when its fingerprint matches and its files all exist; None
    otherwise, or when `force` (`mcx materialize --force`)."""
    path = _stage_file(cfg, name)
    if force or not path.is_file():
        return None
    stored = read_json(path)
    if stored.get("fingerprint") != fingerprint or not all(Path(f).exists() for f in stored["files"]):
        return None
    return {**stored["result"], "cached": True}


def save_stage(cfg: MegaContextConfig, name: str, fingerprint: str, result: dict, files: list) -> None:
    write_json(
        _stage_file(cfg, name),
        {"fingerprint": fingerprint, "files": [str(f) for f in files], "result": _jsonable(result)},
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
