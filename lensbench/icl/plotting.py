"""Figures of ICL runs, shared by the app's ICL page and `analyses/icl.py`. Every function takes
what `summary.json` (or the run's tables) already holds and returns a plotly figure."""

from __future__ import annotations

from typing import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lensbench.plotting.style import layout as _layout

CURVES = {  # accuracy curve key -> (label, colour, dash)
    "few-shot/logit": ("few-shot, logit lens at the last position", "#1f77b4", "solid"),
    "few-shot/simlens": ("few-shot, SimLens at the last position", "#1f77b4", "dot"),
    "zero-shot/logit": ("zero-shot (query alone), logit lens", "#7f7f7f", "solid"),
    "baseline/logit": ("uninformative demonstrations, logit lens", "#bcbd22", "solid"),
    "global/output": ("global patch at layer l (into zero-shot)", "#d62728", "solid"),
    "local/output": ("local patch at layer l (label positions)", "#2ca02c", "solid"),
    "local+sep/output": ("local patch at layer l (labels + separators)", "#2ca02c", "dash"),
}
DEFAULT_CURVES = ("few-shot/logit", "zero-shot/logit", "baseline/logit", "global/output", "local/output")
CONVERGENCE_LABELS = {
    "within": "between the demonstrations of a prompt",
    "across": "with other prompts' local vectors",
    "to_final": "with the prompt's last position",
    "to_global": "with the global vector",
}
TARGET_COLORS = {"label": "#2ca02c", "separator": "#98df8a", "start": "#7f7f7f", "query": "#1f77b4", "other": "#ff7f0e"}


def _band(fig, x, low, high, color, row=None, col=None):
    kw = dict(row=row, col=col) if row is not None else {}
    fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=list(high) + list(low)[::-1], fill="toself", fillcolor=color, mode="lines",
                             opacity=0.12, line=dict(width=0), hoverinfo="skip", showlegend=False), **kw)


def _accuracy_traces(fig, summary: Mapping, curves: Sequence[str], row=None, col=None, legend: bool = True) -> None:
    kw = dict(row=row, col=col) if row is not None else {}
    for key in curves:
        curve = summary["accuracy"].get(key)
        if curve is None:
            continue
        label, color, dash = CURVES.get(key, (key, "#9467bd", "solid"))
        _band(fig, curve["layer"], curve["ci_low"], curve["ci_high"], color, row, col)
        fig.add_trace(go.Scatter(x=curve["layer"], y=curve["accuracy"], name=label, legendgroup=key, showlegend=legend,
                                 mode="lines+markers", marker=dict(size=4), line=dict(color=color, dash=dash)), **kw)
    fig.add_hline(y=summary["chance"], line=dict(color="black", dash="dot", width=1), annotation_text="chance",
                  annotation_position="bottom right", **kw)


def accuracy_figure(summary: Mapping, curves: Sequence[str] = DEFAULT_CURVES, title: str | None = None) -> go.Figure:
    """Accuracy by layer (readout layer for few-/zero-shot, patch layer for the patches), with
    Wilson 95% bands and chance."""
    fig = go.Figure()
    _accuracy_traces(fig, summary, curves)
    fig.update_xaxes(title="layer (readout point / patch point)")
    fig.update_yaxes(title="accuracy", range=[-0.02, 1.02])
    return _layout(fig, title)


