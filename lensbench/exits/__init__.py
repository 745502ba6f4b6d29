"""Early exit over per-layer confidences: policies, offline simulation, calibration, and a
SimExit executor that really stops computing (METHOD.md, "SimExit").

The package: `policies` (the `Policy` records: one place to add a policy), `simulate` (offline
replay on a stored run), `calibration`, `executor` (the SimExit executor) and `timing`
(wall-clock speedups). Every module of the package is loaded here, so a policy module
registers itself by being there.

A *policy* turns per-layer confidences (entropies of a lens at readout points
`min_layer .. L-1`) into an exit layer: the first point whose entropy is below the threshold
(one global value, or one per layer), else `L`, where the model's own output answers.

The built-in policies (`linear-simlens` = SimExit, `logit`, `simlens`, `oracle`) and their costs
are listed in `lensbench.exits.policies`.

The answer at an exit before `L` comes from `answer_lens` (SimLens by default, also `logit`
or `linear-simlens`). Offline, `simulate_exits` replays a policy from a stored run; online,
`SimExitExecutor` runs the prompt block by block, drops exited examples from the batch (and
gives their slots to waiting examples: batching with refill), and continues their `[s]`/`[a]`
pairs through the upper blocks; the two agree (a test checks it).

Calibration (`calibrate`) picks, on a calibration run only, the cheapest threshold that meets
a target (`best-accuracy`; `max-drop`: accuracy at most `max_drop` below the full model;
`fidelity`: agreement with the full model at least `1 - epsilon`, the calibrated threshold of
arXiv 2407.21082), then reports it on a disjoint test run.
"""

from __future__ import annotations

import importlib
import pkgutil

from lensbench.exits.calibration import (
    TARGETS, calibrate, check_disjoint, check_targets, choose_threshold, executor_settings, format_calibration,
    format_speedup, headline_speedup, load_calibration, parse_threshold, per_layer_thresholds, run_map_cost,
)
from lensbench.exits.executor import (
    DEFAULT_POOL, MAX_GRAPHED_PAIRS, ExecutorResult, ExecutorStats, SimExitExecutor, executor_for, linear_simlens_folder,
    run_full_model,
)
from lensbench.exits.policies import (
    ANSWER_LENSES, NO_EXIT, POLICIES, Policy, executor_policies, get_policy, register_policy,
)
from lensbench.exits.simulate import (
    ExitData, curve_of, default_thresholds, exit_costs, exit_layers, operating_curve, prepare_exits, settle_layers,
    simulate_exits, threshold_vector,
)
from lensbench.exits.timing import attainable_speedup, encoded_examples_of, measure_speedup, speed_table

for _module in pkgutil.iter_modules(__path__):  # policy modules beyond the built-in ones
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ANSWER_LENSES", "DEFAULT_POOL", "MAX_GRAPHED_PAIRS", "NO_EXIT", "POLICIES", "TARGETS", "ExecutorResult",
    "ExecutorStats", "ExitData", "Policy",
    "SimExitExecutor", "attainable_speedup", "calibrate", "check_disjoint", "check_targets", "choose_threshold", "curve_of",
    "default_thresholds", "encoded_examples_of", "executor_for", "executor_policies", "executor_settings", "exit_costs",
    "exit_layers", "format_calibration", "format_speedup", "get_policy", "headline_speedup", "linear_simlens_folder",
    "load_calibration", "measure_speedup", "operating_curve", "parse_threshold", "per_layer_thresholds", "prepare_exits",
    "register_policy", "run_full_model", "run_map_cost", "settle_layers", "simulate_exits", "speed_table",
    "threshold_vector",
]
