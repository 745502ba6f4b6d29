"""Calibration: the cheapest exit threshold meeting a target on a calibration run, reported on
a disjoint test run (`calibrate`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from lensbench.errors import LensbenchError
from lensbench.exits.executor import linear_simlens_folder
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


def check_targets(epsilon: float, max_drop: float) -> None:
    """Refuse a fidelity or max-drop target outside its range (NaN included)."""
    if not 0 <= epsilon < 1:
        raise LensbenchError(f"--epsilon must be in [0, 1): the fidelity target is 1 - epsilon (got {epsilon})")
    if not 0 <= max_drop <= 1:
        raise LensbenchError(f"--max-drop must be in [0, 1]: an accuracy drop as a fraction (got {max_drop})")


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
    check_targets(epsilon, max_drop)
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
        "executor": executor_settings(test, policy, answer_lens, map_cost=calib_data.map_cost),
    }


def executor_settings(run, policy: str, answer_lens: str, linear_dir: str | None = None,
                      map_cost: float | None = None) -> dict:
    """What `lensbench exit-speed --calibration` needs to run a calibrated threshold as the
    runs were made: the model, the entropy mode and continuation positions of the (test) run,
    and the Linear SimLens the policy reads (`linear_dir`, else the run's), with its map cost."""
    config = run.manifest.get("config", {})
    model = run.manifest.get("model", {})
    linear = None
    if POLICIES[policy].needs_linear or answer_lens == "linear-simlens":
        linear = linear_dir or linear_simlens_folder(run)
        linear = None if linear is None else str(Path(linear).resolve())
    return {"model": model.get("spec"), "model_sha256": model.get("source_sha256"),
            "entropy": config.get("entropy", "candidates"), "positions": config.get("positions", "consecutive"),
            "linear": linear, "map_cost": map_cost}


CALIBRATION_KEYS = ("policy", "threshold", "answer_lens", "min_layer")


def load_calibration(path: str | Path) -> dict:
    """One result written by `lensbench calibrate --json` (the first of a list, which
    `--target all` writes), checked: a missing, unreadable or foreign file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise LensbenchError(f"--calibration {path}: no such file")
    try:
        saved = json.loads(path.read_text())
    except (ValueError, OSError, UnicodeDecodeError):
        raise LensbenchError(f"--calibration {path} is not JSON (expected the file `lensbench calibrate --json` writes)") from None
    if isinstance(saved, list) and saved:
        saved = saved[0]
    if not isinstance(saved, dict):
        raise LensbenchError(f"--calibration {path} is not a calibration result (expected `lensbench calibrate --json`'s file)")
    missing = [key for key in CALIBRATION_KEYS if key not in saved]
    if missing:
        raise LensbenchError(f"--calibration {path} lacks {', '.join(missing)} (not written by `lensbench calibrate --json`?)")
    if saved["policy"] not in POLICIES or POLICIES[saved["policy"]].confidence is None:
        raise LensbenchError(f"--calibration {path} is for policy '{saved['policy']}', which the executor cannot run")
    try:
        saved["threshold"] = parse_threshold(saved["threshold"])
        if not isinstance(saved["min_layer"], int):
            raise TypeError
    except (TypeError, ValueError):
        raise LensbenchError(f"--calibration {path} has a malformed threshold or min_layer") from None
    if saved["threshold"] is None:
        raise LensbenchError(f"--calibration {path} holds no threshold")
    return saved


def headline_speedup(timings: list[dict]) -> tuple[float | None, int | None]:
    """The headline wall-clock speedup of `measure_speedup`'s rows and its batch size: batch
    size 1 if timed (one request at a time, what early exit serves), else the smallest."""
    if not timings:
        return None, None
    row = min(timings, key=lambda r: r["batch_size"])
    return row["wall_clock_speedup"], int(row["batch_size"])


def format_calibration(result: dict) -> str:
    t, c = result["test"], result["calib"]
    thr = result["threshold"]
    thr_text = "per layer" if isinstance(thr, dict) else ("-" if thr is None else f"{thr:.4g}")
    wall = t.get("wall_clock_speedup")
    wall_text = ""
    if wall:
        batch = t.get("wall_clock_speedup_batch_size")
        wall_text = f", x{wall:.2f} wall-clock" + (f" (batch {batch})" if batch is not None else "")
    return (f"{result['policy']:<15} {result['target']:<14} thr {thr_text:>9} | calib acc {c['accuracy']:.3f} fid {c['fidelity']:.3f} | "
            f"test acc {t['accuracy']:.3f} (full {t['full_accuracy']:.3f}) fid {t['fidelity']:.3f} exit {t['mean_exit_layer']:.2f} "
            f"x{format_speedup(t['layer_token_speedup'])} layer-token" + wall_text)


def format_speedup(value) -> str:
    """A speedup with two decimals; `inf` for an infinite one (stored as null in JSON)."""
    return "inf" if value is None or not np.isfinite(value) else f"{value:.2f}"
