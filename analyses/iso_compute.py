"""Figure 2: Iso-Compute accuracy curves with the average gain of SimLens over the logit lens.

    python -m analyses.iso_compute RUN [RUN ...] --out figures/ [--bootstrap B] [--seed S]

Writes `iso_compute_<stem>.{png,html}` per run (curves of every lens the report has, each with
a shaded step band of its 95 % bootstrap interval per budget, and the gain with its interval in
the subtitle) and `iso_compute_gains.csv` (one row per run: gain in points and its interval,
budget range, example count). Curves, gains and intervals come from the run's report
(`lensbench.report`, which calls `lensbench.compute.iso_compute_curve` / `iso_compute_gain` and
`lensbench.uncertainty`); `--bootstrap 0`: no intervals.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import common
from lensbench import figure_files, plotting

ORDER = ("logit", "simlens", "linear-simlens", "tuned")


def figure_for(run, report: dict, bands: bool = True):
    iso = report.get("iso_compute", {})
    curves = iso.get("curves", {})
    names = common.present(("logit", "simlens"), curves, run, "Iso-Compute curve")
    names += [n for n in ORDER[2:] if n in curves]
    if not names:
        return None, None
    frames = {n: pd.DataFrame(curves[n]) for n in names}
    gain = iso.get("gains", {}).get("simlens_vs_logit")
    if gain is None:
        common.note(f"{run.path}: the gain needs both the logit lens and SimLens; no gain shown")
    full_cost = gain["full_cost"] if gain else None
    unit = iso.get("unit", "layer-token")
    bands_ci = iso.get("curves_ci", {}) if bands else {}
    fig = plotting.iso_compute_figure(
        frames, full_cost=full_cost, final_accuracy=report.get("final_accuracy"),
        gain=gain["gain"] if gain else None, title=f"Iso-Compute accuracy — {common.run_label(run)}",
        intervals={n: bands_ci[n] for n in names if n in bands_ci},
        gain_interval=gain.get("gain_ci") if gain and bands else None, level=common.interval_level(report))
    if unit != "layer-token":
        fig.update_xaxes(title_text=f"compute budget ({unit})")
    return fig, gain


def main(argv: list[str] | None = None) -> list[Path]:
    args = common.add_interval_options(common.argument_parser(__doc__.splitlines()[0])).parse_args(argv)
    formats = common.formats_of(args)
    common.check_intervals(args)
    bands = common.bands_of(args)
    runs, slugs, calib = common.figure_runs(args)
    written: list[Path] = []
    rows = []
    with common.exporting(formats):
        for run in runs:
            report = common.report_for(run, calib[run.path], args)
            fig, gain = figure_for(run, report, bands)
            if fig is None:
                common.note(f"{run.path}: no Iso-Compute curves; no figure")
                continue
            written += figure_files.save_figure(fig, args.out, f"iso_compute_{slugs[run.path]}", formats)
            if gain is not None:
                rows.append({
                    "model": common.model_name(run), "task": common.task_name(run), "run": str(run.path),
                    "n_examples": gain.get("n_examples", report.get("n_examples")),
                    "gain_points": round(100 * gain["gain"], 2),
                    **common.interval_columns("gain_points", gain.get("gain_ci") if bands else None, 100, 2),
                    "unit": gain.get("unit"),
                    "n_budgets": len(gain["budgets"]), "relative_budget_from": round(gain["relative_budgets"][0], 4),
                    "relative_budget_to": round(gain["relative_budgets"][-1], 4),
                })
    if rows:
        written.append(common.write_csv(args.out, "iso_compute_gains.csv", rows))
    return common.finish(written)


if __name__ == "__main__":
    main()
