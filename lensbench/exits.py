"""Early exit over per-layer confidences: policies, offline simulation, calibration, and a
SimExit executor that really stops computing (METHOD.md, "SimExit").

A *policy* turns per-layer confidences (entropies of a lens at readout points
`min_layer .. L-1`) into an exit layer: the first point whose entropy is below the threshold
(one global value, or one per layer), else `L`, where the model's own output answers.

| policy | confidence | extra cost per checked layer |
| --- | --- | --- |
| `linear-simlens` | Linear SimLens's entropy (SimExit, the paper's) | one map (`map_cost` layer-tokens) |
| `logit` | the logit lens's entropy (early exit with no extra parameters, arXiv 2412.01455) | none |
| `simlens` | SimLens's entropy (a better confidence at a higher cost) | the two-token continuation, `2·(L-l)` |
| `oracle` | none: exits at the first layer from which the answer never changes again (headroom) | none |

The answer at an exit before `L` comes from `answer_lens` (SimLens by default, also `logit`
or `linear-simlens`). Offline, `simulate_exits` replays a policy from a stored run; online,
`SimExitExecutor` runs the prompt block by block, drops exited examples from the batch, and
continues their `[s]`/`[a]` pairs through the upper blocks; the two agree (a test checks it).

Calibration (`calibrate`) picks, on a calibration run only, the cheapest threshold that meets
a target (`best-accuracy`; `max-drop`: accuracy at most `max_drop` below the full model;
`fidelity`: agreement with the full model at least `1 - epsilon`, the calibrated threshold of
arXiv 2407.21082), then reports it on a disjoint test run.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensbench.compute import DEFAULT_MAP_COST, layer_token_cost
from lensbench.errors import LensbenchError
from lensbench.tasks import pad_token_id

POLICIES = ("linear-simlens", "logit", "simlens", "oracle")
CONFIDENCE_LENS = {"linear-simlens": "linear-simlens", "logit": "logit", "simlens": "simlens", "oracle": None}
ANSWER_LENSES = ("simlens", "logit", "linear-simlens")
TARGETS = ("best-accuracy", "max-drop", "fidelity")
NO_EXIT = -np.inf  # a per-layer threshold that never exits


# --- offline simulation ---------------------------------------------------------------------------


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
    if policy not in POLICIES:
        raise LensbenchError(f"unknown exit policy '{policy}' (expected one of {', '.join(POLICIES)})")
    if answer_lens not in ANSWER_LENSES:
        raise LensbenchError(f"unknown answer lens '{answer_lens}' (expected one of {', '.join(ANSWER_LENSES)})")
    lenses = set(predictions["lens"].unique())
    needed = {answer_lens} | ({CONFIDENCE_LENS[policy]} if CONFIDENCE_LENS[policy] else set())
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
    if CONFIDENCE_LENS[policy]:
        conf_frame = predictions[predictions["lens"] == CONFIDENCE_LENS[policy]]
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
    if data.policy == "oracle":
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
    cost = np.empty(len(exit_layer))
    for i, (layer, tokens) in enumerate(zip(exit_layer, data.n_tokens)):
        depth = data.depth[layer]
        checked = data.layers[m : min(layer + 1, L)] if layer >= m else data.layers[:0]
        answer_method = "simlens" if (data.answer_lens == "simlens" and layer < L) else "logit"
        total = layer_token_cost(answer_method, tokens, L, depth)
        if data.policy == "linear-simlens":
            total += len(checked) * data.map_cost
        elif data.policy == "simlens":
            # every check runs the continuation; the one at the exit is the answer's own
            total += sum(2.0 * (L - data.depth[c]) for c in checked if not (c == layer and answer_method == "simlens"))
        if data.answer_lens == "linear-simlens" and layer < L and data.policy != "linear-simlens":
            total += data.map_cost
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
    map_cost: one Linear SimLens map (default `compute.DEFAULT_MAP_COST`; see `run_map_cost`).
    """
    data = prepare_exits(predictions, examples, policy, answer_lens, min_layer, map_cost)
    return _simulate(data, threshold)


