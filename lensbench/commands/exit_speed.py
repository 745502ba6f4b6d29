"""`lensbench exit-speed`: time the SimExit executor against the full model at a threshold."""

from __future__ import annotations

import json
from pathlib import Path

from lensbench import exits
from lensbench.commands.options import GRAPH_OPTIONS, add_cuda_graphs_arg, add_model_args, batch_sizes
from lensbench.errors import LensbenchError
from lensbench.lenses.linear import LinearLens
from lensbench.models import load_model
from lensbench.store import atomic_write_json
from lensbench.tasks import encode_examples, load_task, pad_token_id, start_token_id

NAME = "exit-speed"


def add_parser(sub) -> None:
    q = sub.add_parser(NAME, help="time the SimExit executor against the full model at a given threshold")
    add_model_args(q)
    q.add_argument("--task", default="capitals")
    q.add_argument("--limit", type=int, default=64)
    q.add_argument("--linear", help="Linear SimLens folder (for the linear-simlens policy)")
    q.add_argument("--policy", default="linear-simlens", choices=exits.executor_policies())
    q.add_argument("--threshold", type=float, help="global entropy threshold")
    q.add_argument("--calibration", help="a JSON written by `lensbench calibrate --json` (its threshold and options)")
    q.add_argument("--min-layer", type=int, default=0)
    q.add_argument("--answer-lens", default="simlens", choices=exits.ANSWER_LENSES)
    q.add_argument("--batch-sizes", type=batch_sizes, default=[1, 8])
    q.add_argument("--repeats", type=int, default=3)
    q.add_argument("--start-token")
    q.add_argument("--json", help="write the timings here too")
    add_cuda_graphs_arg(q, "the SimLens continuation")


def run(args) -> int:
    threshold, min_layer, answer_lens, policy = args.threshold, args.min_layer, args.answer_lens, args.policy
    if args.calibration:
        saved = json.loads(Path(args.calibration).read_text())
        saved = saved[0] if isinstance(saved, list) else saved
        threshold, min_layer = exits.parse_threshold(saved["threshold"]), saved["min_layer"]
        answer_lens, policy = saved["answer_lens"], saved["policy"]
    if threshold is None:
        raise LensbenchError("give --threshold or --calibration FILE")
    model, info = load_model(args.model, args.device, args.dtype, args.n_ctx)
    start_id = start_token_id(model.tokenizer, args.start_token)
    encoded, _ = encode_examples(load_task(args.task)[: args.limit], model.tokenizer, start_id, model.cfg.n_ctx, True)
    pad_id = pad_token_id(model.tokenizer, start_id)
    linear = None
    if args.linear:
        linear = LinearLens.load(args.linear)
        linear.check_model(model, info)
    executor = exits.SimExitExecutor(model, linear, threshold, policy, answer_lens, min_layer, pad_id=pad_id,
                                     cuda_graphs=GRAPH_OPTIONS[args.cuda_graphs])
    rows = exits.measure_speedup(model, encoded, executor, args.batch_sizes, args.repeats)
    print(f"{policy} exit on {len(encoded)} examples of {args.task}, {info.spec} on {rows[0]['device_name']}")
    print(exits.speed_table(rows))
    if args.json:
        atomic_write_json(Path(args.json), rows)
    return 0
