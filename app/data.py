"""Cached reads of run folders, all through the library.

Every function takes a run's path and its *stamp* (the manifest's modification time), so a
re-written run is read again and an unchanged one comes from the cache. Large tables are
kept with `st.cache_resource` (shared, never copied: callers must not modify them); small
derived results with `st.cache_data`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from lensbench import compute, exits, metrics, uncertainty
from lensbench.errors import LensbenchError
from lensbench.store import MANIFEST, Run, open_run

# The scalar columns the filters, settle layers, Iso-Compute and exits need.
LIGHT_COLUMNS = ["example_index", "example_id", "lens", "layer", "site", "decision", "decision_token", "gold",
                 "correct", "final_decision", "agrees_final", "entropy", "donor_index"]
# The per-readout lists a trajectory shows.
TRAJECTORY_COLUMNS = ["example_index", "lens", "layer", "decision", "decision_token", "entropy",
                      "candidate_logprobs", "topk_tokens", "topk_probs"]


def stamp(run: Run) -> int:
    return (Path(run.path) / MANIFEST).stat().st_mtime_ns


def key(run: Run) -> tuple[str, int]:
    """`(path, stamp)`: the cache key of a run's contents."""
    return str(run.path), stamp(run)


@st.cache_data(show_spinner=False, max_entries=64)
def summary(path: str, stamp: int) -> dict:
    return open_run(path).summary()


@st.cache_data(show_spinner=False, max_entries=16)
def examples(path: str, stamp: int) -> pd.DataFrame:
    return open_run(path).examples()


@st.cache_resource(show_spinner="Reading predictions…", max_entries=4)
def light_predictions(path: str, stamp: int) -> pd.DataFrame:
    """The scalar columns of predictions.parquet (shared: do not modify)."""
    return open_run(path).predictions(columns=LIGHT_COLUMNS)


@st.cache_resource(show_spinner="Reading trajectories…", max_entries=2)
def _trajectory_table(path: str, stamp: int) -> pd.DataFrame:
    frame = open_run(path).predictions(columns=TRAJECTORY_COLUMNS)
    return frame.set_index("example_index").sort_index(kind="stable")


@st.cache_data(show_spinner=False, max_entries=256)
def trajectory(path: str, stamp: int, example_index: int) -> pd.DataFrame:
    """Every lens's readouts of one example: one row per (lens, layer)."""
    table = _trajectory_table(path, stamp)
    if example_index not in table.index:
        raise LensbenchError(f"example {example_index} is not in the predictions of {path}")
    return table.loc[[example_index]].reset_index()


@st.cache_data(show_spinner=False, max_entries=32)
def settle_layers(path: str, stamp: int, lens: str) -> pd.Series:
    """`metrics.settle_layer` of `lens`, per example index."""
    return metrics.settle_layer(light_predictions(path, stamp), lens)


@st.cache_data(show_spinner=False, max_entries=32)
def final_outcomes(path: str, stamp: int) -> pd.DataFrame:
    """Per example: the model's own decision and whether it is correct (the final readout)."""
    frame = light_predictions(path, stamp)
    final = metrics.final_rows(frame)
    out = final.set_index("example_index")[["final_decision", "gold"]]
    return out.assign(correct=out["final_decision"] == out["gold"])


@st.cache_data(show_spinner=False, max_entries=32)
def disagreements(path: str, stamp: int, lens_a: str, lens_b: str) -> pd.Series:
    """Per example: at how many readout layers the two lenses decide differently."""
    frame = light_predictions(path, stamp)
    pair = frame[frame["lens"].isin([lens_a, lens_b])]
    table = pair.pivot_table(index=["example_index", "layer"], columns="lens", values="decision", aggfunc="first")
    differs = (table[lens_a] != table[lens_b]).groupby(level=0).sum()
    return differs.astype(int).rename("disagreements")


