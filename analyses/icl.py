"""Figure 6: in-context learning, global vs local task vectors (runs of `lensbench icl`).

    python -m analyses.icl RUN_OR_FOLDER [...] --out figures/

Per model: `icl_accuracy_<model>` (one panel per task: few-shot / zero-shot / uninformative
readouts by layer, global and local patching by patch layer, Wilson 95% bands) and
`icl_table_<model>.{md,csv}` (few-shot, zero-shot, best global and local layer and accuracy,
the paired local - global difference, convergence at the last layer). Per run:
`icl_convergence_*`, `icl_attention_*`, `icl_decode_*`. Eval runs among the folders are ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import common
from lensbench import figure_files
from lensbench.icl import plotting as icl_plotting


def _ci(p: dict) -> str:
    return f"{p['accuracy']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}]"


def table_rows(runs) -> list[dict]:
    rows = []
    for run in runs:
        s = run.summary()
        best = s.get("best", {})
        conv = s["convergence"]
        diff = s.get("local_minus_global")
        last = -2 if len(conv["layer"]) > 1 else -1  # the last point before the output (point L is the output itself)
        rows.append({
            "task": s["task"], "kind": s["task_kind"], "queries": s["n_queries"], "chance": f"{s['chance']:.2f}",
            "few-shot": _ci(s["few-shot_accuracy"]), "zero-shot": _ci(s["zero-shot_accuracy"]),
            "uninformative": _ci(s["baseline_accuracy"]),
            "global best": f"{_ci(best['global'])} @ {best['global']['layer']}" if "global" in best else "",
            "local best": f"{_ci(best['local'])} @ {best['local']['layer']}" if "local" in best else "",
            "local - global": f"{diff['difference']:+.2f} [{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}]" if diff else "",
            f"within cos @ {conv['layer'][last]}": f"{conv['within']['mean'][last]:.2f}",
            f"to-last cos @ {conv['layer'][last]}": f"{conv['to_final']['mean'][last]:.2f}",
            f"within cos (centred) @ {conv['layer'][last]}": f"{conv['within_c']['mean'][last]:.2f}",
            f"to-last cos (centred) @ {conv['layer'][last]}": f"{conv['to_final_c']['mean'][last]:.2f}",
        })
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Path]:
    args = common.argument_parser(__doc__.splitlines()[0]).parse_args(argv)
    formats = common.formats_of(args)
    runs = common.collect_runs(args.runs, kind="icl")
    if not runs:
        common.note("no complete ICL run among the folders given; no ICL figure")
        return []
    by_model: dict[str, list] = {}
    for run in runs:
        by_model.setdefault(common.model_name(run), []).append(run)
    written: list[Path] = []
    out = Path(args.out)
    with common.exporting(formats):
        for model, model_runs in by_model.items():
            kind_rank = {"rule": 0, "categorization": 1}
            model_runs.sort(key=lambda r: (kind_rank.get(r.manifest.get("task_info", {}).get("kind"), 2), r.manifest["task"]))
            slug = common._slug(Path(model).name)
            summaries = {r.manifest["task"]: r.summary() for r in model_runs}
            fig = icl_plotting.accuracy_grid(summaries, title=f"ICL accuracy by layer — {model}")
            written += figure_files.save_figure(fig, out, f"icl_accuracy_{slug}", formats)
            rows = table_rows(model_runs)
            written.append(common.write_csv(out, f"icl_table_{slug}.csv", rows))
            md = out / f"icl_table_{slug}.md"
            md.write_text(markdown(rows))
            written.append(md)
            for run in model_runs:
                s = summaries[run.manifest["task"]]
                stem = f"{slug}_{common._slug(run.manifest['task'])}"
                label = f"{model} · {run.manifest['task']}"
                written += figure_files.save_figure(icl_plotting.convergence_figure(s, title=f"Local-vector convergence — {label}"),
                                                    out, f"icl_convergence_{stem}", formats)
                written += figure_files.save_figure(icl_plotting.attention_figure(s, title=f"Attention from the last position — {label}"),
                                                    out, f"icl_attention_{stem}", formats)
                written += figure_files.save_figure(icl_plotting.decode_figure(s, title=f"Decoded local vectors — {label}"),
                                                    out, f"icl_decode_{stem}", formats)
    return common.finish(written)


if __name__ == "__main__":
    main()
