"""Start-up: `lensbench eval --help` and option errors do not import the model libraries.

The figures (seconds) are in docs/performance.md; this checks what is imported, which is what
decides them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Needed only once a model is loaded or a stored run is read (transformer_lens brings
# transformers, datasets and pandas with it).
HEAVY = ("transformer_lens", "transformers", "datasets", "pandas", "plotly", "accelerate", "safetensors")

# `python -m lensbench ARGV` as runpy runs it, then the names of HEAVY it imported, as JSON.
PROBE = """
import json, runpy, sys
argv, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["lensbench", *argv]
code = 0
try:
    runpy.run_module("lensbench", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "imported": [m for m in heavy if m in sys.modules]}))
"""


def _imports(*argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [
    ("eval", "--help"),
    ("eval", "--out", "x", "--batch-size", "0"),  # an option error: one line, exit 2
])
def test_eval_help_and_option_errors_import_no_model_library(argv):
    result = _imports(*argv)
    assert result["code"] == (0 if "--help" in argv else 2)
    assert result["imported"] == [], f"`lensbench {' '.join(argv)}` imported {result['imported']}"


def test_every_subcommand_is_registered_under_its_name():
    from lensbench.commands import COMMANDS, build_parser, command_module

    for name in COMMANDS:
        assert command_module(name).NAME == name
    listed = build_parser()._subparsers._group_actions[0].choices  # `lensbench --help` lists them all
    assert list(listed) == list(COMMANDS)
    assert list(build_parser(["report", "RUN"])._subparsers._group_actions[0].choices) == ["report"]