def _summary(sim: pd.DataFrame, n_layers: int) -> dict:
    return {
        "accuracy": float(sim["correct"].mean()),
        "fidelity": float(sim["agrees_final"].mean()),
        "mean_exit_layer": float(sim["exit_layer"].mean()),
        "layer_token_speedup": float(sim["full_cost"].sum() / sim["cost"].sum()),
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
    if data.policy == "oracle":
        thresholds = [np.nan]
    elif thresholds is None:
        thresholds = default_thresholds(data, max_points)
    rows = []
    for tau in thresholds:
        rows.append({"threshold": float(tau), **_summary(_simulate(data, tau), data.n_layers)})
    return pd.DataFrame(rows)


# --- calibration ------------------------------------------------------------------------------


def per_layer_thresholds(data: ExitData, precision: float) -> dict[int, float]:
    """Per layer, the largest threshold whose exits agree with the model's own answer at a rate
    of at least `precision` on these data (each layer judged on all examples); a layer where
    no threshold reaches it never exits. The one-knob family behind `--per-layer`."""
    thresholds = {}
    for layer in range(data.min_layer, data.n_layers):
        entropy = data.confidence[:, layer]
        order = np.argsort(entropy, kind="stable")
        sorted_entropy = entropy[order]
        agrees = (data.answer[order, layer] == data.final_decision[order]).astype(float)
        prefix = np.cumsum(agrees) / np.arange(1, len(agrees) + 1)
        # a cut after position k is realisable only between distinct entropies
        cut_ok = np.append(sorted_entropy[1:] > sorted_entropy[:-1], True)
        good = np.nonzero((prefix >= precision - 1e-12) & cut_ok)[0]
        if good.size == 0:
            thresholds[layer] = NO_EXIT
            continue
        k = good[-1]
        upper = sorted_entropy[k + 1] if k + 1 < len(sorted_entropy) else np.inf
        thresholds[layer] = float((sorted_entropy[k] + upper) / 2) if np.isfinite(upper) else float(np.nextafter(sorted_entropy[k], np.inf))
    return thresholds


def _load_run(run):
    from lensbench.store import Run, open_run

    return run if isinstance(run, Run) else open_run(run)


def run_map_cost(run) -> float | None:
    """The map cost (layer-tokens) recorded by the run's Linear SimLens, if any."""
    from lensbench.lenses.linear import CONFIG_FILE

    for folder in _load_run(run).manifest.get("config", {}).get("linear", []) or []:
        path = Path(folder) / CONFIG_FILE
        if path.exists():
            config = json.loads(path.read_text())
            if config.get("kind") == "linear-simlens" and config.get("map_cost"):
                return float(config["map_cost"])
    return None


def check_disjoint(calib_examples: pd.DataFrame, test_examples: pd.DataFrame) -> None:
    """Refuse a calibration run and a test run that share an example id."""
    shared = set(calib_examples["example_id"]) & set(test_examples["example_id"])
    if shared:
        some = ", ".join(sorted(map(str, shared))[:3])
        raise LensbenchError(
            f"the calibration and test runs share {len(shared)} example(s) (e.g. {some}); "
            "calibrate on TASK@calib and test on TASK@test"
        )


def _meets(curve: pd.DataFrame, target: str, full_accuracy: float, epsilon: float, max_drop: float) -> pd.Series:
    if target == "best-accuracy":
        return curve["accuracy"] >= curve["accuracy"].max() - 1e-12
    if target == "max-drop":
        return curve["accuracy"] >= full_accuracy - max_drop - 1e-12
    if target == "fidelity":
        return curve["fidelity"] >= 1 - epsilon - 1e-12
    raise LensbenchError(f"unknown calibration target '{target}' (expected one of {', '.join(TARGETS)})")


def choose_threshold(data: ExitData, target: str, per_layer: bool = False, epsilon: float = 0.01,
                     max_drop: float = 0.01, thresholds=None) -> tuple[object, dict]:
    """The cheapest setting meeting `target` on `data` (ties: higher accuracy). Returns the
    threshold (a float, a `{layer: tau}` dict, or None for the oracle) and its metrics."""
    full_accuracy = float(np.mean(data.final_decision == data.gold))
    if data.policy == "oracle":
        return None, _summary(_simulate(data, None), data.n_layers)
    if per_layer:
        knobs = np.linspace(0.5, 1.0, 51) if thresholds is None else np.asarray(thresholds, float)
        settings = [per_layer_thresholds(data, q) for q in knobs]
    else:
        knobs = default_thresholds(data) if thresholds is None else np.asarray(thresholds, float)
        settings = [float(t) for t in knobs]
    rows = [{"knob": float(k), **_summary(_simulate(data, s), data.n_layers)} for k, s in zip(knobs, settings)]
    curve = pd.DataFrame(rows)
    ok = curve[_meets(curve, target, full_accuracy, epsilon, max_drop)]
    if ok.empty:  # cannot happen with the default grids (never exiting meets every target)
        raise LensbenchError(f"no threshold meets the target '{target}' on the calibration data")
    best = ok.sort_values(["mean_cost", "accuracy"], ascending=[True, False], kind="stable").index[0]
    metrics = dict(rows[best])
    metrics["full_accuracy"] = full_accuracy
    return settings[best], metrics


def _json_threshold(threshold):
    if isinstance(threshold, dict):
        return {str(k): (None if not np.isfinite(v) else float(v)) for k, v in threshold.items()}
    return threshold


def parse_threshold(value) -> float | dict[int, float] | None:
    """A threshold as stored in JSON (a number, `{"layer": tau or null}`, or null)."""
    if isinstance(value, dict):
        return {int(k): (NO_EXIT if v is None else float(v)) for k, v in value.items()}
    return None if value is None else float(value)


def calibrate(calib_run, test_run, policy: str, target: str, answer_lens: str = "simlens", min_layer: int = 0, *,
              per_layer: bool = False, epsilon: float = 0.01, max_drop: float = 0.01, thresholds=None,
              map_cost: float | None = None) -> dict:
    """Choose the cheapest threshold meeting `target` on `calib_run`, report it on `test_run`.

    calib_run, test_run: run folders (or `Run`s) of the same model on disjoint examples (refused
    otherwise); target: best-accuracy, max-drop (accuracy >= full - max_drop) or fidelity
    (>= 1 - epsilon); per_layer: one threshold per layer from the precision family
    (`per_layer_thresholds`) instead of a global one. The test run is read only after the
    threshold is fixed. `wall_clock_speedup` is None here (see `measure_speedup`).
    """
    if target not in TARGETS:
        raise LensbenchError(f"unknown calibration target '{target}' (expected one of {', '.join(TARGETS)})")
    calib, test = _load_run(calib_run), _load_run(test_run)
    calib_examples, test_examples = calib.examples(), test.examples()
    check_disjoint(calib_examples, test_examples)
    model_a = calib.manifest.get("model", {}).get("source_sha256")
    model_b = test.manifest.get("model", {}).get("source_sha256")
    if model_a != model_b:
        raise LensbenchError(f"the calibration run ({calib.path}) and the test run ({test.path}) used different models")
    if map_cost is None:
        map_cost = run_map_cost(calib)
    calib_data = prepare_exits(calib.predictions(), calib_examples, policy, answer_lens, min_layer, map_cost)
    threshold, calib_metrics = choose_threshold(calib_data, target, per_layer, epsilon, max_drop, thresholds)
    # only now is the test run read
    test_data = prepare_exits(test.predictions(), test_examples, policy, answer_lens, min_layer, map_cost)
    test_sim = _simulate(test_data, threshold)
    test_metrics = _summary(test_sim, test_data.n_layers)
    test_metrics["full_accuracy"] = float(np.mean(test_data.final_decision == test_data.gold))
    test_metrics["wall_clock_speedup"] = None
    return {
        "policy": policy,
        "target": target,
        "epsilon": epsilon if target == "fidelity" else None,
        "max_drop": max_drop if target == "max-drop" else None,
        "answer_lens": answer_lens,
        "min_layer": min_layer,
        "per_layer": per_layer,
        "threshold": _json_threshold(threshold),
        "map_cost": calib_data.map_cost,
        "calib_run": str(calib.path),
        "test_run": str(test.path),
        "calib": calib_metrics,
        "test": test_metrics,
    }


# --- the executor: real early stopping -----------------------------------------------------------


@dataclass
class ExecutorResult:
    """What an executor run decided, per example (in the order given)."""

    example_index: list[int]
    exit_layer: list[int]
    decision: list[int]
    entropy: list[float]  # the confidence at the exit (NaN at L)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"example_index": self.example_index, "exit_layer": self.exit_layer,
                             "decision": self.decision, "entropy": self.entropy})


