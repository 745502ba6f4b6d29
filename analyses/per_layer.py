"""Figure 1: per-layer accuracy and fidelity of the logit lens, SimLens, Linear SimLens and the
tuned-lens-style baseline, one figure per (model, task) run.

    python -m analyses.per_layer RUN [RUN ...] --out figures/ [--bootstrap B] [--seed S]

Writes `per_layer_<model>_<task>.{png,html}`. A lens the run lacks is skipped with a note.
Each line has a shaded band, in its colour, of its 95 % bootstrap interval over the examples:
the run's report's `accuracy_ci` / `fidelity_ci` (`lensbench report`'s `--bootstrap` and
`--seed`, default 1000 resamples, seed 0); `--bootstrap 0` draws the lines alone (from
`summary.json`, no report needed).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python analyses/per_layer.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import common
from lensbench import figure_files, plotting

LENSES = ("logit", "simlens", "linear-simlens", "tuned")


def figure_for(run, report: dict | None = None):
    """The figure of one run: with `report` (`common.report_of`), its `per_layer` with the
    intervals as bands; without, `summary.json`'s lines alone."""
    if report is not None:
        per_layer, final, level = report["per_layer"], report.get("final_accuracy"), common.interval_level(report)
    else:
        summary = run.summary()
        per_layer, final, level = summary["lenses"], summary.get("final_accuracy"), None
    names = common.present(LENSES, per_layer, run)
    if not names:
        return None
    title = f"Per-layer accuracy and fidelity — {common.run_label(run)}"
    if level is not None and any(f"accuracy_ci" in per_layer[n] for n in names):
        title += f"<br><sup>shaded: {plotting.interval_label(level)}s, bootstrap over the examples</sup>"
    return plotting.per_layer_figure(per_layer, names, final_accuracy=final, bands=report is not None, level=level,
                                     title=title)


def main(argv: list[str] | None = None) -> list[Path]:
    args = common.add_interval_options(common.argument_parser(__doc__.splitlines()[0])).parse_args(argv)
    formats = common.formats_of(args)
    common.check_intervals(args)
    runs, slugs, calib = common.figure_runs(args)
    written: list[Path] = []
    with common.exporting(formats):
        for run in runs:
            fig = figure_for(run, common.report_for(run, calib[run.path], args) if common.bands_of(args) else None)
            if fig is None:
                common.note(f"{run.path}: none of {', '.join(LENSES)}; no figure")
                continue
            written += figure_files.save_figure(fig, args.out, f"per_layer_{slugs[run.path]}", formats)
    return common.finish(written)


if __name__ == "__main__":
    main()
