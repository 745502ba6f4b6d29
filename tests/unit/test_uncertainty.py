"""The bootstrap over examples (`lensbench.uncertainty`) on synthetic tables: intervals contain
their estimate, narrow with n, match the normal approximation for a Bernoulli mean, are seeded;
the Iso-Compute gain and the calibrated points recomputed per resample agree with the point
estimates on the unresampled sample; a synthetic run folder gets intervals in its report."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from lensbench import compute, exits, metrics, uncertainty
from lensbench.errors import LensbenchError
from lensbench.report import build_report
from lensbench.uncertainty import Bootstrap, percentile_interval

LENSES = ("logit", "simlens")


def synthetic_predictions(n: int, n_layers: int = 6, lenses=LENSES, seed: int = 0, offset: int = 0,
                          n_choices: int = 4) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A predictions table and an examples table shaped like a run's: each lens is right at
    layer l with a probability rising with l (SimLens ahead of the logit lens), and every lens
    gives the model's own decision at L. Entropies fall with depth and with correctness."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, n_choices, n)
    final = np.where(rng.random(n) < 0.7, gold, (gold + 1) % n_choices)
    rows = []
    for k, lens in enumerate(lenses):
        for layer in range(n_layers + 1):
            depth = layer / n_layers
            if layer == n_layers:
                decision = final
            else:
                right = rng.random(n) < 0.25 + 0.45 * depth ** max(0.5, 1.5 - 0.7 * k)
                decision = np.where(right, final, (final + 1 + rng.integers(0, n_choices - 1, n)) % n_choices)
            entropy = (1.4 * (1 - depth) + 0.3 * rng.random(n) + 0.2 * (decision != final)).astype(np.float32)
            rows.append(pd.DataFrame({
                "example_index": np.arange(offset, offset + n, dtype=np.int32), "lens": lens,
                "layer": np.int16(layer), "site": "final" if layer == n_layers else "pre",
                "decision": decision.astype(np.int16), "gold": gold.astype(np.int16),
                "correct": decision == gold, "final_decision": final.astype(np.int16),
                "agrees_final": decision == final, "entropy": entropy}))
    predictions = pd.concat(rows).sort_values(["example_index", "lens", "layer"], kind="stable").reset_index(drop=True)
    examples = pd.DataFrame({"example_index": np.arange(offset, offset + n, dtype=np.int32),
                             "example_id": [f"ex{i}" for i in range(offset, offset + n)],
                             "gold": gold.astype(np.int16), "n_tokens": rng.integers(20, 60, n).astype(np.int32)})
    return predictions, examples


def write_run(path, predictions: pd.DataFrame, examples: pd.DataFrame, lenses=LENSES) -> None:
    """A complete run folder holding these tables (what `lensbench report` reads)."""
    path.mkdir(parents=True)
    predictions.assign(example_id=[f"ex{i}" for i in predictions["example_index"]]).to_parquet(path / "predictions.parquet")
    examples.to_parquet(path / "examples.parquet")
    manifest = {"format_version": 1, "status": "complete", "lenses": list(lenses), "task": "synthetic",
                "model": {"spec": "synthetic", "source_sha256": "synthetic"}, "map_cost": None, "config": {}}
    (path / "manifest.json").write_text(json.dumps(manifest))


def bernoulli(n: int, p: float, seed: int = 0) -> np.ndarray:
    """Exactly round(p n) ones among n, shuffled."""
    values = np.zeros(n)
    values[: round(p * n)] = 1
    return np.random.default_rng(seed).permutation(values)


def test_interval_contains_the_estimate_and_narrows_with_n():
    widths = []
    for n in (50, 2000):
        values = bernoulli(n, 0.3)
        boot = Bootstrap(n, 1000, 0)
        lo, hi = boot.interval(boot.means(values))
        assert lo <= values.mean() <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 4  # sqrt(2000 / 50) = 6.3 times narrower, give or take


@pytest.mark.parametrize("n, p", [(400, 0.5), (1000, 0.3), (3000, 0.8)])
def test_bernoulli_width_matches_the_normal_approximation(n, p):
    boot = Bootstrap(n, 2000, 1)
    lo, hi = boot.interval(boot.means(bernoulli(n, p)))
    expected = 2 * 1.96 * math.sqrt(p * (1 - p) / n)
    assert hi - lo == pytest.approx(expected, rel=0.1)


def test_seeded_resamples_are_reproducible_and_seeds_differ():
    values = np.stack([bernoulli(300, 0.4, seed=1), bernoulli(300, 0.6, seed=2)], axis=1)

    def interval(seed, **kw):
        boot = Bootstrap(300, 500, seed, **kw)
        return boot.interval(boot.means(values))

    assert np.array_equal(interval(0), interval(0))
    assert not np.array_equal(interval(0), interval(1))
    assert not np.array_equal(interval(0), interval(0, stream=1))
    # the first resamples of a larger B are the same resamples
    small, large = Bootstrap(300, 100, 3), Bootstrap(300, 300, 3)
    assert np.array_equal(small.means(values), large.means(values)[:100])


def test_resamples_draw_n_examples_with_replacement():
    boot = Bootstrap(7, 50, 0)
    (counts,) = list(boot.counts())
    assert counts.shape == (50, 7) and (counts.sum(1) == 7).all()
    assert (counts == 0).any() and (counts > 1).any()  # some left out, some drawn twice


def test_chunked_resamples_are_the_same_resamples(monkeypatch):
    values = bernoulli(200, 0.5)
    whole = Bootstrap(200, 64, 5).means(values)
    monkeypatch.setattr(uncertainty, "_CACHE_CELLS", 0)
    monkeypatch.setattr(uncertainty, "_CHUNK_CELLS", 200 * 10)  # chunks of 10 resamples
    chunked = Bootstrap(200, 64, 5)
    assert len(list(chunked.counts())) == 7
    assert np.array_equal(chunked.means(values), whole)


def test_percentile_interval_is_numpys_and_keeps_infinities():
    samples = np.random.default_rng(0).normal(size=(999, 3))
    assert np.allclose(percentile_interval(samples), np.percentile(samples, [2.5, 97.5], axis=0).T)
    assert percentile_interval(np.full(10, np.inf)).tolist() == [np.inf, np.inf]
    assert percentile_interval(np.array([1.0, 2.0, np.inf] * 10))[1] == np.inf
    assert np.isnan(percentile_interval(np.array([1.0, np.nan, 2.0]))).all()


def test_missing_values_are_left_out_of_the_mean():
    values = np.array([1.0, 0.0, np.nan])
    boot = Bootstrap(3, 200, 0)
    (counts,) = list(boot.counts())
    means = boot.means(values)
    for row, mean in zip(counts, means):
        drawn = np.repeat(values, row.astype(int))
        drawn = drawn[~np.isnan(drawn)]
        assert (np.isnan(mean) and drawn.size == 0) or mean == pytest.approx(drawn.mean())
    assert np.isnan(means).any() and not np.isnan(means).all()  # a resample of only the missing one


@pytest.mark.parametrize("resamples, seed, message", [(-1, 0, "--bootstrap must be 0"), (1, 0, "--bootstrap must be 0"),
                                                      (10, -1, "--seed must be an integer >= 0")])
def test_bad_settings_are_refused(resamples, seed, message):
    with pytest.raises(LensbenchError, match=message):
        uncertainty.check_bootstrap(resamples, seed)


class _Unresampled(Bootstrap):
    """One 'resample' that is the sample itself: the recomputed statistics must equal the
    point estimates."""

    def counts(self):
        yield np.ones((1, self.n))


def test_per_layer_and_gain_recomputed_on_the_sample_are_the_point_estimates():
    predictions, examples = synthetic_predictions(300)
    per_layer = metrics.per_layer(predictions)
    same = _Unresampled(300, 2, 0)
    samples = uncertainty.resample_per_layer(predictions, same)
    for lens, body in per_layer.items():
        cols = [samples.columns[(lens, layer)] for layer in body["layer"]]
        assert samples.accuracy[0, cols].tolist() == body["accuracy"]
        assert samples.fidelity[0, cols].tolist() == body["fidelity"]
    gain = compute.iso_compute_gain(predictions, examples=examples)
    assert gain["gain"] > 0.02  # SimLens ahead in these data
    assert uncertainty.gain_samples(samples, gain)[0] == pytest.approx(gain["gain"], abs=1e-12)
    boot = Bootstrap(300, 1000, 0)
    lo, hi = uncertainty.gain_interval(uncertainty.resample_per_layer(predictions, boot), gain, boot)
    assert lo <= gain["gain"] <= hi and hi - lo > 0.01


def test_per_layer_intervals_follow_the_tables_order():
    predictions, _ = synthetic_predictions(500, lenses=("simlens", "logit"))
    per_layer = metrics.per_layer(predictions)
    boot = Bootstrap(500, 400, 0)
    intervals = uncertainty.per_layer_intervals(uncertainty.resample_per_layer(predictions, boot), per_layer, boot)
    for lens, body in per_layer.items():
        for key in ("accuracy", "fidelity"):
            bounds = intervals[lens][f"{key}_ci"]
            assert len(bounds) == len(body[key])
            assert all(lo <= value <= hi for value, (lo, hi) in zip(body[key], bounds))
    assert intervals["logit"]["fidelity_ci"][-1] == [1.0, 1.0]  # the model's own decision at L


@pytest.mark.parametrize("policy", ["logit", "simlens", "oracle"])
def test_exit_intervals_contain_the_replayed_point(policy):
    predictions, examples = synthetic_predictions(400)
    data = exits.prepare_exits(predictions, examples, policy)
    threshold = None if policy == "oracle" else 0.9
    sim = exits.simulate_exits(predictions, examples, policy, threshold)
    point = exits.simulate._summary(sim, data.n_layers)
    order = uncertainty.example_order(predictions)
    final_correct = (data.final_decision == data.gold).astype(float)
    same = uncertainty.exit_samples(sim, _Unresampled(400, 2, 0), order, final_correct)
    assert same["accuracy"][0] == point["accuracy"] and same["fidelity"][0] == point["fidelity"]
    assert same["layer_token_speedup"][0] == pytest.approx(point["layer_token_speedup"], rel=1e-12)
    intervals = uncertainty.exit_intervals(sim, Bootstrap(400, 500, 0), order, final_correct)
    drop = final_correct.mean() - point["accuracy"]
    for name, value in [("accuracy", point["accuracy"]), ("fidelity", point["fidelity"]),
                        ("layer_token_speedup", point["layer_token_speedup"]), ("accuracy_drop", drop)]:
        lo, hi = intervals[f"{name}_ci"]
        assert lo <= value <= hi, name


@pytest.mark.parametrize("target", exits.TARGETS)
def test_calibration_resampled_on_the_sample_chooses_calibrates_threshold(target):
    calib_pred, calib_ex = synthetic_predictions(300, seed=1)
    test_pred, test_ex = synthetic_predictions(200, seed=2, offset=1000)
    calib = exits.prepare_exits(calib_pred, calib_ex, "logit")
    test = exits.prepare_exits(test_pred, test_ex, "logit")
    threshold, _ = exits.choose_threshold(calib, target, max_drop=0.02)
    point = exits.simulate._summary(exits.simulate._simulate(test, threshold), test.n_layers)
    grid = uncertainty.threshold_grid(calib, test, uncertainty.example_order(test_pred))
    same = uncertainty.calibration_samples(grid, target, _Unresampled(300, 2, 0), _Unresampled(200, 2, 0), max_drop=0.02)
    assert same["threshold"][0] == threshold
    assert same["accuracy"][0] == point["accuracy"] and same["fidelity"][0] == point["fidelity"]
    resampled = uncertainty.calibration_samples(grid, target, Bootstrap(300, 300, 0, stream=1), Bootstrap(200, 300, 0),
                                                max_drop=0.02)
    assert len(np.unique(resampled["threshold"])) > 1  # the threshold itself varies with the calibration sample


def test_report_of_a_synthetic_run_has_intervals_and_none_with_bootstrap_zero(tmp_path):
    predictions, examples = synthetic_predictions(150)
    write_run(tmp_path / "test", predictions, examples)
    calib_pred, calib_ex = synthetic_predictions(100, seed=3, offset=1000)
    write_run(tmp_path / "calib", calib_pred, calib_ex)
    plain = build_report(tmp_path / "test", tmp_path / "calib", bootstrap=0, write=False)
    report = build_report(tmp_path / "test", tmp_path / "calib", bootstrap=200, seed=4, write=False,
                          bootstrap_calibration=True)
    assert "bootstrap" not in plain and "gain_ci" not in plain["iso_compute"]["gains"]["simlens_vs_logit"]
    assert report["bootstrap"] == {"method": "percentile", "resampled": "examples", "resamples": 200, "seed": 4,
                                   "level": 0.95, "n_examples": 150}
    gain = report["iso_compute"]["gains"]["simlens_vs_logit"]
    assert gain["gain_ci"][0] <= gain["gain"] <= gain["gain_ci"][1]
    for lens in LENSES:
        curve, bands = report["iso_compute"]["curves"][lens], report["iso_compute"]["curves_ci"][lens]
        assert len(bands) == len(curve["accuracy"])
        assert all(lo <= a <= hi for a, (lo, hi) in zip(curve["accuracy"], bands))
    calibrated = report["calibrated"]
    assert {c["policy"] for c in calibrated} == {"logit", "simlens", "oracle"}
    for result in calibrated:
        assert "calib_and_test_ci" in result or result["policy"] == "oracle"
        test = result["test"]
        for name in ("accuracy", "fidelity", "layer_token_speedup", "accuracy_drop"):
            lo, hi = test[f"{name}_ci"]
            assert lo <= test[name] <= hi, (result["policy"], result["target"], name)
    # every number the plain report has is unchanged
    assert _without_new_keys(report, plain) == plain


def _without_new_keys(report, plain):
    if isinstance(plain, dict):
        return {k: _without_new_keys(report[k], v) for k, v in plain.items()}
    if isinstance(plain, list):
        return [_without_new_keys(r, p) for r, p in zip(report, plain)]
    return report


def test_exits_that_cost_nothing_have_an_infinite_speedup_without_warnings():
    sim = pd.DataFrame({"example_index": np.arange(5), "correct": [True, False, True, True, False],
                        "agrees_final": True, "cost": 0.0, "full_cost": 40.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        intervals = uncertainty.exit_intervals(sim, Bootstrap(5, 100, 0), np.arange(5))
    assert intervals["layer_token_speedup_ci"] == [np.inf, np.inf]
    assert intervals["fidelity_ci"] == [1.0, 1.0]
