"""`mcx`, the command line: `main.py` is the group and its list of commands, one module per command group.
Every command imports what it needs inside its body, so `mcx --help` loads neither torch nor Dagster."""
