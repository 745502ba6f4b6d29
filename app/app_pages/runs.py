"""Runs: per-layer accuracy and fidelity per lens, Iso-Compute curves (each with its bootstrap
interval band unless the sidebar hides them), the manifest."""

from __future__ import annotations

import streamlit as st

from app import data, ui
from lensbench import plotting

st.title("Runs")
run = ui.current_run()
complete = ui.complete_runs()
paths = [str(r.path) for r in complete]
by_path = {str(r.path): r for r in complete}
# The run chosen in the sidebar is always the first run compared: choosing another run there
# replaces it here (the other runs compared stay).
previous = st.session_state.get("_lb_runs_sidebar_run")
compared = [p for p in st.session_state.get("runs-compare", []) if p in by_path]
if previous != str(run.path) or not compared:
    compared = [str(run.path)] + [p for p in compared if p not in (previous, str(run.path))]
    st.session_state["runs-compare"] = compared
st.session_state["_lb_runs_sidebar_run"] = str(run.path)
chosen = st.multiselect("Runs to compare", paths, key="runs-compare", format_func=lambda p: by_path[p].name,
                        help="the first is the run chosen in the sidebar")
if not chosen:
    st.info("Choose at least one run.")
    raise ui.PageEnd
selected = [by_path[p] for p in chosen]
summaries = {r.name: data.summary(*data.key(r)) for r in selected}

rows = []
for r in selected:
    s = summaries[r.name]
    rows.append({"run": r.name, "model": r.manifest.get("model", {}).get("spec"), "task": r.manifest.get("task"),
                 "examples": s["n_examples"], "layers": s["final_layer"], "final accuracy": round(s["final_accuracy"], 4),
                 "chance": round(data.chance(*data.key(r)) or float("nan"), 3),
                 "lenses": ", ".join(plotting.lens_label(lens) for lens in s["lenses"])})
st.dataframe(rows, hide_index=True)

all_lenses = plotting.lens_order(lens for s in summaries.values() for lens in s["lenses"])
default = [lens for lens in all_lenses if not lens.startswith("simlens[")] or all_lenses
# A lens that comes with a newly compared run is shown (unless it is an ablation); the reader's
# choices among the others stay.
known = st.session_state.get("_lb_runs_lenses_known", [])
if "runs-lenses" in st.session_state:
    kept = [lens for lens in (st.session_state["runs-lenses"] or []) if lens in all_lenses]
    st.session_state["runs-lenses"] = kept + [lens for lens in default if lens not in known and lens not in kept]
st.session_state["_lb_runs_lenses_known"] = all_lenses
lenses = st.pills("Lenses", all_lenses, selection_mode="multi", key="runs-lenses", format_func=plotting.lens_label,
                  default=None if "runs-lenses" in st.session_state else default) or []

st.subheader("Per-layer accuracy and fidelity")
mixed = len({int(s["final_layer"]) for s in summaries.values()}) > 1
if st.session_state.get("_lb_runs_mixed") != mixed or "runs-axis" not in st.session_state:
    # runs of different depths are compared on relative depth unless the reader chooses otherwise
    st.session_state["runs-axis"] = "relative" if mixed else "layer"
st.session_state["_lb_runs_mixed"] = mixed
c1, c2 = st.columns(2)
axis = c1.radio("Layer axis", ["layer", "relative"], horizontal=True, key="runs-axis",
                format_func=lambda x: {"layer": "layer", "relative": "relative depth (layer / number of layers)"}[x],
                help="relative depth puts models of different depths on one axis")
arrangement = "overlay"
if len(selected) > 1:
    arrangement = c2.radio("Runs", ["facet", "overlay"], horizontal=True, key="runs-arrangement",
                           format_func=lambda x: {"facet": "side by side", "overlay": "overlaid (one marker per run)"}[x])
intervals = ui.show_intervals()
if intervals:
    st.caption(f"Shaded: {data.interval_settings()} (docs/METHOD.md, 'Uncertainty'); hover a point for its interval.")
curves = {r.name: {"lenses": data.per_layer_intervals(*data.key(r)) if intervals else summaries[r.name]["lenses"],
                   "n_layers": int(summaries[r.name]["final_layer"]),
                   "final_accuracy": summaries[r.name]["final_accuracy"], "chance": data.chance(*data.key(r))}
          for r in selected}
ui.plot(plotting.runs_per_layer_figure(curves, lenses, x=axis, arrangement=arrangement, bands=intervals,
                                       level=data.BOOTSTRAP[2]), key="runs-per-layer")

st.subheader("Iso-Compute accuracy")
st.caption("Accuracy at the deepest readout point whose mean per-example cost fits the budget "
           "(layer-token units; see docs/METHOD.md, 'Compute accounting').")
for r in selected:
    # the report's numbers (lenses without a cost model have no curve)
    present = tuple(lens for lens in lenses if lens in summaries[r.name]["lenses"])
    iso = data.iso_compute(*data.key(r), present) if present else {"curves": {}}
    if not iso["curves"]:
        st.info(f"{r.name}: none of the chosen lenses has a cost model.")
        continue
    ci = data.iso_compute_intervals(*data.key(r), present) if intervals else {"curves_ci": {}, "gain_ci": None}
    if iso["gain"] is not None:
        interval = ""
        if ci["gain_ci"] is not None:
            interval = (f" ({plotting.interval_label(data.BOOTSTRAP[2])} "
                        f"{plotting.interval_text(ci['gain_ci'], 100, '.1f', signed=True)})")
        st.markdown(f"**{r.name}**: average Iso-Compute gain of SimLens over the logit lens "
                    f"**{iso['gain'] * 100:+.1f} points**{interval}")
    fig = plotting.iso_compute_figure(iso["curves"], full_cost=iso["full_cost"],
                                      final_accuracy=summaries[r.name]["final_accuracy"], gain=iso["gain"],
                                      title=r.name if len(selected) > 1 else None, intervals=ci["curves_ci"],
                                      gain_interval=ci["gain_ci"], level=data.BOOTSTRAP[2])
    ui.plot(fig, key=f"runs-iso-{r.name}")

st.subheader("Manifest")
for r in selected:
    with st.expander(f"{r.name}: manifest.json", expanded=len(selected) == 1):
        st.json(r.manifest, expanded=1)
