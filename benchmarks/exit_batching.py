"""How SimExit's batching shares block calls: the executor's schedule replayed on exit layers.

On a GPU a small model's block call costs about the same (kernel launches, one host
synchronisation per exit check) for 2 rows as for 64, so a batched early-exit executor's time
follows its number of prompt block calls. Every schedule runs each example through the blocks
below its exit layer once (the same row-layers, the sum of the exit layers); what differs is
how many rows share a call. This script replays `lensbench.exits.executor.next_step` (the
schedule `SimExitExecutor.run` follows) on exit layers drawn from a few distributions, without
a model, and prints the block calls of:

  no refill   length-sorted batches of B, each until its last example exits
  cohorts     B examples in flight; freed places refilled (at least B/2 at a time) by a
              cohort entering at layer 0 that catches up with the older rows and merges
  pool P      P x B examples in flight, rows waiting at their layer for full calls of B
              (the executor's default: P = 4)

against the bound `sum of exit layers / B` (every call full). Prints figures; not a test.

    python benchmarks/exit_batching.py [--layers 24] [--examples 512] [--batch-sizes 8,64]
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from lensbench.exits.executor import next_step


def replay(exit_layers: list[int], n_layers: int, batch_size: int, capacity: int, admit_at: int | None) -> tuple[int, int]:
    """(block calls, row-layers) of the schedule on examples with these exit layers (in the
    order they enter). An example exiting at l runs blocks 0..l-1; at L it never exits."""
    waiting: dict[int, list[int]] = {}
    next_up, in_flight, calls, row_layers = 0, 0, 0, 0

    def arrive(rows: list[int], layer: int) -> int:
        stay = [r for r in rows if exit_layers[r] > layer]
        if stay:
            waiting.setdefault(layer, []).extend(stay)
        return len(rows) - len(stay)

    while next_up < len(exit_layers) or waiting:
        left = len(exit_layers) - next_up
        layer = next_step({k: len(v) for k, v in waiting.items()}, in_flight, left, batch_size, capacity, admit_at)
        if layer is None:
            rows = list(range(next_up, next_up + min(capacity - in_flight, left)))
            next_up += len(rows)
            in_flight += len(rows) - arrive(rows, 0)
            continue
        rows, rest = waiting[layer][:batch_size], waiting[layer][batch_size:]
        if rest:
            waiting[layer] = rest
        else:
            del waiting[layer]
        calls += 1
        row_layers += len(rows)
        if layer + 1 == n_layers:
            in_flight -= len(rows)
        else:
            in_flight -= arrive(rows, layer + 1)
    return calls, row_layers


def distributions(n_layers: int, min_layer: int, rng: np.random.Generator) -> dict:
    L, m = n_layers, min_layer
    return {
        "uniform from L/4": lambda n: rng.integers(m, L + 1, n),
        "half by L/2, rest to L": lambda n: np.where(rng.random(n) < 0.5, rng.integers(m, L // 2 + 1, n),
                                                      rng.integers(L // 2, L + 1, n)),
        "geometric from L/4 (mean +4)": lambda n: np.minimum(L, m + rng.geometric(0.2, n) - 1),
        "a third never exit": lambda n: np.where(rng.random(n) < 1 / 3, L, rng.integers(m, L // 2 + 1, n)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--min-layer", type=int, help="first exit layer (default L/4)")
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--batch-sizes", default="8,64")
    p.add_argument("--pools", default="2,4,8")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    L = args.layers
    m = L // 4 if args.min_layer is None else args.min_layer
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    pools = [float(x) for x in args.pools.split(",")]
    rng = np.random.default_rng(args.seed)
    print(f"{L} layers, exits from layer {m}, {args.examples} examples: prompt block calls (fewer is better)")
    header = f"{'exit layers':<30} {'B':>3} {'mean':>5} {'bound':>6} {'no refill':>9} {'cohorts':>8}"
    header += "".join(f" {'pool ' + format(q, 'g'):>8}" for q in pools)
    print(header)
    for name, draw in distributions(L, m, rng).items():
        exits = [int(x) for x in draw(args.examples)]
        for b in sizes:
            schedules = [(b, None), (b, math.ceil(b / 2))] + [(max(b, int(q * b)), b) for q in pools]
            results = [replay(exits, L, b, capacity, admit_at) for capacity, admit_at in schedules]
            assert all(rows == sum(exits) for _, rows in results)  # the same row-layers every time
            line = f"{name:<30} {b:>3} {np.mean(exits):>5.1f} {sum(exits) / b:>6.0f}"
            line += "".join(f" {calls:>{9 if i == 0 else 8}}" for i, (calls, _) in enumerate(results))
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
