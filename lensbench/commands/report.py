"""`lensbench report RUN`: print a run's tables and write `RUN/report.json` (`lensbench.report`)."""

from __future__ import annotations

from pathlib import Path

from lensbench import exits, uncertainty
from lensbench.costs import ModelDims
from lensbench.errors import LensbenchError
from lensbench.icl.summary import format_icl_report, is_icl_run, write_icl_report
from lensbench.models import load_model
from lensbench.report import REPORT_FILE, build_report, check_report_options, format_report
from lensbench.store import open_run

NAME = "report"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="print a run's tables and write RUN/report.json")
    p.add_argument("run", help="a complete run folder")
    p.add_argument("--calib", help="a calibration run (disjoint examples) to add calibrated exit thresholds")
    p.add_argument("--answer-lens", choices=exits.ANSWER_LENSES)  # default simlens; explicit: the run must have it
    p.add_argument("--min-layer", type=int, default=0, help="no exit before this readout point")
    p.add_argument("--per-layer", action="store_true", help="calibrate one threshold per layer")
    p.add_argument("--epsilon", type=float, default=0.01, help="fidelity target 1 - epsilon (default 0.01)")
    p.add_argument("--max-drop", type=float, default=0.01, help="accuracy drop allowed by the max-drop target (default 0.01)")
    p.add_argument("--n-budgets", type=int, default=50, help="budgets in the Iso-Compute grid (default 50)")
    p.add_argument("--flops", action="store_true", help="Iso-Compute in FLOPs (loads the model's config)")
    p.add_argument("--bootstrap", type=int, default=uncertainty.DEFAULT_RESAMPLES, metavar="B",
                   help="bootstrap resamples of the examples for the 95 %% intervals "
                        f"(default {uncertainty.DEFAULT_RESAMPLES}; 0: no intervals, the report without them)")
    p.add_argument("--seed", type=int, default=uncertainty.DEFAULT_SEED,
                   help=f"the bootstrap's seed (default {uncertainty.DEFAULT_SEED})")
    p.add_argument("--bootstrap-calib", action="store_true",
                   help="with --calib: also resample the calibration run and choose each threshold again per resample "
                        "(global thresholds only)")
    p.add_argument("--ci", action="store_true", help="print the per-layer table with its intervals")


def run(args) -> int:
    check_report_options(args.n_budgets, args.epsilon, args.max_drop, args.answer_lens)
    uncertainty.check_bootstrap(args.bootstrap, args.seed)
    if args.bootstrap_calib and (args.calib is None or args.bootstrap == 0 or args.per_layer):
        why = ("needs --calib" if args.calib is None else "needs intervals (--bootstrap above 0)" if args.bootstrap == 0
               else "chooses global thresholds only (drop --per-layer)")
        raise LensbenchError(f"--bootstrap-calib {why}")
    if is_icl_run(open_run(args.run)):  # an ICL run (`lensbench icl`) has its own tables
        report, path = write_icl_report(open_run(args.run))
        print(format_icl_report(report))
        print(f"\nwritten: {path}")
        return 0
    dims = None
    unit = "layer-token"
    if args.flops:
        spec = open_run(args.run).manifest["model"]["spec"]
        model, _ = load_model(spec, "cpu", "float32")
        dims = ModelDims.from_cfg(model.cfg)
        unit = "flop"
    report = build_report(args.run, args.calib, n_budgets=args.n_budgets, unit=unit, dims=dims,
                          answer_lens=args.answer_lens, min_layer=args.min_layer, epsilon=args.epsilon,
                          max_drop=args.max_drop, per_layer=args.per_layer, bootstrap=args.bootstrap, seed=args.seed,
                          bootstrap_calibration=args.bootstrap_calib)
    print(format_report(report, intervals=args.ci))
    print(f"\nwritten: {Path(args.run) / REPORT_FILE}")
    return 0
