"""`lensbench fit-linear`: fit Linear SimLens (or a tuned lens) on cached residuals
(`lensbench.lenses.fit`)."""

from __future__ import annotations

import sys

import torch

from lensbench.commands.options import add_model_args, add_positions_arg, add_site_arg, config_from_args, positive_int
from lensbench.lenses.fit import FitConfig, fit_from_config
from lensbench.lenses.linear import INITS, OBJECTIVES, TARGETS

NAME = "fit-linear"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="fit Linear SimLens (or, with --target final, a tuned lens) on cached residuals")
    add_model_args(p)
    p.add_argument("--task", default="capitals", help="task spec name[:split][@calib|@test] (see `lensbench tasks`)")
    p.add_argument("--split", help="calib or test (a deterministic half, as @calib/@test) or a data-set split name")
    p.add_argument("--out", required=True, help="folder to write (lens.safetensors + config.json)")
    p.add_argument("--limit", type=positive_int, default=1000, help="first N examples (default 1000)")
    p.add_argument("--target", default="simlens", choices=TARGETS,
                   help="match SimLens's readout (linear-simlens, default) or the final distribution (tuned)")
    p.add_argument("--objective", choices=OBJECTIVES,
                   help="candidates-kl (default for simlens), vocab-kl (default for final) or lstsq (closed form)")
    p.add_argument("--init", default="lstsq", choices=INITS, help="start of the KL fit (default lstsq)")
    p.add_argument("--steps", type=int, default=300, help="Adam steps per layer for KL objectives (default 300)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--fit-batch", type=positive_int, default=256, help="examples per Adam step (default 256)")
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge strength toward the identity for lstsq (relative; default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="KL fits: penalty on ||A - I||² (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out to report the fit loss (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward pass when collecting residuals")
    add_positions_arg(p, "SimLens continuation positions")
    add_site_arg(p, "readout site the maps read")
    p.add_argument("--start-token", help="text of the start token [s] (default: BOS, else EOS)")
    p.add_argument("--skip-invalid", action="store_true", help="skip examples whose candidates are not single tokens")
    p.add_argument("--overwrite", action="store_true", help="replace a lens in --out")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's; 1 is fastest on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(FitConfig, args)
    try:
        lens = fit_from_config(cfg, progress=not args.quiet)
    except KeyboardInterrupt:
        end_progress = "" if args.quiet else "\n"  # the progress line has no newline of its own
        print(f"{end_progress}lensbench: interrupted; nothing written to {args.out}", file=sys.stderr)
        return 130
    c = lens.config
    print(f"{c.kind} for {c.model}: {len(c.layers)} maps, {c.objective}, {c.n_train} train / {c.n_val} held-out examples of {c.task}")
    if c.n_val:
        print(f"{'layer':>5} {'train':>10} {'held-out':>10} {'identity':>10}")
        for layer, tr, va, idl in zip(c.layers, c.train_loss, c.val_loss, c.identity_val_loss):
            print(f"{layer:>5} {tr:>10.4f} {va:>10.4f} {idl:>10.4f}")
    else:
        print("held-out: none (n_val=0; too few examples or --val-fraction 0): losses on the training examples")
        print(f"{'layer':>5} {'train':>10} {'identity':>10}")
        for layer, tr, idl in zip(c.layers, c.train_loss, c.identity_train_loss):
            print(f"{layer:>5} {tr:>10.4f} {idl:>10.4f}")
    print(f"time: residuals {c.collect_seconds:.1f} s, fitting {c.fit_seconds:.1f} s, total {c.collect_seconds + c.fit_seconds:.1f} s")
    print(f"lens: {lens.path}")
    return 0