MAX_GRAPHED_PAIRS = 16


class SimExitExecutor:
    """Early exit that stops computing: the prompt runs block by block, examples whose
    confidence at a readout point falls below the threshold leave the batch, and their
    `[s]`/`[a]` pairs are continued by SimLens (`continue_slots`) for the answer.

    model: a HookedTransformer; linear_lens: a fitted `LinearLens` (needed by the
    `linear-simlens` policy or answer); threshold: a float or `{layer: tau}`; policy:
    linear-simlens (SimExit), logit or simlens; entropy: over the candidates or the vocabulary.
    Prompts are right-padded, so no attention mask is needed; rows that leave are cut out and
    the batch is trimmed to the longest remaining prompt.

    cuda_graphs (default: on for a model on one CUDA device, consecutive positions): the
    SimLens continuation of leaving pairs replays per-block CUDA graphs
    (`GraphedContinuation`, captured once per group size up to MAX_GRAPHED_PAIRS) instead of
    calling the blocks from Python. Hooks added to the model after capture are not seen by the
    graphs.
    """

    def __init__(self, model, linear_lens=None, threshold: float | dict = 0.0, policy: str = "linear-simlens",
                 answer_lens: str = "simlens", min_layer: int = 0, entropy: str = "candidates",
                 positions: str = "consecutive", pad_id: int = 0, cuda_graphs: bool | None = None):
        if policy not in POLICIES or policy == "oracle":
            raise LensbenchError(f"the executor runs the policies linear-simlens, logit and simlens (got '{policy}')")
        if answer_lens not in ANSWER_LENSES:
            raise LensbenchError(f"unknown answer lens '{answer_lens}' (expected one of {', '.join(ANSWER_LENSES)})")
        if "linear-simlens" in (policy, answer_lens) and linear_lens is None:
            raise LensbenchError("the linear-simlens policy needs a fitted Linear SimLens (--linear DIR)")
        if entropy not in ("candidates", "vocab"):
            raise LensbenchError(f"entropy must be candidates or vocab (got '{entropy}')")
        n_layers = model.cfg.n_layers
        if not 0 <= min_layer <= n_layers:
            raise LensbenchError(f"min_layer must be in 0..{n_layers} (got {min_layer})")
        if linear_lens is not None:
            linear_lens.check_model(model, None)
            if linear_lens.config.site != "pre":
                raise LensbenchError("the executor exits at hook_resid_pre points; this linear lens was fitted at 'mid'")
        self.model = model
        self.linear_lens = linear_lens
        self.policy = policy
        self.answer_lens = answer_lens
        self.min_layer = min_layer
        self.entropy_mode = entropy
        self.positions = positions
        self.pad_id = pad_id
        self.tau = threshold_vector(threshold, n_layers, min_layer).tolist()
        from lensbench.lenses.simlens import cuda_graphs_possible

        on_cuda = cuda_graphs_possible(model)
        if cuda_graphs and not on_cuda:
            raise LensbenchError("cuda_graphs needs the model on one CUDA device")
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        self._graphs: dict[int, object] = {}

    # readouts at the answer position; candidates only unless the vocabulary entropy is asked for
    def _readout(self, x: Float[Tensor, "n d_model"], cand: Int[Tensor, "n cand"], mask) -> tuple[Tensor, Tensor]:
        from lensbench.readout import unembed

        model = self.model
        if self.entropy_mode == "vocab":
            logits = unembed(model, x)
            cand_logits = logits.gather(1, cand.to(logits.device))
        else:  # only the candidates' columns of W_U: the cheap readout the cost model counts
            normed = model.ln_final(x.to(model.W_U.device)[:, None, :])[:, 0]
            cand = cand.to(normed.device)
            cand_logits = (torch.einsum("nd,ncd->nc", normed, model.W_U.T[cand]) + model.b_U[cand]).float()
        cand_logits = cand_logits.masked_fill(~mask.to(cand_logits.device), -torch.inf)
        cand_logprobs = torch.log_softmax(cand_logits, -1)
        source = cand_logprobs if self.entropy_mode == "candidates" else torch.log_softmax(logits, -1)
        from lensbench.readout import entropy

        return entropy(source), cand_logprobs.argmax(-1)

    def _graphed(self, n: int):
        """The CUDA-graphed continuation for `n` pairs, or None where graphs are off, fail or
        would cost more to capture than they save (more than MAX_GRAPHED_PAIRS pairs)."""
        from lensbench.lenses.simlens import GraphedContinuation

        if not self.cuda_graphs or self.positions != "consecutive" or n > MAX_GRAPHED_PAIRS:
            return None
        if n not in self._graphs:
            try:
                self._graphs[n] = GraphedContinuation(self.model, n)
            except Exception as exc:  # noqa: BLE001 - an uncapturable model runs eagerly, said once
                warnings.warn(f"SimExit: CUDA graphs unavailable ({type(exc).__name__}: {exc}); continuing eagerly")
                self.cuda_graphs = False
                return None
        return self._graphs[n]

    def _continue(self, s: Tensor, a: Tensor, layers: list[int], lengths: Tensor) -> Tensor:
        from lensbench.lenses.simlens import continue_slots
        from lensbench.readout import ReadoutPoint

        n_layers = self.model.cfg.n_layers
        z = torch.stack([s, a], dim=1)
        if self.cuda_graphs:
            groups: dict[int, list[int]] = {}
            for row, layer in enumerate(layers):
                groups.setdefault(int(layer), []).append(row)
            runners = {layer: self._graphed(len(rows)) for layer, rows in groups.items()}
            if all(r is not None for r in runners.values()):
                out = torch.empty(len(layers), z.shape[-1], dtype=z.dtype, device=z.device)
                for layer, rows in groups.items():
                    index = torch.tensor(rows, device=z.device)
                    out[index] = runners[layer].run(z[index], layer).to(z.dtype)
                return out
        starts = [ReadoutPoint(int(layer), "pre", n_layers) for layer in layers]
        position_ids = None
        if self.positions == "original":
            position_ids = torch.stack([torch.zeros_like(lengths), lengths - 1], 1).to(z.device)
        out, _ = continue_slots(self.model, z, starts, position_ids)
        return out

    def _confidence_input(self, layer: int, s: Tensor, h: Tensor, lengths: Tensor) -> Tensor:
        if self.policy == "linear-simlens":
            return self.linear_lens.transform(h, layer)
        if self.policy == "logit":
            return h
        return self._continue(s, h, [layer] * len(h), lengths)

    @torch.inference_mode()
    def run_batch(self, batch) -> ExecutorResult:
        """One batch of `EncodedExample`s (any lengths), right-padded."""
        from lensbench.readout import block_device, pad_right

        model = self.model
        n_layers = model.cfg.n_layers
        device = model.cfg.device
        tokens, lengths = pad_right([e.tokens for e in batch], self.pad_id, device)
        n_cand = max(len(e.candidate_ids) for e in batch)
        cand = torch.zeros(len(batch), n_cand, dtype=torch.long, device=device)
        mask = torch.zeros(len(batch), n_cand, dtype=torch.bool, device=device)
        for row, e in enumerate(batch):
            cand[row, : len(e.candidate_ids)] = torch.tensor(e.candidate_ids)
            mask[row, : len(e.candidate_ids)] = True
        exit_layer = [n_layers] * len(batch)
        decision = [0] * len(batch)
        entropy = [float("nan")] * len(batch)
        pending: list[tuple[int, int, Tensor, Tensor]] = []  # (row, layer, s, a) awaiting SimLens

        resid = model(tokens, stop_at_layer=0)
        rows = torch.arange(len(batch), device=device)
        active_lengths = lengths
        for layer in range(n_layers):
            tau = self.tau[layer]
            if tau > NO_EXIT:
                pick = torch.arange(len(rows), device=resid.device)
                h = resid[pick, (active_lengths - 1).to(resid.device)]
                s = resid[:, 0]
                x = self._confidence_input(layer, s, h, active_lengths)
                ent, dec = self._readout(x, cand[rows], mask[rows])
                leave = ent < tau
                if bool(leave.any()):
                    leave_rows = torch.nonzero(leave).flatten()
                    if self.answer_lens == "simlens" and self.policy != "simlens":
                        for r in leave_rows.tolist():
                            pending.append((int(rows[r]), layer, s[r], h[r]))
                    elif self.answer_lens == "linear-simlens" and self.policy != "linear-simlens":
                        _, dec = self._readout(self.linear_lens.transform(h, layer), cand[rows], mask[rows])
                    elif self.answer_lens == "logit" and self.policy != "logit":
                        _, dec = self._readout(h, cand[rows], mask[rows])
                    for r in leave_rows.tolist():
                        original = int(rows[r])
                        exit_layer[original] = layer
                        entropy[original] = float(ent[r])
                        decision[original] = int(dec[r])
                    keep = ~leave.to(resid.device)
                    resid = resid[keep]
                    rows = rows[keep.to(rows.device)]
                    active_lengths = active_lengths[keep.to(active_lengths.device)]
                    if not rows.numel():
                        break
                    resid = resid[:, : int(active_lengths.max())]
            resid = model.blocks[layer](resid.to(block_device(model, layer)))
        if rows.numel():
            pick = torch.arange(len(rows), device=resid.device)
            h = resid[pick, (active_lengths - 1).to(resid.device)]
            _, dec = self._readout(h, cand[rows], mask[rows])
            for r, original in enumerate(rows.tolist()):
                decision[original] = int(dec[r])
        if pending:
            originals = [p[0] for p in pending]
            out = self._continue(torch.stack([p[2] for p in pending]), torch.stack([p[3] for p in pending]),
                                 [p[1] for p in pending], lengths[originals])
            index = torch.tensor(originals, device=device)
            _, dec = self._readout(out, cand[index], mask[index])
            for r, original in enumerate(originals):
                decision[original] = int(dec[r])
        return ExecutorResult([e.index for e in batch], exit_layer, decision, entropy)

    def run(self, encoded, batch_size: int = 8) -> ExecutorResult:
        """All examples, in length-sorted batches (as the runner forms them)."""
        from lensbench.runner import make_batches

        parts = [self.run_batch(batch) for batch in make_batches(list(encoded), batch_size)]
        result = ExecutorResult([], [], [], [])
        for part in parts:
            result.example_index += part.example_index
            result.exit_layer += part.exit_layer
            result.decision += part.decision
            result.entropy += part.entropy
        return result


