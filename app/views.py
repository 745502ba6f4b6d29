"""Views shared by pages: one example's prompt and its per-lens trajectories."""

from __future__ import annotations

import html
import json

import numpy as np
import pandas as pd
import streamlit as st

from lensbench import plotting
from app import ui


def _one_line(text: str) -> str:
    # Markdown ends a raw HTML block at a blank line: keep the block on one source line.
    return html.escape(text).replace("\n", "&#10;")


def prompt_html(prompt: str, start_token: str, answer_token: str) -> str:
    """The prompt with the start token `[s]` (prepended by the runner) and the answer
    position `[a]` (the last prompt token) marked."""
    body = prompt[len(start_token):] if start_token and prompt.startswith(start_token) else prompt
    tail = ""
    if answer_token and body.endswith(answer_token):
        body, tail = body[: -len(answer_token)], answer_token
    start = (f'<span class="lb-s" title="start token [s]" style="background:#fde2e2;border:1px solid #d62728;'
             f'border-radius:3px;padding:0 2px"><b>[s]</b> {_one_line(start_token)}</span>')
    answer = (f'<span class="lb-a" title="answer position [a]" style="background:#dbeafe;border:1px solid #1f77b4;'
              f'border-radius:3px;padding:0 2px">{_one_line(tail) or "∅"} <b>[a]</b></span>')
    return (f'<div class="lb-prompt" style="white-space:pre-wrap;font-family:monospace;font-size:0.9em;'
            f'border:1px solid #ddd;border-radius:6px;padding:8px;max-height:320px;overflow:auto">'
            f"{start}{_one_line(body)}{answer}</div>")


def query_of(prompt: str) -> str:
    """The example's own question: the prompt's last block (after the last blank line), i.e.
    without the few-shot demonstrations that every example of a task shares."""
    body = prompt.rstrip("\n")
    cut = body.rfind("\n\n")
    return body[cut + 2:] if cut >= 0 else body


def display_id(example_id: str, metadata: str | None = None) -> str:
    """An example's id as shown: a task without ids (BoolQ's "None", "None#2") by its
    document number."""
    if example_id.split("#")[0] not in ("None", "", "nan"):
        return example_id
    try:
        doc = json.loads(metadata or "{}").get("doc_id")
    except ValueError:
        doc = None
    return f"doc {doc}" if doc is not None else example_id


def show_prompt(example: pd.Series) -> None:
    """The query (the prompt's last block, `[a]` marked) in view; the whole prompt with `[s]`
    below it, folded when there are demonstrations."""
    prompt = example["prompt"]
    query = query_of(prompt)
    tail = example["answer_token"] if query.endswith(example["answer_token"]) else ""
    body = query[: len(query) - len(tail)] if tail else query
    passage, cut = "", body.rfind("Question:")
    if cut > 0:  # a reading passage before the question (BoolQ): folded, the question in view
        passage, body = body[:cut], body[cut:]
    answer = (f'<span class="lb-a" title="answer position [a]" style="background:#dbeafe;border:1px solid #1f77b4;'
              f'border-radius:3px;padding:0 2px">{_one_line(tail) or "∅"} <b>[a]</b></span>')
    if passage:
        with st.expander(f"Passage of this example ({len(passage)} characters)"):
            st.markdown(f'<div style="white-space:pre-wrap;font-size:0.9em">{_one_line(passage)}</div>',
                        unsafe_allow_html=True)
    # column-reverse keeps a long query scrolled to its end, where the question and [a] are
    st.markdown(f'<div class="lb-query" style="display:flex;flex-direction:column-reverse;font-family:monospace;'
                f'font-size:0.95em;border:2px solid #1f77b4;border-radius:6px;padding:8px;max-height:220px;'
                f'overflow:auto"><div style="white-space:pre-wrap">{_one_line(body)}{answer}</div></div>',
                unsafe_allow_html=True)
    full = prompt_html(prompt, example["start_token"], example["answer_token"])
    if query != prompt.rstrip("\n") and len(prompt) > len(query) + 2:
        with st.expander(f"Whole prompt ({len(prompt)} characters, with the demonstrations)"):
            st.markdown(full, unsafe_allow_html=True)
    else:
        st.markdown(full, unsafe_allow_html=True)


