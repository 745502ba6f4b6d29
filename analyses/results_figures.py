"""Every figure and table of docs/results.md, regenerated from the runs stored under `results/`:
`make figures` runs this.

    python -m analyses.results_figures                 # all of docs/figures (PNG), bands from the reports
    python -m analyses.results_figures --only sizes,icl --bootstrap 200
    python -m analyses.results_figures --dry-run       # the script calls, nothing drawn

`JOBS` below says which stored runs each figure of docs/results.md is drawn from (the page's
sections name the same runs). Each job runs one `analyses/` script in this process, so the
figures are exactly what `python -m analyses.SCRIPT RUNS --out docs/figures --formats png`
writes. A test run's intervals come from its stored `report.json` when that is current
(calibrated on the calibration run beside it, same `--bootstrap`/`--seed`), else the report is
built in memory; `--write-reports` stores the rebuilt ones in the run folders (the only write
into `results/`). A glob that matches no run is an error: the page would cite a figure that is
not drawn. Nothing is evaluated here; `analyses.make_all` makes new runs.

The PNGs are stored as 256-colour palette images (`compact_png`: about a quarter of the bytes
of the full-colour export; the lines, bands and text are unchanged to the eye, a continuous
colour bar shows steps): every file of the repository travels with each call to a GPU machine,
under a size limit. `--lossless` keeps the full-colour files.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
PER_RUN = ("per_layer", "iso_compute", "simexit", "main_table", "roles")


@dataclass(frozen=True)
class Job:
    name: str  # what --only selects
    scripts: tuple[str, ...]  # modules of analyses/, run in order
    runs: tuple[str, ...]  # globs relative to the repository root
    out: str = ""  # a subfolder of --out


H200 = "results/h200-qwen2.5-coder-0.5b"
CPU05 = "results/cpu-qwen2.5-coder-0.5b"
CPU15 = "results/cpu-qwen2.5-coder-1.5b"

JOBS: tuple[Job, ...] = (
    # The main table and figures 1-4 of qwen2.5-coder-0.5b: ARC-Easy and BoolQ on the H200,
    # ARC-Challenge and MedMCQA on the CPU (docs/results.md, top sections).
    Job("qwen05", PER_RUN, (f"{H200}/*-arc-easy-test-test", f"{H200}/*-boolq-test",
                            f"{CPU05}/*-arc-challenge-test-test", f"{CPU05}/*-medmcqa-test")),
    # The [s]/[a] role runs (ablations and attention on the H200).
    Job("roles", ("roles",), (f"{H200}/*-roles",)),
    # qwen2.5-coder-1.5b on ARC-Easy, ARC-Challenge, BoolQ and MedMCQA (CPU).
    Job("qwen15", PER_RUN, (f"{CPU15}/*-arc-easy-test-test", f"{CPU15}/*-arc-challenge-test", f"{CPU15}/*-boolq-test",
                            f"{CPU15}/*-medmcqa-test"), out="qwen2.5-coder-1.5b"),
    # qwen2.5-coder-1.5b ARC-Easy and BoolQ with the tuned-lens baseline (candidate KL): logit, SimLens, tuned.
    Job("qwen15-tuned", ("per_layer", "iso_compute"), (f"{CPU15}/*-arc-easy-test-tuned-test", f"{CPU15}/*-boolq-test-tuned-test"),
        out="qwen2.5-coder-1.5b-tuned"),
    # Across model sizes: every shipped model's ARC-Easy test run, and the other tasks stored.
    Job("sizes", ("sizes",), ("results/cpu-sizes", f"{H200}/*-arc-easy-test-test", f"{CPU15}/*-arc-easy-test-test",
                              f"{CPU05}/*-arc-challenge-test-test", f"{CPU15}/*-arc-challenge-test")),
    # In-context learning (runs of `lensbench icl`).
    Job("icl", ("icl",), ("results/cpu-icl",)),
)


def resolve(patterns: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """The folders the globs match (sorted, relative to `root`); every glob must match one."""
    found: list[str] = []
    for pattern in patterns:
        hits = sorted(str(Path(p).relative_to(root)) for p in glob.glob(str(root / pattern)) if Path(p).is_dir())
        if not hits:
            raise SystemExit(f"results_figures: no stored run matches {pattern} (under {root})")
        found += [h for h in hits if h not in found]
    return found


def calls(args) -> list[tuple[str, list[str]]]:
    """(script, argv) per script call, in order."""
    wanted = None if not args.only else {n.strip() for n in args.only.split(",") if n.strip()}
    names = {job.name for job in JOBS}
    if wanted is not None and wanted - names:
        raise SystemExit(f"results_figures: unknown job(s) {', '.join(sorted(wanted - names))} "
                         f"(expected some of {', '.join(sorted(names))})")
    out: list[tuple[str, list[str]]] = []
    for job in JOBS:
        if wanted is not None and job.name not in wanted:
            continue
        runs = resolve(job.runs, args.root)
        folder = str(Path(args.out) / job.out) if job.out else str(args.out)
        for script in job.scripts:
            argv = [str(args.root / r) for r in runs] + ["--out", folder, "--formats", args.formats]
            if script != "icl":  # the ICL script draws Wilson intervals of its own
                argv += ["--bootstrap", str(args.bootstrap), "--seed", str(args.seed)]
            out.append((script, argv))
    return out


def write_reports(args, todo: list[tuple[str, list[str]]]) -> None:
    """Store each drawn test run's report (with the intervals asked for) where it is not current."""
    from analyses import common

    seen: set[Path] = set()
    for script, argv in todo:
        if script == "icl":
            continue
        folders = argv[: argv.index("--out")]
        runs, _, calib = common.figure_runs(argparse.Namespace(runs=folders))
        for run in runs:
            if run.path in seen:
                continue
            seen.add(run.path)
            common.report_of(run, calib[run.path], write=True, bootstrap=args.bootstrap, seed=args.seed)


