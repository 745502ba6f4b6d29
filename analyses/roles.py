"""Figure 3: the role analyses of SimLens's two slots, per (model, task) run.

    python -m analyses.roles RUN [RUN ...] --out figures/ [--point LAYER] [--bootstrap B] [--seed S]

Writes, where the run has what each needs:
- `roles_ablations_<stem>`: accuracy and fidelity per layer of SimLens under each `[s]`/`[a]`
  ablation of the run (`simlens[...]` lenses), next to SimLens and the logit lens, each line
  with a shaded band of its 95 % bootstrap interval (the report's, as in `analyses.per_layer`;
  `--bootstrap 0`: none);
- `roles_swap_<stem>`: per layer, how often a swapped slot's decision follows the donor versus
  stays with the recipient (`summary.json`'s `swap`, from `metrics.swap_rates`);
- `roles_attention_<stem>`: mean attention `[a]`→`[s]` per readout point × continuation block
  (averaged over heads), and `roles_attention_heads_<stem>`: per block × head at one readout
  point (`--point`, default the middle layer).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import common
from lensbench import figure_files, plotting


def figures_for(run, point: int | None = None, report: dict | None = None) -> dict:
    """`{name: figure}` for one run; what the run lacks is noted and left out. With `report`
    (`common.report_of`), the ablation curves are its `per_layer`, with their intervals as bands."""
    summary = run.summary()
    label = common.run_label(run)
    figures = {}
    per_layer = report["per_layer"] if report is not None else summary["lenses"]
    ablations = plotting.ablation_lenses(per_layer)
    if ablations:
        refs = common.present(("simlens", "logit"), per_layer, run, "reference curve")
        figures["roles_ablations"] = plotting.ablation_figure(
            per_layer, ablations, refs, final_accuracy=summary.get("final_accuracy"),
            title=f"SimLens slot ablations — {label}", bands=report is not None,
            level=common.interval_level(report) if report is not None else None)
    else:
        common.note(f"{run.path}: no SimLens ablations (--ablations drop-s,drop-a,...); no ablation figure")
    if summary.get("swap"):
        figures["roles_swap"] = plotting.swap_figure(summary["swap"], title=f"Swap follow-rates — {label}")
    else:
        common.note(f"{run.path}: no swap ablation (e.g. --ablations a=swap); no follow-rate figure")
    attention = run.attention()
    if attention is not None:
        mean, points = attention
        layers = [int(p) for p in points]
        chosen = point if point is not None else layers[len(layers) // 2]
        figures["roles_attention"] = plotting.attention_heatmap(
            mean, points, title=f"Attention [a]→[s] per readout point and block (mean over heads) — {label}")
        if chosen in layers:
            figures["roles_attention_heads"] = plotting.attention_heatmap(
                mean, points, point=chosen, title=f"Attention [a]→[s] per block and head at readout layer {chosen} — {label}")
        else:
            common.note(f"{run.path}: readout layer {chosen} is not stored (0..{max(layers)}); no per-head figure")
    else:
        common.note(f"{run.path}: no attention.safetensors (a run with SimLens writes it); no attention figure")
    return figures


def main(argv: list[str] | None = None) -> list[Path]:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--point", type=int, help="readout layer of the per-head attention figure (default: the middle)")
    args = common.add_interval_options(parser).parse_args(argv)
    formats = common.formats_of(args)
    common.check_intervals(args)
    runs, slugs, calib = common.figure_runs(args)
    written: list[Path] = []
    with common.exporting(formats):
        for run in runs:
            has_ablations = plotting.ablation_lenses(run.summary()["lenses"])
            report = common.report_for(run, calib[run.path], args) if common.bands_of(args) and has_ablations else None
            for name, fig in figures_for(run, args.point, report).items():
                written += figure_files.save_figure(fig, args.out, f"{name}_{slugs[run.path]}", formats)
    return common.finish(written)


if __name__ == "__main__":
    main()
