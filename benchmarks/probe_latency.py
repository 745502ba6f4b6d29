"""The live probe's latency: one prompt through every lens and ablation, warm, in memory.

Loads a model once, builds a `lensbench.probe.Prober` (what the app's Live probe page uses)
and times warm `Prober.probe` calls of one prompt (by default the Live probe page's default
prompt and candidates, with a pinned token) for each lens set, interleaved so that a change in
the machine's load touches every set alike. Prints, per set, the median and quartiles over
`--repeats` warm probes, after `--warmup` probes that build the lenses and fill the caches.

Linear SimLens and the tuned lens need fitted folders: `--linear DIR [DIR ...]`, or `--fit`
fits both (closed form on 24 capitals examples, about 20 s) into a temporary folder first.
Without either, the sets list only the lenses that can be built.

    .venv/bin/python benchmarks/probe_latency.py --fit                     # the app's default set
    .venv/bin/python benchmarks/probe_latency.py --fit --profile           # + where the time goes

This is a benchmark that prints figures, not a test (docs/performance.md, "The live probe").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_grad_enabled(False)

# The Live probe page's defaults (app/app_pages/live.py).
PROMPT = "Q: What is the capital of Japan?\nA: Tokyo\n\nQ: What is the capital of France?\nA:"
CANDIDATES = [" Paris", " Rome", " Berlin", " Madrid"]
PIN = " Paris"
ABLATIONS = ("drop-s", "drop-a")


def fit_lenses(model: str, root: Path) -> list[str]:
    """A Linear SimLens and a tuned lens of `model` (closed-form fits on 24 capitals examples)."""
    out = []
    for target in ("simlens", "final"):
        folder = root / target
        subprocess.run([sys.executable, "-m", "lensbench", "fit-linear", "--model", model, "--task", "capitals",
                        "--limit", "24", "--objective", "lstsq", "--target", target, "--out", str(folder),
                        "--threads", "1", "--quiet"], check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
        out.append(str(folder))
    return out


def lens_sets(available: list[str]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """name -> (lenses, ablations): from the logit lens alone to the app's default (all of them)."""
    return {"logit": (("logit",), ()), "logit+simlens": (("logit", "simlens"), ()),
            "all": (tuple(available), ()), "all+ablations": (tuple(available), ABLATIONS)}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q[0], statistics.median(values), q[2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--linear", nargs="*", default=[], help="fitted Linear SimLens / tuned lens folders")
    p.add_argument("--fit", action="store_true", help="fit a Linear SimLens and a tuned lens first (temporary)")
    p.add_argument("--repeats", type=int, default=15, help="warm probes timed per lens set")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sets", help="comma-separated sets to time: logit, logit+simlens, all, all+ablations "
                                  "(the app's default; default: every set)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (the Prober's default: 1)")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table of the last set")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)

    from lensbench.models import load_model
    from lensbench.probe import Prober

    with tempfile.TemporaryDirectory() as tmp:
        linear = list(args.linear) or (fit_lenses(args.model, Path(tmp)) if args.fit else [])
        model, _ = load_model(args.model, device="cpu", dtype="float32")
        prober = Prober(model, args.model, linear_dirs=linear, threads=args.threads)
        sets = lens_sets(prober.available())
        if args.sets:
            sets = {name: sets[name] for name in args.sets.split(",")}

        def probe(lenses, ablations):
            return prober.probe(PROMPT, CANDIDATES, 0, lenses, ablations, pinned=[PIN])

        for lenses, ablations in sets.values():
            for _ in range(args.warmup):
                probe(lenses, ablations)
        times: dict[str, list[float]] = {name: [] for name in sets}
        for _ in range(args.repeats):  # interleaved: a load change touches every set alike
            for name, (lenses, ablations) in sets.items():
                start = time.perf_counter()
                probe(lenses, ablations)
                times[name].append(time.perf_counter() - start)

        load = os.getloadavg()
        n_tokens = len(prober.encode(PROMPT, CANDIDATES, 0)[1].tokens)
        print(f"{args.model}: {model.cfg.n_layers} layers, vocabulary {model.cfg.d_vocab_out}; prompt of {n_tokens} tokens; "
              f"{args.threads} thread(s); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(f"{'lens set':<16} {'median s':>8} {'q1':>8} {'q3':>8}   ({args.repeats} warm probes each)")
        figures = {}
        for name, values in times.items():
            q1, med, q3 = quartiles(values)
            lenses, ablations = sets[name]
            print(f"{name:<16} {med:8.3f} {q1:8.3f} {q3:8.3f}   {','.join(lenses)}{' + ' + ','.join(ablations) if ablations else ''}")
            figures[name] = {"lenses": list(lenses), "ablations": list(ablations), "median_s": med, "q1_s": q1, "q3_s": q3,
                             "seconds": values}
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            lenses, ablations = list(sets.values())[-1]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    probe(lenses, ablations)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        if args.json:
            Path(args.json).write_text(json.dumps({"model": args.model, "tokens": n_tokens, "threads": args.threads,
                                                   "load_average": load, "sets": figures}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
