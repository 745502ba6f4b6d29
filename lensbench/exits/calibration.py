"""Calibration: the cheapest exit threshold meeting a target on a calibration run, reported on
a disjoint test run (`calibrate`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from lensbench.errors import LensbenchError
from lensbench.exits.policies import NO_EXIT, POLICIES
from lensbench.lenses.linear import CONFIG_FILE
from lensbench.store import as_run
from lensbench.exits.simulate import ExitData, _simulate, _summary, default_thresholds, prepare_exits

TARGETS = ("best-accuracy", "max-drop", "fidelity")


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


def run_map_cost(run) -> float | None:
    """The map cost (layer-tokens) of the run's Linear SimLens, if any: the one `eval` recorded
    in the manifest (`map_cost`, from the lens's config). A run made before manifests recorded
    it falls back to its `--linear` folders, where they still exist."""
    manifest = as_run(run).manifest
    if "map_cost" in manifest:
        return None if manifest["map_cost"] is None else float(manifest["map_cost"])
    for folder in manifest.get("config", {}).get("linear", []) or []:
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
    if POLICIES[data.policy].confidence_lens is None:  # the oracle
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
    calib, test = as_run(calib_run), as_run(test_run)
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


def format_calibration(result: dict) -> str:
    t, c = result["test"], result["calib"]
    thr = result["threshold"]
    thr_text = "per layer" if isinstance(thr, dict) else ("-" if thr is None else f"{thr:.4g}")
    wall = t.get("wall_clock_speedup")
    return (f"{result['policy']:<15} {result['target']:<14} thr {thr_text:>9} | calib acc {c['accuracy']:.3f} fid {c['fidelity']:.3f} | "
            f"test acc {t['accuracy']:.3f} (full {t['full_accuracy']:.3f}) fid {t['fidelity']:.3f} exit {t['mean_exit_layer']:.2f} "
            f"x{t['layer_token_speedup']:.2f} layer-token" + (f", x{wall:.2f} wall-clock" if wall else ""))
