"""Figure 4: SimExit's accuracy–speedup trade-off as the exit threshold sweeps, with the
operating points marked, one figure per (model, task) run.

    python -m analyses.simexit TEST_RUN [CALIB_RUN ...] --out figures/ [--calib CALIB_RUN]

Curves: every exit policy whose lenses the run has (`linear-simlens`: SimExit, `logit`,
`simlens`; the oracle as one point), from the run's report (`exits.operating_curve`).
Operating points: the thresholds that `exits.calibrate` picks on the calibration run (the
`T@calib` run beside a `T@test` run, or `--calib`) for "best accuracy" and "accuracy at most
1 point below the full model", placed where they land on this run. A run without a
calibration run gets in-sample points (chosen and reported on the same examples, marked so).

Writes `simexit_<stem>.{png,html}` and `simexit_points.csv` (one row per marked point).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import common
from lensbench import exits, figure_files, plotting

TARGETS = {"best-accuracy": "best accuracy", "max-drop": "≤ 1 point drop"}
POLICY_LABELS = {"linear-simlens": "SimExit (Linear SimLens entropy)", "logit": "logit-lens entropy",
                 "simlens": "SimLens entropy", "oracle": "oracle (headroom)"}


def operating_points(run, report: dict, policies: list[str]) -> list[dict]:
    """Calibrated points from the report when it has them, else in-sample ones."""
    points = []
    calibrated = report.get("calibrated") or []
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
                               "n_examples": test["n_examples"]})
                continue
            exits_cfg = report.get("exits", {})
            data = exits.prepare_exits(run.predictions(), run.examples(), policy, exits_cfg.get("answer_lens", "simlens"),
                                       exits_cfg.get("min_layer", 0), report.get("map_cost"))
            threshold, metrics = exits.choose_threshold(data, target, max_drop=0.01)
            points.append({"policy": policy, "target": target, "how": "in-sample", "calib_run": "",
                           "threshold": threshold, "accuracy": metrics["accuracy"], "fidelity": metrics["fidelity"],
                           "layer_token_speedup": metrics["layer_token_speedup"],
                           "mean_exit_layer": metrics["mean_exit_layer"], "full_accuracy": metrics["full_accuracy"],
                           "n_examples": metrics["n_examples"]})
    return points


def figure_for(run, report: dict, mark: list[str] | None = None):
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
    points = operating_points(run, report, mark)
    marked = [{
        "x": p["layer_token_speedup"], "y": p["accuracy"], "policy": p["policy"],
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
    fig = plotting.exit_tradeoff_figure(curves, full_accuracy=report.get("final_accuracy"), operating_points=marked,
                                        title=title, labels=POLICY_LABELS)
    return fig, points


def main(argv: list[str] | None = None) -> list[Path]:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--mark", help="comma-separated policies whose operating points are marked "
                                       "(default: linear-simlens if the run has it, else every policy)")
    args = parser.parse_args(argv)
    formats = common.formats_of(args)
    mark = args.mark.split(",") if args.mark else None
    runs, slugs, calib = common.figure_runs(args)
    written: list[Path] = []
    rows = []
    with common.exporting(formats):
        for run in runs:
            report = common.report_of(run, calib[run.path])
            fig, points = figure_for(run, report, mark)
            if fig is None:
                common.note(f"{run.path}: no exit policy applies (it needs SimLens); no figure")
                continue
            written += figure_files.save_figure(fig, args.out, f"simexit_{slugs[run.path]}", formats)
            rows += [{"model": common.model_name(run), "task": common.task_name(run), "run": str(run.path), **p,
                      "threshold": "per-layer" if isinstance(p["threshold"], dict) else p["threshold"]} for p in points]
    if rows:
        written.append(common.write_csv(args.out, "simexit_points.csv", rows))
    return common.finish(written)


if __name__ == "__main__":
    main()
