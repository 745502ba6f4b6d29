"""Views shared by pages: one example's prompt and its per-lens trajectories."""

from __future__ import annotations

import html

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


def show_prompt(example: pd.Series) -> None:
    st.markdown(prompt_html(example["prompt"], example["start_token"], example["answer_token"]),
                unsafe_allow_html=True)


def topk_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One lens's stored top-k vocabulary tokens per layer, as `token (p)` cells."""
    table = {}
    for _, row in rows.sort_values("layer").iterrows():
        cells = [f"{tok!r} {p:.2f}" for tok, p in zip(row["topk_tokens"], row["topk_probs"])]
        table[int(row["layer"])] = cells
    frame = pd.DataFrame.from_dict(table, orient="index")
    frame.columns = [f"top {i + 1}" for i in range(frame.shape[1])]
    frame.index.name = "layer"
    return frame


def show_trajectories(traj: pd.DataFrame, example: pd.Series, lenses: list[str], key: str, per_row: int = 3) -> None:
    """Candidate-probability heatmaps, one per lens side by side (one figure), and the top-k
    tokens per layer.

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
        panels.append({
            "title": f"{plotting.lens_label(lens)} → {rows.iloc[-1]['decision_token']!r}",
            "layers": rows["layer"].tolist(), "probs": probs, "decisions": rows["decision"].tolist(),
        })
    fig = plotting.candidate_heatmaps(panels, choices, gold=gold, per_row=per_row)
    ui.plot(fig, key=f"{key}-heatmaps")
    lens = st.selectbox("Top-k vocabulary tokens per layer under", lenses, key=f"{key}-topk-lens",
                        format_func=plotting.lens_label)
    st.dataframe(topk_table(traj[traj["lens"] == lens]), height=420)
