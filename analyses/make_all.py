"""Regenerate every figure and table from scratch, making the runs: `make figures-runs` runs this.

For each configured (model, task) it makes what is missing, and reuses what exists:

1. Linear SimLens and the tuned-lens baseline, fitted on `TASK@calib`
   (`lensbench fit-linear`, `--target simlens` / `--target final`);
2. a calibration run on `TASK@calib` (logit, SimLens, Linear SimLens, tuned) for SimExit's
   thresholds;
3. a test run on `TASK@test` (the same lenses and the `[s]`/`[a]` ablations), which every figure
   is drawn from;
4. the test run's report (`lensbench report TEST --calib CALIB --bootstrap B --seed S`,
   written to TEST/report.json; its intervals are the figures' bands and error bars);
5. with `--measure-speed`, SimExit's wall-clock speedup at the calibrated thresholds
   (`lensbench calibrate ... --measure-speed`, written to TEST/simexit_speed.json);

then it runs every script in `analyses/` over the test runs (and any `--include`d runs).
A complete run is reused; an interrupted one is resumed by the same command; a complete run
made with other options is kept (with a note) unless `--refresh`.

    python -m analyses.make_all                               # the CPU default (smollm2-135m)
    python -m analyses.make_all --models qwen2.5-coder-0.5b --limit 500 --device cuda
    python -m analyses.make_all --skip-eval --include runs/qwen05-arc-easy-logit   # figures only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import common

DEFAULT_MODELS = ("smollm2-135m",)
DEFAULT_TASKS = ("arc-easy", "arc-challenge", "boolq", "medmcqa")
DEFAULT_LIMIT = 50
DEFAULT_ABLATIONS = "drop-s,drop-a,a=swap"
INSTALL_KEYS = {"gemma-3-270m": "gemma", "qwen2.5-coder-0.5b": "qwen05", "qwen2.5-coder-1.5b": "qwen15"}
SCRIPTS = ("per_layer", "iso_compute", "roles", "simexit", "main_table", "sizes", "icl")
INTERVAL_SCRIPTS = ("per_layer", "iso_compute", "roles", "simexit", "main_table", "sizes")  # take --bootstrap / --seed


@dataclass
class Pair:
    """The folders of one (model, task)."""

    model: str
    task: str
    root: Path

    @property
    def slug(self) -> str:
        return common._slug(common.model_short_name(self.model))

    @property
    def calib(self) -> Path:
        return self.root / self.slug / f"{self.task}-calib"

    @property
    def test(self) -> Path:
        return self.root / self.slug / f"{self.task}-test"

    def lens_dir(self, kind: str) -> Path:
        return self.root / self.slug / "lenses" / f"{self.task}-{kind}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run the evaluations the figures need (when missing), then every analysis script.")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated model specs (default {','.join(DEFAULT_MODELS)}; qwen2.5-coder-0.5b needs "
                        "`bash scripts/install-models.sh qwen05`)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated tasks (default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"examples per half (calib and test each; default {DEFAULT_LIMIT}, CPU-feasible)")
    p.add_argument("--fit-limit", type=int, help="examples to fit the linear lenses on (default: --limit)")
    p.add_argument("--fit-steps", type=int, help="Adam steps per layer for the linear lenses (lensbench's default if unset)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", default="8", help="examples per batch, or auto (default 8)")
    p.add_argument("--ablations", default=DEFAULT_ABLATIONS, help=f"SimLens ablations of the test runs (default {DEFAULT_ABLATIONS})")
    p.add_argument("--no-linear", action="store_true", help="no Linear SimLens / tuned lens (no fit, no SimExit curve)")
    p.add_argument("--no-tuned", action="store_true",
                   help="Linear SimLens only: no tuned-lens baseline (one fit and one lens less per task)")
    p.add_argument("--tuned-objective", choices=["vocab-kl", "candidates-kl", "lstsq"],
                   help="the tuned lens's fit objective (default lensbench's, vocab-kl; candidates-kl is the CPU-feasible "
                        "one for large vocabularies: the vocabulary-KL fit of a 1.5B model costs about 2 PFLOP per task)")
    p.add_argument("--measure-speed", action="store_true", help="also time SimExit against the full model (wall-clock)")
    p.add_argument("--runs", default="runs/figures", help="where the runs and lenses go (default runs/figures)")
    p.add_argument("--include", action="append", default=[], help="more run folders (or folders of runs) to draw (repeatable)")
    p.add_argument("--out", default=common.DEFAULT_OUT, help=f"figures folder (default {common.DEFAULT_OUT}/)")
    p.add_argument("--formats", default="png,html", help="png, html (default both)")
    p.add_argument("--icl-tasks", default="all",
                   help="ICL tasks to run `lensbench icl` on per model (default all built-ins; '' for none)")
    p.add_argument("--icl-queries", type=int, default=24, help="queries per ICL run (default 24, CPU-feasible)")
    p.add_argument("--icl-points", default="every:3", help="ICL patch points (default every:3 on the CPU; all for every layer)")
    common.add_interval_options(p)
    p.add_argument("--skip-eval", action="store_true", help="make nothing; draw the runs that exist")
    p.add_argument("--refresh", action="store_true", help="replace complete runs made with other options (--overwrite)")
    p.add_argument("--dry-run", action="store_true", help="print what would be run, run nothing")
    return p


def model_installed(model: str) -> str | None:
    """None if the model can load, else why not (a shipped model whose packages are missing)."""
    from lensbench.models import SHIPPED

    shipped = SHIPPED.get(model)
    if shipped is None:
        return None
    missing = [p for p in shipped.packages if importlib.util.find_spec(p) is None]
    if not missing:
        return None
    key = INSTALL_KEYS.get(model)
    hint = f"bash scripts/install-models.sh {key}" if key else shipped.pip
    return f"model '{model}' is not installed ({len(missing)} package(s) missing, e.g. {missing[0]}): {hint}"


def run_state(folder: Path, want: dict) -> tuple[str, str]:
    """(`missing` | `incomplete` | `complete` | `different`, detail) of a run folder."""
    manifest = folder / "manifest.json"
    if not manifest.exists():
        return ("missing", "") if not folder.exists() or not any(folder.iterdir()) else ("different", "not a run")
    try:
        data = json.loads(manifest.read_text())
    except ValueError:
        return "different", "unreadable manifest"
    config = data.get("config", {})
    diffs = [f"{k}: {config.get(k)!r} (want {v!r})" for k, v in want.items() if config.get(k) != v]
    if diffs:
        return "different", "; ".join(diffs)
    if data.get("status") == "complete":
        return "complete", ""
    return "incomplete", data.get("status", "")


def lens_ready(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "lens.safetensors").exists()


class Driver:
    def __init__(self, args):
        self.args = args
        self.failures: list[str] = []

    def lensbench(self, *argv: str) -> bool:
        cmd = [sys.executable, "-m", "lensbench", *argv]
        shown = "lensbench " + " ".join(shlex.quote(a) for a in argv)
        print(f"$ {shown}", flush=True)
        if self.args.dry_run:
            return True
        start = time.time()
        done = subprocess.run(cmd)
        print(f"  ({time.time() - start:.0f} s, exit {done.returncode})", flush=True)
        if done.returncode != 0:
            self.failures.append(shown)
        return done.returncode == 0

    def common_model_args(self, model: str) -> list[str]:
        return ["--model", model, "--device", self.args.device, "--dtype", self.args.dtype]

    def fit(self, pair: Pair, kind: str) -> bool:
        folder = pair.lens_dir(kind)
        wanted = self.args.tuned_objective if kind == "tuned" else None
        if lens_ready(folder):
            made = json.loads((folder / "config.json").read_text()).get("objective")
            if wanted is None or made == wanted:
                print(f"reuse {folder}")
                return True
            if not self.args.refresh:
                print(f"note: {folder} was fitted with objective {made}, not {wanted}; kept (--refresh refits it)",
                      file=sys.stderr)
                return True
        argv = ["fit-linear", *self.common_model_args(pair.model), "--task", pair.task, "--split", "calib",
                "--limit", str(self.args.fit_limit or self.args.limit), "--target", "simlens" if kind == "linear-simlens" else "final",
                "--out", str(folder), "--quiet"]
        if self.args.fit_steps is not None:
            argv += ["--steps", str(self.args.fit_steps)]
        if wanted:
            argv += ["--objective", wanted]
        if folder.exists():
            argv.append("--overwrite")  # a half-written lens folder
        return self.lensbench(*argv)

    def evaluate(self, pair: Pair, part: str, lenses: list[str], ablations: str, linear: list[Path]) -> bool:
        folder = pair.calib if part == "calib" else pair.test
        task = f"{pair.task}@{part}"
        want = {"model": pair.model, "task": task, "limit": self.args.limit, "lenses": ",".join(lenses),
                "ablations": ablations}
        state, detail = run_state(folder, want)
        if state == "complete":
            print(f"reuse {folder}")
            return True
        if state == "different" and not self.args.refresh:
            print(f"note: {folder} holds a run made with other options ({detail}); kept and drawn as it is "
                  "(--refresh replaces it)", file=sys.stderr)
            return (folder / "manifest.json").exists() and json.loads((folder / "manifest.json").read_text()).get("status") == "complete"
        argv = ["eval", *self.common_model_args(pair.model), "--task", task, "--limit", str(self.args.limit),
                "--lenses", ",".join(lenses), "--out", str(folder), "--batch-size", str(self.args.batch_size), "--quiet"]
        if ablations:
            argv += ["--ablations", ablations]
        for path in linear:
            argv += ["--linear", str(path)]
        if state == "different":
            argv.append("--overwrite")
        return self.lensbench(*argv)

    def report(self, pair: Pair, calibrated: bool) -> None:
        from lensbench.store import open_run

        if self.args.dry_run:
            print(f"$ lensbench report {pair.test}" + (f" --calib {pair.calib}" if calibrated else "")
                  + f" --bootstrap {self.args.bootstrap} --seed {self.args.seed}")
            return
        run = open_run(pair.test)
        calib = open_run(pair.calib) if calibrated else None
        common.report_of(run, calib, write=True, bootstrap=self.args.bootstrap, seed=self.args.seed)
        print(f"report {pair.test / 'report.json'}")

    def speed(self, pair: Pair) -> None:
        target = pair.test / "simexit_speed.json"
        if target.exists():
            print(f"reuse {target}")
            return
        self.lensbench("calibrate", "--calib", str(pair.calib), "--test", str(pair.test), "--policy", "linear-simlens",
                       "--target", "all", "--measure-speed", "--device", self.args.device, "--dtype", self.args.dtype,
                       "--json", str(target))

    def icl(self, model: str, task: str, root: Path) -> Path | None:
        """`lensbench icl` on one built-in task (reused when complete with the same options)."""
        folder = root / common._slug(common.model_short_name(model)) / f"icl-{task}"
        want = {"model": model, "task": task, "queries": self.args.icl_queries, "points": self.args.icl_points}
        state, detail = run_state(folder, want)
        if state == "complete":
            print(f"reuse {folder}")
            return folder
        if state == "different" and not self.args.refresh:
            print(f"note: {folder} holds a run made with other options ({detail}); kept (--refresh replaces it)", file=sys.stderr)
            return folder
        argv = ["icl", *self.common_model_args(model), "--task", task, "--queries", str(self.args.icl_queries),
                "--points", self.args.icl_points, "--out", str(folder), "--quiet"]
        if state == "different":
            argv.append("--overwrite")
        return folder if self.lensbench(*argv) else None

    def make(self, pair: Pair) -> Path | None:
        """Everything one (model, task) needs; the test run's folder, or None."""
        linear_ok = not self.args.no_linear
        lenses = ["logit", "simlens"]
        linear_dirs: list[Path] = []
        if linear_ok:
            kinds = ["linear-simlens"] + ([] if self.args.no_tuned else ["tuned"])
            linear_ok = all(self.fit(pair, kind) for kind in kinds)
            if linear_ok:
                lenses += kinds
                linear_dirs = [pair.lens_dir(kind) for kind in kinds]
            else:
                print(f"note: fitting the linear lenses for {pair.model} on {pair.task} failed; "
                      "going on without Linear SimLens and the tuned lens", file=sys.stderr)
        calibrated = self.evaluate(pair, "calib", lenses, "", linear_dirs)
        if not self.evaluate(pair, "test", lenses, self.args.ablations, linear_dirs):
            return None
        if not self.args.dry_run and not (pair.test / "manifest.json").exists():
            return None
        self.report(pair, calibrated and (self.args.dry_run or (pair.calib / "manifest.json").exists()))
        if self.args.measure_speed and linear_ok and calibrated:
            self.speed(pair)
        return pair.test


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.check_intervals(args)
    models = [m for m in args.models.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    if args.icl_tasks == "all":
        from lensbench.icl.tasks import builtin_tasks

        icl_tasks = list(builtin_tasks())
    else:
        icl_tasks = [t for t in args.icl_tasks.split(",") if t]
    driver = Driver(args)
    root = Path(args.runs)
    draw: list[str] = []
    for model in models:
        if args.skip_eval:
            break
        problem = model_installed(model)
        if problem:
            print(f"note: {problem}; skipped", file=sys.stderr)
            driver.failures.append(problem)
            continue
        for task in tasks:
            print(f"== {model} on {task} ({args.limit} calib + {args.limit} test examples, {args.device})", flush=True)
            made = driver.make(Pair(model, task, root))
            if made is not None:
                draw.append(str(made))
        for task in icl_tasks:
            print(f"== {model}: in-context learning on {task} ({args.icl_queries} queries, {args.device})", flush=True)
            made = driver.icl(model, task, root)
            if made is not None:
                draw.append(str(made))
    if args.skip_eval:
        draw = [str(root)] if root.is_dir() else []
    draw += args.include
    def options(script: str) -> list[str]:
        extra = ["--bootstrap", str(args.bootstrap), "--seed", str(args.seed)] if script in INTERVAL_SCRIPTS else []
        return ["--out", args.out, "--formats", args.formats, *extra]

    if args.dry_run:
        for script in SCRIPTS:
            print(f"$ python -m analyses.{script} {' '.join(draw) or '(runs)'} {' '.join(options(script))}")
        return 0
    if not draw:
        print("nothing to draw: no runs were made or found", file=sys.stderr)
        return 1
    import importlib

    for script in SCRIPTS:
        print(f"== analyses.{script}", flush=True)
        module = importlib.import_module(f"analyses.{script}")
        module.main([*draw, *options(script)])
    if driver.failures:
        print("\nthese steps failed (their figures are missing):", file=sys.stderr)
        for failure in driver.failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    print(f"\nfigures and tables: {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
