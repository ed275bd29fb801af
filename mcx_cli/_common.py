"""What every command shares: one-line errors (exit 2, no traceback), loading a config under the project
root, reading a text file, printing a summary, a text's tokens and a focus policy by name. Imports stay light: `mcx --help` loads this module."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
from pathlib import Path

import click

EXIT_USAGE = 2
EXIT_UNEXPECTED = 1


def fail(message: str, code: int = EXIT_USAGE):
    """Print `error: message` on stderr and exit with `code`."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def config_option(**kwargs):
    """The `--config PATH` option every experiment command takes."""
    kwargs = {"required": True, "help": "Experiment YAML.", **kwargs}
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), **kwargs)


def load(config_path: str, check: bool = True):
    """The config at `config_path` under the project root (`mcx_dagster.project`); one `error:` line per
    problem and exit 2 when it is invalid or (with `check`) names files that are not there."""
    from mcx_core.config import ConfigError, check_files
    from mcx_dagster.project import load_project_config

    try:
        cfg = load_project_config(config_path)
    except ConfigError as err:
        for p in err.problems:
            click.echo(f"error: {err.source}: {p}", err=True)
        sys.exit(EXIT_USAGE)
    if check:
        problems = check_files(cfg)
        for p in problems:
            click.echo(f"error: {config_path}: {p}", err=True)
        if problems:
            sys.exit(EXIT_USAGE)
    return cfg


def read_text(text_path: str, max_chars: int | None = None) -> str:
    """The text file's contents (at most `max_chars` characters, read incrementally), or one `error:` line
    and exit 2."""
    from mcx_core.eval import gists as gist_eval

    try:
        return gist_eval.read_text_file(Path(text_path), max_chars)
    except gist_eval.TextError as err:
        fail(str(err))


def check_text(text_path: str) -> Path:
    """Fail early (before a model loads) when the text file is missing, a directory, binary, or its first
    chunk is not UTF-8; the whole file is checked as it streams."""
    from mcx_core.textstream import TextError, iter_text_chunks

    try:
        next(iter_text_chunks(Path(text_path)), None)
    except TextError as err:
        fail(str(err))
    return Path(text_path)


def text_tokens(lm, text_path: str, need: int | None):
    """(prefix text, token ids as a 1-D long tensor): the first `need` tokens of the file, at least, read
    and tokenized incrementally (all of them when None); one `error:` line and exit 2 for a bad file."""
    import numpy as np
    import torch

    from mcx_core.textstream import TextError, stream_token_prefix

    try:
        text, ids = stream_token_prefix(Path(text_path), lm.tokenizer, need)
    except TextError as err:
        fail(str(err))
    return text, torch.as_tensor(np.asarray(ids, dtype=np.int64))


def token_stream(lm, text_path: str):
    """The file's token ids as an iterator of 1-D tensors (read lazily); a bad file fails with one line."""
    import torch

    from mcx_core.textstream import TextError, iter_token_pieces

    try:
        for _, ids in iter_token_pieces(Path(text_path), lm.tokenizer):
            yield torch.as_tensor(ids, dtype=torch.long)
    except TextError as err:
        fail(str(err))


