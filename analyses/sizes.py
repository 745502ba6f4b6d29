"""Table 7 and figure: how SimLens's lead over the logit lens changes with model size.

    python -m analyses.sizes RUN [RUN ...] --out figures/ [--bootstrap B --seed S]

For every test run (model × task; its `T@calib` run beside it is found as for the other
scripts) it takes from the run's report (`lensbench.report.build_report`, bootstrap intervals
included):

- **depth to 90 %**: per lens, the first readout layer, as a fraction of the model's depth, at
  which the lens's accuracy reaches 90 % of the full model's accuracy; and the first layer
  from which it *stays* there (robust to an early crossing by noise near chance);
- SimLens's **Iso-Compute gain** over the logit lens, with its interval;
- SimExit's layer-token **speedup at ≤ 1 point drop** (the `max-drop` operating point of the
  Linear SimLens policy, calibrated on the calibration run), its test accuracy and intervals.

Writes `sizes_table.{md,csv}` and `sizes.{png,html}` (depth to 90 % per lens against the
number of parameters, and the Iso-Compute gain with its interval). A row whose full model is
within its interval of chance is marked: its depths mean little.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import common
from analyses.simexit import operating_points
from lensbench import figure_files, plotting

LENSES = ("logit", "simlens", "linear-simlens", "tuned")
POLICY = "linear-simlens"
FRACTION = 0.9
# Parameter counts of the shipped models (their model cards); other models are placed by
# n_layers * d_model^2 * 12, the usual estimate of a decoder's non-embedding parameters.
PARAMETERS = {
    "smollm2-135m": 135e6, "gemma-3-270m": 268e6, "qwen2.5-coder-0.5b": 494e6, "qwen2.5-coder-1.5b": 1.54e9,
}


def parameters(run) -> float:
    model = run.manifest.get("model", {})
    spec = model.get("spec", common.model_name(run))
    if spec in PARAMETERS:
        return PARAMETERS[spec]
    return 12.0 * model.get("n_layers", 0) * model.get("d_model", 0) ** 2


def chance(run) -> float | None:
    """Mean over examples of 1 / number of candidates."""
    examples = run.examples()
    if examples is None or examples.empty or "choices" not in examples:
        return None
    return float((1.0 / examples["choices"].map(len)).mean())


def depth_to(accuracy: list[float], target: float, n_layers: int) -> tuple[float | None, float | None]:
    """(first layer reaching `target`, first layer from which every later one does), as
    fractions of `n_layers`; None where the lens never gets there."""
    reached = [a >= target - 1e-12 for a in accuracy]
    first = next((i for i, ok in enumerate(reached) if ok), None)
    stays = None
    for i in range(len(reached) - 1, -1, -1):
        if not reached[i]:
            break
        stays = i
    as_depth = (lambda i: None if i is None else i / n_layers)
    return as_depth(first), as_depth(stays)


def task_family(name: str) -> str:
    """`arc-easy:test@test` and `arc-easy@test` are both ARC-Easy: the task without split or half."""
    return name.split("@")[0].split(":")[0]


def row_for(run, report: dict) -> dict:
    n_layers = int(report["n_layers"])
    full = float(report["final_accuracy"])
    full_ci = report.get("final_accuracy_ci")
    row = {
        "model": common.model_name(run), "task": task_family(common.task_name(run)), "parameters": parameters(run),
        "n_layers": n_layers, "n_examples": report.get("n_examples"),
        "full_accuracy": full, "full_accuracy_lo": full_ci[0] if full_ci else None,
        "full_accuracy_hi": full_ci[1] if full_ci else None, "chance": chance(run),
    }
    per_layer = report.get("per_layer", {})
    for lens in LENSES:
        first = stays = None
        if lens in per_layer:
            first, stays = depth_to(per_layer[lens]["accuracy"], FRACTION * full, n_layers)
        row[f"depth90_{lens}"] = first
        row[f"depth90_stays_{lens}"] = stays
    gain = report.get("iso_compute", {}).get("gains", {}).get("simlens_vs_logit")
    row["iso_gain"] = gain["gain"] if gain else None
    row["iso_gain_lo"], row["iso_gain_hi"] = (gain.get("gain_ci") or (None, None)) if gain else (None, None)
    for key in ("speedup_1pt", "speedup_1pt_lo", "speedup_1pt_hi", "accuracy_1pt", "accuracy_1pt_lo",
                "accuracy_1pt_hi", "calibration"):
        row[key] = None
    if POLICY in report.get("exits", {}).get("policies", {}):
        point = next(p for p in operating_points(run, report, [POLICY]) if p["target"] == "max-drop")
        row["speedup_1pt"], row["accuracy_1pt"] = point["layer_token_speedup"], point["accuracy"]
        row["calibration"] = point["how"]
        test = next((c["test"] for c in report.get("calibrated") or []
                     if c["policy"] == POLICY and c["target"] == "max-drop"), {})
        row["speedup_1pt_lo"], row["speedup_1pt_hi"] = test.get("layer_token_speedup_ci") or (None, None)
        row["accuracy_1pt_lo"], row["accuracy_1pt_hi"] = test.get("accuracy_ci") or (None, None)
    else:
        common.note(f"{run.path}: no Linear SimLens lens; no SimExit operating point")
    row["near_chance"] = bool(row["chance"] is not None and row["full_accuracy_lo"] is not None
                              and row["full_accuracy_lo"] <= row["chance"])
    row["run"] = str(run.path)
    return row


def _pct(v) -> str:
    return "—" if v is None or pd.isna(v) else f"{v:.2f}"


def _interval(v, lo, hi, scale: float = 100.0, fmt: str = "{:+.1f}") -> str:
    if v is None or pd.isna(v):
        return "—"
    text = fmt.format(scale * v)
    if lo is not None and hi is not None and not (pd.isna(lo) or pd.isna(hi)):
        text += f" [{fmt.format(scale * lo)}, {fmt.format(scale * hi)}]"
    return text


def display_frame(rows: list[dict]) -> pd.DataFrame:
    out = []
    for r in rows:
        out.append({
            "model": r["model"] + (" (near chance)" if r["near_chance"] else ""),
            "task": r["task"], "n": r["n_examples"],
            "full acc. (%)": _interval(r["full_accuracy"], r["full_accuracy_lo"], r["full_accuracy_hi"], fmt="{:.1f}"),
            "depth to 90 %: logit / SimLens": f"{_pct(r['depth90_logit'])} / {_pct(r['depth90_simlens'])}",
            "stays from: logit / SimLens": f"{_pct(r['depth90_stays_logit'])} / {_pct(r['depth90_stays_simlens'])}",
            "Iso-Compute gain (pts)": _interval(r["iso_gain"], r["iso_gain_lo"], r["iso_gain_hi"]),
            "SimExit @ ≤1 pt: speedup": _interval(r["speedup_1pt"], r["speedup_1pt_lo"], r["speedup_1pt_hi"],
                                                  scale=1.0, fmt="{:.2f}×"),
            "acc. (%)": _interval(r["accuracy_1pt"], r["accuracy_1pt_lo"], r["accuracy_1pt_hi"], fmt="{:.1f}"),
        })
    return pd.DataFrame(out)


def figure(rows: list[dict]):
    from plotly.subplots import make_subplots

    import plotly.graph_objects as go

    tasks = sorted({r["task"] for r in rows})
    fig = make_subplots(rows=1, cols=2, subplot_titles=("first depth at 90 % of the full model's accuracy",
                                                        "SimLens's Iso-Compute gain over the logit lens"))
    dashes = ["solid", "dot", "dash", "dashdot", "longdash"]
    for t_index, task in enumerate(tasks):
        these = sorted((r for r in rows if r["task"] == task), key=lambda r: r["parameters"])
        x = [r["parameters"] for r in these]
        names = [r["model"] for r in these]
        for lens in ("logit", "simlens"):
            fig.add_trace(go.Scatter(
                x=x, y=[r[f"depth90_{lens}"] for r in these], mode="lines+markers", text=names,
                name=f"{plotting.lens_label(lens)}, {task}", marker_symbol=plotting.run_symbol(t_index),
                line=dict(color=plotting.lens_color(lens), dash=dashes[t_index % len(dashes)])), row=1, col=1)
        gains = [None if r["iso_gain"] is None else 100 * r["iso_gain"] for r in these]
        up = [None if r["iso_gain_hi"] is None else 100 * (r["iso_gain_hi"] - r["iso_gain"]) for r in these]
        down = [None if r["iso_gain_lo"] is None else 100 * (r["iso_gain"] - r["iso_gain_lo"]) for r in these]
        fig.add_trace(go.Scatter(
            x=x, y=gains, mode="lines+markers", text=names, name=f"gain, {task}",
            marker_symbol=plotting.run_symbol(t_index), line=dict(color=plotting.lens_color("simlens"),
                                                                  dash=dashes[t_index % len(dashes)]),
            error_y=dict(type="data", symmetric=False, array=up, arrayminus=down)), row=1, col=2)
    fig.add_hline(y=0, line=dict(color="grey", width=1), row=1, col=2)
    fig.update_xaxes(type="log", title_text="parameters")
    fig.update_yaxes(title_text="relative depth", range=[0, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="points (95 % interval)", row=1, col=2)
    return plotting.layout(fig, "SimLens against the logit lens across model sizes", height=460, width=1100)


def main(argv: list[str] | None = None) -> list[Path]:
    args = common.add_interval_options(common.argument_parser(__doc__.splitlines()[0])).parse_args(argv)
    formats = common.formats_of(args)
    common.check_intervals(args)
    rows, out = common.table_rows(args, row_for, key=lambda r: (r["task"], r["parameters"]))
    written: list[Path] = []
    if not rows:
        return common.finish(written)
    written.append(common.write_csv(out, "sizes_table.csv", rows))
    frame = display_frame(rows)
    from analyses.main_table import to_markdown

    notes = (f"Depth: readout layer / number of layers at which the lens first reaches {FRACTION:.0%} of the "
             "full model's accuracy (\"stays from\": from which every later layer does). Intervals: 95 % "
             "bootstrap over test examples. Speedups in layer-token units, thresholds calibrated on the "
             "calibration half.")
    (out / "sizes_table.md").write_text(to_markdown(frame) + "\n" + notes + "\n")
    written.append(out / "sizes_table.md")
    with common.exporting(formats):
        written += figure_files.save_figure(figure(rows), out, "sizes", formats)
    return common.finish(written)


if __name__ == "__main__":
    main()
