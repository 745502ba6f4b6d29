"""An ICL run's tables (one part per batch, merged at the end), `summary.json` and the tables
`lensbench report` prints for it. Accuracies come with Wilson 95% intervals; paired
differences (local vs global patching on the same queries) with a normal interval."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lensbench import store
from lensbench.icl.measure import ATTENTION_TARGETS

PATCH_CONDITIONS = ("global", "local", "local+sep")
READ_CONDITIONS = ("few-shot", "zero-shot", "baseline")
CONVERGENCE = ("within", "across", "to_final", "to_global", "final_to_global")
Z = 1.959964


def is_icl_run(run) -> bool:
    return run.manifest.get("kind") == "icl"


def wilson(k: float, n: int) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + Z * Z / n
    mid = (p + Z * Z / (2 * n)) / denom
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / denom
    return max(0.0, mid - half), min(1.0, mid + half)


# --- one batch -> tables ------------------------------------------------------------------------


def batch_tables(result: dict, prompts, points, labels: list[str]) -> dict[str, pa.Table]:
    q = np.array([p.index for p in prompts], dtype=np.int32)
    gold = np.array([p.gold for p in prompts], dtype=np.int16)
    layers = np.array([p.layer for p in points], dtype=np.int16)
    n_points, n_rows = len(points), len(prompts)
    pred = {k: [] for k in ("query_index", "condition", "lens", "layer", "decision", "gold", "correct", "gold_logprob")}

    def add(condition, lens, dec, lp):
        dec = dec.numpy().astype(np.int16)
        glp = lp.gather(-1, _long(gold)[None, :, None].expand(n_points, n_rows, 1))[..., 0].numpy()
        pred["query_index"].append(np.tile(q, n_points))
        pred["condition"] += [condition] * (n_points * n_rows)
        pred["lens"] += [lens] * (n_points * n_rows)
        pred["layer"].append(np.repeat(layers, n_rows))
        pred["decision"].append(dec.reshape(-1))
        pred["gold"].append(np.tile(gold, n_points))
        pred["correct"].append((dec == gold[None]).reshape(-1))
        pred["gold_logprob"].append(glp.reshape(-1).astype(np.float32))

    for condition in READ_CONDITIONS:
        for lens, (dec, lp) in result["readout"][condition].items():
            add(condition, lens, dec, lp)
    for condition in PATCH_CONDITIONS:
        if condition in result:
            add(condition, "output", *result[condition])
    predictions = pa.table({k: (np.concatenate(v) if k not in ("condition", "lens") else v) for k, v in pred.items()})

    conv = {"query_index": np.tile(q, n_points), "layer": np.repeat(layers, n_rows)}
    for name, values in result["convergence"].items():
        conv[name] = values.numpy().reshape(-1).astype(np.float32)

    dec_cols = {k: [] for k in ("query_index", "demo", "layer", "lens", "shown", "decision", "gold")}
    for lens, dec in result["decode"].items():  # (point, row, demo)
        n_demos = dec.shape[-1]
        shown = np.array([p.demo_labels for p in prompts], dtype=np.int16)
        dec_cols["query_index"].append(np.broadcast_to(q[None, :, None], dec.shape).reshape(-1))
        dec_cols["demo"].append(np.broadcast_to(np.arange(n_demos, dtype=np.int8), dec.shape).reshape(-1))
        dec_cols["layer"].append(np.broadcast_to(layers[:, None, None], dec.shape).reshape(-1))
        dec_cols["lens"] += [lens] * dec.numel()
        dec_cols["shown"].append(np.broadcast_to(shown[None], dec.shape).reshape(-1))
        dec_cols["decision"].append(dec.numpy().astype(np.int16).reshape(-1))
        dec_cols["gold"].append(np.broadcast_to(gold[None, :, None], dec.shape).reshape(-1))
    decode = pa.table({k: (np.concatenate(v) if k != "lens" else v) for k, v in dec_cols.items()})

    mean, peak, counts = result["attention"]  # (block, row, target), (row, target)
    n_blocks, _, n_targets = mean.shape
    attention = pa.table({
        "query_index": np.tile(np.repeat(q, n_targets), n_blocks),
        "block": np.repeat(np.arange(n_blocks, dtype=np.int16), n_rows * n_targets),
        "target": list(ATTENTION_TARGETS) * (n_blocks * n_rows),
        "mean_heads": mean.numpy().reshape(-1).astype(np.float32),
        "max_heads": peak.numpy().reshape(-1).astype(np.float32),
        "n_positions": np.tile(counts.numpy().reshape(-1), n_blocks).astype(np.int16),
    })
    return {"predictions": predictions, "convergence": pa.table(conv), "decode": decode, "attention": attention}


def _long(array):
    import torch

    return torch.from_numpy(array.astype(np.int64))


# --- merge and summarize ------------------------------------------------------------------------


def finalize(out: Path, manifest: dict) -> dict:
    out = Path(out)
    parts = out / "parts"
    sort_keys = {"predictions": ["query_index", "condition", "lens", "layer"], "convergence": ["query_index", "layer"],
                 "decode": ["query_index", "lens", "demo", "layer"], "attention": ["query_index", "block", "target"]}
    frames = {}
    for name, keys in sort_keys.items():
        tables = [pq.read_table(p) for p in sorted(parts.glob(f"part-*-{name}.parquet"))]
        table = pa.concat_tables(tables)
        frame = table.to_pandas().sort_values(keys, kind="stable").reset_index(drop=True)
        store.atomic_write_table(out / f"{name}.parquet", pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False))
        frames[name] = frame
    summary = summarize(frames, manifest)
    store.atomic_write_json(out / "summary.json", summary)
    manifest.update(status="complete", finished=store.now())
    store.atomic_write_json(out / store.MANIFEST, manifest)
    return summary


def _accuracy_curve(frame: pd.DataFrame) -> dict:
    g = frame.groupby("layer")["correct"]
    k, n = g.sum(), g.count()
    lows, highs = zip(*(wilson(float(a), int(b)) for a, b in zip(k, n)))
    return {"layer": [int(x) for x in k.index], "accuracy": [float(a / b) for a, b in zip(k, n)],
            "ci_low": list(lows), "ci_high": list(highs), "n": int(n.max())}


def _point(curve: dict, i: int) -> dict:
    return {"layer": curve["layer"][i], "accuracy": curve["accuracy"][i], "ci_low": curve["ci_low"][i],
            "ci_high": curve["ci_high"][i], "n": curve["n"]}


def summarize(frames: dict[str, pd.DataFrame], manifest: dict) -> dict:
    pred = frames["predictions"]
    info = manifest.get("task_info", {})
    n_labels = len(info.get("labels", [])) or int(pred["gold"].max()) + 1
    final_layer = int(pred["layer"].max())
    accuracy = {}
    rank = {c: i for i, c in enumerate(READ_CONDITIONS + PATCH_CONDITIONS)}
    groups = sorted(pred.groupby(["condition", "lens"], sort=False), key=lambda kv: (rank.get(kv[0][0], 99), kv[0][1]))
    for (condition, lens), frame in groups:
        accuracy[f"{condition}/{lens}"] = _accuracy_curve(frame)
    summary: dict = {
        "kind": "icl", "task": manifest.get("task"), "task_kind": info.get("kind"), "n_queries": int(pred["query_index"].nunique()),
        "n_labels": n_labels, "chance": 1.0 / n_labels, "final_layer": final_layer, "accuracy": accuracy,
    }
    first_lens = next(k for k in accuracy if k.startswith("few-shot/"))
    lens = first_lens.split("/", 1)[1]
    for condition in READ_CONDITIONS:
        curve = accuracy[f"{condition}/{lens}"]
        summary[f"{condition}_accuracy"] = _point(curve, curve["layer"].index(final_layer))
    # The best patch layer among the non-trivial points: at the first `pre` point a local patch
    # rebuilds the few-shot prompt and a global one rewrites the query's own embedding; at the
    # last point a patch writes the output itself.
    site = manifest.get("config", {}).get("site", "pre")
    best = {}
    for condition in PATCH_CONDITIONS:
        curve = accuracy.get(f"{condition}/output")
        if curve:
            layers = curve["layer"]
            usable = [i for i, layer in enumerate(layers)
                      if i != len(layers) - 1 and not (site == "pre" and layer == 0)] or list(range(len(layers)))
            best[condition] = _point(curve, max(usable, key=lambda i: curve["accuracy"][i]))
    summary["best"] = best
    if "global" in best and "local" in best:
        summary["local_minus_global"] = paired_difference(pred, best["local"]["layer"], best["global"]["layer"])

    conv = frames["convergence"]
    metrics = [c for c in conv.columns if c not in ("query_index", "layer")]
    g = conv.groupby("layer")[metrics]
    mean, sem = g.mean(), g.sem()
    summary["convergence"] = {"layer": [int(x) for x in mean.index],
                              **{m: {"mean": mean[m].astype(float).tolist(), "sem": sem[m].fillna(0).astype(float).tolist()} for m in metrics}}

    dec = frames["decode"]
    decode = {}
    for lens_name, frame in dec.groupby("lens", sort=False):
        grouped = frame.assign(own=frame["decision"] == frame["shown"], query=frame["decision"] == frame["gold"]).groupby("layer")
        decode[lens_name] = {"layer": [int(x) for x in grouped.size().index],
                             "own_label": grouped["own"].mean().astype(float).tolist(),
                             "query_gold": grouped["query"].mean().astype(float).tolist()}
    summary["decode"] = decode

    att = frames["attention"]
    table = att.groupby(["block", "target"])[["mean_heads", "n_positions"]].mean()
    blocks = sorted(att["block"].unique().tolist())
    summary["attention"] = {
        "block": [int(b) for b in blocks],
        "mean_heads": {t: [float(table.loc[(b, t), "mean_heads"]) for b in blocks] for t in ATTENTION_TARGETS},
        "per_position": {t: [float(table.loc[(b, t), "mean_heads"] / max(table.loc[(b, t), "n_positions"], 1)) for b in blocks]
                         for t in ATTENTION_TARGETS},
    }
    return summary


def paired_difference(pred: pd.DataFrame, local_layer: int, global_layer: int) -> dict:
    """Local-patch accuracy at its best layer minus global-patch accuracy at its best layer, on
    the same queries: mean difference and a normal 95% interval of the paired differences (the
    best layers are chosen on the same data, so both accuracies are optimistic)."""
    out = pred[pred["lens"] == "output"]
    loc = out[(out["condition"] == "local") & (out["layer"] == local_layer)].set_index("query_index")["correct"]
    glo = out[(out["condition"] == "global") & (out["layer"] == global_layer)].set_index("query_index")["correct"]
    d = (loc.astype(float) - glo.reindex(loc.index).astype(float)).to_numpy()
    mean = float(d.mean())
    half = float(Z * d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"local_layer": local_layer, "global_layer": global_layer, "difference": mean,
            "ci_low": mean - half, "ci_high": mean + half, "n": int(len(d))}


# --- report ---------------------------------------------------------------------------------------


def _fmt(p: dict) -> str:
    return f"{p['accuracy']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}]"


def build_icl_report(run) -> dict:
    """The tables `lensbench report` prints for an ICL run (also written to report.json)."""
    s = run.summary()
    rows = {"few-shot": s["few-shot_accuracy"], "zero-shot (query alone)": s["zero-shot_accuracy"],
            "uninformative demonstrations": s["baseline_accuracy"]}
    for condition, p in s.get("best", {}).items():
        rows[f"{condition} patch, best layer {p['layer']}"] = p
    curves = {k: v["accuracy"] for k, v in s["accuracy"].items()}
    conv = s["convergence"]
    return {"kind": "icl", "task": s["task"], "task_kind": s["task_kind"], "n_queries": s["n_queries"],
            "chance": s["chance"], "headline": rows, "local_minus_global": s.get("local_minus_global"),
            "layer": s["accuracy"][next(iter(s["accuracy"]))]["layer"], "curves": curves,
            "convergence_layer": conv["layer"],
            "convergence": {k: conv[k]["mean"] for k in ("within", "across", "to_final", "to_global") if k in conv}}


def format_icl_report(report: dict) -> str:
    lines = [f"ICL run: task {report['task']} ({report['task_kind']}), {report['n_queries']} queries, "
             f"chance {report['chance']:.3f}", "", f"{'accuracy (Wilson 95%)':<44} value"]
    for name, p in report["headline"].items():
        lines.append(f"{name:<44} {_fmt(p)}")
    diff = report.get("local_minus_global")
    if diff:
        lines.append(f"{'local - global (paired, best layers)':<44} {diff['difference']:+.3f} "
                     f"[{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]")
    names = list(report["curves"])
    lines += ["", "accuracy by layer", "layer " + " ".join(f"{n[:16]:>16}" for n in names)]
    for i, layer in enumerate(report["layer"]):
        lines.append(f"{layer:>5} " + " ".join(f"{report['curves'][n][i]:>16.3f}" for n in names))
    conv = report["convergence"]
    lines += ["", "cosine of the local (label-position) vectors by layer, raw",
              "layer " + " ".join(f"{k:>10}" for k in conv)]
    for i, layer in enumerate(report["convergence_layer"]):
        lines.append(f"{layer:>5} " + " ".join(f"{conv[k][i]:>10.3f}" for k in conv))
    return "\n".join(lines)


def write_icl_report(run) -> tuple[dict, Path]:
    report = build_icl_report(run)
    path = Path(run.path) / "report.json"
    store.atomic_write_json(path, report)
    return report, path