@st.cache_data(show_spinner="Computing Iso-Compute curves…", max_entries=32)
def iso_compute(path: str, stamp: int, lenses: tuple[str, ...]) -> dict:
    """The report's Iso-Compute numbers (`compute.iso_compute_tables`, at the run's map cost):
    the curve per lens, the full model's cost and, with both lenses, the SimLens-over-logit gain."""
    tables = compute.iso_compute_tables(light_predictions(path, stamp), examples(path, stamp), list(lenses),
                                        map_cost=map_cost(path, stamp))
    gain = tables["gains"].get("simlens_vs_logit")
    return {"curves": tables["curves"], "full_cost": tables["full_cost"], "gain": None if gain is None else gain["gain"],
            "gains": tables["gains"]}


# The intervals the app shows: `lensbench report`'s defaults (1000 resamples of the examples,
# seed 0, 95 %), so a page shows the intervals of the run's report.json.
BOOTSTRAP = (uncertainty.DEFAULT_RESAMPLES, uncertainty.DEFAULT_SEED, uncertainty.DEFAULT_LEVEL)


def interval_settings() -> str:
    resamples, seed, level = BOOTSTRAP
    return f"{level * 100:g} % bootstrap intervals over the examples ({resamples} resamples, seed {seed})"


@st.cache_resource(show_spinner="Resampling the examples…", max_entries=8)
def _bootstrap(path: str, stamp: int) -> tuple[uncertainty.Bootstrap, np.ndarray]:
    """The run's bootstrap (`uncertainty.run_bootstrap`, as `report.build_report` makes it; shared)."""
    boot, order = uncertainty.run_bootstrap(light_predictions(path, stamp), *BOOTSTRAP)
    for _ in boot.counts():  # the resamples drawn once here (kept by the Bootstrap when they fit)
        pass
    return boot, order


@st.cache_resource(show_spinner="Bootstrapping per-layer accuracy…", max_entries=8)
def _layer_samples(path: str, stamp: int) -> uncertainty.LayerSamples:
    """Accuracy and fidelity of every (lens, layer) on every resample (shared: do not modify)."""
    return uncertainty.resample_per_layer(light_predictions(path, stamp), _bootstrap(path, stamp)[0])


@st.cache_data(show_spinner=False, max_entries=32)
def per_layer_intervals(path: str, stamp: int) -> dict:
    """`summary["lenses"]` with each lens's `accuracy_ci` and `fidelity_ci` (the report's
    `per_layer`, `uncertainty.per_layer_intervals`)."""
    per_layer = summary(path, stamp)["lenses"]
    intervals = uncertainty.per_layer_intervals(_layer_samples(path, stamp), per_layer, _bootstrap(path, stamp)[0])
    return {lens: {**body, **intervals[lens]} for lens, body in per_layer.items()}


@st.cache_data(show_spinner=False, max_entries=32)
def iso_compute_intervals(path: str, stamp: int, lenses: tuple[str, ...]) -> dict:
    """The report's Iso-Compute intervals for `iso_compute(path, stamp, lenses)`: `curves_ci`
    per lens (`uncertainty.layers_interval`) and the gain's `gain_ci` (None without a gain)."""
    iso = iso_compute(path, stamp, lenses)
    samples, boot = _layer_samples(path, stamp), _bootstrap(path, stamp)[0]
    curves = {lens: uncertainty.layers_interval(samples, lens, curve["layer"], boot) for lens, curve in iso["curves"].items()}
    gain = iso["gains"].get("simlens_vs_logit")
    return {"curves_ci": curves, "gain_ci": None if gain is None else uncertainty.gain_interval(samples, gain, boot)}


@st.cache_data(show_spinner=False, max_entries=256)
def exit_intervals(path: str, stamp: int, policy: str, answer_lens: str, min_layer: int, threshold: float) -> dict:
    """An exit operating point's intervals, its threshold fixed (`uncertainty.exit_intervals` on
    `simulated_exits`, as `report.exit_point_intervals` gives a calibrated point):
    `accuracy_ci`, `fidelity_ci`, `layer_token_speedup_ci`, `accuracy_drop_ci` (`[lo, hi]`;
    an infinite speedup bound is inf)."""
    boot, order = _bootstrap(path, stamp)
    sim = simulated_exits(path, stamp, policy, answer_lens, min_layer, threshold)
    return uncertainty.exit_intervals(sim, boot, order, uncertainty.final_correct(light_predictions(path, stamp), order))


