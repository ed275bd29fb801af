"""`python -m mcx_cli …` (and `accelerate launch -m mcx_cli train-cycles …`): the `mcx` command."""

from mcx_cli.main import main

if __name__ == "__main__":
    main()
