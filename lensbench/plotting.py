"""Plotly figures shared by the Streamlit app and the analyses scripts.

Every function takes plain data that the library already computed (the per-layer dicts of
`metrics.per_layer` / `summary.json`, the DataFrames of `compute` and `exits`, the attention
tensor of `Run.attention()`) and returns a `plotly.graph_objects.Figure`; none of them
recomputes a metric. `figure_files.save_figure` writes a figure as interactive HTML and a static PNG
(plotly's static export through kaleido, driving the system Chromium at `/usr/bin/chromium`;
kaleido never downloads a browser here).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

METRIC_LABELS = {
    "accuracy": "accuracy",
    "fidelity": "fidelity (agrees with the final layer)",
    "mean_entropy": "mean entropy (nats)",
}

# Fixed colours so that a lens looks the same in every figure, app and analyses alike.
LENS_COLORS = {
    "logit": "#7f7f7f",
    "simlens": "#1f77b4",
    "linear-simlens": "#2ca02c",
    "tuned": "#ff7f0e",
    "simlens[drop-s]": "#d62728",
    "simlens[drop-a]": "#9467bd",
    "simlens[a=swap]": "#8c564b",
    "simlens[s=swap]": "#e377c2",
}
_PALETTE = ["#17becf", "#bcbd22", "#e377c2", "#8c564b", "#9467bd", "#d62728", "#aec7e8", "#ffbb78", "#98df8a"]

LENS_LABELS = {
    "logit": "logit lens",
    "simlens": "SimLens",
    "linear-simlens": "Linear SimLens",
    "tuned": "tuned lens (baseline)",
    "simlens[drop-s]": "SimLens, [s] dropped",
    "simlens[drop-a]": "SimLens, [a] dropped (prior)",
    "simlens[a=swap]": "SimLens, [a] from another example",
}


def lens_color(name: str, index: int = 0) -> str:
    """The fixed colour of a lens; unknown lenses (other ablations) cycle through a palette."""
    return LENS_COLORS.get(name, _PALETTE[index % len(_PALETTE)])


def lens_label(name: str) -> str:
    return LENS_LABELS.get(name, name)


def _layout(fig: go.Figure, title: str | None, height: int = 480, width: int | None = None) -> go.Figure:
    fig.update_layout(
        title=title, template="plotly_white", height=height, width=width,
        legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0),
        margin=dict(l=60, r=20, t=90 if title else 40, b=60),
    )
    return fig


def _final_line(fig: go.Figure, value: float | None, label: str, row=None, col=None,
                position: str = "bottom right") -> None:
    if value is None:
        return
    kwargs = dict(row=row, col=col) if row is not None else {}
    fig.add_hline(y=value, line=dict(color="black", dash="dot", width=1), annotation_text=label,
                  annotation_position=position, **kwargs)


# ---------------------------------------------------------------------------------------------
# 1. Per-layer accuracy and fidelity
# ---------------------------------------------------------------------------------------------

def per_layer_figure(
    per_layer: Mapping[str, Mapping],
    lenses: Sequence[str] | None = None,
    metrics: Sequence[str] = ("accuracy", "fidelity"),
    final_accuracy: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Per-layer curves, one subplot per metric, one line per lens.

    per_layer: `{lens: {"layer": [...], "accuracy": [...], "fidelity": [...]}}` (`summary["lenses"]`).
    lenses: which lenses to draw, in order (default: all); missing ones are skipped.
    final_accuracy: the full model's accuracy, drawn as a dotted line on the accuracy panel.
    """
    names = [n for n in (lenses or list(per_layer)) if n in per_layer]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[METRIC_LABELS.get(m, m) for m in metrics],
                        horizontal_spacing=0.08)
    for i, name in enumerate(names):
        data = per_layer[name]
        for j, metric in enumerate(metrics):
            if metric not in data:
                continue
            fig.add_trace(go.Scatter(
                x=data["layer"], y=data[metric], mode="lines+markers", name=lens_label(name),
                legendgroup=name, showlegend=j == 0, marker=dict(size=5),
                line=dict(color=lens_color(name, i), dash="dash" if name == "logit" else None),
                hovertemplate=f"{lens_label(name)}<br>layer %{{x}}<br>{metric} %{{y:.3f}}<extra></extra>",
            ), row=1, col=j + 1)
    for j, metric in enumerate(metrics):
        fig.update_xaxes(title_text="readout layer", row=1, col=j + 1)
        if metric in ("accuracy", "fidelity"):
            fig.update_yaxes(range=[-0.02, 1.02], row=1, col=j + 1)
        if metric == "accuracy":
            _final_line(fig, final_accuracy, "full model", row=1, col=j + 1)
    return _layout(fig, title, width=None if len(metrics) < 2 else 1100)


