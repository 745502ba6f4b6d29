"""Live probe: a typed prompt and candidates through the embedded model, every lens at once.

`lensbench.probe.Prober.probe` evaluates the prompt in memory (one `evaluate_batch` call on a
one-example batch; the lenses are built once per set): nothing is written to disk, and nothing
of one probe is kept for the next but its result, which the next probe replaces. The model is
loaded once per server process.
"""

from __future__ import annotations

import time

import numpy as np
import streamlit as st

from app import model as embedded
from app import ui, views
from lensbench import plotting
from lensbench.errors import LensbenchError

DEFAULT_PROMPT = "Q: What is the capital of Japan?\nA: Tokyo\n\nQ: What is the capital of France?\nA:"
DEFAULT_CANDIDATES = " Paris\n Rome\n Berlin\n Madrid"
ABLATIONS = ["drop-s", "drop-a"]

st.title("Live probe")
st.caption(f"Type a prompt and one candidate answer per line (each must be a single token for {embedded.MODEL}; "
           "mind the leading space). The start token [s] is prepended; the answer position [a] is the last token.")
dirs_text = st.session_state.get("live-linear", ":".join(embedded.linear_dirs_default()))
prober = embedded.prober(tuple(d for d in dirs_text.split(":") if d))
available = prober.available()
with st.form("live-form"):
    prompt = st.text_area("Prompt", DEFAULT_PROMPT, height=140, key="live-prompt")
    c1, c2 = st.columns([1, 1])
    candidates_text = c1.text_area("Candidates (one per line)", DEFAULT_CANDIDATES, height=120, key="live-candidates")
    gold_text = c1.text_input("Gold candidate (optional, exact text)", " Paris", key="live-gold")
    lenses = c2.pills("Lenses", available, selection_mode="multi", default=available, key="live-lenses",
                      format_func=plotting.lens_label) or []
    ablations = c2.pills("SimLens slot ablations", ABLATIONS, selection_mode="multi", default=ABLATIONS,
                         key="live-ablations", format_func=lambda a: plotting.lens_label(f"simlens[{a}]")) or []
    extra = c2.text_input("More ablations (e.g. s=token:\" the\", a=position:-2)", "", key="live-extra")
    pin = c2.text_input("Pin a token (its probability and rank across layers)", " Paris", key="live-pin")
    c2.text_input("Fitted lens folders for Linear SimLens / the tuned lens (separated by ':')", dirs_text,
                  key="live-linear", help="`lensbench fit-linear --out DIR` for this model; also LENSBENCH_LINEAR")
    submitted = st.form_submit_button("Run the probe", type="primary")

if submitted:
    st.session_state.pop("live-result", None)  # a failed probe never shows the previous one's result
    candidates = [line for line in candidates_text.split("\n") if line.strip()]
    more = [a.strip() for a in extra.split(",") if a.strip()]
    if not prompt.strip() or len(candidates) < 2:
        st.warning("Give a prompt and at least two candidates.")
        raise ui.PageEnd
    if "simlens" not in lenses and (ablations or more):
        lenses = [*lenses, "simlens"]
    if not lenses:
        st.warning("Choose at least one lens.")
        raise ui.PageEnd
    gold = candidates.index(gold_text) if gold_text in candidates else None
    if gold_text and gold is None:
        st.warning(f"The gold text {gold_text!r} is not one of the candidates ({', '.join(repr(c) for c in candidates)}): "
                   "no candidate is marked gold.")
    try:
        with st.spinner("Running the model…"):
            result = prober.probe(prompt, candidates, gold, lenses, [*ablations, *more], pinned=[pin] if pin else [])
    except LensbenchError as exc:
        st.error(str(exc))
        raise ui.PageEnd
    st.session_state["live-result"] = result
    st.session_state["_lb_footer_note"] = f"probe {result.seconds:.2f} s"

result = st.session_state.get("live-result")
if result is None:
    st.info("Run the probe to see its trajectories.")
    raise ui.PageEnd

example, predictions = result.example, result.predictions
choices = list(example["choices"])
final = predictions[predictions["layer"] == predictions["layer"].max()].iloc[0]
st.markdown(f"Model's answer: **{final['decision_token']!r}** (candidates: {', '.join(repr(c) for c in choices)}) · "
            f"probe computed in **{result.seconds:.2f} s** ({len(result.tokens)} tokens, "
            f"{predictions['lens'].nunique()} lenses)")
views.show_prompt(example)
views.show_trajectories(predictions, example, list(dict.fromkeys(predictions["lens"])), key="live")

st.subheader("Pinned token")
if result.tracked:
    token, curves = next(iter(result.tracked.items()))
    st.caption(f"{token!r}: its probability over the whole vocabulary and its rank at every layer, under each lens.")
    ui.plot(plotting.pinned_token_figure(curves, token), key="live-pin-fig")
else:
    st.info("Pin a token in the form to follow it across layers.")

st.subheader("Prediction trajectory over all positions")
grid_lenses = [n for n in ("logit", "simlens", "linear-simlens", "tuned") if n in available]
if st.toggle("Show it (computed with the model for every position)", key="live-grid-on"):
    views.show_position_grid(prober, result.tokens, grid_lenses, key="live", pinned=next(iter(result.tracked), ""))

st.subheader("Attention over the prompt: the full forward pass versus the SimLens continuation")
if st.toggle("Show it", key="live-att-on"):
    from lensbench.probe import answer_attention

    started = time.perf_counter()
    full = answer_attention(prober.model, result.tokens)  # (block, head, position)
    n_blocks, n_heads = full.shape[0], full.shape[1]
    c1, c2, c3 = st.columns(3)
    block = int(c1.number_input("Block", 0, n_blocks - 1, n_blocks // 2, key="live-att-block"))
    readout = int(c2.number_input("SimLens readout layer (≤ block)", 0, block, max(0, block - 4), key="live-att-layer"))
    head = c3.selectbox("Head", ["mean over heads", *range(n_heads)], key="live-att-head")
    weights = full[block].mean(0) if head == "mean over heads" else full[block, int(head)]
    continuation = None
    if result.attention is not None:
        row = result.attention[readout, block]  # (head,) [a] -> [s]
        w = float(np.nanmean(row)) if head == "mean over heads" else float(row[int(head)])
        if np.isfinite(w):
            continuation = {"[s]": w, "[a]": 1.0 - w}
    if result.attention is None:
        st.info("The continuation's attention comes with the SimLens lens: add it to the probe.")
    head_text = head if head == "mean over heads" else f"head {head}"
    ui.plot(plotting.token_attention_figure(result.token_texts, weights, continuation, block, head_text, readout),
            key="live-att-fig")
    st.caption(f"Top: [a]'s attention over every prompt token at block {block} of the full forward pass. Bottom: in "
               f"SimLens's continuation from readout layer {readout}, [a] sees only [s] and itself "
               f"({time.perf_counter() - started:.2f} s).")
