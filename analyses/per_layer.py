"""Figure 1: per-layer accuracy and fidelity of the logit lens, SimLens, Linear SimLens and the
tuned-lens-style baseline, one figure per (model, task) run.

    python -m analyses.per_layer RUN [RUN ...] --out figures/

Writes `per_layer_<model>_<task>.{png,html}`. A lens the run lacks is skipped with a note.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python analyses/per_layer.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import common
from lensbench import figure_files, plotting

LENSES = ("logit", "simlens", "linear-simlens", "tuned")


def figure_for(run):
    summary = run.summary()
    names = common.present(LENSES, summary["lenses"], run)
    if not names:
        return None
    return plotting.per_layer_figure(
        summary["lenses"], names, final_accuracy=summary.get("final_accuracy"),
        title=f"Per-layer accuracy and fidelity — {common.run_label(run)}",
    )


def main(argv: list[str] | None = None) -> list[Path]:
    args = common.argument_parser(__doc__.splitlines()[0]).parse_args(argv)
    formats = common.formats_of(args)
    runs, slugs, _ = common.figure_runs(args)
    written: list[Path] = []
    with common.exporting(formats):
        for run in runs:
            fig = figure_for(run)
            if fig is None:
                common.note(f"{run.path}: none of {', '.join(LENSES)}; no figure")
                continue
            written += figure_files.save_figure(fig, args.out, f"per_layer_{slugs[run.path]}", formats)
    return common.finish(written)


if __name__ == "__main__":
    main()
