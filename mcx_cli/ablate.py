"""`mcx ablate`: JT1 variants trained for the same wall-clock budget, one validation table."""

from __future__ import annotations

import sys

import click

from mcx_cli._common import EXIT_USAGE, fail


@click.command()
@click.option("--config", "spec_path", required=True, type=click.Path(dir_okay=False),
              help="Ablation YAML: base config, budget_seconds, variants (see configs/ablation.yaml).")
@click.option("--only", multiple=True, help="Run only these variants (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (default: a table).")
def ablate(spec_path: str, only: tuple[str, ...], as_json: bool):
    """Train each variant's GistNet for the same wall-clock budget and print ΔNLL@H, recovery and the
    paired difference to recency (95 % intervals) on the validation split. Finished variants are read
    back, not retrained; the table is also written to artifacts/ablation/<name>/ablation.md."""
    from mcx_core.config import ConfigError
    from mcx_core.eval import ablation as A
    from mcx_dagster.project import project_home

    try:
        spec = A.load_spec(spec_path)
    except ConfigError as err:
        for p in err.problems:
            click.echo(f"error: {err.source}: {p}", err=True)
        sys.exit(EXIT_USAGE)
    unknown = sorted(set(only) - set(spec.variants))
    if unknown:
        fail(f"--only: no variant {', '.join(unknown)} in {spec_path} (variants: {', '.join(spec.variants)})")
    from mcx_cli.pipeline import project_writer
    from mcx_core.checkpoints import CheckpointError

    try:
        base = A.variant_config(spec, next(iter(spec.variants)), project_home())
        with project_writer(base, "mcx ablate"):  # one writer of the base config's artifacts at a time
            out = A.run_ablation(spec_path, project_home(), progress=not as_json, only=list(only) or None)
    except CheckpointError as err:
        fail(str(err))
    except ConfigError as err:
        for p in err.problems:
            click.echo(f"error: {err.source}: {p}", err=True)
        sys.exit(EXIT_USAGE)
    except FileNotFoundError as err:
        fail(f"{err} (build the datasets first: make demo, or mcx materialize --select block_dataset)")
    if as_json:
        from mcx_core.jsonutil import dumps_strict

        click.echo(dumps_strict(out["rows"], default=str))
    else:
        click.echo(A.print_table(out["rows"]))
        click.echo(f"\nreport: {out['markdown']}")
