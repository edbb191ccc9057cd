"""The `plait` command. Each subcommand's module is imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments(parser) and run(args) -> exit status, one-line help)
COMMANDS = {
    "serve": ("plait.server.serve", "start the OpenAI-compatible server"),
    "train": ("plait.trainer.cli", "fine-tune a LoRA adapter with QLoRA"),
    "train-router": ("plait.trainer.router_cli", "train a learned router for a fusion of adapters"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="plait", description="Serve and train LoRA adapters on one 4-bit base model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The top-level parser has no options but -h, so the command is the first argument: only
    # its module is imported (serving never loads the trainer, and the reverse).
    chosen = argv[0] if argv else None
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(sub)
    args = parser.parse_args(argv)
    sys.exit(importlib.import_module(COMMANDS[args.command][0]).run(args))
