"""The inference subcommands of the ``refound`` CLI (``predict``, ``embed``, ``serve``).

They live beside the code they run (``refound_core.inference``, ``refound_core.backend``);
``training/cli.py`` only lists them. Same contract as ``training/commands``: each module has
``add_arguments(parser)`` and ``run(args) -> int``, and imports only argparse at top level.
"""
