"""The `mcx` group and its commands. Errors a user can fix print one line, no traceback: besides each
command's own checks, `McxGroup` turns every environment error that escapes a command (a full disk, a
permission or read-only file system, an unwritable --out, a bogus tracking URI) into one `error:` line
and exit 2; any other exception is one line and exit 1, its traceback only under `mcx --debug`."""

from __future__ import annotations

import click

from mcx_cli._common import EXIT_UNEXPECTED, describe_error
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


class McxGroup(click.Group):
    """A click group whose commands never end in a raw traceback unless `--debug` is given."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `mcx query ... | head`: the reader left; nothing to report
            ctx.exit(0)
        except Exception as err:  # the one top-level handler
            if (ctx.obj or {}).get("debug"):
                raise
            message, code = describe_error(err)
            if code == EXIT_UNEXPECTED:
                message += " (run `mcx --debug ...` for the traceback)"
            click.echo(f"error: {message}", err=True)
            ctx.exit(code)


@click.group(cls=McxGroup, context_settings={"help_option_names": ["-h", "--help"]}, commands=COMMANDS)
@click.option("--debug", is_flag=True, help="Show the full traceback of an unexpected error.")
@click.pass_context
def main(ctx: click.Context, debug: bool):
    """MegaContext: learned context compression and dynamic focus for frozen LLMs."""
    ctx.obj = {**(ctx.obj or {}), "debug": debug}