def vocab_views(rows: pd.DataFrame, candidates: list[str]) -> tuple[list[list[str]], list[str]]:
    """What the stored top-k says of the full vocabulary, per layer: for each candidate its
    absolute probability and rank when it is among the top-k, else a bound; and the top-1."""
    hover, top1 = [], []
    for tokens, probs in zip(rows["topk_tokens"], rows["topk_probs"]):
        tokens, probs = list(tokens), [float(p) for p in probs]
        cells = []
        for c in candidates:
            if c in tokens:
                r = tokens.index(c)
                cells.append(f"vocabulary: p = {probs[r]:.3f}, rank {r + 1}")
            else:
                cells.append(f"vocabulary: not in the top {len(tokens)} (p < {probs[-1]:.3f})" if tokens else "")
        hover.append(cells)
        top1.append(f"top-1 {plotting.token_text(tokens[0])} {probs[0]:.2f}" if tokens else "")
    return hover, top1


def topk_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One lens's stored top-k vocabulary tokens per layer, as `token p` cells; the final layer
    first, as the heatmaps put it at the top."""
    table = {}
    for _, row in rows.sort_values("layer", ascending=False).iterrows():
        cells = [f"{plotting.token_text(tok)!s} {p:.2f}" for tok, p in zip(row["topk_tokens"], row["topk_probs"])]
        table[int(row["layer"])] = cells
    frame = pd.DataFrame.from_dict(table, orient="index")
    frame.columns = [f"top {i + 1}" for i in range(frame.shape[1])]
    frame.index.name = "layer"
    return frame


def show_trajectories(traj: pd.DataFrame, example: pd.Series, lenses: list[str], key: str, per_row: int = 3) -> None:
    """Candidate heatmaps, one per lens side by side (one figure), with what the stored top-k
    says of the full vocabulary; the top-k tokens per layer.

    traj: rows of one example (`data.trajectory`); example: its row of examples.parquet.
    """
    choices = list(example["choices"])
    gold = int(example["gold"])
    lenses = [lens for lens in lenses if lens in set(traj["lens"])]
    if not lenses:
        st.info("Choose at least one lens.")
        return
    panels = []
    for lens in lenses:
        rows = traj[traj["lens"] == lens].sort_values("layer")
        probs = np.exp(np.stack([np.asarray(v, dtype=float) for v in rows["candidate_logprobs"]]))
        hover, top1 = vocab_views(rows, choices)
        panels.append({
            "title": f"{plotting.lens_label(lens)} → {plotting.token_text(rows.iloc[-1]['decision_token'])}",
            "layers": rows["layer"].tolist(), "probs": probs, "decisions": rows["decision"].tolist(),
            "hover": hover, "vocab_top1": top1,
        })
    st.caption("Colour: each candidate's share of the probability *among the candidates* (renormalised), not its "
               "probability over the vocabulary; hover a cell for the vocabulary probability and rank (known within "
               "the stored top-k), and each row's vocabulary top-1 is written at its right. Red dots: the decision; "
               "✓: the gold candidate.")
    fig = plotting.candidate_heatmaps(panels, choices, gold=gold if gold >= 0 else None, per_row=per_row)
    ui.plot(fig, key=f"{key}-heatmaps")
    lens = st.selectbox("Top-k vocabulary tokens per layer under", lenses, key=f"{key}-topk-lens",
                        format_func=plotting.lens_label)
    st.dataframe(topk_table(traj[traj["lens"] == lens]), height=420)


def stored_pin(traj: pd.DataFrame, token: str, lenses: list[str]) -> dict:
    """A pinned token's probability and rank per layer from a stored run's top-k: known where
    it is among the top-k, missing (None) elsewhere."""
    curves = {}
    for lens in lenses:
        rows = traj[traj["lens"] == lens].sort_values("layer")
        probs, ranks = [], []
        for tokens, values in zip(rows["topk_tokens"], rows["topk_probs"]):
            tokens = list(tokens)
            found = token in tokens
            probs.append(float(values[tokens.index(token)]) if found else None)
            ranks.append(tokens.index(token) + 1 if found else None)
        curves[lens] = {"layer": rows["layer"].tolist(), "prob": probs, "rank": ranks}
    return curves


GRID_COLOURS = {"entropy": "entropy", "kl": "KL to the final layer", "prob": "probability of a chosen token"}


def _decode_grid(tokenizer, ids: np.ndarray) -> np.ndarray:
    unique, inverse = np.unique(ids.reshape(-1), return_inverse=True)
    text = np.array([tokenizer.decode([int(i)]) for i in unique], dtype=object)
    return text[inverse].reshape(ids.shape)


def show_position_grid(prober, tokens: list[int], lens_names: list[str], key: str, pinned: str = "") -> None:
    """The prediction trajectory over every input position for one lens: a layer × position
    grid of top-1 tokens, coloured by entropy, KL to the final layer, or a chosen token's
    probability; hover for the top-k. Computed with the embedded model on demand."""
    from lensbench.errors import LensbenchError
    from lensbench.trajectory import position_grid

    c1, c2, c3 = st.columns([2, 2, 2])
    lens_name = c1.selectbox("Lens", lens_names, key=f"{key}-grid-lens", format_func=plotting.lens_label,
                             help="SimLens at every position continues ([s], that position) from each layer")
    colour = c2.radio("Colour by", list(GRID_COLOURS), horizontal=True, key=f"{key}-grid-colour",
                      format_func=GRID_COLOURS.get)
    token = c3.text_input("Chosen token (for its probability)", pinned, key=f"{key}-grid-token")
    tokenizer = prober.model.tokenizer
    pinned_id = None
    if colour == "prob":
        pieces = tokenizer.encode(token, add_special_tokens=False) if token else []
        if len(pieces) != 1:
            st.warning(f"{token!r} is {len(pieces)} tokens for the embedded model; choose a single token.")
            return
        pinned_id = pieces[0]
    lens = next(lens for lens in prober.lenses(tuple(lens_names)) if lens.name == lens_name)
    grid_key = (tuple(tokens), lens_name, pinned_id)
    kept = st.session_state.get(f"{key}-grid-result")
    if kept is not None and kept[0] == grid_key:  # only the grid on screen is kept, for reruns of this page
        grid = kept[1]
    else:
        try:
            with st.spinner("Computing the grid…"):
                grid = position_grid(prober.model, tokens, lens, prober.points, pinned_id=pinned_id)
        except LensbenchError as exc:
            st.warning(str(exc))
            return
        st.session_state[f"{key}-grid-result"] = (grid_key, grid)
    top_text = _decode_grid(tokenizer, grid.top_ids)
    hover = [[" · ".join(f"{plotting.token_text(t)} {p:.2f}" for t, p in zip(top_text[l, i], grid.top_probs[l, i]))
              for i in range(top_text.shape[1])] for l in range(top_text.shape[0])]
    values = {"entropy": grid.entropy, "kl": grid.kl_final, "prob": grid.pinned}[colour]
    texts = [tokenizer.decode([t]) for t in tokens]
    fig = plotting.position_grid_figure(texts, grid.layers, top_text[..., 0].tolist(), values, color=colour,
                                        hover=hover, title=f"{plotting.lens_label(lens_name)}: top-1 next token per "
                                                           "layer and input position")
    plot_key = f"{key}-grid"
    ui.plot(fig, key=plot_key)


def embedded_run(run) -> bool:
    """Whether the run's model is the embedded one, which the app can rerun."""
    from app import model as embedded

    return run.manifest.get("model", {}).get("spec") == embedded.MODEL


