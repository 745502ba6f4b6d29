"""Exits: a policy and a threshold; the accuracy/speedup trade-off, exit layers, exit traces."""

from __future__ import annotations

import streamlit as st

from app import data, ui
import numpy as np

from lensbench import exits, plotting
from lensbench.errors import LensbenchError

st.title("Early exits")
run = ui.current_run()
path, stamp = data.key(run)
summary = data.summary(path, stamp)
lenses = list(summary["lenses"])
n_layers = int(summary["final_layer"])

c1, c2, c3 = st.columns(3)
policy_names = list(exits.POLICIES)
policy = c1.selectbox("Policy", policy_names, index=policy_names.index("logit") if "logit" in lenses else 0,
                      key="exits-policy", help="docs/METHOD.md, 'SimExit'; lensbench/exits/")
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

curve = data.operating_curve(path, stamp, policy, answer_lens, min_layer)
if policy == "oracle":
    threshold = None
    point = curve.iloc[0].to_dict()
    st.info("The oracle exits at the first layer from which the answer never changes again: it has no threshold.")
else:
    # The slider runs over the thresholds of the library's sweep (`exits.curve_of`): each step
    # is a distinct operating point, and the current one is a row of the cached curve.
    thresholds = curve["threshold"].tolist()
    labels = ui.distinct_labels(thresholds)
    choice = st.select_slider(
        "Threshold τ: exit at the first checked layer whose entropy is below τ", options=labels,
        value=labels[len(labels) // 4], key=f"exits-threshold-{policy}-{answer_lens}-{min_layer}",
    )
    threshold = thresholds[labels.index(choice)]
    point = curve.iloc[labels.index(choice)].to_dict()
tau = float("nan") if threshold is None else float(threshold)
sim = data.simulated_exits(path, stamp, policy, answer_lens, min_layer, tau)

m = st.columns(5)
m[0].metric("accuracy", f"{point['accuracy']:.3f}", f"{(point['accuracy'] - summary['final_accuracy']) * 100:+.1f} pts vs full")
m[1].metric("fidelity", f"{point['fidelity']:.3f}")
speed = point["layer_token_speedup"]
m[2].metric("speedup (layer-tokens)", f"{speed:.2f}×" if speed is not None and np.isfinite(speed) else "∞ (no block run)")
m[3].metric("mean exit layer", f"{point['mean_exit_layer']:.1f}")
m[4].metric("exit rate", f"{point['exit_rate']:.2f}")

label = "oracle" if threshold is None else f"τ = {threshold:.3g}"
left, right = st.columns(2)
with left:
    fig = plotting.exit_tradeoff_figure(
        {policy: curve}, full_accuracy=summary["final_accuracy"],
        operating_points=[{"x": point["layer_token_speedup"], "y": point["accuracy"], "label": label, "policy": policy}],
        title="accuracy against compute (speedup = full cost / cost)",
    )
    ui.plot(fig, key="exits-curve")
with right:
    ui.plot(plotting.exit_histogram(sim["exit_layer"], n_layers, threshold, title=f"exit layers at {label}"),
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
                                       title=f"confidence of the '{policy}' policy per layer"), key="exits-traces-fig")
    table = sim.assign(example_id=ids).set_index("example_id").loc[picked]
    table.insert(1, "answer", [repr(examples.loc[int(i), "choices"][int(d)])
                               for i, d in zip(table["example_index"], table["decision"])])
    st.dataframe(table[["exit_layer", "answer", "correct", "agrees_final", "cost", "full_cost"]])