def accuracy_grid(summaries: Mapping[str, Mapping], curves: Sequence[str] = DEFAULT_CURVES, title: str | None = None,
                  columns: int = 4) -> go.Figure:
    """One accuracy panel per run (e.g. per task), side by side."""
    names = list(summaries)
    cols = min(columns, len(names))
    rows = -(-len(names) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{n}<br>({summaries[n].get('task_kind')})" for n in names],
                        shared_yaxes=True, horizontal_spacing=0.04, vertical_spacing=0.12)
    for i, name in enumerate(names):
        _accuracy_traces(fig, summaries[name], curves, i // cols + 1, i % cols + 1, legend=i == 0)
    fig.update_yaxes(range=[-0.02, 1.02])
    return _layout(fig, title, height=300 * rows + 120)


def convergence_figure(summary: Mapping, title: str | None = None) -> go.Figure:
    """Cosines of the local vectors by layer (mean ± s.e.m. over queries), raw and centred."""
    conv = summary["convergence"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["raw residuals", "centred (donors' mean residual removed)"],
                        shared_yaxes=True)
    colors = dict(zip(CONVERGENCE_LABELS, ("#2ca02c", "#ff7f0e", "#1f77b4", "#d62728")))
    for col, suffix in ((1, ""), (2, "_c")):
        for key, label in CONVERGENCE_LABELS.items():
            m = conv.get(key + suffix)
            if m is None:
                continue
            lo = [a - b for a, b in zip(m["mean"], m["sem"])]
            hi = [a + b for a, b in zip(m["mean"], m["sem"])]
            _band(fig, conv["layer"], lo, hi, colors[key], 1, col)
            fig.add_trace(go.Scatter(x=conv["layer"], y=m["mean"], name=f"local vectors: {label}", legendgroup=key,
                                     showlegend=col == 1, line=dict(color=colors[key])), row=1, col=col)
    fig.update_xaxes(title="layer")
    fig.update_yaxes(title="cosine similarity", row=1, col=1)
    return _layout(fig, title)


def decode_figure(summary: Mapping, title: str | None = None) -> go.Figure:
    """How often a local vector decodes to its own demonstration's label, or to the query's gold."""
    fig = go.Figure()
    for lens, d in summary.get("decode", {}).items():
        dash = "solid" if lens == "logit" else "dot"
        fig.add_trace(go.Scatter(x=d["layer"], y=d["own_label"], name=f"{lens}: its demonstration's label",
                                 line=dict(color="#2ca02c", dash=dash)))
        fig.add_trace(go.Scatter(x=d["layer"], y=d["query_gold"], name=f"{lens}: the query's gold label",
                                 line=dict(color="#d62728", dash=dash)))
    fig.update_xaxes(title="layer")
    fig.update_yaxes(title="rate", range=[-0.02, 1.02])
    return _layout(fig, title)


def attention_figure(summary: Mapping, title: str | None = None) -> go.Figure:
    """Attention from the last position by block: summed over each target's positions (mean over
    heads), and per position of the target."""
    att = summary["attention"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["summed over the target's positions", "per position"])
    for col, key in ((1, "mean_heads"), (2, "per_position")):
        for target, values in att[key].items():
            fig.add_trace(go.Scatter(x=att["block"], y=values, name=target, legendgroup=target, showlegend=col == 1,
                                     line=dict(color=TARGET_COLORS.get(target))), row=1, col=col)
    fig.update_xaxes(title="block")
    fig.update_yaxes(title="attention weight (mean over heads)", row=1, col=1)
    return _layout(fig, title)


def prompt_decode_figure(layers: Sequence[int], demos: Sequence[str], decoded: Sequence[Sequence[str]],
                         shown: Sequence[str], title: str | None = None) -> go.Figure:
    """One prompt: a row per demonstration (its label position), a column per layer; each cell
    the label its local vector decodes to, green where it is the demonstration's own label."""
    z = [[1.0 if d == s else 0.0 for d in row] for row, s in zip(decoded, shown)]
    fig = go.Figure(go.Heatmap(x=[str(x) for x in layers], y=list(demos), z=z, text=decoded, texttemplate="%{text}",
                               colorscale=[[0, "#f7f7f7"], [1, "#a1d99b"]], zmin=0, zmax=1, showscale=False,
                               hovertemplate="layer %{x}<br>%{y}<br>decodes to %{text}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="demonstration (label position)")
    fig.update_xaxes(title="layer", type="category")
    return _layout(fig, title, height=120 + 32 * len(demos))
