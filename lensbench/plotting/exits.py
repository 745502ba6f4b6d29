"""Early-exit figures: the accuracy/speedup trade-off of every policy, the exit layers, and the
per-example exit traces."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from lensbench.plotting.style import (
    EXAMPLE_COLORS, final_line, interval_label, interval_text, layout, lens_color, lens_dash, policy_label,
)

POLICY_COLORS = {"oracle": "#000000"}


def policy_color(name: str) -> str:
    """A policy is drawn in the colour of its confidence lens (the oracle black)."""
    return POLICY_COLORS.get(name) or lens_color(name)


def exit_tradeoff_figure(
    curves: Mapping[str, "object"],
    full_accuracy: float | None = None,
    operating_points: Sequence[Mapping] = (),
    x: str = "layer_token_speedup",
    y: str = "accuracy",
    title: str | None = None,
    labels: Mapping[str, str] | None = None,
    log_x: bool = True,
    level: float | None = 0.95,
) -> go.Figure:
    """Accuracy (or fidelity) against speedup as the exit threshold sweeps, one line per policy.

    curves: `{policy: DataFrame[threshold, accuracy, fidelity, mean_exit_layer, layer_token_speedup]}`
    (`exits.operating_curve`); a one-row curve (the oracle) is drawn as a point.
    operating_points: dicts with `x`, `y`, `label`, optionally `policy` (coloured like its
    curve) and `symbol` (a plotly marker symbol, default a star), e.g. the calibrated "best
    accuracy" and "≤ 1 point drop" thresholds measured on the test split. A point with
    `x_interval` / `y_interval` (`[lo, hi]`: the report's `layer_token_speedup_ci` /
    `accuracy_ci`, `lensbench.uncertainty`) gets error bars of those intervals (none on a side
    whose bound is missing or infinite, as a speedup's can be) and them on hover.
    labels: display names of the policies (default: `policy_label`); level: the intervals' level.
    """
    labels = dict(labels or {})
    fig = go.Figure()
    for name, frame in curves.items():
        if frame is None or len(frame) == 0:
            continue
        frame = frame.sort_values(x)
        color = policy_color(name)
        label = labels.get(name, policy_label(str(name)))
        exit_layer = frame["mean_exit_layer"] if "mean_exit_layer" in frame else frame["threshold"]
        custom = list(zip(frame["threshold"], exit_layer))
        single = len(frame) == 1
        fig.add_trace(go.Scatter(
            x=list(frame[x]), y=list(frame[y]), mode="markers" if single else "lines+markers", name=label,
            legendgroup=str(name), marker=dict(size=11 if single else 4, symbol="diamond" if single else "circle", color=color),
            line=dict(color=color, dash=lens_dash(str(name))), customdata=custom,
            hovertemplate=f"{label}<br>speedup %{{x:.2f}}×<br>{y} %{{y:.3f}}<br>threshold %{{customdata[0]:.3g}}"
                          "<br>mean exit layer %{customdata[1]:.1f}<extra></extra>",
        ))
    for point in operating_points:
        color = policy_color(point["policy"]) if point.get("policy") else "black"
        errors, hover = {}, {"x": "", "y": ""}
        for axis in ("x", "y"):
            interval = point.get(f"{axis}_interval")
            if interval is None:
                continue
            hover[axis] = " " + interval_text(interval, fmt=".2f" if axis == "x" and x == "layer_token_speedup" else ".3f")
            bar = _error_bar(point[axis], interval, color)
            if bar is not None:
                errors[f"error_{axis}"] = bar
        if errors:
            hover["y"] += f" ({interval_label(level)})"
        fig.add_trace(go.Scatter(
            x=[point["x"]], y=[point["y"]], mode="markers", name=point.get("label", "operating point"),
            legendgroup=str(point.get("policy")),
            marker=dict(symbol=point.get("symbol", "star"), size=point.get("size", 16), color=color,
                        line=dict(color="black", width=1)),
            hovertemplate=f"{point.get('label', '')}<br>speedup %{{x:.2f}}×{hover['x']}<br>{y} %{{y:.3f}}{hover['y']}"
                          "<extra></extra>",
            **errors,
        ))
    if full_accuracy is not None and y == "accuracy":
        final_line(fig, full_accuracy, "full model")
        fig.add_hline(y=full_accuracy - 0.01, line=dict(color="gray", dash="dash", width=1),
                      annotation_text="−1 point", annotation_position="bottom left")
    fig.update_xaxes(title_text="speedup over the full model (layer-token units)" if x == "layer_token_speedup" else x,
                     type="log" if log_x else None)
    fig.update_yaxes(title_text=y)
    return layout(fig, title, width=800, height=520)


def _error_bar(value, interval, color: str) -> dict | None:
    """A plotly error bar from `value` to the bounds of `interval` (a side whose bound is missing
    or infinite is left out; None when both are)."""
    lo, hi = interval
    ok = [b is not None and np.isfinite(b) for b in (lo, hi)]
    if not any(ok) or value is None or not np.isfinite(value):
        return None
    return dict(type="data", symmetric=False, array=[max(hi - value, 0.0) if ok[1] else 0.0],
                arrayminus=[max(value - lo, 0.0) if ok[0] else 0.0], color=color, thickness=1.5, width=5, visible=True)


def exit_histogram(exit_layer: Sequence[int], n_layers: int, threshold: float | None = None,
                   title: str | None = None) -> go.Figure:
    """How many examples exit at each readout layer (`exits.simulate_exits`' `exit_layer`);
    layer `n_layers` is the model's own output (no early exit)."""
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
    return layout(fig, title, height=360)


def exit_trace_figure(
    traces: Mapping[str, Mapping],
    threshold: float | None,
    min_layer: int = 0,
    title: str | None = None,
) -> go.Figure:
    """Per-example exit traces: the policy's confidence (entropy) per layer, the threshold line
    (named in the legend, so no label is drawn over the exit points), and the exit point with
    its decision.

    traces: `{label: {"layers": [...], "entropy": [...], "exit_layer": int, "decision": str,
    "correct": bool}}`; threshold: the exit threshold (None for the oracle); min_layer: the
    first layer checked (shaded before it).
    """
    fig = go.Figure()
    all_layers: list[int] = []
    for i, (label, trace) in enumerate(traces.items()):
        color = EXAMPLE_COLORS[i % len(EXAMPLE_COLORS)]
        layers = list(trace["layers"])
        all_layers += layers
        fig.add_trace(go.Scatter(
            x=layers, y=list(trace["entropy"]), mode="lines+markers", name=str(label),
            legendgroup=str(label), line=dict(color=color), marker=dict(size=4),
            hovertemplate=f"{label}<br>layer %{{x}}<br>entropy %{{y:.3f}}<extra></extra>",
        ))
        layer = int(trace["exit_layer"])
        y = trace["entropy"][layers.index(layer)] if layer in layers else None
        mark = "✓" if trace.get("correct") else "✗"
        fig.add_trace(go.Scatter(
            x=[layer], y=[y], mode="markers+text", text=[f"{trace.get('decision', '')!s} {mark}"],
            textposition="middle right", legendgroup=str(label), showlegend=False,
            marker=dict(symbol="star", size=14, color=color, line=dict(color="black", width=1)),
            hovertemplate=f"{label}<br>exit at layer {layer}<br>decision {trace.get('decision', '')!s} {mark}<extra></extra>",
        ))
    if threshold is not None:
        lo, hi = (min(all_layers), max(all_layers)) if all_layers else (0, 1)
        fig.add_trace(go.Scatter(
            x=[lo, hi], y=[threshold, threshold], mode="lines", name=f"threshold τ = {threshold:.3g}",
            line=dict(color="#d62728", dash="dash", width=1.5), hoverinfo="skip",
        ))
    if min_layer > 0:
        fig.add_vrect(x0=-0.5, x1=min_layer - 0.5, fillcolor="gray", opacity=0.12, line_width=0,
                      annotation_text="not checked", annotation_position="bottom left")
    fig.update_xaxes(title_text="readout layer")
    fig.update_yaxes(title_text="confidence: entropy (nats)", rangemode="tozero")
    return layout(fig, title, height=420)
