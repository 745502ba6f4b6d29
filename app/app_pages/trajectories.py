"""Trajectories: one example's candidate probabilities per layer under every lens, a pinned
token across layers, and (for the embedded model) the prediction trajectory over every input
position."""

from __future__ import annotations

import streamlit as st

from app import data, ui, views
from lensbench import plotting

st.title("Trajectories")
run = ui.current_run()
path, stamp = data.key(run)
examples = data.examples(path, stamp)
summary = data.summary(path, stamp)
lenses = plotting.lens_order(summary["lenses"])
outcomes = data.final_outcomes(path, stamp)

frame = examples.set_index("example_index", drop=False)
requested = st.query_params.get("example")
top = st.container()  # the example picker and search, filled once the filters below are known
c1, c2, c3 = top.columns([3, 2, 2])
query = c2.text_input("Search by id or question", key="traj-search", placeholder="e.g. capital-italy or Paris",
                      help="matches the id and the example's own question (the prompt's last block), not the "
                           "demonstrations every example shares; tick below to search the whole prompt")
outcome = c3.radio("Final answer", ["all", "correct", "wrong"], horizontal=True, key="traj-outcome")
with st.expander("More filters: settle layer, disagreement between lenses, whole-prompt search"):
    c4, c5 = st.columns([1, 2])
    settle_lens = c4.selectbox("Settle layer of", lenses, key="traj-settle-lens", format_func=plotting.lens_label,
                               index=lenses.index("simlens") if "simlens" in lenses else 0)
    settle = data.settle_layers(path, stamp, settle_lens)
    n_layers = int(summary["final_layer"])
    lo, hi = c5.slider("Layer where the decision settles", 0, n_layers, (0, n_layers), key="traj-settle")
    c6, c7, c8 = st.columns([1, 1, 2])
    lens_a = c6.selectbox("Disagreement between", lenses, index=0, key="traj-dis-a", format_func=plotting.lens_label)
    lens_b = c7.selectbox("and", lenses, index=min(1, len(lenses) - 1), key="traj-dis-b", format_func=plotting.lens_label)
    only_disagree = c8.checkbox("only examples where they disagree at some layer", key="traj-dis-only")
    search_all = c8.checkbox("search the whole prompt (with the demonstrations)", key="traj-search-all")

disagree = data.disagreements(path, stamp, lens_a, lens_b) if lens_a != lens_b else None
shown_ids = [views.display_id(i, m) for i, m in zip(frame["example_id"], frame["metadata"])]
frame = frame.assign(shown_id=shown_ids)
mask = frame["example_index"].map(settle).between(lo, hi)
if outcome != "all":
    mask &= frame["example_index"].map(outcomes["correct"]) == (outcome == "correct")
if only_disagree and disagree is not None:
    mask &= frame["example_index"].map(disagree).fillna(0) > 0
if query:
    q = query.strip().lower()
    text = frame["prompt"] if search_all else frame["prompt"].map(views.query_of)
    mask &= (frame["example_id"].str.lower().str.contains(q, regex=False)
             | frame["shown_id"].str.lower().str.contains(q, regex=False)
             | text.str.lower().str.contains(q, regex=False))
filtered = frame[mask]
top.caption(f"{len(filtered)} of {len(frame)} examples match")

if requested is not None and requested not in set(frame["example_id"]):
    st.warning(f"There is no example with id '{requested}' in run `{run.name}`; choose one below.")
if filtered.empty:
    st.warning(f"No example matches these filters in run `{run.name}`" + (f" (search: '{query}')." if query else "."))
    raise ui.PageEnd

ids = filtered["example_id"].tolist()
correct_marks = filtered["example_index"].map(outcomes["correct"]).map({True: "✓", False: "✗"}).fillna("?")
settled_at = filtered["example_index"].map(settle).fillna(-1).astype(int)
labels = dict(zip(ids, [f"{s} · {m} · settles at {t}" for s, m, t in zip(filtered["shown_id"], correct_marks, settled_at)]))

if requested in ids and st.session_state.get("traj-example") not in ids:
    st.session_state["traj-example"] = requested
example_id = c1.selectbox("Example", ids, key="traj-example", format_func=labels.get)
if example_id != requested:
    st.query_params["example"] = example_id
example = filtered.loc[filtered["example_id"] == example_id].iloc[0]
index = int(example["example_index"])
final = outcomes.loc[index]

choices = list(example["choices"])
st.markdown(
    f"**{example['shown_id']}** — gold {choices[int(example['gold'])]!r}, model's answer {choices[int(final['final_decision'])]!r} "
    f"({'correct' if final['correct'] else 'wrong'}); {plotting.lens_label(settle_lens)} settles at layer "
    f"{int(settle.get(index, -1))}"
    + (f"; {plotting.lens_label(lens_a)} and {plotting.lens_label(lens_b)} disagree at "
       f"{int(disagree.get(index, 0))} layer(s)" if disagree is not None else "")
)
views.show_prompt(example)
shown = st.pills("Lenses", lenses, selection_mode="multi", default=lenses, key="traj-lenses",
                 format_func=plotting.lens_label) or []
traj = data.trajectory(path, stamp, index)
views.show_trajectories(traj, example, shown, key="traj")

st.subheader("Pin a token")
pin = st.text_input("Token (mind the leading space)", choices[int(example["gold"])], key="traj-pin")
exact = views.embedded_run(run) and st.checkbox("exact at every rank (reruns the embedded model on this prompt)",
                                                 key="traj-pin-exact")
if pin and exact:
    curves = views.exact_pin(run, example, pin, shown)
    if curves:
        st.caption(f"The full-vocabulary probability and rank of {pin!r} per layer under each lens, recomputed with "
                   "the model (`lensbench.probe`).")
        ui.plot(plotting.pinned_token_figure(curves, pin), key="traj-pin-fig")
elif pin:
    curves = views.stored_pin(traj, pin, shown)
    known = sum(v is not None for c in curves.values() for v in c["prob"])
    st.caption(f"The full-vocabulary probability and rank of {pin!r} per layer under each lens, as far as the stored "
               f"top-{len(traj.iloc[0]['topk_tokens'])} tokens tell (gaps: not among them). The Live probe computes "
               "them at every rank for the embedded model.")
    if known:
        ui.plot(plotting.pinned_token_figure(curves, pin), key="traj-pin-fig")
    else:
        st.info(f"{pin!r} is never among the stored top-k tokens of this example.")

views.show_position_section(run, example, key="traj")
