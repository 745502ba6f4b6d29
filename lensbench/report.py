"""`lensbench report RUN`: the tables of a run, printed and written to `RUN/report.json`.

The report holds, for the app and the analyses (which read it rather than recompute it):

- `per_layer`: accuracy and fidelity of every lens at every readout point (`metrics.per_layer`);
- `iso_compute`: Iso-Compute curves per lens and the gain of SimLens over the logit lens
  (`compute.iso_compute_gain`), in layer-token units (FLOPs with `--flops`);
- `exits`: per policy whose lenses the run has, the operating curve over global thresholds
  (`exits.operating_curve`) and its Pareto front; the oracle's point;
- `calibrated` (with `--calib CALIB_RUN`): for each policy and the three targets, the threshold
  chosen on the calibration run and its results on this (test) run (`exits.calibrate`);
- with `bootstrap=B` (B > 0; the command's default 1000): percentile intervals over resampled
  examples (`lensbench.uncertainty`) next to those numbers, and `bootstrap`, how they were made.

The command is `lensbench.commands.report`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lensbench import compute, exits, metrics, uncertainty
from lensbench.errors import LensbenchError
from lensbench.store import Run, as_run, atomic_write_json, open_run

REPORT_FILE = "report.json"
REPORT_VERSION = 1


def _clean(value):
    """JSON-safe: numpy scalars to Python, NaN and infinities to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if not math.isfinite(value) else value
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def pareto_front(curve: pd.DataFrame) -> pd.DataFrame:
    """Operating points not beaten in both accuracy and cost by another, cheapest first."""
    ordered = curve.sort_values(["mean_cost", "accuracy"], ascending=[True, False], kind="stable")
    best, keep = -np.inf, []
    for idx, row in ordered.iterrows():
        if row["accuracy"] > best + 1e-12:
            keep.append(idx)
            best = row["accuracy"]
    return ordered.loc[keep]


def check_report_options(n_budgets: int, epsilon: float, max_drop: float, answer_lens: str | None) -> None:
    """Refuse report options that cannot make a report, before any run is read."""
    if n_budgets < 2:
        raise LensbenchError(f"--n-budgets must be at least 2: the grid runs from the cheapest point to the full model "
                             f"(got {n_budgets})")
    exits.check_targets(epsilon, max_drop)
    if answer_lens is not None and answer_lens not in exits.ANSWER_LENSES:
        raise LensbenchError(f"unknown answer lens '{answer_lens}' (expected one of {', '.join(exits.ANSWER_LENSES)})")


