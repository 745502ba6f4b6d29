"""The visual grammar every figure shares: one colour per lens (the logit lens always a grey
dashed line), one marker symbol (or one panel) per run, friendly lens names, the reference
lines (full model, chance) and the layout."""

from __future__ import annotations

import re
from typing import Sequence

import plotly.graph_objects as go

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
# Further lenses (other ablations); none of them is a colour of a named lens above.
_PALETTE = ["#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939", "#7b4173", "#3182bd", "#e6550d", "#31a354"]
# One marker symbol per run where several runs share a plot.
RUN_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "star", "cross", "pentagon", "hexagon", "triangle-down"]
# Per-example colours (exit traces), distinct from the lens colours where possible.
EXAMPLE_COLORS = ["#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939", "#7b4173", "#3182bd", "#e6550d", "#31a354",
                  "#756bb1", "#843c39", "#8c6d31"]

LENS_LABELS = {
    "logit": "logit lens",
    "simlens": "SimLens",
    "linear-simlens": "Linear SimLens",
    "tuned": "tuned lens (baseline)",
    "simlens[drop-s]": "SimLens, [s] dropped",
    "simlens[drop-a]": "SimLens, [a] dropped (prior)",
    "simlens[a=swap]": "SimLens, [a] from another example",
    "simlens[s=swap]": "SimLens, [s] from another example",
}
POLICY_LABELS = {
    "linear-simlens": "SimExit (Linear SimLens entropy)",
    "logit": "logit-lens entropy",
    "simlens": "SimLens entropy",
    "oracle": "oracle (settle layer)",
}
_SOURCES = {"self": "its own", "swap": "another example", "mean": "the data-set mean", "zero": "zero"}


def lens_color(name: str, index: int = 0) -> str:
    """The fixed colour of a lens; an unknown lens gets a palette colour fixed by its name."""
    if name in LENS_COLORS:
        return LENS_COLORS[name]
    return _PALETTE[sum(map(ord, name)) % len(_PALETTE)]


def lens_dash(name: str) -> str | None:
    """The logit lens is always dashed; every other lens solid."""
    return "dash" if name == "logit" else None


def lens_line(name: str, width: float = 2.0) -> dict:
    return dict(color=lens_color(name), dash=lens_dash(name), width=width)


def _slot_source(part: str) -> str:
    slot, _, source = part.partition("=")
    kind, _, arg = source.partition(":")
    what = {"token": f"token {arg}", "position": f"position {arg}", "layer": f"layer {arg}",
            "example": f"example {arg}"}.get(kind, _SOURCES.get(kind, source))
    return f"[{slot}] ← {what}"


def lens_label(name: str) -> str:
    """The friendly name of a stored lens (`simlens[a=token:" x"]` → `SimLens, [a] ← token " x"`)."""
    if name in LENS_LABELS:
        return LENS_LABELS[name]
    found = re.fullmatch(r"simlens\[(.*)\]", name)
    if not found:
        return name
    inner = found.group(1)
    if inner.startswith("drop-"):
        return f"SimLens, [{inner[5:]}] dropped"
    return "SimLens, " + "; ".join(_slot_source(part) for part in inner.split(","))


def lens_order(names) -> list[str]:
    """Lenses in one reading order everywhere: the logit lens, SimLens, Linear SimLens, the
    tuned lens, then SimLens's ablations and any other lens (in their given order)."""
    first = ["logit", "simlens", "linear-simlens", "tuned"]
    names = list(dict.fromkeys(names))
    return [n for n in first if n in names] + [n for n in names if n not in first]


BAND_ALPHA = 0.15  # the fill of an interval band: the line's colour, mostly transparent
BOUNDS = ("lower", "upper")


def interval_label(level: float | None = 0.95) -> str:
    """`95 % interval`: how a band or an error bar is named (the bootstrap's level)."""
    return f"{(0.95 if level is None else level) * 100:g} % interval"


def band_name(label: str, bound: str, level: float | None = 0.95) -> str:
    """The name of a band's `lower` or `upper` bound trace (kept out of the legend):
    `SimLens · 95 % interval, lower bound`."""
    return f"{label} · {interval_label(level)}, {bound} bound"


