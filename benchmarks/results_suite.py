"""The result runs behind docs/results.md, in one process (the model is loaded once).

For one model, in order, each step time-boxed against `--budget` seconds and logged to
`OUT/results.json` as it finishes (so a cut-off run still reports what it did):

1. the logit lens on the first `--issue2-limit` ARC-Easy examples (timed);
2. logit lens + SimLens + drop-[s], drop-[a], [a]-swap on `--issue3-limit` ARC-Easy and BoolQ;
3. per task: Linear SimLens and the tuned lens fitted on `T@calib`; runs on `T@calib` and
   `T@test`; calibration of every policy for the three targets (calib -> test); the SimExit
   executor's wall-clock speedups at batch size 1 and `--speed-batch`; `report.json`.

Run folders land in `--runs`; with `--pack DIR` each task's folders (without `parts/`) are
also tarred into DIR. Example (a GPU machine):

    python benchmarks/results_suite.py --model qwen2.5-coder-0.5b --device cuda --runs runs/gpu --pack $OUT
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_grad_enabled(False)

from lensbench.errors import LensbenchError  # noqa: E402
from lensbench.exits import (  # noqa: E402
    POLICIES, TARGETS, executor_for, calibrate, encoded_examples_of, measure_speedup, parse_threshold,
)
from lensbench.lenses.fit import FitConfig, fit_from_config  # noqa: E402
from lensbench.models import load_model  # noqa: E402
from lensbench.report import build_report  # noqa: E402
from lensbench.runner import EvalConfig, run_eval  # noqa: E402
from lensbench.store import atomic_write_json, open_run  # noqa: E402
from lensbench.tasks import pad_token_id  # noqa: E402


class Suite:
    def __init__(self, args):
        self.args = args
        self.started = time.perf_counter()
        self.log: dict = {"args": vars(args), "steps": {}}
        self.out = Path(args.log)
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def step(self, name: str, fn, *a, **kw):
        if self.elapsed() > self.args.budget:
            print(f"=== {name}: skipped (budget of {self.args.budget}s spent)", flush=True)
            self.log["steps"][name] = {"status": "skipped"}
            self.save()
            return None
        print(f"=== {name} (at {self.elapsed():.0f}s)", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn(*a, **kw)
            status = "ok"
        except Exception as exc:  # one failed step must not cost the others
            traceback.print_exc()
            result, status = None, f"failed: {type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        print(f"--- {name}: {status} in {seconds:.1f}s", flush=True)
        self.log["steps"][name] = {"status": status, "seconds": round(seconds, 2),
                                   "result": result if isinstance(result, (dict, list)) else None}
        self.save()
        return result

    def save(self):
        self.log["elapsed"] = round(self.elapsed(), 1)
        atomic_write_json(self.out, self.log)


def summary_of(run_dir) -> dict:
    summary = open_run(run_dir).summary()
    return {"n_examples": summary["n_examples"], "final_accuracy": summary["final_accuracy"],
            "lenses": {k: {"accuracy": v["accuracy"], "fidelity": v["fidelity"]} for k, v in summary["lenses"].items()},
            "swap": summary.get("swap", {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--runs", default="runs/results")
    p.add_argument("--lenses-dir", default=None, help="where fitted lenses go (default RUNS/lenses)")
    p.add_argument("--log", default=None, help="JSON log (default RUNS/results.json)")
    p.add_argument("--pack", default=None, help="tar each task's run folders into this folder")
    p.add_argument("--budget", type=float, default=480, help="seconds after which remaining steps are skipped")
    p.add_argument("--batch-size", default="32")
    p.add_argument("--issue2-task", default="arc-easy")
    p.add_argument("--issue2-limit", type=int, default=200)
    p.add_argument("--issue3-limit", type=int, default=200)
    p.add_argument("--issue3-tasks", default="arc-easy,boolq")
    p.add_argument("--tasks", default="arc-easy:test=600,boolq=600,arc-challenge:test=500,medmcqa=500",
                   help="TASK=LIMIT pairs for the calibrated exit runs (limit per half)")
    p.add_argument("--tuned-tasks", default="arc-easy:test,boolq", help="tasks that also get the tuned-lens baseline")
    p.add_argument("--fit-limit", type=int, default=600)
    p.add_argument("--fit-steps", type=int, default=300)
    p.add_argument("--ablations", default="drop-s,drop-a,a=swap")
    p.add_argument("--speed-tasks", default="arc-easy:test,boolq", help="tasks whose SimExit wall-clock speedup is measured")
    p.add_argument("--speed-examples", type=int, default=100)
    p.add_argument("--speed-batch", type=int, default=16)
    p.add_argument("--speed-repeats", type=int, default=2)
    p.add_argument("--tf32", action="store_true", help="allow TF32 matrix products for float32 on CUDA")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    args.log = args.log or str(runs / "results.json")
    lenses_dir = Path(args.lenses_dir or runs / "lenses")
    if args.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    suite = Suite(args)
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)

    t0 = time.perf_counter()
    model, info = load_model(args.model, args.device, args.dtype)
    suite.log["model"] = dict(info.to_dict(), load_seconds=round(time.perf_counter() - t0, 2),
                              device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu")
    suite.save()
    slug = args.model.replace("/", "_")

    def evaluate(out, task, lenses, limit, ablations="", linear=()):
        cfg = EvalConfig(out=str(out), model=args.model, task=task, lenses=lenses, ablations=ablations, limit=limit,
                         device=args.device, dtype=args.dtype, batch_size=batch_size, linear=list(linear), overwrite=True)
        t = time.perf_counter()
        run_eval(cfg, model=model, model_info=info, progress=False)
        seconds = time.perf_counter() - t
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return dict(summary_of(out), seconds=round(seconds, 2), run=str(out))

    # 1. the logit lens on 200 ARC-Easy examples
    if args.issue2_limit > 0:
        suite.step(f"issue2-{args.issue2_task}-logit", evaluate, runs / f"{slug}-{args.issue2_task}-logit", args.issue2_task,
                   "logit", args.issue2_limit)
    # 2. SimLens and the slot ablations
    for task in [t for t in args.issue3_tasks.split(",") if t]:
        suite.step(f"issue3-{task}", evaluate, runs / f"{slug}-{task}-roles", task, "logit,simlens",
                   args.issue3_limit, args.ablations)
    # 3. calibrated early exit per task
    for item in [t for t in args.tasks.split(",") if t]:
        task, _, limit = item.partition("=")
        limit = int(limit) if limit else None
        name = task.replace(":", "-")
        lin_dir, tuned_dir = lenses_dir / f"{slug}-{name}-linear", lenses_dir / f"{slug}-{name}-tuned"

        def fit(out, target):
            cfg = FitConfig(out=str(out), model=args.model, task=f"{task}@calib", limit=min(args.fit_limit, limit or 10**9),
                            target=target, steps=args.fit_steps, device=args.device, dtype=args.dtype, overwrite=True,
                            batch_size=batch_size if isinstance(batch_size, int) else 16)
            t = time.perf_counter()
            lens = fit_from_config(cfg, model, info, progress=False)
            return {"seconds": round(time.perf_counter() - t, 2), "collect_seconds": lens.config.collect_seconds,
                    "fit": lens.config.fit}

        if suite.step(f"{name}-fit-linear", fit, lin_dir, "simlens") is None:
            continue
        have_tuned = task in args.tuned_tasks.split(",") and suite.step(f"{name}-fit-tuned", fit, tuned_dir, "final") is not None
        linear = [str(lin_dir)] + ([str(tuned_dir)] if have_tuned else [])
        lens_names = "logit,simlens,linear-simlens" + (",tuned" if have_tuned else "")
        calib_dir, test_dir = runs / f"{slug}-{name}-calib", runs / f"{slug}-{name}-test"
        if suite.step(f"{name}-eval-calib", evaluate, calib_dir, f"{task}@calib", lens_names, limit, "", linear) is None:
            continue
        if suite.step(f"{name}-eval-test", evaluate, test_dir, f"{task}@test", lens_names, limit, args.ablations, linear) is None:
            continue

        def calibrate_all():
            out = []
            for policy in POLICIES:
                for target in TARGETS:
                    try:
                        out.append(calibrate(calib_dir, test_dir, policy, target))
                    except LensbenchError as exc:
                        out.append({"policy": policy, "target": target, "error": str(exc)})
            atomic_write_json(test_dir / "calibration.json", out)
            return out

        results = suite.step(f"{name}-calibrate", calibrate_all) or []

        def speed():
            test = open_run(test_dir)
            encoded, start_id = encoded_examples_of(test, model.tokenizer, args.speed_examples)
            pad_id = pad_token_id(model.tokenizer, start_id)
            rows = []
            for result in results:
                if "error" in result or result["policy"] not in ("linear-simlens", "logit"):
                    continue
                if result["target"] not in ("best-accuracy", "max-drop"):
                    continue
                executor = executor_for(model, test, result["policy"], parse_threshold(result["threshold"]),
                                         result["answer_lens"], result["min_layer"], str(lin_dir), pad_id)
                timings = measure_speedup(model, encoded, executor, (1, args.speed_batch), args.speed_repeats)
                result["test"]["timings"] = timings
                result["test"]["wall_clock_speedup"] = timings[-1]["wall_clock_speedup"]
                rows.append({"policy": result["policy"], "target": result["target"], "timings": timings})
            atomic_write_json(test_dir / "calibration.json", results)
            atomic_write_json(test_dir / "simexit_speed.json", [r for r in results if "timings" in r.get("test", {})])
            return rows

        if task in args.speed_tasks.split(","):
            suite.step(f"{name}-speed", speed)
        suite.step(f"{name}-report", lambda: {"written": bool(build_report(test_dir, calib_dir))})
        if args.pack:
            def pack():
                target = Path(args.pack) / f"runs-{name}.tar.gz"
                target.parent.mkdir(parents=True, exist_ok=True)
                # Lens weights (L x d_model^2 floats) stay behind: their config.json travels.
                skip = ("/parts", ".safetensors")
                with tarfile.open(target, "w:gz") as tar:
                    for folder in (calib_dir, test_dir, lin_dir, tuned_dir):
                        if folder.exists():
                            tar.add(folder, arcname=folder.name,
                                    filter=lambda m: None if any(k in m.name for k in skip) and "attention" not in m.name else m)
                return {"file": str(target), "bytes": target.stat().st_size}

            suite.step(f"{name}-pack", pack)
    if args.pack:
        def pack_small():
            target = Path(args.pack) / "runs-issues-2-3.tar.gz"
            with tarfile.open(target, "w:gz") as tar:
                for folder in sorted(runs.glob(f"{slug}-*-logit")) + sorted(runs.glob(f"{slug}-*-roles")):
                    tar.add(folder, arcname=folder.name, filter=lambda m: None if "/parts" in m.name else m)
            return {"file": str(target), "bytes": target.stat().st_size}

        suite.log["budget_ignored_for_pack"] = True
        suite.args.budget = float("inf")
        suite.step("pack-issues-2-3", pack_small)
    print(f"done in {suite.elapsed():.0f}s; log: {args.log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