def build_report(run_path, calib_run=None, *, n_budgets: int = 50, unit: str = "layer-token",
                 dims: compute.ModelDims | None = None, answer_lens: str | None = None, min_layer: int = 0,
                 epsilon: float = 0.01, max_drop: float = 0.01, per_layer: bool = False, write: bool = True,
                 bootstrap: int = uncertainty.DEFAULT_RESAMPLES, seed: int = uncertainty.DEFAULT_SEED,
                 level: float = uncertainty.DEFAULT_LEVEL, bootstrap_calibration: bool = False) -> dict:
    """The report of a run (also written to `RUN/report.json` unless `write=False`).

    calib_run: a calibration run (disjoint examples) to add calibrated exit thresholds;
    unit: layer-token or flop (then `dims`, the model's shape, is needed); answer_lens: the
    exits' answer lens, refused if the run lacks it (None: SimLens, the exits left out of a run
    without it); bootstrap: resamples of the run's examples for the `*_ci` intervals at `level`
    (0: none, the report without them), seeded by `seed` (METHOD.md, "Uncertainty");
    bootstrap_calibration: also resample the calibration run and choose each calibrated
    threshold again per resample (`calib_and_test_ci`; global thresholds only).
    """
    check_report_options(n_budgets, epsilon, max_drop, answer_lens)
    uncertainty.check_bootstrap(bootstrap, seed, level)
    run = run_path if isinstance(run_path, Run) else open_run(run_path)
    if run.status != "complete":
        raise LensbenchError(f"run {run.path} is not complete (status: {run.status}); finish it first")
    predictions = run.predictions(columns=["example_index", "lens", "layer", "site", "decision", "gold", "correct",
                                           "final_decision", "agrees_final", "entropy"])
    examples = run.examples()
    lenses = list(dict.fromkeys(run.manifest.get("lenses") or predictions["lens"].unique()))
    if answer_lens is not None and answer_lens not in lenses:
        raise LensbenchError(f"--answer-lens {answer_lens}: run {run.path} has no {answer_lens} lens "
                             f"(it has {', '.join(lenses)})")
    answer_lens = answer_lens or "simlens"
    map_cost = exits.run_map_cost(run)
    if map_cost is None and dims is not None:
        map_cost = dims.map_cost
    final_layer = int(predictions["layer"].max())
    finals = metrics.final_rows(predictions)
    report: dict = {
        "report_version": REPORT_VERSION,
        "run": str(run.path),
        "model": run.manifest.get("model", {}).get("spec"),
        "task": run.manifest.get("task"),
        "n_examples": int(predictions["example_index"].nunique()),
        "n_layers": final_layer,
        "lenses": lenses,
        "final_accuracy": float((finals["final_decision"] == finals["gold"]).mean()),
        "per_layer": metrics.per_layer(predictions),
        "map_cost": map_cost if map_cost is not None else compute.DEFAULT_MAP_COST,
        "map_cost_source": "linear lens config" if exits.run_map_cost(run) is not None else
                           ("model dims" if map_cost is not None else "default (1/12)"),
    }

    tables = compute.iso_compute_tables(predictions, examples, lenses, map_cost=map_cost, n_budgets=n_budgets,
                                        unit=unit, dims=dims)
    report["iso_compute"] = {"unit": unit, "curves": {lens: curve.to_dict(orient="list") for lens, curve in tables["curves"].items()},
                             "gains": tables["gains"]}
    boot = order = None
    if bootstrap:
        boot, order = uncertainty.run_bootstrap(predictions, bootstrap, seed, level)
        _add_intervals(report, predictions, boot, order)

    policies: dict = {}
    for policy, record in exits.POLICIES.items():
        needed = {answer_lens} | ({record.confidence_lens} if record.confidence_lens else set())
        if not needed <= set(lenses):
            continue
        data = exits.prepare_exits(predictions, examples, policy, answer_lens, min_layer, map_cost)
        curve = exits.curve_of(data)
        policies[policy] = {
            "curve": curve.to_dict(orient="list"),
            "pareto": pareto_front(curve).to_dict(orient="records"),
        }
    report["exits"] = {"answer_lens": answer_lens, "min_layer": min_layer, "policies": policies}

    if calib_run is not None:
        calibrated = []
        for policy in policies:
            oracle = exits.POLICIES[policy].confidence_lens is None
            grid = None
            for target in exits.TARGETS if not oracle else ["best-accuracy"]:
                result = exits.calibrate(calib_run, run, policy, target, answer_lens, min_layer, per_layer=per_layer,
                                         epsilon=epsilon, max_drop=max_drop, map_cost=map_cost)
                if boot is not None:
                    _add_exit_intervals(result, predictions, examples, boot, order)
                    if bootstrap_calibration and not oracle and not per_layer:
                        if grid is None:
                            grid, calib_boot = _threshold_grid(calib_run, predictions, examples, result, boot, order)
                        result["calib_and_test_ci"] = uncertainty.calibration_intervals(
                            grid, target, calib_boot, boot, epsilon, max_drop)
                calibrated.append(result)
        report["calibrated"] = calibrated
    report = _clean(report)
    if write:
        atomic_write_json(run.path / REPORT_FILE, report)
    return report


