"""ICL: runs of `lensbench icl` — accuracy by layer for each task side by side (few-shot,
zero-shot, global and local patching), convergence, attention flow, and one prompt's
demonstrations with their label positions and what their local vectors decode to."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import data, ui
from lensbench.icl import plotting as icl_plotting

st.title("In-context learning")
runs = ui.complete_runs(kind="icl")
if not runs:
    st.info("No complete ICL run in this folder. Make one with e.g. "
            "`lensbench icl --model smollm2-135m --task animal-fruit --queries 24 --out runs/icl-animal-fruit`.")
    raise ui.PageEnd
by_path = {str(r.path): r for r in runs}
chosen_run = st.session_state.get("run")
default_detail = chosen_run if chosen_run in by_path else str(runs[0].path)


def label(path: str) -> str:
    r = by_path[path]
    return f"{r.name} · {r.manifest.get('model', {}).get('spec')} · {r.manifest.get('task')}"


st.subheader("Accuracy by layer, task by task")
st.caption("Few-/zero-shot: the logit lens at the last position at each readout layer. Patches: the global vector "
           "(mean last-position residual of N few-shot prompts) written into the zero-shot query, or the local "
           "vectors (residuals at the label positions of a real few-shot prompt) written into the same prompt with "
           "uninformative labels, at layer l; the model's output then. Bands: Wilson 95% intervals.")
selected = st.multiselect("Runs", list(by_path), default=list(by_path)[:8], key="icl-runs", format_func=label)
curve_names = list(icl_plotting.CURVES)
curves = st.multiselect("Curves", curve_names, default=[c for c in icl_plotting.DEFAULT_CURVES], key="icl-curves",
                        format_func=lambda c: icl_plotting.CURVES[c][0])
if selected:
    summaries = {by_path[p].name: data.summary(*data.key(by_path[p])) for p in selected}
    ui.plot(icl_plotting.accuracy_grid(summaries, curves), key="icl-grid")
    rows = []
    for name, s in summaries.items():
        best = s.get("best", {})
        rows.append({"run": name, "task": s["task"], "kind": s["task_kind"], "queries": s["n_queries"],
                     "few-shot": round(s["few-shot_accuracy"]["accuracy"], 3),
                     "zero-shot": round(s["zero-shot_accuracy"]["accuracy"], 3),
                     "uninformative": round(s["baseline_accuracy"]["accuracy"], 3),
                     "global best (layer)": f"{best['global']['accuracy']:.3f} ({best['global']['layer']})" if "global" in best else "",
                     "local best (layer)": f"{best['local']['accuracy']:.3f} ({best['local']['layer']})" if "local" in best else ""})
    st.dataframe(pd.DataFrame(rows), hide_index=True)

st.subheader("One run")
detail_path = st.selectbox("Run", list(by_path), index=list(by_path).index(default_detail), key="icl-detail", format_func=label)
run = by_path[detail_path]
path, stamp = data.key(run)
summary = data.summary(path, stamp)
left, right = st.columns(2)
with left:
    ui.plot(icl_plotting.convergence_figure(summary, title="Convergence of the local vectors"), key="icl-conv")
with right:
    ui.plot(icl_plotting.attention_figure(summary, title="Attention from the last position"), key="icl-att")
ui.plot(icl_plotting.decode_figure(summary, title="What the local vectors decode to"), key="icl-decode")

st.subheader("One prompt")
queries = data.icl_table(path, stamp, "queries")
decode = data.icl_table(path, stamp, "decode")
options = queries["query_index"].tolist()
q = st.selectbox("Query", options, key="icl-query",
                 format_func=lambda i: f"{i}: {queries.set_index('query_index').loc[i, 'input']}")
row = queries.set_index("query_index").loc[q]
st.markdown(f"**Query** `{row['input']}` — gold **{row['gold_label']}**; {row['n_tokens']} tokens. "
            "Each demonstration's label word (the local vector's position) is in brackets, with its token position; "
            "the uninformative prompt's label follows the arrow.")
lines = [f"{i + 1}. `{inp}` → **[{lab}]** (position {pos}) · uninformative: {base}"
         for i, (inp, lab, pos, base) in enumerate(zip(row["demo_inputs"], row["demo_labels"], row["label_positions"],
                                                       row["baseline_labels"]))]
st.markdown("\n".join(lines))
lenses = sorted(decode["lens"].unique())
lens = st.radio("Decoded with", lenses, horizontal=True, key="icl-lens")
labels = run.manifest["task_info"]["labels"]
mine = decode[(decode["query_index"] == q) & (decode["lens"] == lens)]
layers = sorted(mine["layer"].unique().tolist())
table = mine.pivot(index="demo", columns="layer", values="decision").reindex(columns=layers)
decoded = [[labels[int(v)] if v >= 0 else "(other)" for v in r] for r in table.to_numpy()]
demos = [f"{i + 1}. {inp} → {lab}" for i, (inp, lab) in enumerate(zip(row["demo_inputs"], row["demo_labels"]))]
ui.plot(icl_plotting.prompt_decode_figure(layers, demos, decoded, list(row["demo_labels"]),
                                          title=f"Local vectors of query {q}, decoded with the {lens} lens"), key="icl-prompt")
