"""Exits: every policy's accuracy/speedup curve in one plot; one policy's operating point (its
calibrated threshold when the run stores a calibration, else its best-accuracy point) with its
bootstrap intervals (error bars on the marked points unless the sidebar hides them), exit
layers and exit traces."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import data, ui
from lensbench import exits, plotting
from lensbench.errors import LensbenchError

BEST = "best accuracy on this run"


def default_policy(lenses: list[str]) -> str:
    """SimExit (Linear SimLens's entropy) when the run has Linear SimLens, else SimLens's, else
    the logit lens's entropy."""
    for policy in ("linear-simlens", "simlens", "logit"):
        if policy in exits.POLICIES and exits.POLICIES[policy].confidence_lens in lenses:
            return policy
    return "oracle"


def runnable(policy: str, lenses: list[str]) -> bool:
    needed = exits.POLICIES[policy].confidence_lens
    return needed is None or needed in lenses


def best_row(curve: pd.DataFrame) -> int:
    """The best-accuracy operating point; among equals, the fastest."""
    ranked = curve.assign(_speed=curve["layer_token_speedup"].fillna(np.inf))
    return int(ranked.sort_values(["accuracy", "_speed"], ascending=False, kind="stable").index[0])


def speed_text(value) -> str:
    return f"{value:.2f}×" if value is not None and np.isfinite(value) else "∞ (no block run)"


st.title("Early exits")
run = ui.current_run()
path, stamp = data.key(run)
summary = data.summary(path, stamp)
lenses = plotting.lens_order(summary["lenses"])
n_layers = int(summary["final_layer"])
calibrated = data.calibrations(path, stamp)

c1, c2, c3 = st.columns(3)
policy_names = list(exits.POLICIES)
policy = c1.selectbox(
    "Policy", policy_names, index=policy_names.index(default_policy(lenses)), key="exits-policy",
    format_func=lambda p: plotting.policy_label(p) + ("" if runnable(p, lenses) else " — not in this run"),
    help="docs/METHOD.md, 'SimExit'; lensbench/exits/. The default is SimExit when the run has Linear SimLens.")
answers = [lens for lens in exits.ANSWER_LENSES if lens in lenses] or list(exits.ANSWER_LENSES)
answer_lens = c2.selectbox("Answer lens at an exit", answers, key="exits-answer", format_func=plotting.lens_label)
min_layer = int(c3.number_input("First layer checked", 0, n_layers, 0, key="exits-min-layer"))

try:
    prepared = data.exit_data(path, stamp, policy, answer_lens, min_layer)
except LensbenchError as exc:
    needed = exits.POLICIES[policy].confidence_lens if policy in exits.POLICIES else None
    hint = (" Fit a Linear SimLens and evaluate with `--lenses ...,linear-simlens --linear DIR`."
            if needed == "linear-simlens" else "")
    st.warning(f"The policy '{policy}' cannot run on `{run.name}`: {exc}.{hint}")
    raise ui.PageEnd


def calibrations_of(name: str) -> list[dict]:
    return [c for c in calibrated if c["policy"] == name and c.get("answer_lens") == answer_lens
            and int(c.get("min_layer", 0)) == min_layer]


def curve_of(name: str) -> pd.DataFrame:
    extra = tuple(sorted({float(c["threshold"]) for c in calibrations_of(name)}))
    return data.operating_curve(path, stamp, name, answer_lens, min_layer, extra)


def start_point(name: str, curve: pd.DataFrame, start: str) -> tuple[int, str]:
    """The row of the curve a policy starts at, and its name."""
    for c in calibrations_of(name):
        if start == f"calibrated: {c['target']}":
            row = int(np.argmin(np.abs(curve["threshold"].to_numpy() - float(c["threshold"]))))
            return row, f"calibrated ({c['target']})"
    return best_row(curve), "best accuracy"


curve = curve_of(policy)
starts = [f"calibrated: {c['target']}" for c in calibrations_of(policy)] + [BEST]
if policy == "oracle":
    threshold, row, start_label = None, 0, "oracle"
    point = curve.iloc[0].to_dict()
    st.info("The oracle exits at the first layer from which the answer never changes again: it has no threshold.")
else:
    c4, c5 = st.columns([1, 3])
    start = c4.selectbox("Start at", starts, key=f"exits-start-{policy}-{answer_lens}-{min_layer}",
                         help="a threshold calibrated on a disjoint calibration run (`lensbench calibrate`, stored in "
                              "this run's calibration.json), or this run's best-accuracy point")
    start_row, start_label = start_point(policy, curve, start)
    # The slider runs over the distinct operating points of the library's sweep
    # (`exits.curve_of`; thresholds that change no exit are one step).
    thresholds = curve["threshold"].tolist()
    labels = ui.distinct_labels(thresholds)
    with c5:
        choice = st.select_slider(
            "Threshold τ: exit at the first checked layer whose entropy is below τ", options=labels,
            value=labels[start_row], key=f"exits-threshold-{policy}-{answer_lens}-{min_layer}-{start}",
        )
    row = labels.index(choice)
    threshold = thresholds[row]
    point = curve.iloc[row].to_dict()
    if row != start_row:
        start_label = "chosen"
tau = float("nan") if threshold is None else float(threshold)
sim = data.simulated_exits(path, stamp, policy, answer_lens, min_layer, tau)

where = "oracle" if threshold is None else f"τ = {threshold:.3g} ({start_label})"
st.markdown(f"**{plotting.policy_label(policy)}** at **{where}**, answering with {plotting.lens_label(answer_lens)}")
m = st.columns(5)
m[0].metric("accuracy", f"{point['accuracy']:.3f}", f"{(point['accuracy'] - summary['final_accuracy']) * 100:+.1f} pts vs full")
m[1].metric("fidelity", f"{point['fidelity']:.3f}")
m[2].metric("speedup (layer-tokens)", speed_text(point["layer_token_speedup"]))
m[3].metric("mean exit layer", f"{point['mean_exit_layer']:.1f}")
m[4].metric("exit rate", f"{point['exit_rate']:.2f}")
intervals = ui.show_intervals()


def point_intervals(name: str, tau: float) -> dict | None:
    """A point's bootstrap intervals, its threshold fixed (None when the sidebar hides them)."""
    return data.exit_intervals(path, stamp, name, answer_lens, min_layer, tau) if intervals else None


ci = point_intervals(policy, tau)
if ci is not None:
    speeds = ", ".join(exits.format_speedup(x) for x in ci["layer_token_speedup_ci"])
    st.caption(f"{data.interval_settings()}, the threshold fixed: accuracy {plotting.interval_text(ci['accuracy_ci'])} · "
               f"fidelity {plotting.interval_text(ci['fidelity_ci'])} · speedup [{speeds}]× · accuracy drop from the "
               f"full model {plotting.interval_text(ci['accuracy_drop_ci'], 100, '.1f', signed=True)} points "
               "(paired: the same resampled examples)")

# Every runnable policy's curve in one plot; each marked at its starting point, the chosen
# policy's current point as a star.
curves, marks = {}, []
for name in exits.POLICIES:
    if not runnable(name, lenses):
        continue
    other = curve if name == policy else curve_of(name)
    curves[name] = other
    if name == "oracle":
        continue
    if name == policy:
        marks.append({"x": point["layer_token_speedup"], "y": point["accuracy"], "policy": name,
                      "label": f"{plotting.policy_label(name)}: {where}",
                      "x_interval": ci and ci["layer_token_speedup_ci"], "y_interval": ci and ci["accuracy_ci"]})
    else:
        first = next((f"calibrated: {c['target']}" for c in calibrations_of(name)), BEST)
        r, label = start_point(name, other, first)
        other_ci = point_intervals(name, float(other.iloc[r]["threshold"]))
        marks.append({"x": other.iloc[r]["layer_token_speedup"], "y": other.iloc[r]["accuracy"], "policy": name,
                      "symbol": "circle-open", "size": 14,
                      "label": f"{plotting.policy_label(name)}: τ = {other.iloc[r]['threshold']:.3g} ({label})",
                      "x_interval": other_ci and other_ci["layer_token_speedup_ci"],
                      "y_interval": other_ci and other_ci["accuracy_ci"]})
left, right = st.columns([3, 2])
with left:
    fig = plotting.exit_tradeoff_figure(curves, full_accuracy=summary["final_accuracy"], operating_points=marks,
                                        title="accuracy against compute, every policy (speedup = full cost / cost)"
                                              + ("<br><sup>error bars: the marked points' intervals</sup>" if intervals
                                                 else ""), level=data.BOOTSTRAP[2])
    ui.plot(fig, key="exits-curve")
with right:
    ui.plot(plotting.exit_histogram(sim["exit_layer"], n_layers, threshold, title=f"exit layers at {where}"),
            key="exits-hist")

st.subheader("Exit traces")
examples = data.examples(path, stamp).set_index("example_index")
ids = examples.loc[sim["example_index"], "example_id"].tolist()
default = ids[: min(4, len(ids))]
picked = st.multiselect("Examples", ids, default=default, key="exits-traces", max_selections=12)
if prepared.confidence is None:
    st.info("The oracle has no confidence to trace.")
else:
    position = {int(index): i for i, index in enumerate(prepared.example_index)}
    rows = {example_id: j for j, example_id in enumerate(ids)}
    traces = {}
    for example_id in picked:
        outcome = sim.iloc[rows[example_id]]
        i = position[int(outcome["example_index"])]
        choices = list(examples.loc[int(outcome["example_index"]), "choices"])
        traces[example_id] = {
            "layers": prepared.layers.tolist(), "entropy": prepared.confidence[i].tolist(),
            "exit_layer": int(outcome["exit_layer"]), "decision": repr(choices[int(outcome["decision"])]),
            "correct": bool(outcome["correct"]),
        }
    ui.plot(plotting.exit_trace_figure(traces, threshold, min_layer,
                                       title=f"confidence of the '{plotting.policy_label(policy)}' policy per layer"),
            key="exits-traces-fig")
    table = sim.assign(example_id=ids).set_index("example_id").loc[picked]
    table.insert(1, "answer", [repr(examples.loc[int(i), "choices"][int(d)])
                               for i, d in zip(table["example_index"], table["decision"])])
    table["speedup"] = table["full_cost"] / table["cost"]
    shown = table[["exit_layer", "answer", "correct", "agrees_final", "cost", "full_cost", "speedup"]].rename(columns={
        "exit_layer": "exit layer", "agrees_final": "agrees with full", "cost": "cost with checks",
        "full_cost": "full model cost"})
    st.dataframe(shown.style.format({"cost with checks": "{:.0f}", "full model cost": "{:.0f}", "speedup": "{:.2f}×"}))
    st.caption("Costs in layer-tokens (docs/METHOD.md, 'Compute accounting'): the full model costs prompt tokens × "
               f"{n_layers} layers. An exit's cost is the prompt up to the exit layer, plus every confidence check on "
               "the way (a Linear SimLens map per checked layer for SimExit, a two-token continuation for the SimLens "
               "policy, nothing for the logit lens), plus the answer's continuation; an example that never exits pays "
               "the whole model and its checks, so its cost can exceed the full model's.")
