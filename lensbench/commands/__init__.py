"""The `lensbench` command line: one module per subcommand, one parser, one dispatch.

Each subcommand module has `NAME`, `add_parser(subparsers)` and `run(args) -> int`; shared
option groups are in `options`. Nothing in the library imports this package.

A subcommand's module (and the library it imports) is imported only when that subcommand is
run, so `lensbench eval --help` does not pay for `report`'s or `icl`'s imports; `lensbench
--help` (or no subcommand) imports them all to list them.

User mistakes print one line (`lensbench: error: ...`) and exit 2; an interrupted run exits
130 and resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lensbench.errors import LensbenchError

# Subcommand name -> its module in this package, in the order `lensbench --help` lists them.
COMMANDS = {
    "eval": "eval", "tasks": "tasks", "models": "models", "fit-linear": "fit_linear", "report": "report",
    "calibrate": "calibrate", "exit-speed": "exit_speed", "icl": "icl",
}


class Parser(argparse.ArgumentParser):
    """argparse with lensbench's one-line errors (no usage block): `lensbench: error: ...`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"lensbench: error: {message} (see `{self.prog} --help`)\n")


def command_module(name: str):
    """The module of subcommand `name` (imported on first use)."""
    return importlib.import_module(f"lensbench.commands.{COMMANDS[name]}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv` whose first word is a subcommand, only that subcommand's module is
    imported and added (the only one `argv` can reach), else all of them."""
    parser = Parser(prog="lensbench", description="Latent predictions of LM layers, SimLens and early exit.")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = [argv[0]] if argv and argv[0] in COMMANDS else list(COMMANDS)
    for name in chosen:
        command_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    full = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(full).parse_args(full)
    args.argv = full[full.index(args.command) + 1 :]  # the subcommand's own arguments (for relaunching)
    try:
        return command_module(args.command).run(args)
    except LensbenchError as exc:
        print(f"lensbench: error: {exc}", file=sys.stderr)
        return 2
