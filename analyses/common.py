"""What every figure script shares: reading run folders, pairing a test run with its
calibration run, the run's report (`lensbench.report.build_report`), names, and output.

The scripts never recompute a metric: per-layer numbers come from `summary.json` (or, with
intervals, the report's `per_layer`), Iso-Compute and exit curves from the report, calibrated
thresholds from `lensbench.exits`, and every interval (bands, error bars, `[lo, hi]` in the
tables) from the report (`lensbench.report`, `lensbench.uncertainty`), made with the scripts'
`--bootstrap B --seed S` (the report command's options and defaults; `--bootstrap 0`: none).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import Iterable

from lensbench.errors import LensbenchError
from lensbench.tasks import parse_spec
from lensbench.store import Run, list_runs, open_run

DEFAULT_OUT = "figures"


def note(message: str) -> None:
    """A one-line note on stderr (a skipped curve, a missing run)."""
    print(f"note: {message}", file=sys.stderr)


def argument_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("runs", nargs="+",
                   help="run folders, or folders holding run folders (searched one and two levels deep)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}/)")
    p.add_argument("--formats", default="png,html", help="comma-separated: png, html (default both)")
    p.add_argument("--calib", help="calibration run for the first test run (otherwise found by task name: T@calib beside T@test)")
    return p


def add_interval_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--bootstrap B` and `--seed S`, as `lensbench report` names them: the bootstrap of the
    report whose intervals the figures draw as bands and error bars, and the tables print."""
    from lensbench import uncertainty

    p.add_argument("--bootstrap", type=int, default=uncertainty.DEFAULT_RESAMPLES, metavar="B",
                   help=f"bootstrap resamples of the examples for the {uncertainty.DEFAULT_LEVEL * 100:g} %% intervals "
                        f"(bands, error bars, [lo, hi] in the tables; default {uncertainty.DEFAULT_RESAMPLES}; "
                        "0: none)")
    p.add_argument("--seed", type=int, default=uncertainty.DEFAULT_SEED,
                   help=f"the bootstrap's seed (default {uncertainty.DEFAULT_SEED})")
    return p


def check_intervals(args) -> None:
    """Refuse bootstrap settings that cannot make intervals (one line, before any run is read)."""
    from lensbench import uncertainty

    try:
        uncertainty.check_bootstrap(args.bootstrap, args.seed)
    except LensbenchError as exc:
        raise SystemExit(f"error: {exc}") from None


def bands_of(args) -> bool:
    """Whether the figures carry intervals (`--bootstrap` above 0)."""
    return getattr(args, "bootstrap", 0) > 0


def interval_columns(name: str, interval, scale: float = 1.0, digits: int = 3) -> dict:
    """`{NAME_lo, NAME_hi}` of a report interval for a CSV row (scaled, rounded; empty where the
    report has none or a bound is missing)."""
    lo, hi = interval if interval is not None else (None, None)
    return {f"{name}_lo": None if lo is None else round(lo * scale, digits),
            f"{name}_hi": None if hi is None else round(hi * scale, digits)}


def formats_of(args) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    unknown = set(formats) - {"png", "html"}
    if unknown:
        raise SystemExit(f"unknown format(s) {', '.join(sorted(unknown))} (expected png, html)")
    if "png" in formats:
        from lensbench import figure_files

        if figure_files.find_browser() is None:  # (kaleido would wait forever for one)
            raise SystemExit(f"error: {figure_files.NO_BROWSER} (--formats html)")
    return formats


def collect_runs(paths: Iterable[str | Path], complete_only: bool = True, kind: str = "eval") -> list[Run]:
    """Open the runs named (a folder of runs expands to its runs); incomplete ones are noted and
    skipped, and so are runs of another kind (`eval` runs, or `icl` runs of `lensbench icl`)."""
    runs: list[Run] = []
    for path in paths:
        path = Path(path)
        try:
            found = [open_run(path)]
        except LensbenchError:
            found = list_runs(path)
            if not found:
                note(f"{path} holds no lensbench run; skipped")
        for item in found:
            if isinstance(item, tuple):
                note(f"{item[0]}: {item[1]}; skipped")
                continue
            if item.manifest.get("kind", "eval") != kind:
                continue
            if complete_only and item.status != "complete":
                note(f"run {item.path} is not complete (status: {item.status}); skipped")
                continue
            if all(item.path.resolve() != r.path.resolve() for r in runs):
                runs.append(item)
    return runs


def task_parts(task: str) -> tuple[str, str | None]:
    """`arc-easy@test` -> (`arc-easy`, `test`) (`tasks.parse_spec`'s half)."""
    name, split, part = parse_spec(task)
    return (task.rsplit("@", 1)[0] if part else task), part


def is_calibration_run(run: Run) -> bool:
    return task_parts(run.manifest.get("task", ""))[1] == "calib"


def find_calibration(run: Run, candidates: Iterable[Run] = ()) -> Run | None:
    """The calibration run of a test run: same model (by weights hash) and task `T@calib`,
    among `candidates` or the run folder's siblings; None for a run not of `T@test`."""
    base, part = task_parts(run.manifest.get("task", ""))
    if part != "test":
        return None
    sha = run.manifest.get("model", {}).get("source_sha256")
    pool = list(candidates) + [r for r in list_runs(run.path.parent) if isinstance(r, Run)]
    for other in pool:
        if other.path.resolve() == run.path.resolve() or other.status != "complete":
            continue
        if other.manifest.get("task") == f"{base}@calib" and other.manifest.get("model", {}).get("source_sha256") == sha:
            return other
    return None


