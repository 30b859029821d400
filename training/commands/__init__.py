"""One module per ``refound`` subcommand (see training/cli.py)."""
