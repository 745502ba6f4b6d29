"""Offline exit simulation: a policy replayed on a stored run's per-layer confidences and
decisions, with METHOD.md's compute accounting (`simulate_exits`, `operating_curve`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lensbench.costs import DEFAULT_MAP_COST, layer_token_cost
from lensbench.errors import LensbenchError
from lensbench.exits.policies import ANSWER_LENSES, NO_EXIT, POLICIES, get_policy


@dataclass
class ExitData:
    """Per-example, per-layer matrices of one stored run, prepared once for many thresholds."""

    example_index: np.ndarray  # (n,)
    layers: np.ndarray  # (L+1,) 0..L
    depth: np.ndarray  # (L+1,) layer (+0.5 for mid points)
    n_tokens: np.ndarray  # (n,)
    gold: np.ndarray
    final_decision: np.ndarray
    answer: np.ndarray  # (n, L+1) decisions of the answer lens
    confidence: np.ndarray | None  # (n, L+1) entropies of the policy's confidence lens
    policy: str
    answer_lens: str
    min_layer: int
    map_cost: float

    @property
    def n_layers(self) -> int:
        return int(self.layers[-1])


def _pivot(frame: pd.DataFrame, column: str, index: np.ndarray, layers: np.ndarray) -> np.ndarray:
    table = frame.pivot_table(index="example_index", columns="layer", values=column, aggfunc="first")
    table = table.reindex(index=index, columns=layers)
    if table.isna().to_numpy().any():
        raise LensbenchError(f"the run lacks some (example, layer) rows for column '{column}'")
    return table.to_numpy()


def prepare_exits(predictions: pd.DataFrame, examples: pd.DataFrame, policy: str, answer_lens: str = "simlens",
                  min_layer: int = 0, map_cost: float | None = None) -> ExitData:
    """The matrices a policy needs, from a run's predictions and examples tables."""
    confidence_lens = get_policy(policy).confidence_lens
    if answer_lens not in ANSWER_LENSES:
        raise LensbenchError(f"unknown answer lens '{answer_lens}' (expected one of {', '.join(ANSWER_LENSES)})")
    lenses = set(predictions["lens"].unique())
    needed = {answer_lens} | ({confidence_lens} if confidence_lens else set())
    missing = needed - lenses
    if missing:
        raise LensbenchError(f"policy '{policy}' with answer lens '{answer_lens}' needs lens(es) {', '.join(sorted(missing))}, "
                             f"which this run lacks (it has: {', '.join(sorted(lenses))})")
    n_layers = int(predictions["layer"].max())
    if not 0 <= min_layer <= n_layers:
        raise LensbenchError(f"--min-layer must be in 0..{n_layers} (got {min_layer})")
    layers = np.arange(n_layers + 1)
    answer_frame = predictions[predictions["lens"] == answer_lens]
    index = np.sort(answer_frame["example_index"].unique())
    per_example = answer_frame.drop_duplicates("example_index").set_index("example_index").reindex(index)
    lengths = examples.set_index("example_index")["n_tokens"].reindex(index)
    if lengths.isna().any():
        raise LensbenchError("the examples table lacks some examples of the predictions")
    sites = answer_frame.drop_duplicates("layer").set_index("layer")["site"].reindex(layers)
    depth = layers + np.where(sites.to_numpy() == "mid", 0.5, 0.0)
    confidence = None
    if confidence_lens:
        conf_frame = predictions[predictions["lens"] == confidence_lens]
        confidence = _pivot(conf_frame, "entropy", index, layers).astype(float)
    return ExitData(
        example_index=index, layers=layers, depth=depth.astype(float), n_tokens=lengths.to_numpy().astype(float),
        gold=per_example["gold"].to_numpy().astype(int), final_decision=per_example["final_decision"].to_numpy().astype(int),
        answer=_pivot(answer_frame, "decision", index, layers).astype(int), confidence=confidence, policy=policy,
        answer_lens=answer_lens, min_layer=min_layer, map_cost=DEFAULT_MAP_COST if map_cost is None else float(map_cost),
    )


def threshold_vector(threshold: float | dict, n_layers: int, min_layer: int) -> np.ndarray:
    """Per-point thresholds (L+1,): a global value or `{layer: tau}` at `min_layer .. L-1`,
    NO_EXIT elsewhere (a layer missing from a dict never exits)."""
    tau = np.full(n_layers + 1, NO_EXIT)
    if isinstance(threshold, dict):
        for layer, value in threshold.items():
            layer = int(layer)
            if not 0 <= layer <= n_layers:
                raise LensbenchError(f"threshold for layer {layer} is outside 0..{n_layers}")
            if min_layer <= layer < n_layers and value is not None:
                tau[layer] = float(value)
    else:
        tau[min_layer:n_layers] = float(threshold)
    return tau


def settle_layers(answer: np.ndarray, final_decision: np.ndarray) -> np.ndarray:
    """Per example, the first layer from which the answer never changes again (the answer at
    `L` being the model's own), as `metrics.settle_layer` defines it."""
    decisions = answer.copy()
    decisions[:, -1] = final_decision
    differs = decisions != decisions[:, -1:]
    last_change = np.where(differs.any(1), differs.shape[1] - 1 - np.argmax(differs[:, ::-1], axis=1), -1)
    return last_change + 1


