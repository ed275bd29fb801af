"""What every command shares: one-line errors (exit 2, no traceback), loading a config under the project
root, reading a text file, printing a summary, a text's tokens and a focus policy by name. Imports stay light: `mcx --help` loads this module."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

EXIT_USAGE = 2


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


def read_text(text_path: str) -> str:
    """The text file's contents, or one `error:` line and exit 2."""
    from mcx_core.eval import gists as gist_eval

    try:
        return gist_eval.read_text_file(Path(text_path))
    except gist_eval.TextError as err:
        fail(str(err))


def print_summary(values: dict, as_json: bool, title: str, float_format: str) -> None:
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