@torch.inference_mode()
def run_full_model(model, encoded, batch_size: int = 8, pad_id: int = 0) -> list[int]:
    """The baseline: the full forward pass, read out at the answer position only."""
    from lensbench.readout import pad_right, unembed
    from lensbench.runner import make_batches

    decisions = []
    n_layers = model.cfg.n_layers
    for batch in make_batches(list(encoded), batch_size):
        tokens, lengths = pad_right([e.tokens for e in batch], pad_id, model.cfg.device)
        resid = model(tokens, stop_at_layer=n_layers)
        h = resid[torch.arange(len(batch), device=resid.device), (lengths - 1).to(resid.device)]
        logits = unembed(model, h)
        for row, e in enumerate(batch):
            decisions.append(int(logits[row, e.candidate_ids].argmax()))
    return decisions


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
                    warmup: int = 1) -> list[dict]:
    """Wall-clock speedup of the executor over the full model on the same examples and device,
    per batch size, next to its layer-token speedup. One dict per batch size."""
    from lensbench.compute import layer_token_cost

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
        out.append({
            "batch_size": int(batch_size),
            "n_examples": len(encoded),
            "full_seconds": full_s,
            "exit_seconds": exit_s,
            "wall_clock_speedup": full_s / exit_s if exit_s > 0 else float("nan"),
            "layer_token_speedup": float(full_cost / cost.sum()),
            "mean_exit_layer": float(np.mean(result.exit_layer)),
            "device": str(model.cfg.device),
            "device_name": torch.cuda.get_device_name() if str(model.cfg.device).startswith("cuda") else "cpu",
            **bound,
        })
    return out


