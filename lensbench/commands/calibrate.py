"""`lensbench calibrate`: choose an exit threshold on a calibration run, report it on a test run
(`exits.calibrate`), optionally timing the executor (`exits.measure_speedup`)."""

from __future__ import annotations

import os
from pathlib import Path

from lensbench import exits
from lensbench.commands.options import GRAPH_OPTIONS, add_cuda_graphs_arg, add_dtype_arg, batch_sizes
from lensbench.errors import LensbenchError
from lensbench.models import load_model
from lensbench.store import atomic_write_json, open_run
from lensbench.tasks import pad_token_id

NAME = "calibrate"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="choose an exit threshold on a calibration run, report it on a test run")
    p.add_argument("--calib", required=True, help="calibration run folder (e.g. of TASK@calib)")
    p.add_argument("--test", required=True, help="test run folder, disjoint examples (e.g. TASK@test)")
    p.add_argument("--policy", default="linear-simlens", choices=list(exits.POLICIES))
    p.add_argument("--target", default="all", choices=[*exits.TARGETS, "all"], help="calibration target (default: all three)")
    p.add_argument("--epsilon", type=float, default=0.01, help="fidelity target 1 - epsilon (default 0.01)")
    p.add_argument("--max-drop", type=float, default=0.01, help="max-drop target: accuracy drop allowed (default 0.01 = 1 point)")
    p.add_argument("--answer-lens", default="simlens", choices=exits.ANSWER_LENSES)
    p.add_argument("--min-layer", type=int, default=0, help="no exit before this readout point")
    p.add_argument("--per-layer", action="store_true", help="one threshold per layer (precision-calibrated) instead of one global")
    p.add_argument("--measure-speed", action="store_true", help="also time the executor against the full model on the test examples")
    p.add_argument("--linear", help="Linear SimLens folder for --measure-speed (default: the test run's)")
    p.add_argument("--batch-sizes", type=batch_sizes, default=[1, 8], help="batch sizes timed (default 1,8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, help="time on the first N test examples only")
    p.add_argument("--device", default="cpu")
    add_dtype_arg(p)
    p.add_argument("--json", help="write the result here too")
    add_cuda_graphs_arg(p, "the SimLens continuation")


def check_output_file(path: str | None, option: str = "--json") -> None:
    """Refuse, before any compute, an output file that cannot be written: a folder, or a file
    in a folder that does not exist or is not writable."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise LensbenchError(f"{option} {path} is a folder; give a file name")
    parent = target.parent
    if not parent.is_dir():
        raise LensbenchError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LensbenchError(f"{option} {path}: folder {parent} is not writable")


def write_json_output(path: str, obj, option: str = "--json") -> None:
    try:
        atomic_write_json(Path(path), obj)
    except OSError as exc:
        raise LensbenchError(f"{option} {path}: cannot write ({exc.strerror or exc})") from None


def check_speed_args(args) -> None:
    """The timing options: --repeats and --limit of at least 1."""
    if args.repeats < 1:
        raise LensbenchError(f"--repeats must be at least 1 (got {args.repeats})")
    if args.limit is not None and args.limit < 1:
        raise LensbenchError(f"--limit must be at least 1 (got {args.limit})")


def run(args) -> int:
    exits.check_targets(args.epsilon, args.max_drop)
    check_speed_args(args)
    if not args.measure_speed and (args.linear is not None or args.limit is not None):
        raise LensbenchError("--linear and --limit are options of --measure-speed; add it or leave them out")
    check_output_file(args.json)
    targets = list(exits.TARGETS) if args.target == "all" else [args.target]
    results = [exits.calibrate(args.calib, args.test, args.policy, t, args.answer_lens, args.min_layer,
                               per_layer=args.per_layer, epsilon=args.epsilon, max_drop=args.max_drop) for t in targets]
    if args.measure_speed:
        test = open_run(args.test)
        model, info = load_model(test.manifest["model"]["spec"], args.device, args.dtype)
        encoded, start_id = exits.encoded_examples_of(test, model.tokenizer, args.limit)
        pad_id = pad_token_id(model.tokenizer, start_id)
        for result in results:
            if exits.get_policy(result["policy"]).confidence is None:  # the oracle is not executable
                continue
            executor = exits.executor_for(model, test, result["policy"], exits.parse_threshold(result["threshold"]),
                                    result["answer_lens"], result["min_layer"], args.linear, pad_id,
                                    GRAPH_OPTIONS[args.cuda_graphs])
            timings = exits.measure_speedup(model, encoded, executor, args.batch_sizes, args.repeats)
            speedup, batch = exits.headline_speedup(timings)
            result["test"]["timings"] = timings
            result["test"]["wall_clock_speedup"] = speedup
            result["test"]["wall_clock_speedup_batch_size"] = batch
            result["test"]["wall_clock_speedup_by_batch_size"] = {str(t["batch_size"]): t["wall_clock_speedup"]
                                                                  for t in timings}
            if args.linear and executor.linear_lens is not None:  # the lens timed, whatever the run recorded
                result["executor"]["linear"] = str(Path(args.linear).resolve())
    for result in results:
        print(exits.format_calibration(result))
        if result["test"].get("timings"):
            print(exits.speed_table(result["test"]["timings"]))
    if args.json:
        write_json_output(args.json, results if len(results) > 1 else results[0])
    return 0