def model_name(run: Run) -> str:
    return str(run.manifest.get("model", {}).get("spec", "model"))


def task_name(run: Run) -> str:
    return str(run.manifest.get("task", "task"))


def run_label(run: Run) -> str:
    n = run.manifest.get("n_examples")
    return f"{model_name(run)} · {task_name(run)}" + (f" · {n} examples" if n else "")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def model_short_name(name: str) -> str:
    """A model spec's name for files: a path spec (`dir/model.gguf`) is named by its file; a
    shipped name keeps its dots ("qwen2.5-coder-0.5b" is not a file name with a suffix)."""
    path = Path(name)
    return path.stem if path.suffix in (".gguf", ".bin", ".safetensors") else path.name


def run_slugs(runs: list[Run]) -> dict[Path, str]:
    """A file-name stem per run: `MODEL_TASK`, with the run folder's name added where two collide."""
    base = {r.path: _slug(f"{model_short_name(model_name(r))}_{task_name(r)}") for r in runs}
    counts: dict[str, int] = {}
    for stem in base.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {p: (s if counts[s] == 1 else f"{s}_{_slug(p.name)}") for p, s in base.items()}


def report_of(run: Run, calib: Run | None = None, write: bool = False, bootstrap: int | None = None,
              seed: int | None = None) -> dict:
    """The run's report: `RUN/report.json` when it is current (newer than the predictions,
    calibrated on `calib`, and with intervals from `bootstrap` resamples seeded by `seed` at the
    default level, when `bootstrap` is above 0), else built by `lensbench.report.build_report`
    (in memory; the scripts leave run folders as they are unless `write`: `make_all` writes it
    once). `bootstrap`, `seed`: None for the report command's defaults; with `bootstrap=0` any
    current report will do (the figures then leave its intervals out)."""
    from lensbench import uncertainty
    from lensbench.report import build_report

    bootstrap = uncertainty.DEFAULT_RESAMPLES if bootstrap is None else bootstrap
    seed = uncertainty.DEFAULT_SEED if seed is None else seed
    stored = run.report()
    report_path = run.path / "report.json"
    predictions_path = run.path / "predictions.parquet"
    if stored is not None and report_path.stat().st_mtime >= predictions_path.stat().st_mtime:
        calibrated = stored.get("calibrated") or []
        paired = calib is None or (calibrated and Path(calibrated[0]["calib_run"]).resolve() == calib.path.resolve())
        made = stored.get("bootstrap") or {}
        same_intervals = bootstrap == 0 or (made.get("resamples") == bootstrap and made.get("seed") == seed
                                            and made.get("level") == uncertainty.DEFAULT_LEVEL)
        if paired and same_intervals:
            return stored
    return build_report(run, calib_run=calib, write=write, bootstrap=bootstrap, seed=seed)


def report_for(run: Run, calib: Run | None, args) -> dict:
    """`report_of` with a script's `--bootstrap` / `--seed`."""
    return report_of(run, calib, bootstrap=args.bootstrap, seed=args.seed)


def interval_level(report: dict) -> float | None:
    """The level of the report's intervals (None without them)."""
    return (report.get("bootstrap") or {}).get("level")


def lens_names(run: Run) -> list[str]:
    return list(run.manifest.get("lenses") or run.summary()["lenses"])


def present(wanted: Iterable[str], have: Iterable[str], run: Run, what: str = "curve") -> list[str]:
    """The wanted lenses the run has, noting each one it lacks."""
    have = set(have)
    kept = []
    for name in wanted:
        if name in have:
            kept.append(name)
        else:
            note(f"{run.path}: no '{name}' lens; its {what} is skipped")
    return kept


def exporting(formats: Iterable[str]):
    """One Chromium kept open for all PNGs of a script (a no-op without PNG output)."""
    from contextlib import nullcontext

    from lensbench import figure_files

    return figure_files.static_export() if "png" in formats else nullcontext()


def figure_runs(args) -> tuple[list[Run], dict[Path, str], dict[Path, Run | None]]:
    """The runs to draw (calibration runs that pair with a test run given are left out), their
    file-name stems, and each one's calibration run (None where there is none)."""
    runs = collect_runs(args.runs)
    calib = {r.path: find_calibration(r, runs) for r in runs}
    if getattr(args, "calib", None):
        first = next((r for r in runs if not is_calibration_run(r)), None)
        if first is not None:
            calib[first.path] = open_run(args.calib)
    paired = {c.path.resolve() for c in calib.values() if c is not None}
    runs = [r for r in runs if r.path.resolve() not in paired]
    return runs, run_slugs(runs), {r.path: calib[r.path] for r in runs}


def table_rows(args, row_of, key) -> tuple[list[dict], Path]:
    """The table scripts' common start: one row per test run (`row_of(run, report)`, the report
    with the script's intervals), sorted by `key`, and the output folder (created). With no
    complete run the rows are empty, after a note."""
    runs, _, calib = figure_runs(args)
    rows = sorted((row_of(run, report_for(run, calib[run.path], args)) for run in runs), key=key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        note("no complete runs; no table")
    return rows, out


def finish(written: list[Path]) -> list[Path]:
    for path in written:
        print(path)
    return written


def write_csv(out: str | Path, name: str, rows: list[dict]) -> Path:
    """`rows` (dicts with the same keys) as OUT/NAME, header first."""
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