# ---------------------------------------------------------------------------------------------
# 2. Iso-Compute accuracy
# ---------------------------------------------------------------------------------------------

def iso_compute_figure(
    curves: Mapping[str, "object"],
    full_cost: float | None = None,
    final_accuracy: float | None = None,
    gain: float | None = None,
    gain_label: str = "SimLens − logit lens",
    title: str | None = None,
) -> go.Figure:
    """Iso-Compute accuracy against the compute budget, one step line per lens.

    curves: `{lens: DataFrame[budget, accuracy, layer]}` (`compute.iso_compute_curve`).
    full_cost: the full model's cost in the same units (marked with a vertical line).
    gain: the average Iso-Compute gain, shown in the title.
    """
    fig = go.Figure()
    for i, (name, frame) in enumerate(curves.items()):
        if frame is None or len(frame) == 0:
            continue
        layer = frame["layer"] if "layer" in frame else [None] * len(frame)
        fig.add_trace(go.Scatter(
            x=list(frame["budget"]), y=list(frame["accuracy"]), mode="lines", line_shape="hv",
            name=lens_label(name), line=dict(color=lens_color(name, i), dash="dash" if name == "logit" else None),
            customdata=list(layer),
            hovertemplate=f"{lens_label(name)}<br>budget %{{x:.0f}}<br>accuracy %{{y:.3f}}<br>layer %{{customdata}}<extra></extra>",
        ))
    if full_cost is not None:
        fig.add_vline(x=full_cost, line=dict(color="black", dash="dot", width=1), annotation_text="full model")
    _final_line(fig, final_accuracy, "full-model accuracy", position="bottom left")
    if gain is not None:
        suffix = f"average Iso-Compute gain ({gain_label}): {gain * 100:+.1f} points"
        title = f"{title}<br><sup>{suffix}</sup>" if title else suffix
    fig.update_xaxes(title_text="compute budget (layer-token units)")
    fig.update_yaxes(title_text="Iso-Compute accuracy", range=[-0.02, 1.02])
    return _layout(fig, title, width=800)


# ---------------------------------------------------------------------------------------------
# 3. Role analyses: ablations, swaps, attention to [s]
# ---------------------------------------------------------------------------------------------

def ablation_lenses(names: Iterable[str]) -> list[str]:
    """The SimLens slot-ablation lenses among `names` (`simlens[...]`)."""
    return [n for n in names if n.startswith("simlens[")]