@st.cache_data(show_spinner=False, max_entries=16)
def attention(path: str, stamp: int):
    """`Run.attention()` as numpy: `(mean (point, block, head), points)`, or None."""
    found = open_run(path).attention()
    if found is None:
        return None
    mean, points = found
    return mean.float().numpy(), [int(p) for p in points]


@st.cache_data(show_spinner=False, max_entries=16)
def map_cost(path: str, stamp: int) -> float | None:
    return exits.run_map_cost(open_run(path))


@st.cache_resource(show_spinner="Preparing exit data…", max_entries=16)
def exit_data(path: str, stamp: int, policy: str, answer_lens: str, min_layer: int) -> exits.ExitData:
    """`exits.prepare_exits` for a policy (shared: do not modify)."""
    return exits.prepare_exits(light_predictions(path, stamp), examples(path, stamp), policy, answer_lens,
                               min_layer, map_cost(path, stamp))


@st.cache_data(show_spinner="Sweeping thresholds…", max_entries=32)
def operating_curve(path: str, stamp: int, policy: str, answer_lens: str, min_layer: int,
                    extra: tuple[float, ...] = ()) -> pd.DataFrame:
    """`exits.curve_of` over the library's default thresholds plus `extra` ones (e.g. the
    calibrated thresholds, so that they are exact points of the curve), with every operating
    point once: thresholds that exit exactly the same examples at the same layers are one step
    (an `extra` threshold stands for its step)."""
    prepared = exit_data(path, stamp, policy, answer_lens, min_layer)
    if prepared.confidence is None:
        return exits.curve_of(prepared)
    thresholds = np.unique(np.concatenate([exits.default_thresholds(prepared), np.asarray(extra, dtype=float)]))
    curve = exits.curve_of(prepared, thresholds)
    outcome = [tuple(exits.exit_layers(prepared, float(t)).tolist()) for t in curve["threshold"]]
    keep = {}
    for row, (tau, key) in enumerate(zip(curve["threshold"], outcome)):
        if key not in keep or float(tau) in extra:
            keep[key] = row
    return curve.iloc[sorted(keep.values())].reset_index(drop=True)


@st.cache_data(show_spinner=False, max_entries=64)
def chance(path: str, stamp: int) -> float | None:
    """Chance accuracy of the run's task: the mean over examples of 1 / number of candidates."""
    ex = examples(path, stamp)
    if ex.empty:
        return None
    return float(np.mean([1.0 / len(c) for c in ex["choices"]]))


@st.cache_data(show_spinner=False, max_entries=64)
def calibrations(path: str, stamp: int) -> list[dict]:
    """The global-threshold results of `lensbench calibrate --json` stored in the run folder
    (`calibration.json`, written for the test run), else none."""
    file = Path(path) / "calibration.json"
    if not file.is_file():
        return []
    try:
        saved = json.loads(file.read_text())
    except (ValueError, OSError):
        return []
    saved = saved if isinstance(saved, list) else [saved]
    return [c for c in saved if isinstance(c, dict) and isinstance(c.get("threshold"), (int, float))
            and c.get("policy") in exits.POLICIES]


@st.cache_data(show_spinner=False, max_entries=256)
def simulated_exits(path: str, stamp: int, policy: str, answer_lens: str, min_layer: int, threshold: float) -> pd.DataFrame:
    """`exits.simulate_exits` at one threshold: one row per example."""
    return exits.simulate_exits(light_predictions(path, stamp), examples(path, stamp), policy, threshold,
                                answer_lens, min_layer, map_cost=map_cost(path, stamp))


@st.cache_data(show_spinner=False, max_entries=16)
def icl_table(path: str, stamp: int, name: str) -> pd.DataFrame:
    """A table of an ICL run (`queries`, `predictions`, `convergence`, `decode`, `attention`)."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(path) / f"{name}.parquet").to_pandas()
