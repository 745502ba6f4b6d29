"""`lensbench` command line: eval, tasks, models (fit-linear, report and exits register here too).

User mistakes print one line (`lensbench: error: ...`) and exit 2; an interrupted run exits
130 and resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import os
import sys

from lensbench.errors import LensbenchError

# Subcommands added by other modules: name -> (module, function adding the parser).
EXTRA_COMMANDS = {
    "fit-linear": ("lensbench.lenses.linear", "add_cli"),
    "report": ("lensbench.report", "add_cli"),
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _batch_size(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else _positive_int(text)


def add_model_args(p: argparse.ArgumentParser) -> None:
    from lensbench.models import DEFAULT_MODEL, DEFAULT_N_CTX

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL}; see `lensbench models`)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--n-ctx", type=_positive_int, default=DEFAULT_N_CTX, help="context length to build (default %(default)s)")


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate lenses at every readout point and store a run")
    add_model_args(p)
    p.add_argument("--task", default="capitals", help="task name[:split][@calib|@test] or a JSONL file (see `lensbench tasks`)")
    p.add_argument("--lenses", default="logit", help="comma-separated: logit, simlens, linear-simlens, tuned")
    p.add_argument("--ablations", default="", help='SimLens slot ablations, e.g. drop-s,drop-a,a=swap,s=token:" the" (docs/lenses.md)')
    p.add_argument("--linear", action="append", default=[], help="folder of a fitted linear-simlens / tuned lens (repeatable)")
    p.add_argument("--out", required=True, help="run folder to write (resumed if it holds the same unfinished run)")
    p.add_argument("--limit", type=_positive_int, help="first N examples only")
    p.add_argument("--batch-size", type=_batch_size, default=8,
                   help="examples per batch, or auto: the largest that fits, up to --max-batch-size (default 8)")
    p.add_argument("--max-batch-size", type=_positive_int, default=64, help="batch size planned by --batch-size auto (default 64)")
    p.add_argument("--num-processes", type=_positive_int, default=1,
                   help="shard the examples across N local processes (one per GPU with --device cuda); "
                        "`accelerate launch -m lensbench eval ...` does the same across nodes")
    p.add_argument("--n-devices", type=_positive_int, default=1, help="split one model's blocks across N GPUs (TransformerLens)")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="replay SimLens continuations from CUDA graphs (auto: on for one CUDA device)")
    p.add_argument("--start-token", help="text of the start token [s] (default: BOS, else EOS)")
    p.add_argument("--positions", default="consecutive", choices=["consecutive", "original"],
                   help="SimLens continuation positions: (0, 1) or the original (0, T-1)")
    p.add_argument("--site", default="pre", choices=["pre", "mid"], help="readout at hook_resid_pre (default) or hook_resid_mid")
    p.add_argument("--topk", type=_positive_int, default=5, help="vocabulary top-k stored per readout (default 5)")
    p.add_argument("--entropy", default="candidates", choices=["candidates", "vocab"], help="entropy over the candidates (default) or the vocabulary")
    p.add_argument("--mean-examples", type=_positive_int, default=256, help="examples averaged for the `mean` slot source")
    p.add_argument("--skip-invalid", action="store_true", help="skip (and report) examples whose candidates are not single tokens")
    p.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _without_option(argv: list[str], name: str) -> list[str]:
    """`argv` less `--name VALUE` / `--name=VALUE`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept


def cmd_eval(args) -> int:
    from lensbench import distributed
    from lensbench.runner import EvalConfig, format_table, run_eval
    from lensbench.store import open_run

    if args.num_processes > 1:
        if distributed.launched_world() > 1:
            raise LensbenchError("--num-processes inside a launched process group: use one or the other")
        if args.n_devices > 1:
            raise LensbenchError("--num-processes and --n-devices cannot be combined")
        return distributed.launch_local(["eval", *_without_option(args.argv, "--num-processes")], args.num_processes)
    dist = distributed.init(args.device)
    device = distributed.rank_device(args.device, dist)
    cfg = EvalConfig(
        out=args.out, model=args.model, task=args.task, lenses=args.lenses, ablations=args.ablations,
        limit=args.limit, device=device, dtype=args.dtype, batch_size=args.batch_size,
        start_token=args.start_token, positions=args.positions, site=args.site, topk=args.topk,
        entropy=args.entropy, skip_invalid=args.skip_invalid, overwrite=args.overwrite, linear=args.linear,
        mean_examples=args.mean_examples, n_ctx=args.n_ctx, max_batch_size=args.max_batch_size,
        n_devices=args.n_devices, cuda_graphs=args.cuda_graphs,
    )
    try:
        out = run_eval(cfg, progress=not args.quiet, dist=dist)
    except KeyboardInterrupt:
        print(f"lensbench: interrupted; finished batches are kept in {args.out}. Run the same command to resume.", file=sys.stderr)
        return 130
    if not dist.is_main:
        return 0
    run = open_run(out)
    summary = run.summary()
    print(format_table(summary))
    if summary.get("skipped"):
        print(f"skipped {len(summary['skipped'])} invalid example(s); see manifest.json")
    print(f"results: {out}")
    return 0


def cmd_tasks(args) -> int:
    from lensbench.tasks import describe_tasks

    print(describe_tasks())
    print("\nAppend :SPLIT for another split, @calib / @test for a deterministic half. A JSONL file path also works.")
    return 0


def cmd_models(args) -> int:
    from lensbench.models import RANDOM_PRESETS, SHIPPED

    for name, m in SHIPPED.items():
        print(f"{name:<20} {m.note}\n{'':<20} install: {m.pip}")
    print(f"{'random:PRESET[:SEED]':<20} random weights, presets: {', '.join(RANDOM_PRESETS)}")
    print(f"{'PATH.gguf / FOLDER':<20} a GGUF file or a local transformers folder")
    print(f"{'official name':<20} any TransformerLens official model (downloads; needs a network)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="lensbench", description="Latent predictions of LM layers, SimLens and early exit.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    sub.add_parser("tasks", help="list the registered tasks")
    sub.add_parser("models", help="list the model specs")
    for name, (module, func) in EXTRA_COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        getattr(mod, func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    full = list(sys.argv[1:] if argv is None else argv)
    args.argv = full[full.index(args.command) + 1 :]  # the subcommand's own arguments (for relaunching)
    handlers = {"eval": cmd_eval, "tasks": cmd_tasks, "models": cmd_models}
    handler = handlers.get(args.command) or getattr(args, "handler", None)
    try:
        return handler(args)
    except LensbenchError as exc:
        print(f"lensbench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
