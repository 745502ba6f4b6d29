"""`lensbench icl`: in-context learning, global vs local task vectors at the label words
(`lensbench.icl.runner.run_icl`; docs/METHOD.md, "In-context learning")."""

from __future__ import annotations

import sys

from lensbench.commands.options import add_model_args, config_from_args, positive_int
from lensbench.errors import LensbenchError
from lensbench.icl.measure import DECIDE
from lensbench.icl.patching import MODES, SITES
from lensbench.icl.runner import ICLConfig, run_icl
from lensbench.icl.summary import format_icl_report, write_icl_report
from lensbench.icl.tasks import BASELINES, KINDS, describe_icl_tasks
from lensbench.store import open_run

NAME = "icl"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="in-context learning: global vs local task vectors at the label words")
    add_model_args(p)
    p.add_argument("--task", help="a built-in ICL task (see --list) or a JSONL file of {input, label} items")
    p.add_argument("--list", action="store_true", help="list the built-in ICL tasks and exit")
    p.add_argument("--out", help="run folder to write (resumed if it holds the same unfinished run)")
    p.add_argument("--kind", choices=KINDS, help="override the task's kind (rule or categorization)")
    p.add_argument("--template", help='prompt template with {input} and {label} (default: the task\'s, "{input} -> {label}\\n")')
    p.add_argument("--shots", type=positive_int, default=8, help="demonstrations per prompt (default 8)")
    p.add_argument("--queries", type=positive_int, default=100, help="queries (prompts) to measure (default 100)")
    p.add_argument("--donors", type=positive_int, default=32, help="N: few-shot prompts averaged into the global vector (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demonstrations and queries (default 0)")
    p.add_argument("--baseline", default="shuffle", choices=BASELINES,
                   help="uninformative demonstrations: labels shuffled among them (default) or random labels")
    p.add_argument("--site", default="pre", choices=SITES, help="patch at hook_resid_pre (default) or hook_resid_post")
    p.add_argument("--mode", default="replace", choices=MODES, help="patch by replacing (default) or adding")
    p.add_argument("--with-separator", action="store_true", help="also patch label + separator positions (condition local+sep)")
    p.add_argument("--lenses", default="logit,simlens", help="readouts of the last position and of the local vectors")
    p.add_argument("--decide", default="candidates", choices=DECIDE, help="argmax over the task's labels (default) or the vocabulary")
    p.add_argument("--points", default="all", help="patch points: all (default), every:N, or comma-separated layers")
    p.add_argument("--naive", action="store_true", help="the TransformerLens hook reference for every patch (slow; same numbers)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="queries per batch (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace a different run in --out (only lensbench's files are removed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.list:
        print(describe_icl_tasks())
        print("\nA JSONL file works too: one {\"input\", \"label\"} object per line (docs/format.md, 'ICL tasks').")
        return 0
    if not args.task or not args.out:
        raise LensbenchError("icl needs --task and --out (or --list)")
    cfg = config_from_args(ICLConfig, args)
    try:
        out = run_icl(cfg, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"lensbench: interrupted; finished batches are kept in {args.out}. Run the same command to resume.", file=sys.stderr)
        return 130
    report, _ = write_icl_report(open_run(out))
    print(format_icl_report(report))
    print(f"results: {out}")
    return 0