def ablation_figure(
    per_layer: Mapping[str, Mapping],
    ablations: Sequence[str] | None = None,
    references: Sequence[str] = ("simlens", "logit"),
    metrics: Sequence[str] = ("accuracy", "fidelity"),
    final_accuracy: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """SimLens under each slot ablation, next to plain SimLens and the logit lens."""
    ablations = list(ablations) if ablations is not None else ablation_lenses(per_layer)
    return per_layer_figure(per_layer, [*references, *ablations], metrics, final_accuracy, title)


def swap_figure(swap: Mapping[str, Mapping], title: str | None = None) -> go.Figure:
    """Per layer, how often a swapped slot's decision follows the donor versus stays with the recipient.

    swap: `summary["swap"]` (`metrics.swap_rates`): `{lens: {"layer", "follow_donor",
    "stay_recipient", "n_informative"}}`.
    """
    fig = go.Figure()
    for i, (name, data) in enumerate(swap.items()):
        color = lens_color(name, i)
        n = data.get("n_informative", [None] * len(data["layer"]))
        fig.add_trace(go.Scatter(
            x=data["layer"], y=data["follow_donor"], mode="lines+markers", name=f"{name}: follows donor",
            line=dict(color=color), customdata=n, connectgaps=False,
            hovertemplate="layer %{x}<br>follows donor %{y:.3f}<br>informative pairs %{customdata}<extra></extra>",
        ))
        fig.add_trace(go.Scatter(
            x=data["layer"], y=data["stay_recipient"], mode="lines+markers", name=f"{name}: stays with recipient",
            line=dict(color=color, dash="dot"), marker=dict(symbol="x"), customdata=n, connectgaps=False,
            hovertemplate="layer %{x}<br>stays %{y:.3f}<br>informative pairs %{customdata}<extra></extra>",
        ))
    fig.update_xaxes(title_text="readout layer")
    fig.update_yaxes(title_text="rate (pairs whose donor and recipient disagree)", range=[-0.02, 1.02])
    return _layout(fig, title, width=800)


def _to_numpy(x):
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    import numpy as np

    return np.asarray(x, dtype=float)


def attention_heatmap(mean, points, point: int | None = None, title: str | None = None) -> go.Figure:
    """Attention [a] → [s] in SimLens's continuation.

    mean: `(point, block, head)` mean attention (`Run.attention()[0]`); points: the readout
    layer of each row. With `point=None`: readout point × block, averaged over heads; with a
    readout layer: block × head at that point. Blocks the continuation does not run are blank.
    """
    import numpy as np

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
    else:
        if point not in layers:
            raise ValueError(f"readout layer {point} is not among the stored points {layers}")
        z = values[layers.index(point)]  # (block, head)
        x, y = list(range(n_heads)), list(range(n_blocks))
        xlabel, ylabel = "head", "block"
        hover = "block %{y}<br>head %{x}<br>attention %{z:.3f}<extra></extra>"
    z = [[None if (isinstance(v, float) and math.isnan(v)) else float(v) for v in row] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, colorscale="Viridis", zmin=0, zmax=1, hovertemplate=hover,
                               colorbar=dict(title="[a]→[s]")))
    fig.update_xaxes(title_text=xlabel)
    fig.update_yaxes(title_text=ylabel)
    return _layout(fig, title, height=520, width=760)


# ---------------------------------------------------------------------------------------------
# 4. SimExit trade-off
# ---------------------------------------------------------------------------------------------