def exit_layers(data: ExitData, threshold: float | dict | None) -> np.ndarray:
    """The exit point of every example under a policy and threshold."""
    n_layers = data.n_layers
    if POLICIES[data.policy].confidence_lens is None:  # the oracle
        return np.maximum(settle_layers(data.answer, data.final_decision), data.min_layer)
    tau = threshold_vector(threshold, n_layers, data.min_layer)
    below = data.confidence < tau[None, :]
    below[:, n_layers] = True  # the model's own output at L
    return np.argmax(below, axis=1)


def exit_costs(data: ExitData, exit_layer: np.ndarray) -> np.ndarray:
    """Per-example layer-token cost of exiting at `exit_layer` (METHOD.md accounting):
    the prompt up to the exit, the confidence checks at `min_layer .. exit` (up to `L-1`),
    and the answer's continuation."""
    L, m = data.n_layers, data.min_layer
    policy = POLICIES[data.policy]
    cost = np.empty(len(exit_layer))
    for i, (layer, tokens) in enumerate(zip(exit_layer, data.n_tokens)):
        depth = data.depth[layer]
        checked = data.layers[m : min(layer + 1, L)] if layer >= m else data.layers[:0]
        answer_method = "simlens" if (data.answer_lens == "simlens" and layer < L) else "logit"
        total = layer_token_cost(answer_method, tokens, L, depth)
        total += policy.check_cost(data, checked, layer, answer_method)
        if data.answer_lens == "linear-simlens" and layer < L and policy.confidence_lens != "linear-simlens":
            total += data.map_cost  # the answer's own map, unless the checks already computed it
        cost[i] = total
    return cost


def _simulate(data: ExitData, threshold) -> pd.DataFrame:
    layer = exit_layers(data, threshold)
    rows = np.arange(len(layer))
    decision = np.where(layer < data.n_layers, data.answer[rows, np.minimum(layer, data.n_layers)], data.final_decision)
    cost = exit_costs(data, layer)
    full = data.n_tokens * data.n_layers
    return pd.DataFrame({
        "example_index": data.example_index,
        "exit_layer": layer,
        "decision": decision,
        "correct": decision == data.gold,
        "agrees_final": decision == data.final_decision,
        "cost": cost,
        "full_cost": full,
        "n_tokens": data.n_tokens.astype(int),
    })


def simulate_exits(predictions: pd.DataFrame, examples: pd.DataFrame, policy: str, threshold: float | dict[int, float],
                   answer_lens: str = "simlens", min_layer: int = 0, *, map_cost: float | None = None) -> pd.DataFrame:
    """Replay an exit policy on a stored run: one row per example with columns
    `example_index, exit_layer, decision, correct, agrees_final, cost, full_cost` (and `n_tokens`).

    threshold: exit at the first point `l >= min_layer` whose entropy is strictly below it
    (a float, or `{layer: tau}`); ignored by the oracle. Costs in layer-token units;
    map_cost: one Linear SimLens map (default `costs.DEFAULT_MAP_COST`; see `run_map_cost`).
    """
    data = prepare_exits(predictions, examples, policy, answer_lens, min_layer, map_cost)
    return _simulate(data, threshold)


def speedup_ratio(full_cost: float, cost: float) -> float:
    """`full_cost / cost`; infinite where the exits cost nothing in layer-tokens (every
    example answered by the logit lens at layer 0: no block ran)."""
    return float(full_cost / cost) if cost > 0 else float("inf")


def _summary(sim: pd.DataFrame, n_layers: int) -> dict:
    return {
        "accuracy": float(sim["correct"].mean()),
        "fidelity": float(sim["agrees_final"].mean()),
        "mean_exit_layer": float(sim["exit_layer"].mean()),
        "layer_token_speedup": speedup_ratio(sim["full_cost"].sum(), sim["cost"].sum()),
        "exit_rate": float((sim["exit_layer"] < n_layers).mean()),
        "mean_cost": float(sim["cost"].mean()),
        "n_examples": int(len(sim)),
    }


def default_thresholds(data: ExitData, max_points: int = 200) -> np.ndarray:
    """Thresholds that realise the distinct operating points: 0 (never exit), values between
    observed entropies at the checked layers (at most `max_points`, by quantile), and one
    above them all (exit at `min_layer`)."""
    if data.confidence is None:
        return np.array([np.nan])
    values = np.unique(data.confidence[:, data.min_layer : data.n_layers])
    if values.size == 0:
        return np.array([0.0])
    if values.size > max_points:
        values = np.unique(np.quantile(values, np.linspace(0, 1, max_points)))
    above = np.nextafter(values, np.inf)  # strictly-below exits everything up to the value
    return np.unique(np.concatenate([[0.0], above]))


def operating_curve(predictions: pd.DataFrame, examples: pd.DataFrame, policy: str, thresholds=None,
                    answer_lens: str = "simlens", min_layer: int = 0, *, map_cost: float | None = None,
                    max_points: int = 200) -> pd.DataFrame:
    """One row per global threshold: `threshold, accuracy, fidelity, mean_exit_layer,
    layer_token_speedup` (and `exit_rate`, `mean_cost`). The oracle has one row (threshold NaN)."""
    data = prepare_exits(predictions, examples, policy, answer_lens, min_layer, map_cost)
    return curve_of(data, thresholds, max_points)


def curve_of(data: ExitData, thresholds=None, max_points: int = 200) -> pd.DataFrame:
    if POLICIES[data.policy].confidence_lens is None:  # the oracle
        thresholds = [np.nan]
    elif thresholds is None:
        thresholds = default_thresholds(data, max_points)
    rows = []
    for tau in thresholds:
        rows.append({"threshold": float(tau), **_summary(_simulate(data, tau), data.n_layers)})
    return pd.DataFrame(rows)
