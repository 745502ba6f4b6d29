"""Confidence intervals in the figures and tables of `analyses/` (issue 16), on the tiny real run
(`small_run`, 12 examples) and a calibration/test pair copied from it.

Each figure is read back from the HTML the script wrote, and its bands and error bars are
compared with the intervals of the report that `lensbench.report.build_report` makes for the
same run (default bootstrap: 1000 resamples, seed 0): a band that is missing, or computed
another way, fails. `--bootstrap 0` leaves them all out.
"""

from __future__ import annotations

import base64
import csv
import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lensbench import plotting  # noqa: E402
from lensbench.report import build_report, exit_point_intervals  # noqa: E402
from lensbench.store import open_run  # noqa: E402
from lensbench import uncertainty  # noqa: E402

STEM = "smollm2-135m_capitals"
PAIR = "smollm2-135m_capitals-test"  # the test run of `pair`
METRIC_AXES = {"accuracy": "x", "fidelity": "x2"}  # per_layer_figure: one panel per metric


def run_script(name: str, runs: list[Path], out: Path, *options: str) -> list[Path]:
    module = importlib.import_module(f"analyses.{name}")
    return module.main([*map(str, runs), "--out", str(out), "--formats", "html", *options])


def values(v):
    """A plotly JSON array (a list, or a typed array `{"dtype", "bdata"}`) as a list."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).tolist()
    return v


def html_figure(path: Path) -> dict:
    """`{"data": [...], "layout": {...}}` of the figure a script wrote as HTML."""
    text = path.read_text()
    decoder = json.JSONDecoder()
    i = text.index("Plotly.newPlot(") + len("Plotly.newPlot(")

    def next_value(i):
        while text[i] in " \n\t,":
            i += 1
        return decoder.raw_decode(text, i)

    _, i = next_value(i)  # the div's id
    data, i = next_value(i)
    layout, _ = next_value(i)
    return {"data": data, "layout": layout}


def bands(figure: dict) -> list[dict]:
    return [t for t in figure["data"] if " interval, " in t.get("name", "")]


def band(figure: dict, label: str, bound: str, axis: str = "x") -> list:
    name = plotting.band_name(label, bound, 0.95)
    found = [t for t in figure["data"] if t.get("name") == name and t.get("xaxis", "x") == axis]
    assert len(found) == 1, f"no single band trace {name!r} on {axis}"
    return [np.nan if v is None else v for v in values(found[0]["y"])]


def bounds(intervals, side: int) -> list:
    return [np.nan if pair[side] is None else pair[side] for pair in intervals]


@pytest.fixture(scope="module")
def report(small_run):
    """The library's report of the run (default bootstrap), built in memory."""
    return build_report(small_run, write=False)


