"""analyses.sizes: the depth at which each lens first reaches 90 % of the full model's accuracy,
checked against the stored predictions (not against the script's own arithmetic), and the
table and figure it writes."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_depth_to_first_crossing_and_staying():
    from analyses.sizes import depth_to

    # layers 0..4 of a 4-layer model: crosses at 1, dips at 2, stays from 3
    assert depth_to([0.2, 0.8, 0.5, 0.9, 1.0], 0.75, 4) == (0.25, 0.75)
    assert depth_to([0.1, 0.2, 0.3], 0.75, 2) == (None, None)
    assert depth_to([0.9, 0.9, 0.9], 0.75, 2) == (0.0, 0.0)


@pytest.mark.parametrize("name, family", [("arc-easy:test@test", "arc-easy"), ("arc-easy@test", "arc-easy"),
                                          ("boolq", "boolq"), ("medmcqa@calib", "medmcqa")])
def test_task_family(name, family):
    from analyses.sizes import task_family

    assert task_family(name) == family


def test_sizes_table_matches_the_predictions(small_run, tmp_path):
    from analyses import sizes

    written = sizes.main([str(small_run), "--out", str(tmp_path), "--formats", "html"])
    assert {p.name for p in written} == {"sizes_table.csv", "sizes_table.md", "sizes.html"}
    rows = list(csv.DictReader((tmp_path / "sizes_table.csv").open()))
    assert len(rows) == 1
    row = rows[0]

    pred = pd.read_parquet(Path(small_run) / "predictions.parquet")
    n_layers = int(pred["layer"].max())
    full = pred[(pred["lens"] == "logit") & (pred["layer"] == n_layers)]["correct"].mean()
    assert float(row["full_accuracy"]) == pytest.approx(full)
    for lens in ("logit", "simlens"):
        acc = pred[pred["lens"] == lens].groupby("layer")["correct"].mean().sort_index()
        first = next(layer for layer, a in acc.items() if a >= 0.9 * full - 1e-12)
        assert float(row[f"depth90_{lens}"]) == pytest.approx(first / n_layers), lens
    choices = pd.read_parquet(Path(small_run) / "examples.parquet")["choices"]
    assert float(row["chance"]) == pytest.approx((1.0 / choices.map(len)).mean())
    # no Linear SimLens in this run: no SimExit point, said in the table as a dash
    assert row["speedup_1pt"] == ""
    table = (tmp_path / "sizes_table.md").read_text()
    assert "smollm2-135m" in table and "capitals" in table
    html = (tmp_path / "sizes.html").read_text()
    assert "Iso-Compute gain" in html and '"type":"scatter"' in html