@torch.inference_mode()
def attainable_speedup(model, executor: SimExitExecutor, full_seconds: float, exit_layers: list[int],
                       repeats: int = 3) -> dict:
    """The batch-size-1 wall-clock speedup SimExit would reach if deciding to exit cost
    nothing: per example, the full model's time times l/L (its prompt blocks up to its exit
    layer l; examples are taken as equally long) plus the two-token continuation from l, timed
    as the executor runs it. Layer-token accounting counts a two-token block as 2/T of a
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
    return {"attainable_exit_seconds": ideal, "attainable_wall_clock_speedup": full_seconds / ideal,
            "continuation_seconds": {str(k): v for k, v in continuation.items()}}


# --- re-encoding a run's examples (for timing on the run's own examples) -------------------------


def encoded_examples_of(run, tokenizer, limit: int | None = None):
    """The run's examples, encoded as the run encoded them (its start token)."""
    from lensbench.tasks import Example, encode_examples

    run = _load_run(run)
    table = run.examples()
    if limit is not None:
        table = table.head(limit)
    start_id = int(run.manifest["start_token"]["id"])
    examples = [Example(str(r.example_id), r.prompt, list(r.choices), int(r.gold)) for r in table.itertuples()]
    encoded, _ = encode_examples(examples, tokenizer, start_id, 10**9, skip_invalid=False)
    for enc, index in zip(encoded, table["example_index"].tolist()):
        enc.index = int(index)
    return encoded, start_id


