"""The `hkt-hf` command line: one module per command (`import_checkpoint`, `evaluate`, `train`, `push`, `demo`),
each a `Command` whose options are dataclasses parsed by transformers' `HfArgumentParser`; `main` dispatches.

Adding a command means writing one more module with a `COMMAND` and listing it in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformers import HfArgumentParser

from hkt_hf import __version__
from . import demo, evaluate, import_checkpoint, push, train
from .common import PROG, CliError, Command, command_parser, options_from

COMMANDS: dict[str, Command] = {
    cmd.name: cmd for cmd in (import_checkpoint.COMMAND, evaluate.COMMAND, train.COMMAND, push.COMMAND, demo.COMMAND)
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Hereditary Knowledge Transfer (HKT) for Hugging Face transformers: train a small child model "
        "with the knowledge of a frozen larger parent, evaluate it, share it. New here? Run `hkt-hf demo`.",
        epilog=f"Run `{PROG} COMMAND --help` for the options and examples of one command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=HfArgumentParser)
    for cmd in COMMANDS.values():
        command_parser(cmd, subparsers.add_parser, help=cmd.summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hkt-hf`; returns the exit code (0 success, 2 wrong usage or input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    namespace = build_parser().parse_args(argv)
    cmd = COMMANDS[namespace.command]
    own_argv = argv[argv.index(cmd.name) + 1 :]  # what follows the command name, for `train` to re-read
    try:
        try:
            options = cmd.parse(namespace, own_argv) if cmd.parse else options_from(namespace, cmd.options)
        except ValueError as err:  # an option dataclass refused its values
            raise CliError(f"{err} (see `{PROG} {cmd.name} --help`)") from err
        return cmd.run(*options)
    except CliError as err:
        print(f"{PROG} {cmd.name}: error: {err}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "CliError", "Command", "build_parser", "main"]
