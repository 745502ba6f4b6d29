"""Table 5: the paper's main table — per model × task, the full model's accuracy, SimLens's
Iso-Compute gain over the logit lens, and SimExit's speedup at best accuracy and at ≤ 1 point
accuracy drop.

    python -m analyses.main_table RUN [RUN ...] --out figures/ [--bootstrap B] [--seed S]

Writes `main_table.md` (Markdown, for docs/results.md), `main_table.csv`, and
`main_table.{png,html}`. SimExit is the `linear-simlens` exit policy; its thresholds are
calibrated on the `T@calib` run beside a `T@test` run (else chosen in-sample, marked `*`).
Speedups are in layer-token units; a measured wall-clock speedup is added where the test run
folder holds `simexit_speed.json` (`lensbench calibrate ... --measure-speed --json`).
Every number but the wall-clock speedup has its 95 % bootstrap interval over the examples after
it, `+7.3 [+2.1, +12.0]` (in the CSV: `*_lo`, `*_hi` columns), from the run's report
(`lensbench report`'s `--bootstrap`/`--seed`; the SimExit points' with their threshold fixed,
as `analyses.simexit` marks them); `--bootstrap 0`: none.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import common
from analyses.simexit import operating_points
from lensbench import figure_files, plotting

SPEED_FILE = "simexit_speed.json"
POLICY = "linear-simlens"


def wall_clock(run) -> dict[str, float]:
    """`{target: wall-clock speedup}` from RUN/simexit_speed.json, if measured."""
    path = run.path / SPEED_FILE
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    results = data if isinstance(data, list) else [data]
    return {r["target"]: r["test"]["wall_clock_speedup"] for r in results
            if r.get("policy") == POLICY and r.get("test", {}).get("wall_clock_speedup")}


def row_for(run, report: dict, intervals: bool = True) -> dict:
    """The table's numbers for one run (percentages and points to one decimal, speedups to two),
    each followed by its interval's `_lo` and `_hi` (empty without intervals)."""
    gain = report.get("iso_compute", {}).get("gains", {}).get("simlens_vs_logit")
    ci = intervals and bool(report.get("bootstrap"))
    row = {
        "model": common.model_name(run),
        "task": common.task_name(run),
        "n_examples": report.get("n_examples"),
        "full_accuracy": round(100 * report["final_accuracy"], 1),
        **common.interval_columns("full_accuracy", report.get("final_accuracy_ci") if ci else None, 100, 1),
        "iso_compute_gain": None if gain is None else round(100 * gain["gain"], 1),
        **common.interval_columns("iso_compute_gain", gain.get("gain_ci") if gain and ci else None, 100, 1),
    }
    for key in ("best", "1pt"):
        row.update({f"speedup_{key}": None, f"speedup_{key}_lo": None, f"speedup_{key}_hi": None,
                    f"accuracy_{key}": None, f"accuracy_{key}_lo": None, f"accuracy_{key}_hi": None})
    row.update({"wall_clock_best": None, "wall_clock_1pt": None, "calibration": "", "run": str(run.path),
                "interval_level": common.interval_level(report) if ci else None})
    if gain is None:
        common.note(f"{run.path}: no Iso-Compute gain (needs the logit lens and SimLens)")
    if POLICY not in report.get("exits", {}).get("policies", {}):
        common.note(f"{run.path}: no Linear SimLens lens; SimExit columns left empty")
        row["calibration"] = "no Linear SimLens"
        return row
    points = {p["target"]: p for p in operating_points(run, report, [POLICY], ci)}
    for target, key in (("best-accuracy", "best"), ("max-drop", "1pt")):
        p = points[target]
        row[f"speedup_{key}"] = round(p["layer_token_speedup"], 2)
        row.update(common.interval_columns(f"speedup_{key}", p["layer_token_speedup_ci"], 1, 2))
        row[f"accuracy_{key}"] = round(100 * p["accuracy"], 1)
        row.update(common.interval_columns(f"accuracy_{key}", p["accuracy_ci"], 100, 1))
    how = {p["how"] for p in points.values()}
    row["calibration"] = (f"calibrated on {Path(points['best-accuracy']['calib_run']).name}" if how == {"calibrated"}
                          else "in-sample")
    measured = wall_clock(run)
    row["wall_clock_best"] = measured.get("best-accuracy")
    row["wall_clock_1pt"] = measured.get("max-drop")
    return row


