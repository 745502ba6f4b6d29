"""Runs: per-layer accuracy and fidelity per lens, Iso-Compute curves, the manifest."""

from __future__ import annotations

import streamlit as st

from app import data, ui
from lensbench import plotting

st.title("Runs")
run = ui.current_run()
complete = ui.complete_runs()
paths = [str(r.path) for r in complete]
by_path = {str(r.path): r for r in complete}
chosen = st.multiselect("Runs to compare", paths, default=[str(run.path)], key="runs-compare",
                        format_func=lambda p: by_path[p].name)
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
                 "lenses": ", ".join(s["lenses"])})
st.dataframe(rows, hide_index=True)

all_lenses = list(dict.fromkeys(lens for s in summaries.values() for lens in s["lenses"]))
default = [lens for lens in all_lenses if not lens.startswith("simlens[")] or all_lenses
lenses = st.multiselect("Lenses", all_lenses, default=default, key="runs-lenses", format_func=plotting.lens_label)

st.subheader("Per-layer accuracy and fidelity")
if len(selected) == 1:
    s = summaries[selected[0].name]
    curves, final = s["lenses"], s["final_accuracy"]
    names = lenses
else:
    curves = {f"{name} · {lens}": v for name, s in summaries.items() for lens, v in s["lenses"].items() if lens in lenses}
    names, final = list(curves), None
ui.plot(plotting.per_layer_figure(curves, names, final_accuracy=final), key="runs-per-layer")

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
    if iso["gain"] is not None:
        st.markdown(f"**{r.name}**: average Iso-Compute gain of SimLens over the logit lens "
                    f"**{iso['gain'] * 100:+.1f} points**")
    fig = plotting.iso_compute_figure(iso["curves"], full_cost=iso["full_cost"],
                                      final_accuracy=summaries[r.name]["final_accuracy"], gain=iso["gain"],
                                      title=r.name if len(selected) > 1 else None)
    ui.plot(fig, key=f"runs-iso-{r.name}")

st.subheader("Manifest")
for r in selected:
    with st.expander(f"{r.name}: manifest.json", expanded=len(selected) == 1):
        st.json(r.manifest, expanded=1)
