"""The `plait` command. Each subcommand's module is imported only when it runs."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plait", description="Serve and train LoRA adapters on one 4-bit base model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from plait.server import serve

    serve.add_arguments(commands.add_parser("serve", help="start the OpenAI-compatible server"))
    args = parser.parse_args(argv)
    sys.exit(serve.run(args))
