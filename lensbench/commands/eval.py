"""`lensbench eval`: evaluate lenses at every readout point and store a run (`runner.run_eval`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lensbench import distributed
from lensbench.commands.options import (
    add_cuda_graphs_arg, add_model_args, add_positions_arg, add_site_arg, batch_size, config_from_args, positive_int,
)
from lensbench.errors import LensbenchError
from lensbench.lenses import LENS_NAMES
from lensbench.metrics import format_table
from lensbench.models import resolve_device
from lensbench.runner import ENTROPY_MODES, EvalConfig, run_eval, sigterm_as_interrupt
from lensbench.store import MANIFEST, open_run

NAME = "eval"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="evaluate lenses at every readout point and store a run")
    add_model_args(p)
    p.add_argument("--task", default="capitals", help="task name[:split][@calib|@test] or a JSONL file (see `lensbench tasks`)")
    p.add_argument("--lenses", default="logit", help="comma-separated: " + ", ".join(LENS_NAMES))
    p.add_argument("--ablations", default="", help='SimLens slot ablations, e.g. drop-s,drop-a,a=swap,s=token:" the" (docs/lenses.md)')
    p.add_argument("--linear", action="append", default=[], help="folder of a fitted linear-simlens / tuned lens (repeatable)")
    p.add_argument("--out", required=True, help="run folder to write (resumed if it holds the same unfinished run)")
    p.add_argument("--limit", type=positive_int, help="first N examples only")
    p.add_argument("--batch-size", type=batch_size, default=8,
                   help="examples per batch, or auto: the largest that fits, up to --max-batch-size (default 8)")
    p.add_argument("--max-batch-size", type=positive_int, default=64, help="batch size planned by --batch-size auto (default 64)")
    p.add_argument("--num-processes", type=positive_int, default=1,
                   help="shard the examples across N local processes (one per GPU with --device cuda); "
                        "`accelerate launch -m lensbench eval ...` does the same across nodes")
    p.add_argument("--threads", type=positive_int,
                   help="torch's intra-op CPU threads (default: torch's count in this process); numbers are "
                        "bit-identical only at the same thread count, so each --num-processes worker gets this "
                        "count too (the CPU is then oversubscribed N times)")
    p.add_argument("--n-devices", type=positive_int, default=1, help="split one model's blocks across N GPUs (TransformerLens)")
    add_cuda_graphs_arg(p)
    p.add_argument("--start-token", help="text of the start token [s] (default: BOS, else EOS)")
    add_positions_arg(p, "SimLens continuation positions: (0, 1) or the original (0, T-1)")
    add_site_arg(p, "readout at hook_resid_pre (default) or hook_resid_mid")
    p.add_argument("--topk", type=positive_int, default=5, help="vocabulary top-k stored per readout (default 5)")
    p.add_argument("--entropy", default="candidates", choices=ENTROPY_MODES, help="entropy over the candidates (default) or the vocabulary")
    p.add_argument("--mean-examples", type=positive_int, default=256, help="examples averaged for the `mean` slot source")
    p.add_argument("--skip-invalid", action="store_true", help="skip (and report) examples whose candidates are not single tokens")
    p.add_argument("--overwrite", action="store_true", help="replace a different lensbench run in --out (only the files a run writes; see docs/format.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _launch(args) -> int:
    """`--num-processes N`: check here what can be checked (once, not by every worker), then
    start the workers with this process's thread count."""
    cfg = config_from_args(EvalConfig, args)
    cfg.validate()
    resolve_device(cfg.device)
    threads = cfg.threads or torch.get_num_threads()
    # The last occurrence of an option wins (also over an abbreviation such as --num-proc).
    argv = ["eval", *args.argv, "--num-processes", "1"]
    try:
        return distributed.launch_local(argv, args.num_processes, threads)
    except KeyboardInterrupt:
        print(f"lensbench: interrupted; finished batches are kept in {args.out}. Run the same command to resume.",
              file=sys.stderr)
        return 130


def run(args) -> int:
    if args.num_processes > 1:
        if distributed.launched_world() > 1:
            raise LensbenchError("--num-processes inside a launched process group: use one or the other")
        if args.n_devices > 1:
            raise LensbenchError("--num-processes and --n-devices cannot be combined")
        return _launch(args)
    # SIGTERM is Ctrl-C for the whole command, model load included: one line and exit 130.
    with sigterm_as_interrupt():
        try:
            return _run(args)
        except KeyboardInterrupt:
            print(_interrupted(Path(args.out) if args.out.strip() else None), file=sys.stderr)
            return 130


def _interrupted(out: Path | None) -> str:
    """The line an interrupted `eval` prints: what is kept where, if anything."""
    if out is None or not (out / MANIFEST).is_file():
        return "lensbench: interrupted before the run started; nothing was written."
    if distributed.launched_world() > 1:  # every worker prints this line: the same one, printed once
        return f"lensbench: interrupted; finished batches are kept in {out}. Run the same command to resume."
    parts = len(list((out / "parts").glob("part-*.parquet"))) if (out / "parts").is_dir() else 0
    return (f"lensbench: interrupted; {parts} finished batch(es) are kept in {out}. "
            "Run the same command to resume.")


def _run(args) -> int:
    dist = distributed.init(args.device)
    cfg = config_from_args(EvalConfig, args, device=distributed.rank_device(args.device, dist))
    out = run_eval(cfg, progress=not args.quiet, dist=dist)
    if not dist.is_main:
        return 0
    summary = open_run(out).summary()
    print(format_table(summary))
    if summary.get("skipped"):
        print(f"skipped {len(summary['skipped'])} invalid example(s); see manifest.json")
    print(f"results: {out}")
    return 0
