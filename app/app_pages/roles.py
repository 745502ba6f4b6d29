"""Roles: the [s]/[a] slot ablations per layer (with their interval bands), swap follow-rates,
attention [a] -> [s]."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import data, ui
from lensbench import plotting

st.title("Roles of [s] and [a]")
run = ui.current_run()
path, stamp = data.key(run)
summary = data.summary(path, stamp)
per_layer = summary["lenses"]
ablations = plotting.ablation_lenses(per_layer)

st.subheader("Slot ablations per layer")
if not ablations:
    st.info(f"Run `{run.name}` has no SimLens slot ablations; evaluate with e.g. "
            "`--lenses logit,simlens --ablations drop-s,drop-a,a=swap` to see them.")
else:
    chosen = st.pills("Ablations", ablations, selection_mode="multi", default=ablations, key="roles-ablations",
                      format_func=plotting.lens_label) or []
    metric = st.radio("Metric", ["accuracy", "fidelity"], horizontal=True, key="roles-metric")
    references = [r for r in ("simlens", "logit") if r in per_layer]
    intervals = ui.show_intervals()
    if intervals:
        st.caption(f"Shaded: {data.interval_settings()}.")
    fig = plotting.ablation_figure(data.per_layer_intervals(path, stamp) if intervals else per_layer, chosen,
                                   references, metrics=(metric,), final_accuracy=summary["final_accuracy"],
                                   chance=data.chance(path, stamp) if metric == "accuracy" else None,
                                   bands=intervals, level=data.BOOTSTRAP[2])
    ui.plot(fig, key="roles-ablation")
    table = pd.DataFrame({plotting.lens_label(lens): per_layer[lens][metric] for lens in [*references, *chosen]},
                         index=pd.Index(per_layer[(references or chosen)[0]]["layer"], name="layer"))
    with st.expander(f"{metric} per layer (table)"):
        st.dataframe(table.style.format("{:.3f}"), height=300)

st.subheader("Swap follow-rates")
swap = summary.get("swap") or {}
if not swap:
    st.info("No slot swaps in this run (e.g. `--ablations a=swap`): nothing to follow.")
else:
    st.caption("Among the *informative* pairs — those whose donor and recipient decide differently under SimLens at "
               "that layer — how often the swapped run's decision follows the donor (the slot carries the example) or "
               "stays with the recipient; the bars count the informative pairs. A gap is a layer with none: every "
               "pair decides alike there, so there is nothing to follow.")
    ui.plot(plotting.swap_figure(swap), key="roles-swap")
    for name, rates in swap.items():
        counts = rates.get("n_informative", [])
        empty = [layer for layer, n in zip(rates["layer"], counts) if not n]
        if empty:
            st.caption(f"{plotting.lens_label(name)}: no informative pair at layer(s) "
                       f"{ui.ranges(empty)}; {max(counts)} at most elsewhere.")

st.subheader("Attention from [a] to [s] in the continuation")
attention = data.attention(path, stamp)
if attention is None:
    st.info("This run has no attention record (it is written with the SimLens lens).")
else:
    mean, points = attention
    left, right = st.columns(2)
    st.caption("The continuation from readout layer l runs blocks l…L−1 only, so blocks below the readout layer "
               "have no attention to show (blank).")
    with left:
        ui.plot(plotting.attention_heatmap(mean, points, title="mean over heads"), key="roles-att-all")
    with right:
        upper = [p for p in points if p < max(points)]
        point = st.select_slider("Readout layer", upper, value=upper[len(upper) // 2], key="roles-att-point")
        ui.plot(plotting.attention_heatmap(mean, points, point=point, title=f"readout layer {point}: block × head"),
                key="roles-att-point-fig")
