"""The `lensbench` command line: one module per subcommand, one parser, one dispatch.

Each subcommand module has `NAME`, `add_parser(subparsers)` and `run(args) -> int`; shared
option groups are in `options`. Nothing in the library imports this package.

User mistakes print one line (`lensbench: error: ...`) and exit 2; an interrupted run exits
130 and resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import os
import sys

from lensbench.commands import calibrate, exit_speed, fit_linear, icl, models, report, tasks
from lensbench.commands import eval as eval_command
from lensbench.errors import LensbenchError

# In the order `lensbench --help` lists them.
COMMANDS = [eval_command, tasks, models, fit_linear, report, calibrate, exit_speed, icl]


class Parser(argparse.ArgumentParser):
    """argparse with lensbench's one-line errors (no usage block): `lensbench: error: ...`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"lensbench: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lensbench", description="Latent predictions of LM layers, SimLens and early exit.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    full = list(sys.argv[1:] if argv is None else argv)
    args.argv = full[full.index(args.command) + 1 :]  # the subcommand's own arguments (for relaunching)
    handler = {command.NAME: command.run for command in COMMANDS}[args.command]
    try:
        return handler(args)
    except LensbenchError as exc:
        print(f"lensbench: error: {exc}", file=sys.stderr)
        return 2