# --- command line -----------------------------------------------------------------------------------


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes, got '{text}'")
    return sizes


def add_cli(sub) -> None:
    """`calibrate` and `exit-speed` (registered by `lensbench.report.add_cli`)."""
    from lensbench.cli import add_model_args

    p = sub.add_parser("calibrate", help="choose an exit threshold on a calibration run, report it on a test run")
    p.add_argument("--calib", required=True, help="calibration run folder (e.g. of TASK@calib)")
    p.add_argument("--test", required=True, help="test run folder, disjoint examples (e.g. TASK@test)")
    p.add_argument("--policy", default="linear-simlens", choices=POLICIES)
    p.add_argument("--target", default="all", choices=[*TARGETS, "all"], help="calibration target (default: all three)")
    p.add_argument("--epsilon", type=float, default=0.01, help="fidelity target 1 - epsilon (default 0.01)")
    p.add_argument("--max-drop", type=float, default=0.01, help="max-drop target: accuracy drop allowed (default 0.01 = 1 point)")
    p.add_argument("--answer-lens", default="simlens", choices=ANSWER_LENSES)
    p.add_argument("--min-layer", type=int, default=0, help="no exit before this readout point")
    p.add_argument("--per-layer", action="store_true", help="one threshold per layer (precision-calibrated) instead of one global")
    p.add_argument("--measure-speed", action="store_true", help="also time the executor against the full model on the test examples")
    p.add_argument("--linear", help="Linear SimLens folder for --measure-speed (default: the test run's)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 8], help="batch sizes timed (default 1,8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, help="time on the first N test examples only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", help="write the result here too")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="replay the SimLens continuation from CUDA graphs (auto: on for one CUDA device)")
    p.set_defaults(handler=cmd_calibrate)

    q = sub.add_parser("exit-speed", help="time the SimExit executor against the full model at a given threshold")
    add_model_args(q)
    q.add_argument("--task", default="capitals")
    q.add_argument("--limit", type=int, default=64)
    q.add_argument("--linear", help="Linear SimLens folder (for the linear-simlens policy)")
    q.add_argument("--policy", default="linear-simlens", choices=[p_ for p_ in POLICIES if p_ != "oracle"])
    q.add_argument("--threshold", type=float, help="global entropy threshold")
    q.add_argument("--calibration", help="a JSON written by `lensbench calibrate --json` (its threshold and options)")
    q.add_argument("--min-layer", type=int, default=0)
    q.add_argument("--answer-lens", default="simlens", choices=ANSWER_LENSES)
    q.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 8])
    q.add_argument("--repeats", type=int, default=3)
    q.add_argument("--start-token")
    q.add_argument("--json", help="write the timings here too")
    q.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="replay the SimLens continuation from CUDA graphs (auto: on for one CUDA device)")
    q.set_defaults(handler=cmd_exit_speed)


