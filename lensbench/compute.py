"""Iso-Compute accuracy over stored runs (METHOD.md, "Compute accounting").

*Iso-Compute accuracy* at budget `B`: a lens's accuracy at the deepest readout point whose
(mean per-example) cost is at most `B`. The gain of a lens over a baseline is the mean of the
difference over a grid of budgets from the cheapest budget at which both have a readout
point to the full model's cost. A stored lens is charged as its registered class says
(`lensbench.lenses.lens_cost`); the costs themselves are `lensbench.costs`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lensbench.costs import COST_UNITS, DEFAULT_MAP_COST, ModelDims, flop_cost, layer_token_cost
from lensbench.errors import LensbenchError
from lensbench.lenses import lens_cost


def _frames(run_or_predictions, examples: pd.DataFrame | None):
    if isinstance(run_or_predictions, pd.DataFrame):
        if examples is None:
            raise LensbenchError("Iso-Compute from a predictions table needs the run's examples (for prompt lengths)")
        return run_or_predictions, examples
    from lensbench.store import Run, open_run

    run = run_or_predictions if isinstance(run_or_predictions, Run) else open_run(run_or_predictions)
    return run.predictions(columns=["example_index", "lens", "layer", "site", "correct"]), run.examples()


def point_costs(predictions: pd.DataFrame, examples: pd.DataFrame, lens: str, unit: str = "layer-token",
                dims: ModelDims | None = None, map_cost: float | None = None) -> pd.DataFrame:
    """Per readout point of `lens`: `layer, depth, cost, accuracy` (cost: mean over examples)."""
    if unit not in COST_UNITS:
        raise LensbenchError(f"unknown cost unit '{unit}' (expected {' or '.join(COST_UNITS)})")
    if unit == "flop" and dims is None:
        raise LensbenchError("FLOP costs need the model's shape (ModelDims)")
    frame = predictions[predictions["lens"] == lens]
    if frame.empty:
        raise LensbenchError(f"lens '{lens}' is not in this run (it has: {', '.join(sorted(predictions['lens'].unique()))})")
    n_layers = int(predictions["layer"].max())
    method, maps = lens_cost(lens)
    lengths = examples.set_index("example_index")["n_tokens"].reindex(frame["example_index"].unique())
    if lengths.isna().any():
        raise LensbenchError("the examples table lacks some examples of the predictions")
    mean_tokens = float(lengths.mean())
    grouped = frame.groupby("layer", sort=True).agg(accuracy=("correct", "mean"), site=("site", "first"))
    rows = []
    for layer, row in grouped.iterrows():
        depth = float(layer) + (0.5 if row["site"] == "mid" else 0.0)
        n_maps = maps if layer < n_layers else 0
        if unit == "layer-token":
            mc = DEFAULT_MAP_COST if map_cost is None else map_cost
            # cost is linear in T, so the mean cost is the cost at the mean length
            cost = layer_token_cost(method, mean_tokens, n_layers, depth) + n_maps * mc
        else:
            cost = float(np.mean([flop_cost(method, int(t), dims, depth) for t in lengths]))
            cost += n_maps * (dims.map_flops())
        rows.append({"layer": int(layer), "depth": depth, "cost": cost, "accuracy": float(row["accuracy"])})
    return pd.DataFrame(rows)


def full_cost(predictions: pd.DataFrame, examples: pd.DataFrame, unit: str = "layer-token", dims: ModelDims | None = None) -> float:
    """Mean per-example cost of the full model on the examples of `predictions`."""
    n_layers = int(predictions["layer"].max())
    lengths = examples.set_index("example_index")["n_tokens"].reindex(predictions["example_index"].unique())
    if unit == "flop":
        return float(np.mean([flop_cost("full", int(t), dims, n_layers) for t in lengths]))
    return float(lengths.mean() * n_layers)


def _iso_at(points: pd.DataFrame, budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and layer of the deepest point with cost <= budget (NaN / -1 where none)."""
    accuracy = np.full(len(budgets), np.nan)
    layer = np.full(len(budgets), -1, dtype=int)
    ordered = points.sort_values("depth")
    for i, budget in enumerate(budgets):
        affordable = ordered[ordered["cost"] <= budget * (1 + 1e-12) + 1e-9]
        if len(affordable):
            deepest = affordable.iloc[-1]
            accuracy[i] = deepest["accuracy"]
            layer[i] = int(deepest["layer"])
    return accuracy, layer


