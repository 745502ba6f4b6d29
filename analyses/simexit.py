"""Figure 4: SimExit's accuracy–speedup trade-off as the exit threshold sweeps, with the
operating points marked, one figure per (model, task) run.

    python -m analyses.simexit TEST_RUN [CALIB_RUN ...] --out figures/ [--calib CALIB_RUN] [--bootstrap B] [--seed S]

Curves: every exit policy whose lenses the run has (`linear-simlens`: SimExit, `logit`,
`simlens`; the oracle as one point), from the run's report (`exits.operating_curve`).
Operating points: the thresholds that `exits.calibrate` picks on the calibration run (the
`T@calib` run beside a `T@test` run, or `--calib`) for "best accuracy" and "accuracy at most
1 point below the full model", placed where they land on this run. A run without a
calibration run gets in-sample points (chosen and reported on the same examples, marked so).
Each marked point has error bars of its 95 % bootstrap intervals over the test examples, its
threshold fixed (accuracy up and down, speedup left and right): the report's `accuracy_ci` and
`layer_token_speedup_ci` of a calibrated point, `report.exit_point_intervals` (the same
computation, on the report's bootstrap) of an in-sample one; `--bootstrap 0`: none.

Writes `simexit_<stem>.{png,html}` and `simexit_points.csv` (one row per marked point, with its
intervals: `*_lo`, `*_hi`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import common
from lensbench import exits, figure_files, plotting, uncertainty
from lensbench.report import exit_point_intervals

TARGETS = {"best-accuracy": "best accuracy", "max-drop": "≤ 1 point drop"}
POLICY_LABELS = {"linear-simlens": "SimExit (Linear SimLens entropy)", "logit": "logit-lens entropy",
                 "simlens": "SimLens entropy", "oracle": "oracle (headroom)"}


INTERVALS = ("accuracy", "fidelity", "layer_token_speedup", "accuracy_drop")


def operating_points(run, report: dict, policies: list[str], intervals: bool = True) -> list[dict]:
    """Calibrated points from the report when it has them, else in-sample ones; each with its
    `*_ci` intervals (`INTERVALS`) when the report has a bootstrap and `intervals` (else None)."""
    points = []
    calibrated = report.get("calibrated") or []
    boot = report.get("bootstrap") if intervals else None
    frames = resampled = None
    for policy in policies:
        for target, label in TARGETS.items():
            found = [c for c in calibrated if c["policy"] == policy and c["target"] == target]
            if found:
                result = found[0]
                test = result["test"]
                points.append({"policy": policy, "target": target, "how": "calibrated", "calib_run": result["calib_run"],
                               "threshold": result["threshold"], "accuracy": test["accuracy"],
                               "fidelity": test["fidelity"], "layer_token_speedup": test["layer_token_speedup"],
                               "mean_exit_layer": test["mean_exit_layer"], "full_accuracy": test["full_accuracy"],
                               "n_examples": test["n_examples"],
                               **{f"{n}_ci": test.get(f"{n}_ci") if boot else None for n in INTERVALS}})
                continue
            exits_cfg = report.get("exits", {})
            answer_lens, min_layer = exits_cfg.get("answer_lens", "simlens"), exits_cfg.get("min_layer", 0)
            if frames is None:
                frames = run.predictions(), run.examples()
            data = exits.prepare_exits(*frames, policy, answer_lens, min_layer, report.get("map_cost"))
            threshold, metrics = exits.choose_threshold(data, target, max_drop=0.01)
            ci = dict.fromkeys((f"{n}_ci" for n in INTERVALS), None)
            if boot:  # the report's bootstrap, the threshold fixed, as for a calibrated point
                if resampled is None:
                    resampled = uncertainty.run_bootstrap(frames[0], boot["resamples"], boot["seed"], boot["level"])
                ci.update(exit_point_intervals(*frames, policy, threshold, answer_lens, min_layer, report.get("map_cost"),
                                               *resampled))
            points.append({"policy": policy, "target": target, "how": "in-sample", "calib_run": "",
                           "threshold": threshold, "accuracy": metrics["accuracy"], "fidelity": metrics["fidelity"],
                           "layer_token_speedup": metrics["layer_token_speedup"],
                           "mean_exit_layer": metrics["mean_exit_layer"], "full_accuracy": metrics["full_accuracy"],
                           "n_examples": metrics["n_examples"], **ci})
    return points


def figure_for(run, report: dict, mark: list[str] | None = None, intervals: bool = True):
    policies = report.get("exits", {}).get("policies", {})
    for policy in exits.POLICIES:
        if policy not in policies:
            common.note(f"{run.path}: policy '{policy}' needs lenses the run lacks; its curve is skipped")
    if not policies:
        return None, []
    curves = {p: pd.DataFrame(body["curve"]) for p, body in policies.items()}
    if mark is None:
        mark = ["linear-simlens"] if "linear-simlens" in policies else [p for p in policies if p != "oracle"]
    mark = [p for p in mark if p in policies and p != "oracle"]
    points = operating_points(run, report, mark, intervals)
    marked = [{
        "x": p["layer_token_speedup"], "y": p["accuracy"], "policy": p["policy"],
        "x_interval": p["layer_token_speedup_ci"], "y_interval": p["accuracy_ci"],
        "symbol": "star" if p["target"] == "best-accuracy" else "star-triangle-up",
        "label": f"{TARGETS[p['target']]}" + (" (in-sample)" if p["how"] == "in-sample" else "")
                 + ("" if len(mark) == 1 else f", {p['policy']}"),
    } for p in points]
    how = {p["how"] for p in points}
    subtitle = ("operating points calibrated on " + Path(points[0]["calib_run"]).name if how == {"calibrated"}
                else "operating points chosen in-sample (no calibration run)" if how == {"in-sample"} else "")
    title = f"SimExit accuracy–speedup trade-off — {common.run_label(run)}"
    if subtitle:
        title += f"<br><sup>{subtitle}; speedup in layer-token units</sup>"
    if any(p["accuracy_ci"] for p in points):
        title += f"<br><sup>error bars: {plotting.interval_label(common.interval_level(report))}s over the test " \
                 "examples (bootstrap), the threshold fixed</sup>"
    fig = plotting.exit_tradeoff_figure(curves, full_accuracy=report.get("final_accuracy"), operating_points=marked,
                                        title=title, labels=POLICY_LABELS, level=common.interval_level(report))
    return fig, points


def csv_row(point: dict) -> dict:
    """A marked point as `simexit_points.csv` writes it: its intervals as `NAME_lo`, `NAME_hi`."""
    row = {k: v for k, v in point.items() if not k.endswith("_ci")}
    row["threshold"] = "per-layer" if isinstance(point["threshold"], dict) else point["threshold"]
    for name in INTERVALS:
        row.update(common.interval_columns(name, point.get(f"{name}_ci"), digits=6))
    return row


def main(argv: list[str] | None = None) -> list[Path]:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--mark", help="comma-separated policies whose operating points are marked "
                                       "(default: linear-simlens if the run has it, else every policy)")
    args = common.add_interval_options(parser).parse_args(argv)
    formats = common.formats_of(args)
    common.check_intervals(args)
    mark = args.mark.split(",") if args.mark else None
    runs, slugs, calib = common.figure_runs(args)
    written: list[Path] = []
    rows = []
    with common.exporting(formats):
        for run in runs:
            report = common.report_for(run, calib[run.path], args)
            fig, points = figure_for(run, report, mark, common.bands_of(args))
            if fig is None:
                common.note(f"{run.path}: no exit policy applies (it needs SimLens); no figure")
                continue
            written += figure_files.save_figure(fig, args.out, f"simexit_{slugs[run.path]}", formats)
            rows += [{"model": common.model_name(run), "task": common.task_name(run), "run": str(run.path), **csv_row(p)}
                     for p in points]
    if rows:
        written.append(common.write_csv(args.out, "simexit_points.csv", rows))
    return common.finish(written)


if __name__ == "__main__":
    main()