def exit_tradeoff_figure(
    curves: Mapping[str, "object"],
    full_accuracy: float | None = None,
    operating_points: Sequence[Mapping] = (),
    x: str = "layer_token_speedup",
    y: str = "accuracy",
    title: str | None = None,
    labels: Mapping[str, str] | None = None,
    log_x: bool = True,
) -> go.Figure:
    """Accuracy (or fidelity) against speedup as the exit threshold sweeps, one line per policy.

    curves: `{policy: DataFrame[threshold, accuracy, fidelity, mean_exit_layer, layer_token_speedup]}`
    (`exits.operating_curve`); a one-row curve (the oracle) is drawn as a point.
    operating_points: dicts with `x`, `y`, `label`, optionally `policy` (coloured like its
    curve) and `symbol` (a plotly marker symbol, default a star), e.g. the calibrated "best
    accuracy" and "≤ 1 point drop" thresholds measured on the test split.
    labels: display names of the policies (default: the keys).
    """
    labels = dict(labels or {})
    fig = go.Figure()
    colors = {}
    for i, (name, frame) in enumerate(curves.items()):
        if frame is None or len(frame) == 0:
            continue
        frame = frame.sort_values(x)
        colors[name] = lens_color(name, i)
        label = labels.get(name, str(name))
        exit_layer = frame["mean_exit_layer"] if "mean_exit_layer" in frame else frame["threshold"]
        custom = list(zip(frame["threshold"], exit_layer))
        single = len(frame) == 1
        fig.add_trace(go.Scatter(
            x=list(frame[x]), y=list(frame[y]), mode="markers" if single else "lines+markers", name=label,
            marker=dict(size=11 if single else 4, symbol="diamond" if single else "circle"),
            line=dict(color=colors[name]), customdata=custom,
            hovertemplate=f"{label}<br>speedup %{{x:.2f}}×<br>{y} %{{y:.3f}}<br>threshold %{{customdata[0]:.3g}}"
                          "<br>mean exit layer %{customdata[1]:.1f}<extra></extra>",
        ))
    for point in operating_points:
        color = colors.get(point.get("policy"), "black")
        fig.add_trace(go.Scatter(
            x=[point["x"]], y=[point["y"]], mode="markers", name=point.get("label", "operating point"),
            marker=dict(symbol=point.get("symbol", "star"), size=15, color=color, line=dict(color="black", width=1)),
            hovertemplate=f"{point.get('label', '')}<br>speedup %{{x:.2f}}×<br>{y} %{{y:.3f}}<extra></extra>",
        ))
    if full_accuracy is not None and y == "accuracy":
        _final_line(fig, full_accuracy, "full model")
        fig.add_hline(y=full_accuracy - 0.01, line=dict(color="gray", dash="dash", width=1),
                      annotation_text="−1 point", annotation_position="bottom left")
    fig.update_xaxes(title_text="speedup over the full model (layer-token units)" if x == "layer_token_speedup" else x,
                     type="log" if log_x else None)
    fig.update_yaxes(title_text=y)
    return _layout(fig, title, width=800)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def table_figure(frame, title: str | None = None) -> go.Figure:
    """A DataFrame as a plotly table (for the main-table PNG and HTML)."""
    fig = go.Figure(go.Table(
        header=dict(values=[f"<b>{c}</b>" for c in frame.columns], fill_color="#e8eef7", align="left"),
        cells=dict(values=[list(frame[c]) for c in frame.columns], align="left"),
    ))
    return _layout(fig, title, height=max(220, 60 + 30 * (len(frame) + 2)), width=max(700, 150 * len(frame.columns)))


# ---------------------------------------------------------------------------------------------
# 5. One example: trajectories and exit traces (used by the app)
# ---------------------------------------------------------------------------------------------