def translucent(color: str, alpha: float = BAND_ALPHA) -> str:
    """`#1f77b4` as `rgba(31,119,180,alpha)`."""
    value = color.lstrip("#")
    if len(value) == 3:
        value = "".join(c * 2 for c in value)
    r, g, b = (int(value[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha:g})"


def band_traces(x: Sequence, interval: Sequence, label: str, color: str, legendgroup: str,
                level: float | None = 0.95, line_shape: str | None = None, dash: str | None = None,
                **extra) -> list[go.Scatter]:
    """A shaded interval band: two traces, the lower bound then the upper bound filled down to
    it (`fill="tonexty"`), in `color` at `BAND_ALPHA`, without lines (width 0; `dash` as the
    line's, for uniform trace data), legend entries or hover (the band shows and hides with its
    line's legend group). `interval`: `[[lo, hi], ...]` per x (None or NaN bounds leave a gap);
    `extra`: further trace properties (e.g. `meta`, the run)."""
    lows, highs = [], []
    for pair in interval:
        lo, hi = (None, None) if pair is None else pair
        lows.append(None if lo is None or lo != lo else float(lo))
        highs.append(None if hi is None or hi != hi else float(hi))
    common = dict(x=list(x), mode="lines", line=dict(width=0, color=color, shape=line_shape, dash=dash),
                  legendgroup=legendgroup,
                  showlegend=False, hoverinfo="skip", **extra)
    return [go.Scatter(y=lows, name=band_name(label, "lower", level), **common),
            go.Scatter(y=highs, name=band_name(label, "upper", level), fill="tonexty",
                       fillcolor=translucent(color), **common)]


def interval_text(interval, scale: float = 1.0, fmt: str = ".3f", signed: bool = False) -> str:
    """`[0.571, 0.650]` (None bounds as `–`); `scale=100, fmt=".1f", signed=True` gives points: `[+2.1, +12.0]`."""
    if interval is None:
        return ""
    spec = ("+" if signed else "") + fmt
    return "[" + ", ".join("–" if x is None or x != x else format(x * scale, spec) for x in interval) + "]"


def policy_label(name: str) -> str:
    return POLICY_LABELS.get(name, name)


def run_symbol(index: int) -> str:
    return RUN_SYMBOLS[index % len(RUN_SYMBOLS)]


def layout(fig: go.Figure, title: str | None, height: int = 480, width: int | None = None,
           legend: str = "bottom") -> go.Figure:
    """The shared layout: white template, the legend below (or at the right) the plot."""
    legends = {
        "bottom": dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0),
        "top": dict(orientation="h", yanchor="bottom", y=1.1, xanchor="left", x=0),
        "right": dict(orientation="v", yanchor="top", y=1, xanchor="left", x=1.02),
    }
    top = 40 if not title else 90 if legend != "top" else 150 if "<br>" in title else 130  # a top legend below the title
    fig.update_layout(
        title=title, template="plotly_white", height=height + (top - 90 if title and legend == "top" else 0),
        width=width, legend=legends[legend], margin=dict(l=60, r=20, t=top, b=60),
    )
    return fig


def final_line(fig: go.Figure, value: float | None, label: str, row=None, col=None,
               position: str = "bottom right") -> None:
    """The full model's accuracy: a black dotted line."""
    if value is None:
        return
    kwargs = dict(row=row, col=col) if row is not None else {}
    fig.add_hline(y=value, line=dict(color="black", dash="dot", width=1), annotation_text=label,
                  annotation_position=position, **kwargs)


def chance_line(fig: go.Figure, value: float | None, row=None, col=None, position: str = "top right") -> None:
    """Chance accuracy (the mean of 1 / number of candidates): a light red dash-dot line."""
    if value is None:
        return
    kwargs = dict(row=row, col=col) if row is not None else {}
    fig.add_hline(y=value, line=dict(color="#e377c2", dash="dashdot", width=1),
                  annotation_text=f"chance {value:.2f}", annotation_position=position, **kwargs)


def value_range(values: Sequence[float], extra: Sequence[float | None] = (), lo: float = 0.0, hi: float = 1.0,
                pad: float = 0.04) -> list[float]:
    """A y range that holds the data and the reference lines, within [lo, hi], padded: not a
    fixed 0-1 axis, so a two-choice task's curves between 0.4 and 0.7 are readable."""
    finite = [float(v) for v in [*values, *extra] if v is not None and v == v]
    if not finite:
        return [lo - pad, hi + pad]
    low, high = max(lo, min(finite)), min(hi, max(finite))
    span = max(high - low, 0.1)
    return [max(lo - pad, low - span * 0.08), min(hi + pad, high + span * 0.08)]
