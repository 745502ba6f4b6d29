"""Timing the executor against the full model: measured and attainable wall-clock speedups."""

from __future__ import annotations

import time

import numpy as np
import torch

from lensbench.costs import DEFAULT_MAP_COST, layer_token_cost
from lensbench.exits.executor import SimExitExecutor, run_full_model
from lensbench.exits.simulate import ExitData, exit_costs, speedup_ratio
from lensbench.store import as_run
from lensbench.tasks import Example, encode_examples


def _timed(fn, device: str, repeats: int, warmup: int) -> tuple[float, object]:
    """Median wall-clock seconds of `fn()` (CUDA-synchronised), and its last result."""
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(max(1, repeats)):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def measure_speedup(model, encoded, executor: SimExitExecutor, batch_sizes=(1, 8), repeats: int = 3,
                    warmup: int = 1, no_refill: bool = False) -> list[dict]:
    """Wall-clock speedup of the executor over the full model on the same examples and device,
    per batch size, next to its layer-token speedup and their ratio. One dict per batch size.

    The executor runs with refill (`SimExitExecutor.run`): block calls of at most the batch
    size, freed slots given to waiting examples. Each row also gives the executor's prompt
    block calls and rows per call against the full model's (`ceil(n / batch) x L` calls).
    `no_refill`: at batch sizes above 1, also time the batching without refill (length-sorted
    batches, each until its last example exits) as `no_refill_*`."""
    encoded = list(encoded)
    n_layers = model.cfg.n_layers
    map_cost = executor.linear_lens.config.map_cost if executor.linear_lens is not None else None
    out = []
    for batch_size in batch_sizes:
        full_s, _ = _timed(lambda: run_full_model(model, encoded, batch_size, executor.pad_id), model.cfg.device, repeats, warmup)
        exit_s, result = _timed(lambda: executor.run(encoded, batch_size), model.cfg.device, repeats, warmup)
        lengths = {e.index: len(e.tokens) for e in encoded}
        data = ExitData(
            example_index=np.array(result.example_index), layers=np.arange(n_layers + 1),
            depth=np.arange(n_layers + 1, dtype=float), n_tokens=np.array([lengths[i] for i in result.example_index], float),
            gold=np.zeros(len(encoded), int), final_decision=np.zeros(len(encoded), int),
            answer=np.zeros((len(encoded), n_layers + 1), int), confidence=None, policy=executor.policy,
            answer_lens=executor.answer_lens, min_layer=executor.min_layer,
            map_cost=DEFAULT_MAP_COST if map_cost is None else map_cost,
        )
        cost = exit_costs(data, np.array(result.exit_layer))
        full_cost = sum(layer_token_cost("full", lengths[i], n_layers, n_layers) for i in result.example_index)
        bound = attainable_speedup(model, executor, full_s, result.exit_layer, repeats) if batch_size == 1 else {}
        wall = full_s / exit_s if exit_s > 0 else float("nan")
        layer_token = speedup_ratio(full_cost, cost.sum())
        row = {
            "batch_size": int(batch_size),
            "n_examples": len(encoded),
            "full_seconds": full_s,
            "exit_seconds": exit_s,
            "wall_clock_speedup": wall,
            "layer_token_speedup": layer_token,
            "wall_over_layer_token": wall / layer_token if np.isfinite(layer_token) and layer_token > 0 else float("nan"),
            "mean_exit_layer": float(np.mean(result.exit_layer)),
            "refill": batch_size > 1,
            "pool": executor.pool,
            "block_calls": result.stats.block_calls,
            "rows_per_call": result.stats.rows_per_call(),
            "full_block_calls": -(-len(encoded) // batch_size) * n_layers,
            "device": str(model.cfg.device),
            "device_name": torch.cuda.get_device_name() if str(model.cfg.device).startswith("cuda") else "cpu",
            **bound,
        }
        if no_refill and batch_size > 1:
            plain_s, plain = _timed(lambda: executor.run(encoded, batch_size, refill=False), model.cfg.device, repeats, warmup)
            row.update(no_refill_exit_seconds=plain_s,
                       no_refill_wall_clock_speedup=full_s / plain_s if plain_s > 0 else float("nan"),
                       no_refill_block_calls=plain.stats.block_calls, no_refill_rows_per_call=plain.stats.rows_per_call())
        out.append(row)
    return out


@torch.inference_mode()
def attainable_speedup(model, executor: SimExitExecutor, full_seconds: float, exit_layers: list[int],
                       repeats: int = 3) -> dict:
    """The batch-size-1 wall-clock speedup SimExit would reach if deciding to exit cost
    nothing: per example, the full model's time times l/L (its prompt blocks up to its exit
    layer l; examples are taken as equally long) plus the continuation from l (`[a]` against
    the cached `[s]`), timed as the executor runs it. Layer-token accounting counts a two-token block as 2/T of a
    prompt block; on a GPU it still reads every weight of the block, which is what separates
    this bound from the layer-token speedup. `wall / attainable` is the executor's own
    overhead (the checks and their synchronisation)."""
    n_layers = model.cfg.n_layers
    device = model.cfg.device
    pair = torch.randn(1, model.cfg.d_model, dtype=next(model.parameters()).dtype, device=device)
    lengths = torch.tensor([2], device=device)
    continuation: dict[int, float] = {}
    for layer in sorted(set(int(x) for x in exit_layers)):
        if layer >= n_layers or executor.answer_lens != "simlens":
            continuation[layer] = 0.0
        else:
            continuation[layer] = _timed(lambda: executor._continue(pair, pair, [layer], lengths), device,
                                         max(3, repeats), 1)[0]
    per_example = full_seconds / len(exit_layers)
    ideal = sum(per_example * min(int(x), n_layers) / n_layers + continuation[int(x)] for x in exit_layers)
    # exits at layer 0 answered by the logit lens run no block: nothing to time, an infinite bound
    return {"attainable_exit_seconds": ideal, "attainable_wall_clock_speedup": speedup_ratio(full_seconds, ideal),
            "continuation_seconds": {str(k): v for k, v in continuation.items()}}


# --- re-encoding a run's examples (for timing on the run's own examples) -------------------------


def encoded_examples_of(run, tokenizer, limit: int | None = None):
    """The run's examples, encoded as the run encoded them (its start token)."""
    run = as_run(run)
    table = run.examples()
    if limit is not None:
        table = table.head(limit)
    start_id = int(run.manifest["start_token"]["id"])
    examples = [Example(str(r.example_id), r.prompt, list(r.choices), int(r.gold)) for r in table.itertuples()]
    encoded, _ = encode_examples(examples, tokenizer, start_id, 10**9, skip_invalid=False)
    for enc, index in zip(encoded, table["example_index"].tolist()):
        enc.index = int(index)
    return encoded, start_id


def speed_table(rows: list[dict]) -> str:
    lines = [f"{'batch':>5} {'full s':>9} {'exit s':>9} {'wall-clock x':>12} {'attainable x':>12} {'layer-token x':>13} "
             f"{'wall/lt':>7} {'mean exit':>9} {'calls':>11}"]
    for r in rows:
        bound = f"{r['attainable_wall_clock_speedup']:>12.2f}" if "attainable_wall_clock_speedup" in r else f"{'-':>12}"
        calls = f"{r['block_calls']}/{r['full_block_calls']}" if "block_calls" in r else "-"
        ratio = r.get("wall_over_layer_token", float("nan"))
        lines.append(f"{r['batch_size']:>5} {r['full_seconds']:>9.3f} {r['exit_seconds']:>9.3f} {r['wall_clock_speedup']:>12.2f} "
                     f"{bound} {r['layer_token_speedup']:>13.2f} {ratio:>7.2f} {r['mean_exit_layer']:>9.2f} {calls:>11}")
        if "no_refill_exit_seconds" in r:
            lines.append(f"{'':>5} {'':>9} {r['no_refill_exit_seconds']:>9.3f} {r['no_refill_wall_clock_speedup']:>12.2f} "
                         f"without refill ({r['no_refill_block_calls']} block calls)")
    lines.append("attainable: the batch-1 speedup if exit decisions were free (prompt blocks to the exit layer + the "
                 "measured continuation); wall/lt: wall-clock / layer-token speedup; calls: SimExit's "
                 "prompt block calls / the full model's")
    return "\n".join(lines)
