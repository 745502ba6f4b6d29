"""Compute accounting (METHOD.md) on hand-checked cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lensbench.compute import iso_compute_curve, iso_compute_gain
from lensbench.costs import DEFAULT_MAP_COST, ModelDims, flop_cost, layer_token_cost
from lensbench.errors import LensbenchError


@pytest.mark.parametrize(
    "method, layer, maps, map_cost, expected",
    [
        ("full", 0, 0, 0.0, 40.0),  # T·L whatever the layer
        ("logit", 0, 0, 0.0, 0.0),
        ("logit", 3, 0, 0.0, 30.0),  # T·l
        ("simlens", 0, 0, 0.0, 8.0),  # 2·(L-l)
        ("simlens", 3, 0, 0.0, 32.0),  # 30 + 2
        ("simlens", 4, 0, 0.0, 40.0),  # = the full model at l = L
        ("simlens", 2.5, 0, 0.0, 28.0),  # a mid point: 25 + 3
        ("simexit", 2, 3, 0.25, 24.75),  # 20 + 4 + 0.75
        ("simexit", 4, 4, 0.5, 42.0),  # never exited: the full pass plus 4 maps
    ],
)
def test_layer_token_cost_hand_checked(method, layer, maps, map_cost, expected):
    assert layer_token_cost(method, 10, 4, layer, linear_maps=maps, map_cost=map_cost) == pytest.approx(expected)


def test_simexit_default_map_cost_is_a_twelfth_of_a_block():
    assert layer_token_cost("simexit", 10, 4, 2, linear_maps=6) == pytest.approx(20 + 4 + 6 / 12)
    assert DEFAULT_MAP_COST == pytest.approx(1 / 12)


def test_layer_token_cost_rejects_bad_input():
    with pytest.raises(LensbenchError, match="unknown method"):
        layer_token_cost("tuned", 10, 4, 1)
    with pytest.raises(LensbenchError, match="outside"):
        layer_token_cost("simlens", 10, 4, 5)


# d_model 2, one head of size 2 (one KV head), MLP 4 (not gated), vocabulary 10, 2 blocks.
DIMS = ModelDims(n_layers=2, d_model=2, n_heads=1, n_kv_heads=1, d_head=2, d_mlp=4, gated_mlp=False, d_vocab=10)


def test_flop_counts_hand_checked():
    # Q,K,V,O: 4 × (2·2·2) = 32; MLP in and out: 2 × (2·2·4) = 32
    assert DIMS.position_flops() == 64
    # 3 positions: 3·64 linear + QK and AV over 1+2+3 keys: 4·1·2·6 = 48
    assert DIMS.block_flops(3) == 240
    assert DIMS.block_flops(2) == 128 + 24
    assert DIMS.map_flops() == 2 * 2 * 2 + 2
    assert DIMS.map_cost == pytest.approx(10 / 64)
    readout = 2 * 2 * 10
    assert flop_cost("full", 3, DIMS, 2) == 2 * 240 + readout
    assert flop_cost("logit", 3, DIMS, 1) == 240 + readout
    assert flop_cost("simlens", 3, DIMS, 1) == 240 + 152 + readout
    # two maps, each with a readout over 4 candidates (2·2·4)
    assert flop_cost("simexit", 3, DIMS, 1, linear_maps=2, n_candidates=4) == 240 + 152 + readout + 2 * (10 + 16)
    assert flop_cost("logit", 3, DIMS, 1, readout="candidates", n_candidates=4) == 240 + 16


def test_model_dims_from_a_transformer_lens_config(tiny_rotary):
    dims = ModelDims.from_cfg(tiny_rotary.cfg)
    assert (dims.n_layers, dims.d_model, dims.d_mlp, dims.gated_mlp) == (4, 64, 128, True)
    # Q, K, V, O: 4 × 2·64·64; gated MLP: 3 × 2·64·128
    assert dims.position_flops() == 4 * 2 * 64 * 64 + 3 * 2 * 64 * 128
    assert ModelDims.from_dict(dims.to_dict()) == dims


def _iso_frames():
    """Two examples (4 and 6 tokens, mean 5), L = 2. Logit lens accuracy by layer 0, .5, 1;
    SimLens .5, 1, 1. Mean costs: logit 0, 5, 10; SimLens 4, 7, 10; the full model 10."""
    correct = {"logit": [[False, False], [True, False], [True, True]],
               "simlens": [[True, False], [True, True], [True, True]]}
    rows = []
    for lens, by_layer in correct.items():
        for layer, flags in enumerate(by_layer):
            for example, flag in enumerate(flags):
                rows.append({"example_index": example, "lens": lens, "layer": layer,
                             "site": "final" if layer == 2 else "pre", "correct": flag})
    examples = pd.DataFrame({"example_index": [0, 1], "n_tokens": [4, 6]})
    return pd.DataFrame(rows), examples


def test_iso_compute_curve_hand_checked():
    predictions, examples = _iso_frames()
    budgets = [3, 4, 5, 7, 9.99, 10]
    logit = iso_compute_curve(predictions, "logit", budgets, examples=examples)
    assert list(logit.columns[:3]) == ["budget", "accuracy", "layer"]
    assert logit["layer"].tolist() == [0, 0, 1, 1, 1, 2]
    assert logit["accuracy"].tolist() == [0, 0, 0.5, 0.5, 0.5, 1]
    simlens = iso_compute_curve(predictions, "simlens", budgets, examples=examples)
    assert simlens["layer"].tolist() == [-1, 0, 0, 1, 1, 2]
    assert math.isnan(simlens["accuracy"][0])  # nothing affordable below 2·L
    assert simlens["accuracy"].tolist()[1:] == [0.5, 0.5, 1, 1, 1]
    assert simlens["relative_budget"].tolist()[-1] == 1.0


def test_iso_compute_gain_hand_checked():
    predictions, examples = _iso_frames()
    gain = iso_compute_gain(predictions, "simlens", "logit", n_budgets=3, examples=examples)
    # budgets from 4 (SimLens's cheapest point) to 10: 4, 7, 10
    assert gain["budgets"] == [4, 7, 10]
    assert gain["lens_accuracy"] == [0.5, 1, 1]
    assert gain["baseline_accuracy"] == [0, 0.5, 1]
    assert gain["gain"] == pytest.approx(1 / 3)


def test_iso_compute_needs_the_examples_and_a_known_lens():
    predictions, examples = _iso_frames()
    with pytest.raises(LensbenchError, match="examples"):
        iso_compute_curve(predictions, "logit")
    with pytest.raises(LensbenchError, match="not in this run"):
        iso_compute_curve(predictions, "tuned", examples=examples)


def test_linear_lens_points_pay_one_map():
    predictions, examples = _iso_frames()
    tuned = predictions[predictions["lens"] == "logit"].assign(lens="tuned")
    frame = pd.concat([predictions, tuned])
    curve = iso_compute_curve(frame, "tuned", [0.4, 0.5, 5.4, 5.5, 10], examples=examples, map_cost=0.5)
    # costs: layer 0 = 0.5, layer 1 = 5.5, layer 2 = 10 (no map at L)
    assert curve["layer"].tolist() == [-1, 0, 0, 1, 2]
    assert np.isnan(curve["accuracy"][0])
