"""Metrics over stored predictions: per-layer accuracy and fidelity, swap follow-rates.

Pure functions of the predictions table, so that the runner, `lensbench report`, the app and
the analyses all compute the same numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas is imported where it is used: `lensbench eval --help` does not need it
    import pandas as pd


def per_layer(predictions: pd.DataFrame) -> dict:
    """`{lens: {"layer": [...], "accuracy": [...], "fidelity": [...], "mean_entropy": [...], "n": N}}`."""
    out = {}
    grouped = predictions.groupby(["lens", "layer"], sort=True).agg(
        accuracy=("correct", "mean"), fidelity=("agrees_final", "mean"), mean_entropy=("entropy", "mean"),
        n=("correct", "size"),
    )
    for lens, frame in grouped.groupby(level=0, sort=False):
        frame = frame.droplevel(0)
        out[lens] = {
            "layer": [int(x) for x in frame.index],
            "accuracy": [float(x) for x in frame["accuracy"]],
            "fidelity": [float(x) for x in frame["fidelity"]],
            "mean_entropy": [float(x) for x in frame["mean_entropy"]],
            "n": int(frame["n"].iloc[0]),
        }
    return out


def swap_rates(predictions: pd.DataFrame, reference_lens: str = "simlens") -> dict:
    """For each swap lens: per layer, how often the decision follows the donor's own decision
    (under `reference_lens`) versus staying with the recipient's.

    Decisions are compared as tokens, since donor and recipient may have different candidates.
    """
    import pandas as pd

    swap = predictions[predictions["donor_index"] >= 0]
    ref = predictions[predictions["lens"] == reference_lens]
    if swap.empty or ref.empty:
        return {}
    ref_tokens = ref.set_index(["example_index", "layer"])["decision_token"]
    out = {}
    for lens, frame in swap.groupby("lens", sort=True):
        donor = ref_tokens.reindex(pd.MultiIndex.from_arrays([frame["donor_index"], frame["layer"]])).to_numpy()
        recipient = ref_tokens.reindex(pd.MultiIndex.from_arrays([frame["example_index"], frame["layer"]])).to_numpy()
        tokens = frame["decision_token"].to_numpy()
        table = pd.DataFrame({
            "layer": frame["layer"].to_numpy(),
            "follow": tokens == donor,
            "stay": tokens == recipient,
            "differ": donor != recipient,
        })
        # Only pairs whose donor and recipient disagree can tell following from staying.
        informative = table[table["differ"]]
        rates = informative.groupby("layer").agg(follow=("follow", "mean"), stay=("stay", "mean"), n=("follow", "size"))
        rates = rates.reindex(sorted(table["layer"].unique()))
        out[lens] = {
            "layer": [int(x) for x in rates.index],
            "follow_donor": [None if np.isnan(x) else float(x) for x in rates["follow"]],
            "stay_recipient": [None if np.isnan(x) else float(x) for x in rates["stay"]],
            "n_informative": [0 if np.isnan(x) else int(x) for x in rates["n"]],
        }
    return out


def settle_layer(predictions: pd.DataFrame, lens: str) -> pd.Series:
    """Per example: the first layer from which `lens`'s decision never changes again."""
    import pandas as pd

    frame = predictions[predictions["lens"] == lens].sort_values(["example_index", "layer"])
    result = {}
    for index, group in frame.groupby("example_index", sort=False):
        decisions = group["decision"].to_numpy()
        layers = group["layer"].to_numpy()
        changed = np.nonzero(decisions != decisions[-1])[0]
        result[index] = int(layers[changed[-1] + 1]) if len(changed) else int(layers[0])
    return pd.Series(result, name="settle_layer")


def final_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per example at the final readout point (where every lens is the model itself):
    its `final_decision` and `gold` are the full model's answer and the truth."""
    return predictions[predictions["layer"] == predictions["layer"].max()].drop_duplicates("example_index")


def summarize(predictions: pd.DataFrame, extra: dict | None = None) -> dict:
    layers = per_layer(predictions)
    final_layer = int(predictions["layer"].max())
    finals = final_rows(predictions)
    summary = {
        "n_examples": int(predictions["example_index"].nunique()),
        "final_layer": final_layer,
        "final_accuracy": float((finals["final_decision"] == finals["gold"]).mean()),
        "lenses": layers,
        "swap": swap_rates(predictions),
    }
    if extra:
        summary.update(extra)
    return summary


def format_per_layer(per_layer: dict, names: list[str] | None = None, intervals: bool = False) -> str:
    """Per-layer accuracy and fidelity of each lens as a text table (`per_layer`'s layout:
    `{lens: {"layer": [...], "accuracy": [...], "fidelity": [...]}}`); with `intervals`, each
    value followed by its `accuracy_ci` / `fidelity_ci` interval where the lens has one."""
    names = [n for n in (names or list(per_layer)) if n in per_layer]
    if not intervals or not any("accuracy_ci" in per_layer[n] for n in names):
        lines = [f"{'layer':>5} " + " ".join(f"{n[:21]:>21}" for n in names),
                 f"{'':>5} " + " ".join(f"{'acc':>10} {'fid':>10}" for _ in names)]
        for i, layer in enumerate(per_layer[names[0]]["layer"]):
            lines.append(f"{layer:>5} " + " ".join(
                f"{per_layer[n]['accuracy'][i]:>10.3f} {per_layer[n]['fidelity'][i]:>10.3f}" for n in names))
        return "\n".join(lines)
    lines = [f"{'layer':>5} " + " ".join(f"{n[:41]:>41}" for n in names),
             f"{'':>5} " + " ".join(f"{'acc [95 % interval]':>20} {'fid [95 % interval]':>20}" for _ in names)]
    for i, layer in enumerate(per_layer[names[0]]["layer"]):
        cells = []
        for n in names:
            for key in ("accuracy", "fidelity"):
                ci = per_layer[n].get(f"{key}_ci")
                cells.append(f"{with_interval(per_layer[n][key][i], ci[i] if ci else None):>20}")
        lines.append(f"{layer:>5} " + " ".join(cells))
    return "\n".join(lines)


def with_interval(value, interval=None, fmt: str = ".3f") -> str:
    """`0.612 [0.571, 0.650]`: a value and its interval (`[lo, hi]`, None bounds printed `-`)."""
    def text(x):
        return "-" if x is None else format(x, fmt)

    if interval is None:
        return text(value)
    return f"{text(value)} [{text(interval[0])}, {text(interval[1])}]"


def format_table(summary: dict, lenses: list[str] | None = None) -> str:
    """The per-layer table printed at the end of a run, with the final model's accuracy."""
    return (format_per_layer(summary["lenses"], lenses) + "\n"
            f"final model accuracy: {summary['final_accuracy']:.3f} on {summary['n_examples']} examples")