@pytest.fixture(scope="module")
def pair(small_run, tmp_path_factory):
    """A calibration run and a test run (copies of the small run as capitals@calib / @test; the
    calibration copy's example ids renamed, as calibration needs disjoint examples)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("pair")
    for part in ("calib", "test"):
        shutil.copytree(small_run, root / part, ignore=shutil.ignore_patterns("report.json", "parts"))
        manifest = json.loads((root / part / "manifest.json").read_text())
        manifest["task"] = f"capitals@{part}"
        (root / part / "manifest.json").write_text(json.dumps(manifest))
    for name in ("examples.parquet", "predictions.parquet"):
        table = pq.read_table(root / "calib" / name)
        column = table.schema.get_field_index("example_id")
        renamed = pa.array([f"calib-{x}" for x in table["example_id"].to_pylist()], pa.string())
        pq.write_table(table.set_column(column, "example_id", renamed), root / "calib" / name)
    return root


def test_per_layer_bands_are_the_reports_intervals(small_run, report, tmp_path):
    run_script("per_layer", [small_run], tmp_path)
    figure = html_figure(tmp_path / f"per_layer_{STEM}.html")
    for lens in ("logit", "simlens"):
        label = plotting.lens_label(lens)
        for metric, axis in METRIC_AXES.items():
            intervals = report["per_layer"][lens][f"{metric}_ci"]
            assert np.allclose(band(figure, label, "lower", axis), bounds(intervals, 0), equal_nan=True)
            assert np.allclose(band(figure, label, "upper", axis), bounds(intervals, 1), equal_nan=True)
    upper = [t for t in bands(figure) if t["name"].endswith("upper bound")]
    assert upper and all(t["fill"] == "tonexty" and t["showlegend"] is False for t in upper)
    # the legend: one entry per lens, none for the bands
    assert sorted(t["name"] for t in figure["data"] if t.get("showlegend", True)) == ["SimLens", "logit lens"]


def test_roles_ablation_bands(small_run, report, tmp_path):
    run_script("roles", [small_run], tmp_path)
    figure = html_figure(tmp_path / f"roles_ablations_{STEM}.html")
    lens = "simlens[drop-s]"
    intervals = report["per_layer"][lens]["accuracy_ci"]
    assert np.allclose(band(figure, plotting.lens_label(lens), "upper"), bounds(intervals, 1), equal_nan=True)


def test_iso_compute_bands_and_gain_interval(small_run, report, tmp_path):
    run_script("iso_compute", [small_run], tmp_path)
    figure = html_figure(tmp_path / f"iso_compute_{STEM}.html")
    iso = report["iso_compute"]
    for lens in ("logit", "simlens"):  # the script draws these (and Linear SimLens, the tuned lens: not in this run)
        intervals, label = iso["curves_ci"][lens], plotting.lens_label(lens)
        assert np.allclose(band(figure, label, "lower"), bounds(intervals, 0), equal_nan=True)
        assert np.allclose(band(figure, label, "upper"), bounds(intervals, 1), equal_nan=True)
    lo, hi = iso["gains"]["simlens_vs_logit"]["gain_ci"]
    assert f"[{lo * 100:+.1f}, {hi * 100:+.1f}] points" in figure["layout"]["title"]["text"]
    rows = list(csv.DictReader((tmp_path / "iso_compute_gains.csv").open()))
    assert float(rows[0]["gain_points_lo"]) == pytest.approx(lo * 100, abs=0.006)
    assert float(rows[0]["gain_points_hi"]) == pytest.approx(hi * 100, abs=0.006)


def test_simexit_error_bars_are_the_calibrated_points_intervals(pair, tmp_path):
    """A calibrated pair: the marked points' error bars are the report's test-run intervals."""
    run_script("simexit", [pair], tmp_path)
    figure = html_figure(tmp_path / f"simexit_{PAIR}.html")
    report = build_report(pair / "test", pair / "calib", write=False)
    marked = [t for t in figure["data"] if t.get("marker", {}).get("symbol") in ("star", "star-triangle-up")]
    assert len(marked) == 4  # no Linear SimLens: the logit and SimLens policies, two targets each
    for trace in marked:
        policy = trace["legendgroup"]
        target = "best-accuracy" if trace["marker"]["symbol"] == "star" else "max-drop"
        test = next(c["test"] for c in report["calibrated"] if c["policy"] == policy and c["target"] == target)
        y = values(trace["y"])[0]
        assert y == pytest.approx(test["accuracy"])
        lo, hi = test["accuracy_ci"]
        error = trace["error_y"]
        assert y + values(error["array"])[0] == pytest.approx(hi) and y - values(error["arrayminus"])[0] == pytest.approx(lo)
        x = values(trace["x"])[0]
        lo, hi = test["layer_token_speedup_ci"]
        if hi is not None and "error_x" in trace:
            assert x + values(trace["error_x"]["array"])[0] == pytest.approx(hi)
            assert x - values(trace["error_x"]["arrayminus"])[0] == pytest.approx(lo)
    rows = list(csv.DictReader((tmp_path / "simexit_points.csv").open()))
    assert {r["how"] for r in rows} == {"calibrated"}
    for row in rows:
        test = next(c["test"] for c in report["calibrated"]
                    if c["policy"] == row["policy"] and c["target"] == row["target"])
        assert float(row["accuracy_drop_lo"]) == pytest.approx(test["accuracy_drop_ci"][0], abs=1e-6)


def test_in_sample_points_get_the_threshold_fixed_intervals(small_run, tmp_path):
    """Without a calibration run, the in-sample points' intervals are the library's for their
    threshold (`report.exit_point_intervals`, on the report's bootstrap)."""
    run_script("simexit", [small_run], tmp_path)
    rows = list(csv.DictReader((tmp_path / "simexit_points.csv").open()))
    run = open_run(small_run)
    predictions, examples = run.predictions(), run.examples()
    boot, order = uncertainty.run_bootstrap(predictions)
    for row in rows:
        assert row["how"] == "in-sample"
        expected = exit_point_intervals(predictions, examples, row["policy"], float(row["threshold"]), "simlens", 0,
                                        None, boot, order)
        for name in ("accuracy", "layer_token_speedup", "accuracy_drop"):
            lo, hi = expected[f"{name}_ci"]
            assert float(row[f"{name}_lo"]) == pytest.approx(lo, abs=1e-6), name
            assert float(row[f"{name}_hi"]) == pytest.approx(hi, abs=1e-6), name


def test_main_table_carries_the_intervals(pair, tmp_path):
    run_script("main_table", [pair], tmp_path)
    report = build_report(pair / "test", pair / "calib", write=False)
    table = (tmp_path / "main_table.md").read_text()
    lo, hi = report["final_accuracy_ci"]
    assert f"{report['final_accuracy'] * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}]" in table
    gain = report["iso_compute"]["gains"]["simlens_vs_logit"]
    lo, hi = gain["gain_ci"]
    assert f"{gain['gain'] * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]" in table
    assert "95 % intervals, bootstrap over the examples (1000 resamples, seed 0)" in table
    row = next(csv.DictReader((tmp_path / "main_table.csv").open()))
    assert float(row["full_accuracy_lo"]) == pytest.approx(round(report["final_accuracy_ci"][0] * 100, 1))
    assert float(row["iso_compute_gain_hi"]) == pytest.approx(round(hi * 100, 1))


def test_bootstrap_0_leaves_the_intervals_out(pair, tmp_path):
    for script in ("per_layer", "iso_compute", "simexit", "roles"):
        run_script(script, [pair], tmp_path, "--bootstrap", "0")
    for name in ("per_layer", "iso_compute", "simexit", "roles_ablations"):
        figure = html_figure(tmp_path / f"{name}_{PAIR}.html")
        assert not bands(figure), name
        assert not any("error_x" in t or "error_y" in t for t in figure["data"]), name
        assert "interval" not in json.dumps(figure["layout"].get("title", "")), name
    assert figure["data"], "the figures still have their curves"
    run_script("main_table", [pair], tmp_path, "--bootstrap", "0")
    table = (tmp_path / "main_table.md").read_text()
    assert "[" not in table.split("\n\n")[0] and "interval" not in table
    row = next(csv.DictReader((tmp_path / "main_table.csv").open()))
    assert row["full_accuracy"] and row["full_accuracy_lo"] == "" and row["speedup_best_hi"] == ""


def test_seed_changes_the_bands(small_run, report, tmp_path):
    run_script("per_layer", [small_run], tmp_path, "--seed", "3")
    seeded = build_report(small_run, write=False, seed=3)["per_layer"]["simlens"]["accuracy_ci"]
    assert not np.allclose(bounds(seeded, 1), bounds(report["per_layer"]["simlens"]["accuracy_ci"], 1))
    figure = html_figure(tmp_path / f"per_layer_{STEM}.html")
    assert np.allclose(band(figure, "SimLens", "upper"), bounds(seeded, 1), equal_nan=True)


@pytest.mark.parametrize("options, message", [(["--bootstrap", "1"], "--bootstrap must be 0"),
                                              (["--seed", "-1"], "--seed must be an integer >= 0")])
def test_bad_bootstrap_settings_are_one_line_errors(small_run, tmp_path, options, message):
    with pytest.raises(SystemExit) as raised:
        run_script("per_layer", [small_run], tmp_path, *options)
    text = str(raised.value)
    assert message in text and "\n" not in text
    assert not tmp_path.joinpath(f"per_layer_{STEM}.html").exists()
