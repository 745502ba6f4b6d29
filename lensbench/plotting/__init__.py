"""Plotly figures shared by the Streamlit app and the analyses scripts.

Every function takes plain data that the library already computed (the per-layer dicts of
`metrics.per_layer` / `summary.json`, the DataFrames of `compute` and `exits`, the attention
tensor of `Run.attention()`, the probe's rows) and returns a `plotly.graph_objects.Figure`;
none of them recomputes a metric. Confidence intervals come the same way, as the report's
`*_ci` pairs (`lensbench.uncertainty`): per-layer and Iso-Compute curves draw them as shaded
bands (two traces per band, the lower bound then the upper filled down to it, named by
`style.band_name` and kept out of the legend), exit operating points as error bars.
`figure_files.save_figure` writes a figure as interactive HTML and a static PNG (plotly's
static export through kaleido, driving the system Chromium at `/usr/bin/chromium`; kaleido
never downloads a browser here).

The modules: `style` (the visual grammar: one colour per lens, the logit lens grey dashed, one
marker symbol or panel per run, friendly names, full-model and chance lines, interval bands in
the line's colour), `curves` (per-layer, Iso-Compute, ablations, swaps), `attention`, `exits`,
`examples` (one example: candidate heatmaps, the layer × position grid, a pinned token).
"""

from lensbench.plotting.attention import attention_heatmap, token_attention_figure
from lensbench.plotting.curves import (
    X_LABELS, ablation_figure, ablation_lenses, iso_compute_figure, per_layer_figure, runs_per_layer_figure,
    swap_figure, table_figure,
)
from lensbench.plotting.examples import (
    candidate_heatmap, candidate_heatmaps, pinned_token_figure, position_grid_figure, token_text,
)
from lensbench.plotting.exits import exit_histogram, exit_trace_figure, exit_tradeoff_figure, policy_color
from lensbench.plotting.style import (
    BAND_ALPHA, LENS_COLORS, LENS_LABELS, METRIC_LABELS, POLICY_LABELS, RUN_SYMBOLS, band_name, band_traces, chance_line,
    final_line, interval_label, interval_text, layout, lens_color, lens_dash, lens_label, lens_line, lens_order,
    policy_label, run_symbol, translucent, value_range,
)

__all__ = [
    "BAND_ALPHA", "band_name", "band_traces", "interval_label", "interval_text", "translucent",
    "LENS_COLORS", "LENS_LABELS", "METRIC_LABELS", "POLICY_LABELS", "RUN_SYMBOLS", "X_LABELS", "ablation_figure",
    "ablation_lenses", "attention_heatmap", "candidate_heatmap", "candidate_heatmaps", "chance_line",
    "exit_histogram", "exit_trace_figure", "exit_tradeoff_figure", "final_line", "iso_compute_figure", "layout",
    "lens_color", "lens_dash", "lens_label", "lens_line", "lens_order", "per_layer_figure", "pinned_token_figure", "policy_color",
    "policy_label", "position_grid_figure", "run_symbol", "runs_per_layer_figure", "swap_figure", "table_figure",
    "token_attention_figure", "token_text", "value_range",
]
