"""One example's figures: candidate probabilities per layer under each lens, the prediction
trajectory over every input position (a layer × position grid), and a pinned token's absolute
probability and rank across layers.

Every layer axis runs the same way: layer 0 at the bottom, the final layer at the top (as in
the tuned-lens and logit-lens plots), and tables list the final layer first to match.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lensbench.plotting.style import layout, lens_label, lens_line


def token_text(token: str) -> str:
    """A token as it reads in a figure: `repr` without the quotes; a token that decodes to a
    partial UTF-8 character (shown by fonts as a box) as `⟨byte⟩`."""
    text = repr(token)[1:-1]
    return text.replace("\ufffd", "⟨byte⟩") if "\ufffd" in text else text


VOCAB_COLUMN = "vocabulary top-1"


def _candidate_labels(candidates: Sequence[str], gold: int | None) -> list[str]:
    labels = [token_text(c) + (" ✓" if gold is not None and i == gold else "") for i, c in enumerate(candidates)]
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):  # category labels must be unique on a plotly axis
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} ({seen[label]})"
    return labels


def candidate_heatmaps(
    panels: Sequence[Mapping],
    candidates: Sequence[str],
    gold: int | None = None,
    per_row: int = 3,
    panel_height: int = 460,
    title: str | None = None,
    color_label: str = "share among<br>the candidates",
) -> go.Figure:
    """Candidate probabilities per readout layer for one example, one heatmap per lens, side by side.

    panels: `[{"title": str, "layers": [...], "probs": (layer, candidate), "decisions": [...] or
    None, "hover": (layer, candidate) strings or None, "vocab_top1": [str per layer] or None}]`,
    with `probs` the `exp` of the stored `candidate_logprobs`: the probability *renormalised over
    the candidates*, which the colour bar says; `hover` adds what is known of the full
    vocabulary (the candidate's absolute probability and rank, or a bound from the stored top-k);
    `vocab_top1` is written in a column of its own at the right. gold: the gold candidate's column (✓);
    decisions: the decided column per layer, marked with a red dot.
    """
    labels = _candidate_labels(candidates, gold)
    n_cols = max(1, min(per_row, len(panels)))
    n_rows = max(1, -(-len(panels) // n_cols))
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=[p.get("title", "") for p in panels],
                        horizontal_spacing=0.09, vertical_spacing=0.12 / n_rows + 0.04)
    for i, panel in enumerate(panels):
        row, col = i // n_cols + 1, i % n_cols + 1
        layers = list(panel["layers"])
        hover = panel.get("hover")
        fig.add_trace(go.Heatmap(
            z=np.asarray(panel["probs"], dtype=float), x=labels, y=layers, coloraxis="coloraxis",
            customdata=hover if hover is not None else None,
            hovertemplate=f"{panel.get('title', '')}<br>layer %{{y}}<br>%{{x}}<br>share among the candidates %{{z:.3f}}"
                          + ("<br>%{customdata}" if hover is not None else "") + "<extra></extra>",
        ), row=row, col=col)
        if panel.get("decisions") is not None:
            fig.add_trace(go.Scatter(
                x=[labels[int(d)] for d in panel["decisions"]], y=layers, mode="markers", name="decision",
                marker=dict(symbol="circle", size=5, color="#d62728"), hoverinfo="skip", showlegend=False,
            ), row=row, col=col)
        columns = list(labels)
        if panel.get("vocab_top1") is not None:  # a column of its own, right of the candidates
            columns.append(VOCAB_COLUMN)
            fig.add_trace(go.Scatter(
                x=[VOCAB_COLUMN] * len(layers), y=layers, mode="text", text=list(panel["vocab_top1"]),
                textposition="middle center", textfont=dict(size=9, color="#444444"), showlegend=False,
                hovertemplate="layer %{y}<br>vocabulary top-1: %{text}<extra></extra>",
            ), row=row, col=col)
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=columns, row=row, col=col)
        fig.update_yaxes(title_text="readout layer" if col == 1 else None, row=row, col=col)
    fig.update_layout(coloraxis=dict(colorscale="Blues", cmin=0, cmax=1, colorbar=dict(title=color_label)))
    return layout(fig, title, height=panel_height * n_rows + 40)


def candidate_heatmap(
    layers: Sequence[int],
    candidates: Sequence[str],
    probs,
    gold: int | None = None,
    decisions: Sequence[int] | None = None,
    title: str | None = None,
    height: int = 520,
) -> go.Figure:
    """One lens's candidate probabilities per readout layer (`candidate_heatmaps` with one panel)."""
    panel = {"title": "", "layers": layers, "probs": probs, "decisions": decisions}
    return candidate_heatmaps([panel], candidates, gold, per_row=1, panel_height=height - 40, title=title)


GRID_COLORS = {"entropy": ("Viridis_r", "entropy<br>(nats)"), "kl": ("Magma_r", "KL to the<br>final layer"),
               "prob": ("Blues", "p(pinned)")}


def position_grid_figure(
    tokens: Sequence[str],
    layers: Sequence[int],
    top1: Sequence[Sequence[str]],
    values,
    color: str = "entropy",
    hover: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    max_chars: int = 7,
) -> go.Figure:
    """The prediction trajectory over every input position: a layer × position grid with the
    top-1 next-token prediction written in each cell, coloured by `values` (entropy, KL to the
    final layer, or a pinned token's probability: `color`), hover for the top-k.

    tokens: the input tokens (x axis); top1, values, hover: (layer, position).
    """
    x = [f"{i}: {token_text(t)}" for i, t in enumerate(tokens)]
    text = [[token_text(t)[:max_chars] for t in row] for row in top1]
    scale, label = GRID_COLORS.get(color, ("Viridis", color))
    z = np.asarray(values, dtype=float)
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=list(layers), text=text, texttemplate="%{text}", textfont=dict(size=10),
        colorscale=scale, zmin=0, zmax=1 if color == "prob" else None, colorbar=dict(title=label),
        customdata=hover, xgap=1, ygap=1,
        hovertemplate="layer %{y}<br>input %{x}<br>" + (label.replace("<br>", " ")) + " %{z:.3f}"
                      + ("<br>%{customdata}" if hover is not None else "") + "<extra></extra>",
    ))
    fig.update_xaxes(title_text="input position (the prediction is of the next token)", type="category", tickangle=-50)
    fig.update_yaxes(title_text="readout layer", dtick=max(1, len(layers) // 16))
    width = max(700, 70 * len(tokens) + 160)
    return layout(fig, title, height=max(420, 22 * len(layers) + 200), width=min(width, 2400))


def pinned_token_figure(curves: Mapping[str, Mapping], token: str, title: str | None = None) -> go.Figure:
    """A pinned token's absolute (full-vocabulary) probability and rank across layers, one line
    per lens. curves: `{lens: {"layer": [...], "prob": [...], "rank": [...]}}` (rank 1 = top-1)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"p({token_text(token)}) over the whole vocabulary",
                                                        f"rank of {token_text(token)} (1 = top-1)"],
                        horizontal_spacing=0.1)
    for name, data in curves.items():
        label = lens_label(name)
        for j, (key, fmt) in enumerate((("prob", ".3g"), ("rank", "d"))):
            fig.add_trace(go.Scatter(
                x=list(data["layer"]), y=list(data[key]), mode="lines+markers", name=label, legendgroup=name,
                showlegend=j == 0, line=lens_line(name), marker=dict(size=5),
                hovertemplate=f"{label}<br>layer %{{x}}<br>{key} %{{y:{fmt}}}<extra></extra>",
            ), row=1, col=j + 1)
    fig.update_yaxes(type="log", title_text="probability", row=1, col=1)
    fig.update_yaxes(type="log", autorange="reversed", title_text="rank", row=1, col=2)
    fig.update_xaxes(title_text="readout layer")
    return layout(fig, title, height=420, legend="top")