def print_summary(values: dict, as_json: bool, title: str, float_format: str) -> None:
    """One strict JSON object (NaN/inf as null), or a metric/value table."""
    if as_json:
        from mcx_core.jsonutil import dumps_strict

        click.echo(dumps_strict(values, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value")
    for k, v in values.items():
        for name, x in (v.items() if isinstance(v, dict) else [(None, v)]):  # a dict: one row per entry
            label = k if name is None else f"{k}.{name}"
            if isinstance(x, list) and all(isinstance(y, float) for y in x):  # an interval
                table.add_row(label, "[" + ", ".join(float_format.format(y) for y in x) + "]")
            else:
                table.add_row(label, float_format.format(x) if isinstance(x, float) else str(x))
    Console().print(table)


def tokens(lm, text: str):
    """The text's token ids (no special tokens), as a 1-D long tensor."""
    import torch

    return torch.as_tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def focus_policy(policy: str, ck: Path, lm, horizon: int, seed: int, ids):
    """The runtime's focus policy by name: the checkpoint's LensNet, or a non-learned one over `ids`."""
    from mcx_core.focus.policies import standard_policies

    if policy == "lensnet":
        from mcx_core.focus.lensnet import LensNetPolicy, load_lensnet

        return LensNetPolicy(load_lensnet(ck, lm.device), lm.embed)
    return standard_policies(lm, horizon, seed=seed, oracle=False)[policy](ids)


_ERRNO_WORDS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
}


def _causes(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _free_space(path: str | None) -> str:
    """How much is free on the file system of `path` (its nearest existing parent)."""
    if not path:
        return "a file being written filled its disk"
    p = os.path.abspath(path)
    while p != os.path.dirname(p) and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        return f"{shutil.disk_usage(p).free / 2**20:.1f} MiB free on the disk of {p}"
    except OSError:
        return "free space unknown"


def describe_error(err: BaseException) -> tuple[str, int]:
    """(one line, exit code) for an exception that escaped a command: environment errors (files, disk,
    permissions, MLflow store, Dagster selection) are exit 2; anything else is unexpected (exit 1)."""
    for e in _causes(err):
        if isinstance(e, OSError) and (e.errno in _ERRNO_WORDS or e.filename):
            what = _ERRNO_WORDS.get(e.errno) or e.strerror or _first_line(e)
            where = e.filename if e.filename is None else os.fspath(e.filename)
            extra = f" ({_free_space(where)})" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            return (f"{what}: {where}{extra}" if where else f"{what}{extra}"), EXIT_USAGE
    for e in _causes(err):
        text = str(e)
        # torch.save on a full disk: "PytorchStreamWriter failed writing file ...: file write failed"
        if isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "file write failed" in text):
            return f"writing a file failed (no space left on device?): {_first_line(e)}", EXIT_USAGE
        mod = type(e).__module__.split(".")[0]
        if mod in ("mlflow", "sqlalchemy"):
            return f"MLflow tracking store: {_first_line(e)}", EXIT_USAGE
        if mod == "dagster" and type(e).__name__ in ("DagsterInvalidSubsetError", "DagsterInvalidAssetSelectionError"):
            return f"asset selection: {_first_line(e)}", EXIT_USAGE
        if mod == "safetensors" or type(e).__name__ in ("SafetensorError", "HeaderTooLarge"):
            return f"unreadable checkpoint file: {_first_line(e)}", EXIT_USAGE
    return f"unexpected {type(err).__name__}: {_first_line(err)}", EXIT_UNEXPECTED


class _DagsterLogCondenser(logging.Filter):
    """Dagster's console logger prints a stack trace with every failed step; a failed blocking check is
    a result (exit 3, summarised one line per check by the command), and another failed step's error is
    its first lines. Keeps traces under `--debug`."""

    def __init__(self, debug: bool):
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        if self.debug:
            return True
        msg = record.getMessage()
        if "DagsterAssetCheckFailedError" in msg:
            return False  # the command prints one `check failed:` line per failed check
        if "Stack Trace:" in msg:
            head = msg.split("Stack Trace:", 1)[0]
            record.msg, record.args = " ".join(line.strip() for line in head.splitlines() if line.strip()), None
        return True


@contextlib.contextmanager
def condensed_dagster_logs(debug: bool = False):
    """While a Dagster run executes in-process: its console logger (made with `logging.getLoggerClass()`
    for every run) condenses failure traces as `_DagsterLogCondenser` says."""
    previous = logging.getLoggerClass()
    condenser = _DagsterLogCondenser(debug)

    class CondensingLogger(previous):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.addFilter(condenser)

    logging.setLoggerClass(CondensingLogger)
    try:
        yield
    finally:
        logging.setLoggerClass(previous)


def debug_enabled() -> bool:
    """Whether `mcx --debug` was given (full tracebacks)."""
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if isinstance(ctx.obj, dict) and ctx.obj.get("debug"):
            return True
        ctx = ctx.parent
    return False
