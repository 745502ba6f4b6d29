"""`lensbench report` with bootstrap intervals on real (tiny) runs: report.json's new `*_ci`
keys bracket their estimates, the printed tables show them, `--seed` reproduces them,
`--bootstrap 0` is the report without them, and bad settings are one-line errors before any
compute.

The runs (a Linear SimLens fitted with 2 steps; capitals@calib and capitals@test with the logit
lens, SimLens and Linear SimLens) are made once per module, as in test_bad_input.py.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from lensbench.commands import main

MODEL = "random:tiny-rotary:1"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("intervals")
    paths = {name: root / name for name in ("L", "C", "T")}
    assert main(["fit-linear", "--model", MODEL, "--task", "capitals", "--split", "calib", "--steps", "2",
                 "--out", str(paths["L"]), "--quiet"]) == 0
    for name, task in (("C", "capitals@calib"), ("T", "capitals@test")):
        assert main(["eval", "--model", MODEL, "--task", task, "--lenses", "logit,simlens,linear-simlens",
                     "--linear", str(paths["L"]), "--out", str(paths[name]), "--quiet"]) == 0
    torch.set_num_threads(threads)
    return paths


def _report(runs, capsys, *options) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["report", str(runs["T"]), "--calib", str(runs["C"]), *options]) == 0
    printed = capsys.readouterr().out
    return json.loads((runs["T"] / "report.json").read_text()), printed


def _brackets(interval, value) -> bool:
    lo, hi = interval
    return lo - 1e-12 <= value <= hi + 1e-12


def test_report_json_has_intervals_around_every_estimate(runs, capsys):
    report, printed = _report(runs, capsys)  # the default: 1000 resamples, seed 0
    assert report["bootstrap"] == {"method": "percentile", "resampled": "examples", "resamples": 1000, "seed": 0,
                                   "level": 0.95, "n_examples": report["n_examples"]}
    assert _brackets(report["final_accuracy_ci"], report["final_accuracy"])
    assert set(report["per_layer"]) == {"logit", "simlens", "linear-simlens"}
    widths = []
    for lens, body in report["per_layer"].items():
        for key in ("accuracy", "fidelity"):
            assert len(body[f"{key}_ci"]) == len(body[key]) == len(body["layer"])
            for value, interval in zip(body[key], body[f"{key}_ci"]):
                assert _brackets(interval, value), (lens, key)
                widths.append(interval[1] - interval[0])
    assert max(widths) > 0.1  # 19 examples: wide intervals
    gain = report["iso_compute"]["gains"]["simlens_vs_logit"]
    assert _brackets(gain["gain_ci"], gain["gain"]) and gain["gain_ci"][0] < gain["gain_ci"][1]
    for lens, curve in report["iso_compute"]["curves"].items():
        bands = report["iso_compute"]["curves_ci"][lens]
        assert all(_brackets(band, a) for band, a in zip(bands, curve["accuracy"]) if a is not None)
    assert len(report["calibrated"]) == 10  # 3 policies x 3 targets and the oracle
    for result in report["calibrated"]:
        test = result["test"]
        assert test["accuracy_drop"] == pytest.approx(test["full_accuracy"] - test["accuracy"])
        for name in ("accuracy", "fidelity", "layer_token_speedup", "accuracy_drop"):
            assert _brackets(test[f"{name}_ci"], test[name]), (result["policy"], result["target"], name)
        assert "calib_and_test_ci" not in result  # only with --bootstrap-calib
    # printed: the gain and each calibrated point with their intervals
    assert re.search(r"Iso-Compute gain .*: [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] points", printed)
    assert len(re.findall(r"^    test acc \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \| fid ", printed, re.M)) == 10
    assert "1000 resamples, seed 0" in printed


def test_seed_reproduces_and_changes_the_intervals(runs, capsys):
    first, _ = _report(runs, capsys, "--bootstrap", "200", "--seed", "7")
    again, _ = _report(runs, capsys, "--bootstrap", "200", "--seed", "7")
    other, _ = _report(runs, capsys, "--bootstrap", "200", "--seed", "8")
    assert first == again
    assert first["bootstrap"]["seed"] == 7 and first["bootstrap"]["resamples"] == 200

    def intervals(report):
        return ([report["per_layer"][lens]["accuracy_ci"] for lens in report["per_layer"]],
                report["iso_compute"]["gains"]["simlens_vs_logit"]["gain_ci"],
                [c["test"]["layer_token_speedup_ci"] for c in report["calibrated"]])

    assert intervals(first) != intervals(other)


def _strip_new(report, plain):
    """`report` with only the keys of `plain` (dropping the keys the bootstrap adds)."""
    if isinstance(plain, dict):
        return {k: _strip_new(report[k], v) for k, v in plain.items()}
    if isinstance(plain, list):
        return [_strip_new(r, p) for r, p in zip(report, plain)]
    return report


NEW_KEYS = {"bootstrap", "final_accuracy_ci", "accuracy_ci", "fidelity_ci", "curves_ci", "gain_ci",
            "layer_token_speedup_ci", "accuracy_drop", "accuracy_drop_ci", "calib_and_test_ci"}


def _keys(value) -> set:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def test_bootstrap_zero_is_the_report_without_intervals(runs, capsys):
    plain, printed_plain = _report(runs, capsys, "--bootstrap", "0")
    full, printed = _report(runs, capsys)
    assert not _keys(plain) & NEW_KEYS
    assert _strip_new(full, plain) == plain  # the intervals change no number the report had
    assert "[" not in printed_plain and "resamples" not in printed_plain
    # printed: the same lines, less the intervals and the lines that carry them
    without = [re.sub(r" \[[^]]*\]", "", line) for line in printed.splitlines()
               if not line.startswith(("    test acc", "[lo, hi]", "(per-layer intervals"))]
    assert without == printed_plain.splitlines()


def test_ci_prints_the_per_layer_intervals(runs, capsys):
    report, printed = _report(runs, capsys, "--bootstrap", "100", "--ci")
    body = report["per_layer"]["simlens"]
    lo, hi = body["accuracy_ci"][0]
    assert f"{body['accuracy'][0]:.3f} [{lo:.3f}, {hi:.3f}]" in printed
    assert "acc [95 % interval]" in printed


def test_bootstrap_calib_resamples_the_calibration_too(runs, capsys):
    report, printed = _report(runs, capsys, "--bootstrap", "300", "--bootstrap-calib")
    for result in report["calibrated"]:
        if result["policy"] == "oracle":
            assert "calib_and_test_ci" not in result  # no threshold to choose
            continue
        both = result["calib_and_test_ci"]
        assert set(both) == {"accuracy", "fidelity", "layer_token_speedup", "accuracy_drop", "threshold"}
        assert all(lo <= hi for key, (lo, hi) in both.items() if key != "layer_token_speedup" or hi is not None)
    widened = [c for c in report["calibrated"] if "calib_and_test_ci" in c
               and c["calib_and_test_ci"]["threshold"][0] < c["calib_and_test_ci"]["threshold"][1]]
    assert widened  # the chosen threshold varies with the calibration sample
    assert "with calibration resampled too" in printed


@pytest.mark.parametrize("options, fragment", [
    (["--bootstrap", "-1"], "--bootstrap must be 0 (no intervals) or at least 2"),
    (["--bootstrap", "1"], "--bootstrap must be 0 (no intervals) or at least 2"),
    (["--seed", "-3"], "--seed must be an integer >= 0"),
    (["--bootstrap", "many"], "invalid int value"),
    (["--bootstrap-calib", "--no-calib"], "--bootstrap-calib needs --calib"),
    (["--bootstrap-calib", "--bootstrap", "0"], "--bootstrap-calib needs intervals"),
    (["--bootstrap-calib", "--per-layer"], "--bootstrap-calib chooses global thresholds only"),
])
def test_bad_bootstrap_settings_are_one_line_errors_before_any_compute(options, fragment, runs, capsys, monkeypatch):
    def compute(*args, **kwargs):
        raise AssertionError("compute started before the input was checked")

    for target in ("lensbench.commands.report.load_model", "lensbench.report.open_run",
                   "lensbench.exits.calibration.as_run", "lensbench.commands.report.open_run"):
        monkeypatch.setattr(target, compute)
    calib = [] if "--no-calib" in options else ["--calib", str(runs["C"])]
    argv = ["report", str(runs["T"]), *calib, *[o for o in options if o != "--no-calib"]]
    capsys.readouterr()
    code = _main_code(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lensbench: error: ") and fragment in lines[0], err


def _main_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def test_logit_answers_warn_nothing_and_write_strict_json(runs, capsys, tmp_path):
    """Exits answered by the logit lens at layer 0 cost nothing (an infinite speedup on some
    resamples): no warning, and report.json stays strict JSON (null, never NaN or Infinity)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report, printed = _report(runs, capsys, "--answer-lens", "logit", "--bootstrap", "300", "--bootstrap-calib")
    text = (runs["T"] / "report.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"report.json holds {name}"))
    assert all("accuracy_ci" in c["test"] for c in report["calibrated"])
    assert "with calibration resampled too" in printed