def _add_intervals(report: dict, predictions: pd.DataFrame, boot, order) -> None:
    """The bootstrap intervals of the per-layer table and the Iso-Compute numbers, in place."""
    samples = uncertainty.resample_per_layer(predictions, boot)
    report["bootstrap"] = boot.describe()
    report["final_accuracy_ci"] = uncertainty.mean_interval(uncertainty.final_correct(predictions, order), boot)
    for lens, intervals in uncertainty.per_layer_intervals(samples, report["per_layer"], boot).items():
        report["per_layer"][lens].update(intervals)
    iso = report["iso_compute"]
    iso["curves_ci"] = {lens: uncertainty.layers_interval(samples, lens, curve["layer"], boot)
                        for lens, curve in iso["curves"].items()}
    for gain in iso["gains"].values():
        gain["gain_ci"] = uncertainty.gain_interval(samples, gain, boot)


def exit_point_intervals(predictions: pd.DataFrame, examples: pd.DataFrame, policy: str, threshold, answer_lens: str,
                         min_layer: int, map_cost: float | None, boot, order) -> dict:
    """An exit operating point's intervals on a run, its threshold fixed: the run's examples
    resampled (`boot`, `order`: `uncertainty.run_bootstrap`), the threshold replayed on them
    (`exits.simulate_exits`). `{"accuracy_ci", "fidelity_ci", "layer_token_speedup_ci",
    "accuracy_drop_ci"}` (`uncertainty.exit_intervals`), as the report gives a calibrated point."""
    sim = exits.simulate_exits(predictions, examples, policy, threshold, answer_lens, min_layer, map_cost=map_cost)
    return uncertainty.exit_intervals(sim, boot, order, uncertainty.final_correct(predictions, order))


def _add_exit_intervals(result: dict, predictions: pd.DataFrame, examples: pd.DataFrame, boot, order) -> None:
    """A calibrated point's test-run intervals (its threshold fixed), in place."""
    test = result["test"]
    test["accuracy_drop"] = test["full_accuracy"] - test["accuracy"]
    test.update(exit_point_intervals(predictions, examples, result["policy"], exits.parse_threshold(result["threshold"]),
                                     result["answer_lens"], result["min_layer"], result["map_cost"], boot, order))


def _points(interval) -> str:
    """` [lo, hi]` of a fraction's interval in points (empty without one)."""
    if interval is None:
        return ""
    lo, hi = ("-" if x is None else f"{x * 100:+.2f}" for x in interval)
    return f" [{lo}, {hi}]"


def _threshold_grid(calib_run, predictions: pd.DataFrame, examples: pd.DataFrame, result: dict, boot, order):
    """A policy's replays over the calibration grid on both runs, and the calibration run's
    bootstrap (its own stream of resamples, independent of the test run's)."""
    calib = as_run(calib_run)
    args = (result["policy"], result["answer_lens"], result["min_layer"], result["map_cost"])
    calib_data = exits.prepare_exits(calib.predictions(), calib.examples(), *args)
    grid = uncertainty.threshold_grid(calib_data, exits.prepare_exits(predictions, examples, *args), order)
    calib_boot = uncertainty.Bootstrap(len(calib_data.example_index), boot.resamples, boot.seed, boot.level, stream=1)
    return grid, calib_boot