def compact_png(path: Path, colors: int = 256) -> int:
    """Rewrite the PNG at `path` as an optimised palette image of at most `colors` colours
    (median cut, no dithering); returns the bytes saved."""
    from PIL import Image

    before = path.stat().st_size
    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                                dither=Image.Dither.NONE)
    palette.save(path, "PNG", optimize=True)
    return before - path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "figures"), help="figures folder (default docs/figures)")
    p.add_argument("--formats", default="png", help="png, html (default png, as in docs/)")
    p.add_argument("--only", default="", help=f"comma-separated jobs ({', '.join(j.name for j in JOBS)}; default all)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="resamples for the 95%% intervals (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-reports", action="store_true", help="store rebuilt reports in the run folders")
    p.add_argument("--lossless", action="store_true", help="keep full-colour PNGs (default: 256-colour palettes)")
    p.add_argument("--dry-run", action="store_true", help="print the script calls, draw nothing")
    p.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bootstrap < 0:
        raise SystemExit("results_figures: --bootstrap must be >= 0")
    if not args.dry_run:
        from analyses import common

        common.formats_of(args)  # a bad format, or PNGs without a browser: one line before any work
    todo = calls(args)
    for script, script_argv in todo:
        shown = " ".join(a if not a.startswith(str(args.root)) else str(Path(a).relative_to(args.root)) or "."
                         for a in script_argv)
        print(f"$ python -m analyses.{script} {shown}", flush=True)
    if args.dry_run:
        return 0
    if args.write_reports and args.bootstrap:
        write_reports(args, todo)
    for script, script_argv in todo:
        started = time.perf_counter()
        print(f"== analyses.{script}", flush=True)
        written = importlib.import_module(f"analyses.{script}").main(script_argv) or []
        saved = 0 if args.lossless else sum(compact_png(Path(w)) for w in written if str(w).endswith(".png"))
        print(f"   {time.perf_counter() - started:.1f} s" + (f", PNGs {saved / 1e6:.1f} MB smaller as palettes" if saved else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