def _speed_table(rows: list[dict]) -> str:
    lines = [f"{'batch':>5} {'full s':>9} {'exit s':>9} {'wall-clock x':>12} {'attainable x':>12} {'layer-token x':>13} "
             f"{'mean exit':>9}"]
    for r in rows:
        bound = f"{r['attainable_wall_clock_speedup']:>12.2f}" if "attainable_wall_clock_speedup" in r else f"{'-':>12}"
        lines.append(f"{r['batch_size']:>5} {r['full_seconds']:>9.3f} {r['exit_seconds']:>9.3f} {r['wall_clock_speedup']:>12.2f} "
                     f"{bound} {r['layer_token_speedup']:>13.2f} {r['mean_exit_layer']:>9.2f}")
    lines.append("attainable: the batch-1 speedup if exit decisions were free (prompt blocks to the exit layer + the "
                 "measured two-token continuation)")
    return "\n".join(lines)


def format_calibration(result: dict) -> str:
    t, c = result["test"], result["calib"]
    thr = result["threshold"]
    thr_text = "per layer" if isinstance(thr, dict) else ("-" if thr is None else f"{thr:.4g}")
    wall = t.get("wall_clock_speedup")
    return (f"{result['policy']:<15} {result['target']:<14} thr {thr_text:>9} | calib acc {c['accuracy']:.3f} fid {c['fidelity']:.3f} | "
            f"test acc {t['accuracy']:.3f} (full {t['full_accuracy']:.3f}) fid {t['fidelity']:.3f} exit {t['mean_exit_layer']:.2f} "
            f"x{t['layer_token_speedup']:.2f} layer-token" + (f", x{wall:.2f} wall-clock" if wall else ""))