def format_report(report: dict, max_rows: int = 8, intervals: bool = False) -> str:
    """The report's tables as text; `intervals`: the per-layer table with its intervals too
    (the others show theirs whenever the report has them)."""
    boot = report.get("bootstrap")
    final = metrics.with_interval(report["final_accuracy"], report.get("final_accuracy_ci"))
    lines = [f"run {report['run']}: {report['model']} on {report['task']}, {report['n_examples']} examples, "
             f"final accuracy {final}", ""]
    if boot:
        lines[-1:] = [f"[lo, hi]: {boot['level'] * 100:g} % bootstrap percentile intervals over the examples "
                      f"({boot['resamples']} resamples, seed {boot['seed']}; METHOD.md, \"Uncertainty\")", ""]
    lines.append(metrics.format_per_layer(report["per_layer"], report["lenses"], intervals=intervals))
    if boot and not intervals:
        lines.append("(per-layer intervals: in report.json, or printed with --ci)")
    gains = report["iso_compute"]["gains"]
    lines.append("")
    for baseline, name in compute.GAIN_BASELINES.items():
        if f"simlens_vs_{baseline}" in gains:
            g = gains[f"simlens_vs_{baseline}"]
            lines.append(f"Iso-Compute gain of SimLens over {name} ({g['unit']}): {g['gain'] * 100:+.2f}"
                         f"{_points(g.get('gain_ci'))} points, "
                         f"mean over {len(g['budgets'])} budgets from {g['relative_budgets'][0]:.3f} to 1.0 of the full model")
    if "simlens_vs_logit" not in gains:
        lines.append("Iso-Compute gain: needs both the logit lens and SimLens in the run")
    policies = report["exits"]["policies"]
    if policies:
        lines.append("")
        lines.append(f"exit operating points (answer: {report['exits']['answer_lens']}, min layer {report['exits']['min_layer']}; "
                     "Pareto front, cheapest first)")
        lines.append(f"{'policy':<15} {'threshold':>10} {'accuracy':>9} {'fidelity':>9} {'mean exit':>9} {'speedup':>8}")
        for policy, body in policies.items():
            front = body["pareto"]
            step = max(1, math.ceil(len(front) / max_rows))
            shown = front[::step] + ([front[-1]] if (len(front) - 1) % step else [])
            for row in shown:
                thr = "-" if row["threshold"] is None else f"{row['threshold']:.4g}"
                lines.append(f"{policy:<15} {thr:>10} {row['accuracy']:>9.3f} {row['fidelity']:>9.3f} "
                             f"{row['mean_exit_layer']:>9.2f} {exits.format_speedup(row['layer_token_speedup']):>7}x")
    if report.get("calibrated"):
        lines.append("")
        lines.append("calibrated on " + report["calibrated"][0]["calib_run"] + ", reported on this run")
        for result in report["calibrated"]:
            lines.append(exits.format_calibration(result))
            if "accuracy_ci" in result["test"]:
                lines.append("    " + _test_intervals(result["test"]))
            if "calib_and_test_ci" in result:
                lines.append("    " + _calib_and_test_intervals(result["calib_and_test_ci"]))
    return "\n".join(lines)


def _bounds(interval, fmt=".3f") -> str:
    return "[" + ", ".join("-" if x is None else format(x, fmt) for x in interval) + "]"


def _calib_and_test_intervals(both: dict) -> str:
    """The intervals with the calibration resampled too (`--bootstrap-calib`)."""
    speed = "[" + ", ".join(exits.format_speedup(x) for x in both["layer_token_speedup"]) + "]"
    return (f"with calibration resampled too: acc {_bounds(both['accuracy'])} | fid {_bounds(both['fidelity'])} | "
            f"x{speed} layer-token | drop{_points(both['accuracy_drop'])} points | "
            f"threshold {_bounds(both['threshold'], '.4g')}")


def _test_intervals(test: dict) -> str:
    """A calibrated point's test numbers with their intervals (the threshold fixed)."""
    speed_text = f"x{exits.format_speedup(test['layer_token_speedup'])} [" + ", ".join(
        exits.format_speedup(x) for x in test["layer_token_speedup_ci"]) + "]"
    drop = test.get("accuracy_drop")
    drop_text = "" if drop is None else f" | drop {drop * 100:+.2f}{_points(test.get('accuracy_drop_ci'))} points"
    return (f"test acc {metrics.with_interval(test['accuracy'], test['accuracy_ci'])} | "
            f"fid {metrics.with_interval(test['fidelity'], test['fidelity_ci'])} | {speed_text} layer-token" + drop_text)
