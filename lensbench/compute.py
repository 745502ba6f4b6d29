"""Compute accounting and Iso-Compute accuracy (METHOD.md, "Compute accounting").

Costs are per example, in *layer-token units* (one block applied to one position) by default:

| method | cost at readout point `l` of a prompt of `T` tokens, `L` blocks |
| --- | --- |
| `full` | `T·L` |
| `logit` | `T·l` (the unembedding is not a block: 0 layer-tokens; counted by `flop_cost`) |
| `simlens` | `T·l + 2·(L-l)` (the two-token post-forward is always counted, also at `l = L`, where it is 0) |
| `simexit` | `T·l + 2·(L-l) + linear_maps·map_cost` |

A Linear SimLens map is a `d_model × d_model` product on one position; in layer-token units
it costs `map_cost`, the ratio of its multiply-adds to those of one block at one position
(`ModelDims.map_cost`, recorded in each fitted lens's config). Without the model's shape the
default is `DEFAULT_MAP_COST = 1/12`: a standard block's `12·d²` (4d² attention projections,
8d² MLP) against the map's `d²`.

`flop_cost` counts FLOPs instead (2 per multiply-add): the blocks' projections and MLP, the
attention's quadratic term over the keys each position sees, the maps, and the readouts.

*Iso-Compute accuracy* at budget `B`: a lens's accuracy at the deepest readout point whose
(mean per-example) cost is at most `B`. The gain of a lens over a baseline is the mean of the
difference over a grid of budgets from the cheapest budget at which both have a readout
point to the full model's cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from lensbench.errors import LensbenchError

METHODS = ("full", "logit", "simlens", "simexit")
COST_UNITS = ("layer-token", "flop")
DEFAULT_MAP_COST = 1.0 / 12.0


def layer_token_cost(method: str, n_tokens: int, n_layers: int, layer: float, linear_maps: int = 0,
                     map_cost: float = DEFAULT_MAP_COST) -> float:
    """Cost of one example in layer-token units.

    method: full, logit, simlens or simexit; n_tokens: the prompt length T (with `[s]`);
    n_layers: L; layer: the readout point (a float for sub-layer depths, e.g. 3.5 for `mid`);
    linear_maps: Linear SimLens maps evaluated (simexit); map_cost: one map in layer-tokens.
    """
    if method not in METHODS:
        raise LensbenchError(f"unknown method '{method}' (expected one of {', '.join(METHODS)})")
    if not 0 <= layer <= n_layers:
        raise LensbenchError(f"readout layer {layer} is outside 0..{n_layers}")
    if method == "full":
        return float(n_tokens * n_layers)
    cost = float(n_tokens * layer)
    if method in ("simlens", "simexit"):
        cost += 2.0 * (n_layers - layer)
    if method == "simexit":
        cost += linear_maps * map_cost
    return cost


@dataclass(frozen=True)
class ModelDims:
    """The shape numbers that FLOP counts need."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    gated_mlp: bool
    d_vocab: int
    attn_only: bool = False

    @classmethod
    def from_cfg(cls, cfg) -> "ModelDims":
        """From a `HookedTransformerConfig`."""
        return cls(
            n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
            n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads, d_head=cfg.d_head,
            d_mlp=cfg.d_mlp or 0, gated_mlp=bool(cfg.gated_mlp), d_vocab=cfg.d_vocab_out,
            attn_only=bool(cfg.attn_only),
        )

    @classmethod
    def from_dict(cls, data: dict) -> "ModelDims":
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    def position_flops(self) -> float:
        """FLOPs of one block on one position, without the attention's quadratic term."""
        attn = 2 * self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads)  # Q, O; K, V
        mlp = 0 if self.attn_only else (3 if self.gated_mlp else 2) * 2 * self.d_model * self.d_mlp
        return float(attn + mlp)

    def block_flops(self, n_positions: int) -> float:
        """FLOPs of one block over a causal sequence of `n_positions` (position t sees t+1 keys)."""
        keys = n_positions * (n_positions + 1) / 2
        return n_positions * self.position_flops() + 4.0 * self.n_heads * self.d_head * keys

    def map_flops(self) -> float:
        return 2.0 * self.d_model * self.d_model + self.d_model

    @property
    def map_cost(self) -> float:
        """One Linear SimLens map in layer-token units."""
        return self.map_flops() / self.position_flops()

    def readout_flops(self, n_outputs: int | None = None) -> float:
        """`W_U · LN_final(h)` at one position, over `n_outputs` logits (default: the vocabulary)."""
        return 2.0 * self.d_model * (self.d_vocab if n_outputs is None else n_outputs)


def flop_cost(method: str, n_tokens: int, dims: ModelDims, layer: float, linear_maps: int = 0,
              readout: str = "vocab", n_candidates: int = 4) -> float:
    """Cost of one example in FLOPs (2 per multiply-add), with attention's quadratic term.

    method, n_tokens, layer, linear_maps as in `layer_token_cost`; dims: the model's shape;
    readout: the answer's unembedding over the whole vocabulary ("vocab") or the candidates
    only ("candidates"); every Linear SimLens map is followed by a confidence readout over the
    `n_candidates` candidates. A fractional layer prorates the prompt's blocks.
    """
    if method not in METHODS:
        raise LensbenchError(f"unknown method '{method}' (expected one of {', '.join(METHODS)})")
    if readout not in ("vocab", "candidates"):
        raise LensbenchError(f"unknown readout '{readout}' (expected vocab or candidates)")
    n_layers = dims.n_layers
    if not 0 <= layer <= n_layers:
        raise LensbenchError(f"readout layer {layer} is outside 0..{n_layers}")
    answer = dims.readout_flops(None if readout == "vocab" else n_candidates)
    if method == "full":
        return n_layers * dims.block_flops(n_tokens) + answer
    cost = layer * dims.block_flops(n_tokens) + answer
    if method in ("simlens", "simexit"):
        cost += (n_layers - layer) * dims.block_flops(2)
    if method == "simexit":
        cost += linear_maps * (dims.map_flops() + dims.readout_flops(n_candidates))
    return float(cost)


# --- Iso-Compute ------------------------------------------------------------------------------


def lens_method(lens: str) -> tuple[str, int]:
    """How a stored lens is charged: (method, maps per readout). SimLens ablations count as
    SimLens; a Linear SimLens or tuned lens readout is a logit readout after one map."""
    if lens == "logit":
        return "logit", 0
    if lens.startswith("simlens"):
        return "simlens", 0
    if lens.startswith("linear-simlens") or lens.startswith("tuned"):
        return "logit", 1
    raise LensbenchError(f"no cost model for lens '{lens}'")


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
    method, maps = lens_method(lens)
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
