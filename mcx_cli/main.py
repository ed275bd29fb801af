"""The `mcx` group and its commands. Errors a user can fix print one line, no traceback."""

from __future__ import annotations

import click

from mcx_cli.ablate import ablate
from mcx_cli.config import validate_config
from mcx_cli.pipeline import materialize, register_cycles, train_cycles
from mcx_cli.query import query
from mcx_cli.telemetry import analyze, compare, explain, profile
from mcx_cli.text import eval_text, run_text

COMMANDS = [
    validate_config,
    materialize,
    register_cycles,
    train_cycles,
    ablate,
    eval_text,
    run_text,
    query,
    analyze,
    profile,
    compare,
    explain,
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, commands=COMMANDS)
def main():
    """MegaContext: learned context compression and dynamic focus for frozen LLMs."""
