"""The project an entry point serves: its root, decided once where a command or the code location
starts (`$MCX_HOME`, which the Makefile exports, else the working directory) and passed down from there."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG = "configs/default.yaml"


def project_home() -> Path:
    """The project root of this process's entry point: `$MCX_HOME`, else the working directory."""
    from mcx_core.config import project_root

    return project_root(os.environ.get("MCX_HOME"))


def load_project_config(config_path: str | os.PathLike, root: str | os.PathLike | None = None):
    """The config at `config_path` (relative: under the project root), its paths resolving under that root."""
    from mcx_core.config import load_config

    home = Path(root).resolve() if root else project_home()
    path = Path(config_path)
    return load_config(path if path.is_absolute() else home / path, root=home)