def _fmt(value, pattern: str, empty: str = "—") -> str:
    return empty if value is None or (isinstance(value, float) and pd.isna(value)) else pattern.format(value)


def _with_interval(row: dict, name: str, pattern: str, unit: str = "") -> str:
    """`61.2 [56.0, 66.1]`: a row's number (and `unit`) and its interval (`NAME_lo`, `NAME_hi`)
    in `pattern`; a missing bound (an infinite speedup's) as `–`; the number alone without an
    interval."""
    if row[name] is None:
        return _fmt(None, pattern)
    text = _fmt(row[name], pattern) + unit
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    if lo is None and hi is None:
        return text
    return f"{text} [{_fmt(lo, pattern, '–')}, {_fmt(hi, pattern, '–')}]"


def display_frame(rows: list[dict]) -> pd.DataFrame:
    """The table as the paper shows it (strings), from the numeric rows."""
    out = []
    for r in rows:
        star = "*" if r["calibration"] == "in-sample" else ""
        def speed(key):
            s = _with_interval(r, f"speedup_{key}", "{:.2f}", "×")
            if r[f"speedup_{key}"] is not None:
                s += f"{star} ({_with_interval(r, f'accuracy_{key}', '{:.1f}', '%')})"
                if r[f"wall_clock_{key}"]:
                    s += f", wall-clock {r[f'wall_clock_{key}']:.2f}×"
            return s
        out.append({
            "model": r["model"], "task": r["task"], "n": r["n_examples"],
            "full acc. (%)": _with_interval(r, "full_accuracy", "{:.1f}"),
            "SimLens Iso-Compute gain (pts)": _with_interval(r, "iso_compute_gain", "{:+.1f}"),
            "SimExit speedup @ best acc. (acc.)": speed("best"),
            "SimExit speedup @ ≤1 pt drop (acc.)": speed("1pt"),
            "run": Path(r["run"]).name,
        })
    return pd.DataFrame(out)


def to_markdown(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Path]:
    args = common.add_interval_options(common.argument_parser(__doc__.splitlines()[0])).parse_args(argv)
    formats = common.formats_of(args)
    common.check_intervals(args)
    intervals = common.bands_of(args)
    rows, out = common.table_rows(args, lambda run, report: row_for(run, report, intervals),
                                  key=lambda r: (r["model"], r["task"]))
    written: list[Path] = []
    if not rows:
        return common.finish(written)
    written.append(common.write_csv(out, "main_table.csv", rows))
    frame = display_frame(rows)
    notes = ("Speedups in layer-token units (wall-clock where measured). * thresholds chosen in-sample "
             "(no calibration run). Accuracy at the operating point in parentheses.")
    level = next((r["interval_level"] for r in rows if r["interval_level"]), None)
    if level:
        notes += (f" [lo, hi]: {plotting.interval_label(level)}s, bootstrap over the examples ({args.bootstrap} "
                  f"resamples, seed {args.seed}); the SimExit points' with their threshold fixed.")
    (out / "main_table.md").write_text(to_markdown(frame) + "\n" + notes + "\n")
    written.append(out / "main_table.md")
    with common.exporting(formats):
        fig = plotting.table_figure(frame, title=f"Main table<br><sup>{notes}</sup>")
        written += figure_files.save_figure(fig, out, "main_table", formats)
    return common.finish(written)


if __name__ == "__main__":
    main()
