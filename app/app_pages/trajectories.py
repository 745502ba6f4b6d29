"""Trajectories: one example's candidate probabilities per layer under every lens."""

from __future__ import annotations

import streamlit as st

from app import data, ui, views
from lensbench import plotting

st.title("Trajectories")
run = ui.current_run()
path, stamp = data.key(run)
examples = data.examples(path, stamp)
summary = data.summary(path, stamp)
lenses = list(summary["lenses"])
outcomes = data.final_outcomes(path, stamp)

frame = examples.set_index("example_index", drop=False)
requested = st.query_params.get("example")
with st.expander("Find an example", expanded=True):
    c1, c2, c3 = st.columns([2, 1, 1])
    query = c1.text_input("Search by id or text", key="traj-search", placeholder="e.g. capital-italy or Paris")
    outcome = c2.radio("Final answer", ["all", "correct", "wrong"], horizontal=True, key="traj-outcome")
    settle_lens = c3.selectbox("Settle layer of", lenses, key="traj-settle-lens", format_func=plotting.lens_label,
                               index=lenses.index("simlens") if "simlens" in lenses else 0)
    settle = data.settle_layers(path, stamp, settle_lens)
    n_layers = int(summary["final_layer"])
    lo, hi = st.slider("Layer where the decision settles", 0, n_layers, (0, n_layers), key="traj-settle")
    c4, c5, c6 = st.columns([1, 1, 2])
    lens_a = c4.selectbox("Disagreement between", lenses, index=0, key="traj-dis-a", format_func=plotting.lens_label)
    lens_b = c5.selectbox("and", lenses, index=min(1, len(lenses) - 1), key="traj-dis-b", format_func=plotting.lens_label)
    only_disagree = c6.checkbox("only examples where they disagree at some layer", key="traj-dis-only")

    disagree = data.disagreements(path, stamp, lens_a, lens_b) if lens_a != lens_b else None
    mask = frame["example_index"].map(settle).between(lo, hi)
    if outcome != "all":
        mask &= frame["example_index"].map(outcomes["correct"]) == (outcome == "correct")
    if only_disagree and disagree is not None:
        mask &= frame["example_index"].map(disagree).fillna(0) > 0
    if query:
        q = query.strip().lower()
        mask &= frame["example_id"].str.lower().str.contains(q, regex=False) | frame["prompt"].str.lower().str.contains(q, regex=False)
    filtered = frame[mask]
    st.caption(f"{len(filtered)} of {len(frame)} examples match")

if requested is not None and requested not in set(frame["example_id"]):
    st.warning(f"There is no example with id '{requested}' in run `{run.name}`; choose one below.")
if filtered.empty:
    st.warning(f"No example matches these filters in run `{run.name}`" + (f" (search: '{query}')." if query else "."))
    raise ui.PageEnd

ids = filtered["example_id"].tolist()
correct_marks = filtered["example_index"].map(outcomes["correct"]).map({True: "✓", False: "✗"}).fillna("?")
settled_at = filtered["example_index"].map(settle).fillna(-1).astype(int)
labels = dict(zip(ids, [f"{i} · {m} · settles at {s}" for i, m, s in zip(ids, correct_marks, settled_at)]))


if requested in ids and st.session_state.get("traj-example") not in ids:
    st.session_state["traj-example"] = requested
example_id = st.selectbox("Example", ids, key="traj-example", format_func=labels.get)
if example_id != requested:
    st.query_params["example"] = example_id
example = filtered.loc[filtered["example_id"] == example_id].iloc[0]
index = int(example["example_index"])
final = outcomes.loc[index]

choices = list(example["choices"])
st.markdown(
    f"**{example_id}** — gold {choices[int(example['gold'])]!r}, model's answer {choices[int(final['final_decision'])]!r} "
    f"({'correct' if final['correct'] else 'wrong'}); {settle_lens} settles at layer {int(settle.get(index, -1))}"
    + (f"; {lens_a} and {lens_b} disagree at {int(disagree.get(index, 0))} layer(s)" if disagree is not None else "")
)
views.show_prompt(example)
shown = st.multiselect("Lenses", lenses, default=lenses, key="traj-lenses", format_func=plotting.lens_label)
views.show_trajectories(data.trajectory(path, stamp, index), example, shown, key="traj")
