"""Behaviour pinned across refactors: the command line reproduces the runs, lens, calibration
and report digested in tests/golden/expected.json and expected_floats.npz (made by
tests/golden/make_golden.py; how they are compared, and when and why they were last made: that
file's docstring). Discrete values must be equal; floats agree within make_golden.RTOL/ATOL."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402


def _floats_differ(expected: np.ndarray, actual: np.ndarray) -> str | None:
    """Why two float arrays differ beyond the tolerance (None when they agree)."""
    if expected.shape != actual.shape:
        return f"shape {list(expected.shape)} != {list(actual.shape)}"
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    if not np.array_equal(np.isnan(e), np.isnan(a)):
        return "NaN at other places"
    ok = np.isclose(a, e, rtol=make_golden.RTOL, atol=make_golden.ATOL, equal_nan=True)
    if ok.all():
        return None
    worst = int(np.argmax(np.where(ok, 0, np.abs(np.nan_to_num(a - e)))))
    return f"{int((~ok).sum())} of {ok.size} values off, e.g. [{worst}] {e.flat[worst]!r} != {a.flat[worst]!r}"


def _differences(expected, actual, where: str = "", floats: tuple[dict, dict] = ({}, {})) -> list[str]:
    """Where `actual` differs from `expected` (keys `actual` adds are allowed: new fields).
    Numbers that are not both integers agree within the tolerance; `{"floats": KEY}` entries
    compare the arrays floats[0][KEY] (expected) and floats[1][KEY] (actual)."""
    if isinstance(expected, dict) and "floats" in expected and isinstance(actual, dict) and "floats" in actual:
        key = expected["floats"]
        if key not in floats[0] or actual["floats"] not in floats[1]:
            return [f"{where}: float values {key} missing"]
        why = _floats_differ(floats[0][key], floats[1][actual["floats"]])
        rest = _differences({k: v for k, v in expected.items() if k != "floats"},
                            {k: v for k, v in actual.items() if k != "floats"}, where, floats)
        return ([f"{where}: {why}"] if why else []) + rest
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object"]
        out = []
        for key, value in expected.items():
            if key not in actual:
                out.append(f"{where}/{key}: missing")
            else:
                out.extend(_differences(value, actual[key], f"{where}/{key}", floats))
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        # element by element, so that the objects of a list (calibration results) may add fields too
        return [d for i, (e, a) in enumerate(zip(expected, actual))
                for d in _differences(e, a, f"{where}[{i}]", floats)]
    if isinstance(expected, bool) != isinstance(actual, bool):
        return [f"{where}: {json.dumps(expected)[:120]} != {json.dumps(actual)[:120]}"]
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)) and float in (type(expected), type(actual)):
        if math.isclose(expected, actual, rel_tol=make_golden.RTOL, abs_tol=make_golden.ATOL) or \
                (math.isnan(expected) and math.isnan(actual)):
            return []
        return [f"{where}: {expected!r} != {actual!r}"]
    if expected != actual:
        return [f"{where}: {json.dumps(expected)[:120]} != {json.dumps(actual)[:120]}"]
    return []


def test_differences_allow_new_fields_and_last_bits_only():
    expected = {"a": [{"x": 1.5, "y": [1, 2]}], "b": 0.1, "n": 3}
    assert _differences(expected, {"a": [{"x": 1.5, "y": [1, 2], "new": None}], "b": 0.1, "n": 3, "c": 2}) == []
    assert _differences(expected, {"a": [{"x": 1.5000001, "y": [1, 2]}], "b": 0.1000000001, "n": 3}) == []
    assert _differences(expected, {"a": [{"x": 1.51, "y": [1, 2]}], "b": 0.1, "n": 3}) == ["/a[0]/x: 1.5 != 1.51"]
    assert _differences(expected, {"a": [{"x": 1.5, "y": [1, 2]}], "b": 0.1, "n": 4})  # integers exactly
    assert _differences(expected, {"a": [{"x": 1.5, "y": [1, 2, 3]}], "b": 0.1, "n": 3})
    assert _differences(expected, {"a": [{"y": [1, 2]}], "b": 0.1, "n": 3}) == ["/a[0]/x: missing"]
    assert _differences(expected, {"a": [], "b": 0.1, "n": 3})
    assert _differences({"f": True}, {"f": 1.0})


def test_float_arrays_agree_within_the_tolerance_only():
    values = np.linspace(-12.0, 3.0, 50, dtype=np.float32)
    entry = {"floats": "k", "n": 50}
    assert _differences(entry, dict(entry), floats=({"k": values}, {"k": values * np.float32(1 + 1e-6)})) == []
    moved = values.copy()
    moved[7] += 0.05
    (problem,) = _differences(entry, dict(entry), floats=({"k": values}, {"k": moved}))
    assert "1 of 50 values off" in problem
    assert _differences(entry, dict(entry), floats=({"k": values}, {"k": values[:-1]}))
    assert _differences(entry, {"floats": "k", "n": 49}, floats=({"k": values}, {"k": values}))


@pytest.mark.slow
def test_cli_reproduces_golden_outputs(tmp_path):
    expected = json.loads((GOLDEN / "expected.json").read_text())
    with np.load(GOLDEN / make_golden.FLOATS_FILE) as stored:
        expected_floats = dict(stored)
    make_golden.make(tmp_path)
    actual, actual_floats = make_golden.digest(tmp_path)
    problems = _differences(expected, actual, floats=(expected_floats, actual_floats))
    assert not problems, "\n".join(problems[:40])
