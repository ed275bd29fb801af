"""`mcx validate-config`."""

from __future__ import annotations

import click

from mcx_cli._common import load


@click.command("validate-config")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--no-file-checks", is_flag=True, help="Only check the shape, not the files it names.")
def validate_config(path: str, no_file_checks: bool):
    """Validate a config; print the resolved config, or one line per problem (exit 2)."""
    cfg = load(path, check=not no_file_checks)
    click.echo(f"# {path}: valid")
    click.echo(cfg.to_yaml(), nl=False)
