"""Behaviour pinned across refactors: the command line reproduces, bit for bit, the runs,
lens, calibration and report stored in tests/golden/expected.json (made by
tests/golden/make_golden.py; when and why it was last made: that file's docstring)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402


def _differences(expected, actual, where: str = "") -> list[str]:
    """Where `actual` differs from `expected` (keys `actual` adds are allowed: new fields)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object"]
        out = []
        for key, value in expected.items():
            if key not in actual:
                out.append(f"{where}/{key}: missing")
            else:
                out.extend(_differences(value, actual[key], f"{where}/{key}"))
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        # element by element, so that the objects of a list (calibration results) may add fields too
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in _differences(e, a, f"{where}[{i}]")]
    if expected != actual:
        return [f"{where}: {json.dumps(expected)[:120]} != {json.dumps(actual)[:120]}"]
    return []


def test_differences_allow_new_fields_only():
    expected = {"a": [{"x": 1.5, "y": [1, 2]}], "b": 0.1}
    assert _differences(expected, {"a": [{"x": 1.5, "y": [1, 2], "new": None}], "b": 0.1, "c": 2}) == []
    assert _differences(expected, {"a": [{"x": 1.5000000001, "y": [1, 2]}], "b": 0.1}) == ["/a[0]/x: 1.5 != 1.5000000001"]
    assert _differences(expected, {"a": [{"x": 1.5, "y": [1, 2, 3]}], "b": 0.1})
    assert _differences(expected, {"a": [{"y": [1, 2]}], "b": 0.1}) == ["/a[0]/x: missing"]
    assert _differences(expected, {"a": [], "b": 0.1})


@pytest.mark.slow
def test_cli_reproduces_golden_outputs(tmp_path):
    expected = json.loads((GOLDEN / "expected.json").read_text())
    make_golden.make(tmp_path)
    actual = make_golden.digest(tmp_path)
    problems = _differences(expected, actual)
    assert not problems, "\n".join(problems[:40])
