"""Per-layer curves of stored runs: accuracy and fidelity per lens (one run, or several side by
side), Iso-Compute accuracy, slot ablations and swap follow-rates."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lensbench.plotting.style import (
    METRIC_LABELS, band_traces, chance_line, final_line, interval_label, interval_text, layout, lens_color, lens_dash,
    lens_label, lens_line, run_symbol, value_range,
)

X_LABELS = {"layer": "readout layer", "relative": "relative depth (layer / number of layers)"}


def _x_values(layers: Sequence[int], n_layers: int | None, x: str) -> list[float]:
    if x == "relative":
        if not n_layers:
            raise ValueError("a relative-depth axis needs each run's number of layers")
        return [layer / n_layers for layer in layers]
    return list(layers)


def runs_per_layer_figure(
    runs: Mapping[str, Mapping],
    lenses: Sequence[str],
    metrics: Sequence[str] = ("accuracy", "fidelity"),
    x: str = "layer",
    arrangement: str = "facet",
    title: str | None = None,
    bands: bool = True,
    level: float | None = 0.95,
) -> go.Figure:
    """Per-layer curves of one or several runs, one colour per lens, the logit lens grey dashed.

    runs: `{run name: {"lenses": summary["lenses"], "n_layers": L, "final_accuracy": float or
    None, "chance": float or None}}`; lenses: the lenses to draw (skipped where a run lacks one);
    x: "layer" or "relative" (layer / L, for runs of different depths); arrangement: "facet"
    (one column per run, one row per metric) or "overlay" (one panel per metric, one marker
    symbol per run). The legend holds one entry per lens (and per run when overlaid).

    A lens whose data has `accuracy_ci` / `fidelity_ci` (the report's `per_layer`, `[[lo, hi],
    ...]` per layer: `lensbench.uncertainty`) gets a shaded band of that interval behind its
    line, in its colour (`style.band_traces`; no legend entry), and the interval on hover;
    `bands=False` leaves them out. level: the intervals' level, for their names.
    """
    names = list(runs)
    overlay = arrangement == "overlay" or len(names) == 1
    n_rows, n_cols = (1, len(metrics)) if overlay else (len(metrics), len(names))
    if overlay:
        titles = [METRIC_LABELS.get(m, m) for m in metrics]
    else:
        titles = [f"{run} · {METRIC_LABELS.get(m, m)}" if len(names) > 1 else METRIC_LABELS.get(m, m)
                  for m in metrics for run in names]
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=titles, horizontal_spacing=0.06,
                        vertical_spacing=0.14, shared_yaxes=False)
    shown: set[str] = set()
    ranges: dict[tuple[int, int], list[float]] = {}
    references: dict[tuple[int, int], list[float | None]] = {}
    for r, run in enumerate(names):
        info = runs[run]
        per_layer = info["lenses"]
        for j, metric in enumerate(metrics):
            row, col = (1, j + 1) if overlay else (j + 1, r + 1)
            for name in lenses:
                data = per_layer.get(name)
                if data is None or metric not in data:
                    continue
                xs = _x_values(data["layer"], info.get("n_layers"), x)
                label = lens_label(name)
                interval = data.get(f"{metric}_ci") if bands else None
                if interval is not None:
                    for trace in band_traces(xs, interval, label if len(names) == 1 else f"{run} · {label}",
                                             lens_color(name), name, level, dash=lens_dash(name), meta=run):
                        fig.add_trace(trace, row=row, col=col)
                    ranges.setdefault((row, col), []).extend(v for pair in interval for v in (pair or ()) if v is not None)
                hover_ci = [f" {interval_text(pair)}" for pair in interval] if interval is not None else [""] * len(xs)
                fig.add_trace(go.Scatter(
                    x=xs, y=data[metric], mode="lines+markers", name=label, legendgroup=name,
                    showlegend=name not in shown and not (overlay and len(names) > 1),
                    line=lens_line(name), marker=dict(size=6 if len(names) > 1 and overlay else 5,
                                                      symbol=run_symbol(r) if overlay else "circle"),
                    customdata=[[layer, ci] for layer, ci in zip(data["layer"], hover_ci)],
                    meta=run,
                    hovertemplate=f"{run}<br>{label}<br>layer %{{customdata[0]}}"
                                  + (" (depth %{x:.2f})" if x == "relative" else "")
                                  + f"<br>{metric} %{{y:.3f}}%{{customdata[1]}}<extra></extra>",
                ), row=row, col=col)
                shown.add(name)
                ranges.setdefault((row, col), []).extend(v for v in data[metric] if v is not None)
            if metric == "accuracy":
                refs = references.setdefault((row, col), [])
                refs += [info.get("final_accuracy"), info.get("chance")]
                if not overlay or r == 0:
                    final_line(fig, info.get("final_accuracy"), "full model", row=row, col=col)
                    chance_line(fig, info.get("chance"), row=row, col=col)
    if overlay and len(names) > 1:
        for name in lenses:  # the legend: one line per lens, one symbol per run
            if name in shown:
                fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=lens_label(name), legendgroup=name,
                                         line=lens_line(name), hoverinfo="skip"))
        for r, run in enumerate(names):
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=run, hoverinfo="skip",
                                     marker=dict(symbol=run_symbol(r), size=8, color="black")))
    for (row, col), values in ranges.items():
        metric = metrics[col - 1] if overlay else metrics[row - 1]
        if metric in ("accuracy", "fidelity"):
            fig.update_yaxes(range=value_range(values, references.get((row, col), ())), row=row, col=col)
    for row in range(1, n_rows + 1):
        for col in range(1, n_cols + 1):
            fig.update_xaxes(title_text=X_LABELS[x] if row == n_rows else None, row=row, col=col)
    height = 480 if n_rows == 1 else 330 * n_rows + 80
    width = None if n_cols < 2 else min(1500, 560 * n_cols)
    return layout(fig, title, height=height, width=width, legend="top")


def per_layer_figure(
    per_layer: Mapping[str, Mapping],
    lenses: Sequence[str] | None = None,
    metrics: Sequence[str] = ("accuracy", "fidelity"),
    final_accuracy: float | None = None,
    title: str | None = None,
    chance: float | None = None,
    n_layers: int | None = None,
    bands: bool = True,
    level: float | None = 0.95,
) -> go.Figure:
    """Per-layer curves of one run, one subplot per metric, one line per lens.

    per_layer: `{lens: {"layer": [...], "accuracy": [...], "fidelity": [...]}}` (`summary["lenses"]`,
    or the report's `per_layer`, whose `accuracy_ci` / `fidelity_ci` are drawn as bands unless
    `bands=False`). lenses: which lenses to draw, in order (default: all); missing ones are skipped.
    final_accuracy: the full model's accuracy (a dotted line); chance: chance accuracy (dash-dot).
    """
    names = [n for n in (lenses or list(per_layer)) if n in per_layer]
    run = {"lenses": per_layer, "final_accuracy": final_accuracy, "chance": chance, "n_layers": n_layers}
    return runs_per_layer_figure({"run": run}, names, metrics, title=title, bands=bands, level=level)


def iso_compute_figure(
    curves: Mapping[str, "object"],
    full_cost: float | None = None,
    final_accuracy: float | None = None,
    gain: float | None = None,
    gain_label: str = "SimLens − logit lens",
    title: str | None = None,
    chance: float | None = None,
    intervals: Mapping[str, Sequence] | None = None,
    gain_interval: Sequence | None = None,
    level: float | None = 0.95,
) -> go.Figure:
    """Iso-Compute accuracy against the compute budget, one step line per lens.

    curves: `{lens: DataFrame[budget, accuracy, layer]}` (`compute.iso_compute_curve`).
    full_cost: the full model's cost in the same units (marked with a vertical line).
    gain: the average Iso-Compute gain, shown in the title, with `gain_interval` (`[lo, hi]`,
    the report's `gain_ci`) after it when given.
    intervals: `{lens: [[lo, hi], ...]}` per budget of its curve (the report's
    `iso_compute.curves_ci`), drawn as step bands behind the lines (`style.band_traces`).
    level: the intervals' level, for their names.
    """
    fig = go.Figure()
    values: list[float] = []
    intervals = intervals or {}
    for name, frame in curves.items():
        if frame is None or len(frame) == 0:
            continue
        layer = frame["layer"] if "layer" in frame else [None] * len(frame)
        band = intervals.get(name)
        if band is not None:
            if len(band) != len(frame):
                raise ValueError(f"{name}: {len(band)} intervals for an Iso-Compute curve of {len(frame)} budgets")
            fig.add_traces(band_traces(list(frame["budget"]), band, lens_label(name), lens_color(name), name, level,
                                       line_shape="hv", dash=lens_dash(name)))
            values += [v for pair in band for v in (pair or ()) if v is not None and v == v]
        hover_ci = [f" {interval_text(pair)}" for pair in band] if band is not None else [""] * len(frame)
        fig.add_trace(go.Scatter(
            x=list(frame["budget"]), y=list(frame["accuracy"]), mode="lines", line_shape="hv",
            name=lens_label(name), legendgroup=name, line=lens_line(name),
            customdata=[[lay, ci] for lay, ci in zip(layer, hover_ci)],
            hovertemplate=f"{lens_label(name)}<br>budget %{{x:.0f}}<br>accuracy %{{y:.3f}}%{{customdata[1]}}"
                          "<br>layer %{customdata[0]}<extra></extra>",
        ))
        values += [v for v in frame["accuracy"] if v == v]
    if full_cost is not None:
        fig.add_vline(x=full_cost, line=dict(color="black", dash="dot", width=1), annotation_text="full model")
    final_line(fig, final_accuracy, "full-model accuracy", position="bottom left")
    chance_line(fig, chance)
    if gain is not None:
        suffix = f"average Iso-Compute gain ({gain_label}): {gain * 100:+.1f}"
        if gain_interval is not None:
            suffix += f" {interval_text(gain_interval, 100, '.1f', signed=True)} points ({interval_label(level)})"
        else:
            suffix += " points"
        title = f"{title}<br><sup>{suffix}</sup>" if title else suffix
    fig.update_xaxes(title_text="compute budget (layer-token units)")
    fig.update_yaxes(title_text="Iso-Compute accuracy", range=value_range(values, [final_accuracy, chance]))
    return layout(fig, title, width=800)


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
    chance: float | None = None,
    bands: bool = True,
    level: float | None = 0.95,
) -> go.Figure:
    """SimLens under each slot ablation, next to plain SimLens and the logit lens (with the
    bands of `per_layer_figure` where `per_layer` has intervals)."""
    ablations = list(ablations) if ablations is not None else ablation_lenses(per_layer)
    return per_layer_figure(per_layer, [*references, *ablations], metrics, final_accuracy, title, chance=chance,
                            bands=bands, level=level)


def swap_figure(swap: Mapping[str, Mapping], title: str | None = None) -> go.Figure:
    """Per layer, how often a swapped slot's decision follows the donor versus stays with the
    recipient (top), and on how many informative pairs (bottom): a gap is a layer where no
    pair's donor and recipient decide differently, so there is nothing to follow.

    swap: `summary["swap"]` (`metrics.swap_rates`): `{lens: {"layer", "follow_donor",
    "stay_recipient", "n_informative"}}`.
    """
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.06)
    for name, data in swap.items():
        color, label = lens_color(name), lens_label(name)
        n = data.get("n_informative", [None] * len(data["layer"]))
        fig.add_trace(go.Scatter(
            x=data["layer"], y=data["follow_donor"], mode="lines+markers", name=f"{label}: follows donor",
            legendgroup=name, line=dict(color=color), customdata=n, connectgaps=False,
            hovertemplate="layer %{x}<br>follows the donor %{y:.3f}<br>informative pairs %{customdata}<extra></extra>",
        ), row=1, col=1)
        fig.add_trace(go.Scatter(
            x=data["layer"], y=data["stay_recipient"], mode="lines+markers", name=f"{label}: stays with recipient",
            legendgroup=name, line=dict(color=color, dash="dot"), marker=dict(symbol="x"), customdata=n,
            connectgaps=False,
            hovertemplate="layer %{x}<br>stays %{y:.3f}<br>informative pairs %{customdata}<extra></extra>",
        ), row=1, col=1)
        fig.add_trace(go.Bar(
            x=data["layer"], y=n, name=f"{label}: informative pairs", legendgroup=name, marker_color=color,
            opacity=0.6, hovertemplate="layer %{x}<br>%{y} informative pairs<extra></extra>",
        ), row=2, col=1)
    fig.update_xaxes(title_text="readout layer", row=2, col=1)
    fig.update_yaxes(title_text="rate among informative pairs", range=[-0.02, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="pairs", row=2, col=1)
    return layout(fig, title, height=560, width=800)


def table_figure(frame, title: str | None = None) -> go.Figure:
    """A DataFrame as a plotly table (for the main-table PNG and HTML)."""
    fig = go.Figure(go.Table(
        header=dict(values=[f"<b>{c}</b>" for c in frame.columns], fill_color="#e8eef7", align="left"),
        cells=dict(values=[list(frame[c]) for c in frame.columns], align="left"),
    ))
    return layout(fig, title, height=max(220, 60 + 30 * (len(frame) + 2)), width=max(700, 150 * len(frame.columns)))