def _candidate_labels(candidates: Sequence[str], gold: int | None) -> list[str]:
    labels = [repr(c)[1:-1] + (" ✓" if gold is not None and i == gold else "") for i, c in enumerate(candidates)]
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
) -> go.Figure:
    """Candidate probabilities per readout layer for one example, one heatmap per lens, side by side.

    panels: `[{"title": str, "layers": [...], "probs": (layer, candidate), "decisions": [...] or None}]`,
    with `probs` the `exp` of the stored `candidate_logprobs`; candidates: the candidate tokens
    (columns); gold: the gold candidate's column (✓ in its label); decisions: the decided column
    per layer, marked with a red dot.
    """
    import numpy as np

    labels = _candidate_labels(candidates, gold)
    n_cols = max(1, min(per_row, len(panels)))
    n_rows = max(1, -(-len(panels) // n_cols))
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=[p.get("title", "") for p in panels],
                        horizontal_spacing=0.06, vertical_spacing=0.12 / n_rows + 0.04)
    for i, panel in enumerate(panels):
        row, col = i // n_cols + 1, i % n_cols + 1
        layers = list(panel["layers"])
        fig.add_trace(go.Heatmap(
            z=np.asarray(panel["probs"], dtype=float), x=labels, y=layers, colorscale="Blues", zmin=0, zmax=1,
            coloraxis="coloraxis", hovertemplate=f"{panel.get('title', '')}<br>layer %{{y}}<br>%{{x}}<br>p = %{{z:.3f}}<extra></extra>",
        ), row=row, col=col)
        if panel.get("decisions") is not None:
            fig.add_trace(go.Scatter(
                x=[labels[int(d)] for d in panel["decisions"]], y=layers, mode="markers", name="decision",
                marker=dict(symbol="circle", size=5, color="#d62728"), hoverinfo="skip", showlegend=False,
            ), row=row, col=col)
        fig.update_xaxes(type="category", row=row, col=col)
        fig.update_yaxes(title_text="readout layer" if col == 1 else None, row=row, col=col)
    fig.update_layout(coloraxis=dict(colorscale="Blues", cmin=0, cmax=1, colorbar=dict(title="p")))
    return _layout(fig, title, height=panel_height * n_rows + 40)


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


def exit_histogram(exit_layer: Sequence[int], n_layers: int, threshold: float | None = None,
                   title: str | None = None) -> go.Figure:
    """How many examples exit at each readout layer (`exits.simulate_exits`' `exit_layer`);
    layer `n_layers` is the model's own output (no early exit)."""
    import numpy as np

    counts = np.bincount(np.asarray(exit_layer, dtype=int), minlength=n_layers + 1)
    colors = ["#1f77b4"] * n_layers + ["#7f7f7f"]
    fig = go.Figure(go.Bar(
        x=list(range(n_layers + 1)), y=counts.tolist(), marker_color=colors,
        hovertemplate="exit layer %{x}<br>%{y} examples<extra></extra>",
    ))
    fig.update_xaxes(title_text=f"exit layer ({n_layers} = no early exit)")
    fig.update_yaxes(title_text="examples")
    if threshold is not None and title is None:
        title = f"exit layers at threshold {threshold:.3g}"
    return _layout(fig, title, height=360)


def exit_trace_figure(
    traces: Mapping[str, Mapping],
    threshold: float | None,
    min_layer: int = 0,
    title: str | None = None,
) -> go.Figure:
    """Per-example exit traces: the policy's confidence (entropy) per layer, the threshold line,
    and the exit point with its decision.

    traces: `{label: {"layers": [...], "entropy": [...], "exit_layer": int, "decision": str,
    "correct": bool}}`; threshold: the exit threshold (None for the oracle); min_layer: the
    first layer checked (shaded before it).
    """
    fig = go.Figure()
    for i, (label, trace) in enumerate(traces.items()):
        color = _PALETTE[i % len(_PALETTE)]
        fig.add_trace(go.Scatter(
            x=list(trace["layers"]), y=list(trace["entropy"]), mode="lines+markers", name=str(label),
            legendgroup=str(label), line=dict(color=color), marker=dict(size=4),
            hovertemplate=f"{label}<br>layer %{{x}}<br>entropy %{{y:.3f}}<extra></extra>",
        ))
        layer = int(trace["exit_layer"])
        layers = list(trace["layers"])
        y = trace["entropy"][layers.index(layer)] if layer in layers else None
        mark = "✓" if trace.get("correct") else "✗"
        fig.add_trace(go.Scatter(
            x=[layer], y=[y], mode="markers+text", text=[f"{trace.get('decision', '')!s} {mark}"],
            textposition="top center", legendgroup=str(label), showlegend=False,
            marker=dict(symbol="star", size=14, color=color, line=dict(color="black", width=1)),
            hovertemplate=f"{label}<br>exit at layer {layer}<br>decision {trace.get('decision', '')!s} {mark}<extra></extra>",
        ))
    if threshold is not None:
        fig.add_hline(y=threshold, line=dict(color="#d62728", dash="dash", width=1.5),
                      annotation_text=f"threshold {threshold:.3g}", annotation_position="top left")
    if min_layer > 0:
        fig.add_vrect(x0=-0.5, x1=min_layer - 0.5, fillcolor="gray", opacity=0.12, line_width=0,
                      annotation_text="not checked", annotation_position="top left")
    fig.update_xaxes(title_text="readout layer")
    fig.update_yaxes(title_text="confidence: entropy (nats)", rangemode="tozero")
    return _layout(fig, title, height=420)
