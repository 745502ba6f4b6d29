"""Attention figures: `[a]` → `[s]` in SimLens's continuation per readout layer, block and head
(stored runs), and `[a]`'s attention over the real prompt tokens in the full forward pass versus
in the continuation (the live probe)."""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lensbench.plotting.examples import token_text
from lensbench.plotting.style import layout


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def attention_heatmap(mean, points, point: int | None = None, title: str | None = None) -> go.Figure:
    """Attention [a] → [s] in SimLens's continuation.

    mean: `(point, block, head)` mean attention (`Run.attention()[0]`); points: the readout
    layer of each row. With `point=None`: readout point × block, averaged over heads; with a
    readout layer: block × head at that point. Blocks the continuation does not run (those
    below the readout layer: it starts at the readout layer's block) are blank, and the figure
    says so.
    """
    values = _to_numpy(mean)
    layers = [int(p) for p in _to_numpy(points)]
    n_blocks, n_heads = values.shape[1], values.shape[2]
    if point is None:
        with warnings.catch_warnings():  # the final readout point runs no block: an all-NaN row
            warnings.simplefilter("ignore", RuntimeWarning)
            z = np.nanmean(values, axis=2)
        x, y = list(range(n_blocks)), layers
        xlabel, ylabel = "block of the continuation", "readout layer"
        hover = "readout layer %{y}<br>block %{x}<br>mean over heads %{z:.3f}<extra></extra>"
        note = "blank: blocks below the readout layer (the continuation from layer l runs blocks l…L−1 only)"
    else:
        if point not in layers:
            raise ValueError(f"readout layer {point} is not among the stored points {layers}")
        z = values[layers.index(point)]  # (block, head)
        x, y = list(range(n_heads)), list(range(n_blocks))
        xlabel, ylabel = "head", "block"
        hover = "block %{y}<br>head %{x}<br>attention %{z:.3f}<extra></extra>"
        note = (f"blocks 0…{point - 1} are not run: the continuation from readout layer {point} starts at block {point}"
                if point > 0 else "every block runs from readout layer 0")
    z = [[None if (isinstance(v, float) and math.isnan(v)) else float(v) for v in row] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, colorscale="Viridis", zmin=0, zmax=1, hovertemplate=hover,
                               colorbar=dict(title="[a]→[s]")))
    if point is not None and point > 0:
        fig.add_shape(type="rect", xref="paper", x0=0, x1=1, y0=-0.5, y1=point - 0.5,
                      fillcolor="#dddddd", opacity=0.5, line_width=0, layer="below")
        fig.add_annotation(xref="paper", x=0.5, y=(point - 1) / 2, text=f"not run (blocks 0…{point - 1})",
                           showarrow=False, font=dict(color="#555555"))
    fig.update_xaxes(title_text=xlabel)
    fig.update_yaxes(title_text=ylabel)
    title = f"{title}<br><sup>{note}</sup>" if title else f"<sup>{note}</sup>"
    return layout(fig, title, height=540, width=760)


def token_attention_figure(
    tokens: Sequence[str],
    full: Sequence[float],
    continuation: Mapping[str, float] | None,
    block: int,
    head: str,
    readout_layer: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """`[a]`'s attention to every prompt token at one block (a head, or the mean over heads):
    in the full forward pass (top) versus in SimLens's two-token continuation from
    `readout_layer` (bottom; it sees only `[s]` and `[a]`).

    tokens: the prompt's tokens as text (the first is `[s]`, the last `[a]`); full: the
    weights over them; continuation: `{"[s]": w, "[a]": w}` (None: the block is not run).
    """
    labels = [f"{i}: {token_text(t)}" for i, t in enumerate(tokens)]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.5, 0.5], vertical_spacing=0.12,
                        subplot_titles=[f"full forward pass, block {block}, {head}",
                                        f"SimLens continuation from layer {readout_layer}, block {block}, {head}"
                                        if continuation is not None else
                                        f"SimLens continuation: block {block} is not run from layer {readout_layer}"])
    fig.add_trace(go.Bar(x=labels, y=list(full), name="full forward", marker_color="#7f7f7f",
                         hovertemplate="%{x}<br>attention %{y:.3f}<extra>full forward</extra>"), row=1, col=1)
    cont = [None] * len(tokens)
    if continuation is not None:
        cont[0], cont[-1] = continuation.get("[s]"), continuation.get("[a]")
    fig.add_trace(go.Bar(x=labels, y=cont, name="SimLens continuation", marker_color="#1f77b4",
                         hovertemplate="%{x}<br>attention %{y:.3f}<extra>continuation</extra>"), row=2, col=1)
    fig.update_yaxes(title_text="attention from [a]", range=[0, 1.02])
    fig.update_xaxes(type="category", tickangle=-60, row=2, col=1)
    return layout(fig, title, height=560, legend="top")