GRAPH_OPTIONS = {"auto": None, "on": True, "off": False}


def _executor_for(model, run, policy, threshold, answer_lens, min_layer, linear_dir, pad_id, cuda_graphs=None):
    from lensbench.lenses.linear import LinearLens

    linear = None
    if "linear-simlens" in (policy, answer_lens):
        folder = linear_dir
        if folder is None:
            folders = (run.manifest.get("config", {}).get("linear") or []) if run is not None else []
            kinds = [f for f in folders if LinearLens.load(f).config.kind == "linear-simlens"]
            if not kinds:
                raise LensbenchError("the linear-simlens policy needs --linear DIR")
            folder = kinds[0]
        linear = LinearLens.load(folder)
    entropy = run.manifest.get("config", {}).get("entropy", "candidates") if run is not None else "candidates"
    positions = run.manifest.get("config", {}).get("positions", "consecutive") if run is not None else "consecutive"
    return SimExitExecutor(model, linear, threshold, policy, answer_lens, min_layer, entropy, positions, pad_id, cuda_graphs)


def cmd_calibrate(args) -> int:
    targets = list(TARGETS) if args.target == "all" else [args.target]
    results = [calibrate(args.calib, args.test, args.policy, t, args.answer_lens, args.min_layer, per_layer=args.per_layer,
                         epsilon=args.epsilon, max_drop=args.max_drop) for t in targets]
    if args.measure_speed:
        from lensbench.models import load_model

        test = _load_run(args.test)
        model, info = load_model(test.manifest["model"]["spec"], args.device, args.dtype)
        encoded, start_id = encoded_examples_of(test, model.tokenizer, args.limit)
        pad_id = pad_token_id(model.tokenizer, start_id)
        for result in results:
            if result["policy"] == "oracle":
                continue
            executor = _executor_for(model, test, result["policy"], parse_threshold(result["threshold"]),
                                     result["answer_lens"], result["min_layer"], args.linear, pad_id,
                                     GRAPH_OPTIONS[args.cuda_graphs])
            timings = measure_speedup(model, encoded, executor, args.batch_sizes, args.repeats)
            result["test"]["timings"] = timings
            result["test"]["wall_clock_speedup"] = timings[-1]["wall_clock_speedup"]
    for result in results:
        print(format_calibration(result))
        if result["test"].get("timings"):
            print(_speed_table(result["test"]["timings"]))
    if args.json:
        from lensbench.store import atomic_write_json

        atomic_write_json(Path(args.json), results if len(results) > 1 else results[0])
    return 0


def cmd_exit_speed(args) -> int:
    from lensbench.models import load_model
    from lensbench.tasks import encode_examples, load_task, start_token_id

    threshold, min_layer, answer_lens, policy = args.threshold, args.min_layer, args.answer_lens, args.policy
    if args.calibration:
        saved = json.loads(Path(args.calibration).read_text())
        saved = saved[0] if isinstance(saved, list) else saved
        threshold, min_layer = parse_threshold(saved["threshold"]), saved["min_layer"]
        answer_lens, policy = saved["answer_lens"], saved["policy"]
    if threshold is None:
        raise LensbenchError("give --threshold or --calibration FILE")
    model, info = load_model(args.model, args.device, args.dtype, args.n_ctx)
    start_id = start_token_id(model.tokenizer, args.start_token)
    encoded, _ = encode_examples(load_task(args.task)[: args.limit], model.tokenizer, start_id, model.cfg.n_ctx, True)
    pad_id = pad_token_id(model.tokenizer, start_id)
    linear = None
    if args.linear:
        from lensbench.lenses.linear import LinearLens

        linear = LinearLens.load(args.linear)
        linear.check_model(model, info)
    executor = SimExitExecutor(model, linear, threshold, policy, answer_lens, min_layer, pad_id=pad_id,
                               cuda_graphs=GRAPH_OPTIONS[args.cuda_graphs])
    rows = measure_speedup(model, encoded, executor, args.batch_sizes, args.repeats)
    print(f"{policy} exit on {len(encoded)} examples of {args.task}, {info.spec} on {rows[0]['device_name']}")
    print(_speed_table(rows))
    if args.json:
        from lensbench.store import atomic_write_json

        atomic_write_json(Path(args.json), rows)
    return 0