def iso_compute_curve(run_or_predictions, lens: str, budgets=None, *, examples: pd.DataFrame | None = None,
                      n_budgets: int = 50, unit: str = "layer-token", dims: ModelDims | None = None,
                      map_cost: float | None = None) -> pd.DataFrame:
    """Iso-Compute accuracy of `lens` at each budget: columns `budget, accuracy, layer` (and
    `relative_budget`, the budget over the full model's cost).

    run_or_predictions: a run folder, a `Run`, or a predictions DataFrame (then pass
    `examples`); budgets: per-example budgets in `unit`s (default: `n_budgets` evenly spaced
    from the lens's cheapest point to the full model). Where no point is affordable,
    accuracy is NaN and layer is -1.
    """
    predictions, examples = _frames(run_or_predictions, examples)
    points = point_costs(predictions, examples, lens, unit, dims, map_cost)
    full = full_cost(predictions, examples, unit, dims)
    if budgets is None:
        budgets = np.linspace(points["cost"].min(), full, n_budgets)
    budgets = np.asarray(budgets, dtype=float)
    accuracy, layer = _iso_at(points, budgets)
    return pd.DataFrame({"budget": budgets, "accuracy": accuracy, "layer": layer, "relative_budget": budgets / full})


# the readouts SimLens's Iso-Compute gain is reported against (`gains["simlens_vs_<name>"]`), with how reports name them
GAIN_BASELINES = {"logit": "the logit lens", "tuned": "the tuned lens"}


def iso_compute_gain(run, lens: str = "simlens", baseline: str = "logit", n_budgets: int = 50, *,
                     examples: pd.DataFrame | None = None, unit: str = "layer-token", dims: ModelDims | None = None,
                     map_cost: float | None = None) -> dict:
    """Mean Iso-Compute accuracy difference `lens - baseline` over a grid of budgets.

    The grid runs from the cheapest budget at which both lenses have a readout point to the
    full model's cost. Returns `gain`, `budgets`, `relative_budgets`, `lens_accuracy`,
    `baseline_accuracy`, `lens_layer`, `baseline_layer`, `unit`, `full_cost`.
    """
    predictions, examples = _frames(run, examples)
    ours = point_costs(predictions, examples, lens, unit, dims, map_cost)
    theirs = point_costs(predictions, examples, baseline, unit, dims, map_cost)
    full = full_cost(predictions, examples, unit, dims)
    start = max(ours["cost"].min(), theirs["cost"].min())
    budgets = np.linspace(start, full, n_budgets)
    lens_acc, lens_layer = _iso_at(ours, budgets)
    base_acc, base_layer = _iso_at(theirs, budgets)
    return {
        "lens": lens,
        "baseline": baseline,
        "unit": unit,
        "gain": float(np.mean(lens_acc - base_acc)),
        "budgets": budgets.tolist(),
        "relative_budgets": (budgets / full).tolist(),
        "lens_accuracy": lens_acc.tolist(),
        "baseline_accuracy": base_acc.tolist(),
        "lens_layer": lens_layer.tolist(),
        "baseline_layer": base_layer.tolist(),
        "full_cost": full,
        "n_examples": int(predictions["example_index"].nunique()),
    }


def iso_compute_tables(predictions: pd.DataFrame, examples: pd.DataFrame, lenses, *, map_cost: float | None = None,
                       n_budgets: int = 50, unit: str = "layer-token", dims: ModelDims | None = None) -> dict:
    """A run's Iso-Compute numbers, computed once for `lensbench report` and the app alike.

    Returns `unit`; `curves`: `iso_compute_curve` of each of `lenses` that has a cost model;
    `gains`: `{"simlens_vs_logit": iso_compute_gain(...)}` when `lenses` has both, and
    `"simlens_vs_tuned"` likewise against the tuned lens (charged its map); `full_cost`.
    map_cost: the run's Linear SimLens map cost (`exits.run_map_cost`; default 1/12).
    """
    curves = {}
    for lens in lenses:
        try:
            curves[lens] = iso_compute_curve(predictions, lens, examples=examples, n_budgets=n_budgets, unit=unit,
                                             dims=dims, map_cost=map_cost)
        except LensbenchError:
            continue
    gains = {}
    for baseline in GAIN_BASELINES:
        if "simlens" in lenses and baseline in lenses:
            gains[f"simlens_vs_{baseline}"] = iso_compute_gain(predictions, "simlens", baseline, n_budgets, examples=examples,
                                                               unit=unit, dims=dims, map_cost=map_cost)
    return {"unit": unit, "curves": curves, "gains": gains, "full_cost": full_cost(predictions, examples, unit, dims)}