def exact_pin(run, example: pd.Series, token: str, lenses: list[str]) -> dict | None:
    """A pinned token's exact probability and rank per layer, recomputed with the embedded model
    for the run's lenses (ablations that read the run's other examples — swaps, a donor example,
    the data-set mean — are left out)."""
    from app import model as embedded
    from lensbench.errors import LensbenchError

    prober = embedded.prober(tuple(run.manifest.get("config", {}).get("linear", []) or []))
    kinds = [k for k in ("logit", "simlens", "linear-simlens", "tuned") if k in lenses]
    ablations = [name[len("simlens["):-1] for name in lenses
                 if name.startswith("simlens[") and not any(k in name for k in ("swap", "example:", "mean"))]
    if ablations and "simlens" not in kinds:
        kinds.append("simlens")
    try:
        result = prober.probe(example["prompt"], list(example["choices"]), int(example["gold"]), kinds, ablations,
                              pinned=[token])
    except LensbenchError as exc:
        st.warning(str(exc))
        return None
    return {name: curve for name, curve in result.tracked[token].items() if name in lenses}


def show_position_section(run, example: pd.Series, key: str) -> None:
    """The position grid of a stored example, when its run's model is the embedded one."""
    from app import model as embedded

    st.subheader("Prediction trajectory over all positions")
    spec = run.manifest.get("model", {}).get("spec")
    if not embedded_run(run):
        st.info(f"This view reruns the model on the prompt; the app runs only the embedded {embedded.MODEL}, and "
                f"this run's model is {spec}. The Live probe shows it for any prompt.")
        return
    if not st.toggle("Compute it with the model", key=f"{key}-grid-on"):
        return
    dirs = tuple(run.manifest.get("config", {}).get("linear", []) or [])
    prober = embedded.prober(dirs)
    _, encoded = prober.encode(example["prompt"], list(example["choices"]), int(example["gold"]))
    names = [n for n in ("logit", "simlens", "linear-simlens", "tuned") if n in prober.available()]
    show_position_grid(prober, encoded.tokens, names, key, pinned=list(example["choices"])[int(example["gold"])])
