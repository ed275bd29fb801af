"""Reading a config: YAML -> validated `MegaContextConfig`, errors as `field.path: message` lines,
the project root relative paths resolve against, and checks of the files a config names."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mcx_core.config.sections import EMBEDDED_SOURCES, MegaContextConfig, resolve_path


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # SafeLoader reports an unhashable key itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(text: str) -> Any:
    """YAML -> Python like `yaml.safe_load`, refusing duplicate keys (`yaml.YAMLError`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass


class ConfigError(ValueError):
    """A config that cannot be used. `problems` holds one `field.path: message` line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _pydantic_problems(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        # Drop pydantic's internal tags (e.g. 'function-after[_check()]') from the location.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p and "]" in p))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "missing required field"
        msg = msg.removeprefix("Value error, ")
        if not loc and re.match(r"[a-z_]+(\.[a-z_0-9]+)+ ", msg):
            problems.append(msg)  # a cross-section check: its message starts with the field it is about
        else:
            problems.append(f"{_loc(loc)}: {msg}")
    return problems


def parse_config(data: Any, source: str = "<config>", root: str | os.PathLike | None = None) -> MegaContextConfig:
    """Validate a YAML mapping; relative paths in it resolve against `root` (default: the working directory)."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["<root>: the file must hold a YAML mapping"])
    try:
        return MegaContextConfig.model_validate(data).with_root(root)
    except ValidationError as err:
        raise ConfigError(source, _pydantic_problems(err)) from None


def load_config(path: str | os.PathLike, root: str | os.PathLike | None = None,
                overrides: dict[str, Any] | None = None) -> MegaContextConfig:
    """Read, validate and return a config whose relative paths resolve against `root` (the project
    root; default: the working directory). `overrides` use dotted keys: {'runtime.steps': 5}."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), [f"<file>: config file not found: {p.resolve()}"])
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(str(p), [f"<yaml>: not valid YAML{where}: {getattr(err, 'problem', err)}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(p), ["<file>: not a UTF-8 text file"]) from None
    except OSError as err:
        raise ConfigError(str(p), [f"<file>: cannot read {p}: {err.strerror or err}"]) from None
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return parse_config(data, str(p), root)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def check_files(cfg: MegaContextConfig, root: str | os.PathLike | None = None) -> list[str]:
    """Problems with files a config names (missing model dir, globs that match nothing), relative paths
    under `root` (default: the config's project root)."""
    problems: list[str] = []
    root = root or cfg.root
    bm = cfg.base_model
    if bm.source == "local":
        d = resolve_path(bm.path, root)
        if not (d / "config.json").is_file():
            problems.append(f"base_model.path: no Hugging Face model directory at {d} (config.json missing)")
    for name, corpus in cfg.dataset.corpora.items():
        if corpus.source in EMBEDDED_SOURCES:
            continue
        if corpus.source.startswith("embedded:"):
            problems.append(
                f"dataset.corpora.{name}.source: unknown embedded corpus {corpus.source!r} "
                f"(known: {', '.join(EMBEDDED_SOURCES)})"
            )
        elif not glob.glob(str(resolve_path(corpus.source, root)), recursive=True):
            problems.append(f"dataset.corpora.{name}.source: no file matches {resolve_path(corpus.source, root)}")
    for split, src in cfg.dataset.splits.items():
        if not glob.glob(str(resolve_path(src.source, root)), recursive=True):
            problems.append(f"dataset.splits.{split}.source: no file matches {resolve_path(src.source, root)}")
    tok = cfg.dataset.tokenizer
    if tok != "auto" and not resolve_path(tok, root).is_dir():
        problems.append(f"dataset.tokenizer: no local tokenizer directory at {resolve_path(tok, root)}")
    for field in ("artifacts_dir", "dataset.output_dir"):
        value = cfg.artifacts_dir if field == "artifacts_dir" else cfg.dataset.output_dir
        problem = unwritable_dir(resolve_path(value, root))
        if problem:
            problems.append(f"{field}: {problem}")
    uri = cfg.mlflow.tracking_uri
    if uri and uri.startswith("sqlite:///"):  # the store's folder must be writable (created on first use)
        db = resolve_path(uri.removeprefix("sqlite:///"), root)
        problem = unwritable_dir(db.parent)
        if problem:
            problems.append(f"mlflow.tracking_uri: {problem}")
    problems += _runtime_length_problems(cfg, root)
    return problems


def unwritable_dir(path: Path) -> str | None:
    """Why a directory cannot be created or written at `path` (None when it can): checks `path` or its
    nearest existing parent, without creating anything."""
    p = Path(path)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory, so {p} cannot be created"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable ({'read-only file system' if _read_only(probe) else 'permission denied'})"
    return None


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _runtime_length_problems(cfg: MegaContextConfig, root) -> list[str]:
    """`runtime.steps` that no document can hold: a step needs `refocus_every` new tokens, and a token is
    at least one byte, so a document shorter in bytes than prefill + steps x refocus_every + horizon
    cannot be streamed; the largest source file bounds every document of its corpus."""
    from mcx_core.data.corpora import list_sources

    rc = cfg.runtime
    need = rc.prefill_tokens + rc.steps * rc.refocus_every + cfg.dataset.horizon
    largest = 0
    try:
        for corpus in cfg.dataset.corpora.values():
            for f in list_sources(corpus, Path(root) if root else None):
                largest = max(largest, f.path.stat().st_size)
    except (OSError, ValueError):
        return []  # the file checks above report missing sources
    if largest and need > largest:
        return [(
            f"runtime.steps: {rc.steps} steps need documents of {need} tokens (runtime.prefill_tokens + "
            f"steps x refocus_every + dataset.horizon), but the largest source file has {largest} bytes"
        )]
    return []
