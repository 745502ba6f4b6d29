"""`lensbench exit-speed`: time the SimExit executor against the full model at a threshold."""

from __future__ import annotations

import math
from pathlib import Path

from lensbench import exits
from lensbench.commands.calibrate import check_output_file, write_json_output
from lensbench.commands.options import GRAPH_OPTIONS, add_cuda_graphs_arg, add_model_args, batch_sizes
from lensbench.errors import LensbenchError
from lensbench.lenses.linear import LinearLens
from lensbench.models import load_model
from lensbench.tasks import encode_examples, load_task, pad_token_id, start_token_id

NAME = "exit-speed"


def add_parser(sub) -> None:
    q = sub.add_parser(NAME, help="time the SimExit executor against the full model at a given threshold")
    add_model_args(q)
    q.add_argument("--task", default="capitals")
    q.add_argument("--limit", type=int, default=64)
    q.add_argument("--linear", help="Linear SimLens folder (for the linear-simlens policy)")
    q.add_argument("--policy", choices=exits.executor_policies())  # default linear-simlens (None: not given)
    q.add_argument("--threshold", type=float, help="global entropy threshold")
    q.add_argument("--calibration", help="a JSON written by `lensbench calibrate --json` (its threshold and options)")
    q.add_argument("--min-layer", type=int)  # default 0
    q.add_argument("--answer-lens", choices=exits.ANSWER_LENSES)  # default simlens
    q.add_argument("--batch-sizes", type=batch_sizes, default=[1, 8])
    q.add_argument("--repeats", type=int, default=3)
    q.add_argument("--start-token")
    q.add_argument("--json", help="write the timings here too")
    add_cuda_graphs_arg(q, "the SimLens continuation")


SAVED_OPTIONS = (("threshold", "--threshold"), ("policy", "--policy"), ("answer_lens", "--answer-lens"),
                 ("min_layer", "--min-layer"))


def _settings(args) -> dict:
    """The executor's settings: from --calibration FILE, or from the options (checked)."""
    if args.calibration:
        given = [option for key, option in SAVED_OPTIONS if getattr(args, key) is not None]
        if given:
            raise LensbenchError(f"--calibration sets the threshold, policy, answer lens and min layer; "
                                 f"use one or the other (drop {', '.join(given)})")
        saved = exits.load_calibration(args.calibration)
        executor = saved.get("executor") or {}
        if not executor:
            print(f"note: {args.calibration} predates recorded executor settings (an older lensbench): timing with "
                  "entropy over the candidates, consecutive positions, and the model unchecked")
        return {"threshold": saved["threshold"], "policy": saved["policy"], "answer_lens": saved["answer_lens"],
                "min_layer": saved["min_layer"], "entropy": executor.get("entropy", "candidates"),
                "positions": executor.get("positions", "consecutive"), "linear": executor.get("linear"),
                "model": executor.get("model"), "model_sha256": executor.get("model_sha256")}
    if args.threshold is None:
        raise LensbenchError("give --threshold or --calibration FILE")
    if not math.isfinite(args.threshold) or args.threshold < 0:
        raise LensbenchError(f"--threshold must be a finite entropy >= 0 (got {args.threshold})")
    return {"threshold": args.threshold, "policy": args.policy or "linear-simlens",
            "answer_lens": args.answer_lens or "simlens", "min_layer": args.min_layer or 0,
            "entropy": "candidates", "positions": "consecutive", "linear": None, "model": None, "model_sha256": None}


def run(args) -> int:
    if args.limit < 1:
        raise LensbenchError(f"--limit must be at least 1 (got {args.limit})")
    if args.repeats < 1:
        raise LensbenchError(f"--repeats must be at least 1 (got {args.repeats})")
    check_output_file(args.json)
    settings = _settings(args)
    linear_dir = args.linear or settings["linear"]
    if args.linear and settings["linear"] and Path(args.linear).resolve() != Path(settings["linear"]):
        raise LensbenchError(f"--linear {args.linear} is not the Linear SimLens the calibration used "
                             f"({settings['linear']}); leave --linear out")
    linear = LinearLens.load(linear_dir) if linear_dir else None  # a bad folder fails before the model loads
    model, info = load_model(args.model, args.device, args.dtype, args.n_ctx)
    if settings["model_sha256"] is not None and info.source_sha256 != settings["model_sha256"]:
        raise LensbenchError(f"--calibration {args.calibration} was calibrated on {settings['model']}; "
                             f"--model {args.model} is a different model")
    if linear is not None:
        linear.check_model(model, info)
    start_id = start_token_id(model.tokenizer, args.start_token)
    encoded, _ = encode_examples(load_task(args.task)[: args.limit], model.tokenizer, start_id, model.cfg.n_ctx, True)
    if not encoded:
        raise LensbenchError(f"no examples of {args.task} to time")
    pad_id = pad_token_id(model.tokenizer, start_id)
    policy = settings["policy"]
    executor = exits.SimExitExecutor(model, linear, settings["threshold"], policy, settings["answer_lens"],
                                     settings["min_layer"], settings["entropy"], settings["positions"], pad_id=pad_id,
                                     cuda_graphs=GRAPH_OPTIONS[args.cuda_graphs])
    rows = exits.measure_speedup(model, encoded, executor, args.batch_sizes, args.repeats)
    print(f"{policy} exit on {len(encoded)} examples of {args.task}, {info.spec} on {rows[0]['device_name']}")
    if args.calibration:
        print(f"calibration: {args.calibration} (entropy over {settings['entropy']}, {settings['positions']} positions)")
    print(exits.speed_table(rows))
    if args.json:
        write_json_output(args.json, rows)
    return 0
