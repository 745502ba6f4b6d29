"""Bootstrap confidence intervals over examples (METHOD.md, "Uncertainty").

A nonparametric bootstrap: each of `B` resamples draws `n` example indices with replacement
from the run's `n` examples; a statistic is recomputed on every resample and its interval is
the `(1 - level) / 2` and `(1 + level) / 2` percentiles of the `B` values (linear interpolation
between order statistics, numpy's default). Resample `b` draws its indices from its own
generator, `np.random.default_rng(SeedSequence(seed).spawn(B)[b])`, so the same seed gives the
same resamples whatever the chunking, and the first `B` resamples of a larger `B` are the same.

Every statistic of one run is computed on the same resamples (one `Bootstrap` per run), so its
intervals are jointly consistent (e.g. the Iso-Compute gain is recomputed from the resampled
per-layer accuracies). A resample is a vector of counts (how often each example was drawn), and
a mean over examples is a matrix product with it: vectorised, seconds for thousands of
examples x hundreds of (lens, layer) columns.

What the intervals capture: the sampling variation of the examples (which questions the data
set happens to hold), for the model and lenses as they are. What they do not: the variation of
fitted parts (Linear SimLens, the tuned lens) over their training data, of the model over
seeds or sizes, or dependence between examples (they are treated as independent draws).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lensbench import metrics
from lensbench.errors import LensbenchError
from lensbench.exits.simulate import _simulate, default_thresholds

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
_CACHE_CELLS = 1 << 23  # counts matrices up to 8M cells (64 MB) are kept; larger ones are redrawn per statistic
_CHUNK_CELLS = 1 << 22  # else drawn in chunks of resamples of about 4M cells (32 MB)


def check_bootstrap(resamples: int, seed: int, level: float = DEFAULT_LEVEL) -> None:
    """Refuse bootstrap settings that cannot make intervals."""
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or (resamples != 0 and resamples < 2):
        raise LensbenchError(f"--bootstrap must be 0 (no intervals) or at least 2 resamples (got {resamples})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LensbenchError(f"--seed must be an integer >= 0 (got {seed})")
    if not 0 < level < 1:
        raise LensbenchError(f"the interval level must be in (0, 1) (got {level})")


def percentile_interval(samples, level: float = DEFAULT_LEVEL) -> np.ndarray:
    """Percentile intervals of `samples` (B, ...) along axis 0: an array (..., 2) of [lo, hi].

    numpy's linear interpolation between order statistics, except that two equal order
    statistics give that value (so an infinite speedup on both sides stays infinite, not NaN).
    A column with a NaN sample has a NaN interval.
    """
    samples = np.asarray(samples, dtype=float)
    if samples.ndim == 0 or samples.shape[0] == 0:
        raise LensbenchError("a percentile interval needs at least one sample")
    ordered = np.sort(samples, axis=0)
    count = ordered.shape[0]
    bounds = []
    for q in ((1 - level) / 2, (1 + level) / 2):
        h = (count - 1) * q
        below, above = int(np.floor(h)), int(np.ceil(h))
        a, b = ordered[below], ordered[above]
        with np.errstate(invalid="ignore"):
            value = np.where(a == b, a, a + (h - below) * (b - a))
        bounds.append(value)
    out = np.stack(bounds, axis=-1)
    nan = np.isnan(samples).any(axis=0)
    out[nan] = np.nan
    return out


@dataclass
class Bootstrap:
    """`resamples` bootstrap resamples of `n` examples (with replacement), seeded.

    `means(values)`, `sums(values)`: a statistic of the examples' values (n,) or (n, k) on every
    resample, (B, k); `interval(samples)`: their percentile intervals, (k, 2).
    """

    n: int
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    level: float = DEFAULT_LEVEL
    stream: int = 0  # another stream of resamples for the same seed (the calibration run's: 1)
    _counts: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        check_bootstrap(self.resamples, self.seed, self.level)
        if self.resamples == 0:
            raise LensbenchError("a Bootstrap needs at least 2 resamples (0 means no bootstrap: make none)")
        if self.n < 1:
            raise LensbenchError("a bootstrap needs at least one example")

    def describe(self) -> dict:
        """What report.json says about the intervals (`bootstrap`)."""
        return {"method": "percentile", "resampled": "examples", "resamples": int(self.resamples),
                "seed": int(self.seed), "level": float(self.level), "n_examples": int(self.n)}

    def _draw(self, seeds: list) -> np.ndarray:
        rows = np.stack([np.random.default_rng(s).integers(0, self.n, self.n) for s in seeds])
        offsets = np.arange(len(seeds))[:, None] * self.n
        flat = np.bincount((rows + offsets).ravel(), minlength=len(seeds) * self.n)
        return flat.reshape(len(seeds), self.n).astype(float)

    def counts(self):
        """The resamples as count matrices (chunk, n): how often each example was drawn."""
        if self._counts is not None:
            yield self._counts
            return
        seeds = np.random.SeedSequence(self.seed if not self.stream else [self.seed, self.stream]).spawn(self.resamples)
        if self.resamples * self.n <= _CACHE_CELLS:
            self._counts = self._draw(seeds)
            yield self._counts
            return
        chunk = max(1, _CHUNK_CELLS // self.n)
        for start in range(0, self.resamples, chunk):
            yield self._draw(seeds[start:start + chunk])

    def sums(self, values) -> np.ndarray:
        """Per resample, the sum of `values` over the drawn examples: (B, k) (or (B,) for (n,))."""
        values = np.asarray(values, dtype=float)
        if values.shape[0] != self.n:
            raise LensbenchError(f"the bootstrap has {self.n} examples, the values {values.shape[0]}")
        return np.concatenate([counts @ values for counts in self.counts()], axis=0)

    def means(self, values) -> np.ndarray:
        """Per resample, the mean of `values` over the drawn examples; a NaN value is a missing
        one (the mean is over the drawn examples that have it; NaN where none has)."""
        values = np.asarray(values, dtype=float)
        missing = np.isnan(values)
        if not missing.any():
            return self.sums(values) / self.n
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums(np.where(missing, 0.0, values)) / self.sums((~missing).astype(float))

    def interval(self, samples) -> np.ndarray:
        return percentile_interval(samples, self.level)


def _pairs(interval: np.ndarray) -> list:
    """(k, 2) intervals as JSON-ready `[[lo, hi], ...]` (NaN stays NaN; the report writes null)."""
    return [[float(lo), float(hi)] for lo, hi in np.asarray(interval, dtype=float).reshape(-1, 2)]


def example_order(predictions: pd.DataFrame) -> np.ndarray:
    """The run's example indices in the order every bootstrap of the report uses (ascending)."""
    return np.sort(predictions["example_index"].unique())


def run_bootstrap(predictions: pd.DataFrame, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                  level: float = DEFAULT_LEVEL) -> tuple[Bootstrap, np.ndarray]:
    """The bootstrap of a run's examples and their order (`example_order`): the one
    `report.build_report` makes, so that the app and the analyses get the report's intervals."""
    order = example_order(predictions)
    return Bootstrap(len(order), resamples, seed, level), order


def final_correct(predictions: pd.DataFrame, order: np.ndarray) -> np.ndarray:
    """Per example of `order`, whether the full model is right (1.0 / 0.0): its final readout."""
    finals = metrics.final_rows(predictions).set_index("example_index").reindex(order)
    return (finals["final_decision"] == finals["gold"]).to_numpy().astype(float)


@dataclass
class LayerSamples:
    """Per-layer accuracy and fidelity of every lens on every resample: `columns` maps
    `(lens, layer)` to a column of `accuracy` and `fidelity` (B, K)."""

    columns: dict
    accuracy: np.ndarray
    fidelity: np.ndarray


def resample_per_layer(predictions: pd.DataFrame, boot: Bootstrap) -> LayerSamples:
    """Accuracy and fidelity of each (lens, readout point) on each resample of the examples
    (`example_order`); a (lens, point) an example lacks leaves that example out of its mean."""
    order = example_order(predictions)
    if len(order) != boot.n:
        raise LensbenchError(f"the bootstrap has {boot.n} examples, the predictions {len(order)}")
    rows = np.searchsorted(order, predictions["example_index"].to_numpy())
    keys = pd.MultiIndex.from_arrays([predictions["lens"].to_numpy(), predictions["layer"].to_numpy().astype(int)])
    codes, uniques = pd.factorize(keys, sort=True)
    columns = {(str(lens), int(layer)): i for i, (lens, layer) in enumerate(uniques)}
    shape = (boot.n, len(columns))
    out = []
    for name in ("correct", "agrees_final"):
        matrix = np.full(shape, np.nan)
        matrix[rows, codes] = predictions[name].to_numpy().astype(float)
        out.append(boot.means(matrix))
    return LayerSamples(columns, out[0], out[1])


def per_layer_intervals(samples: LayerSamples, per_layer: dict, boot: Bootstrap) -> dict:
    """`{lens: {"accuracy_ci": [[lo, hi], ...], "fidelity_ci": [...]}}`, in `per_layer`'s
    (`metrics.per_layer`) order of readout points."""
    acc, fid = boot.interval(samples.accuracy), boot.interval(samples.fidelity)
    out = {}
    for lens, body in per_layer.items():
        cols = [samples.columns[(lens, int(layer))] for layer in body["layer"]]
        out[lens] = {"accuracy_ci": _pairs(acc[cols]), "fidelity_ci": _pairs(fid[cols])}
    return out


def mean_interval(values, boot: Bootstrap) -> list:
    """`[lo, hi]` of the mean of the examples' `values` (n,)."""
    return _pairs(boot.interval(boot.means(values)))[0]


def layers_interval(samples: LayerSamples, lens: str, layers, boot: Bootstrap) -> list:
    """`[[lo, hi], ...]` of `lens`'s accuracy at each of `layers` (an Iso-Compute curve's
    points; a layer of -1, no affordable point, has a NaN interval)."""
    acc = boot.interval(samples.accuracy)
    return [[float("nan")] * 2 if int(layer) < 0 else _pairs(acc[samples.columns[(lens, int(layer))]])[0]
            for layer in layers]


def gain_samples(samples: LayerSamples, gain: dict) -> np.ndarray:
    """The Iso-Compute gain (`compute.iso_compute_gain`'s dict) on every resample, (B,).

    The budgets and the point each budget affords (`lens_layer`, `baseline_layer`) stay the
    full sample's (the point costs are a function of the mean prompt length, held fixed); the
    accuracies at those points are the resample's. A budget that affords no point (layer -1)
    makes the gain NaN, as it does the full sample's.
    """
    def at(lens: str, layers: list) -> np.ndarray:
        acc = np.full((samples.accuracy.shape[0], len(layers)), np.nan)
        for j, layer in enumerate(layers):
            if int(layer) >= 0:
                acc[:, j] = samples.accuracy[:, samples.columns[(lens, int(layer))]]
        return acc

    return np.mean(at(gain["lens"], gain["lens_layer"]) - at(gain["baseline"], gain["baseline_layer"]), axis=1)


def gain_interval(samples: LayerSamples, gain: dict, boot: Bootstrap) -> list:
    """`[lo, hi]` of the Iso-Compute gain (`gain_samples`)."""
    return _pairs(boot.interval(gain_samples(samples, gain)))[0]


def exit_samples(sim: pd.DataFrame, boot: Bootstrap, order: np.ndarray, gold_final: np.ndarray | None = None) -> dict:
    """Accuracy, fidelity and layer-token speedup of a replayed exit policy (`simulate_exits`'s
    rows, one per example; the threshold fixed) on every resample of the examples `order`.

    The speedup is the ratio of the resampled sums, `sum(full_cost) / sum(cost)` (infinite
    where the resample's exits cost nothing). With `gold_final`, the full model's correctness
    per example (in `order`), also the accuracy drop `full accuracy - accuracy` (paired).
    """
    sim = sim.set_index("example_index").reindex(order)
    if sim["cost"].isna().any():
        raise LensbenchError("the exit replay lacks some examples of the run")
    correct = sim["correct"].to_numpy().astype(float)
    columns = [correct, sim["agrees_final"].to_numpy().astype(float), sim["full_cost"].to_numpy().astype(float),
               sim["cost"].to_numpy().astype(float)]
    if gold_final is not None:
        columns.append(np.asarray(gold_final, dtype=float) - correct)
    sums = boot.sums(np.stack(columns, axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        speedup = np.where(sums[:, 3] > 0, sums[:, 2] / sums[:, 3], np.inf)
    out = {"accuracy": sums[:, 0] / boot.n, "fidelity": sums[:, 1] / boot.n, "layer_token_speedup": speedup}
    if gold_final is not None:
        out["accuracy_drop"] = sums[:, 4] / boot.n
    return out


def exit_intervals(sim: pd.DataFrame, boot: Bootstrap, order: np.ndarray, gold_final: np.ndarray | None = None) -> dict:
    """`{"accuracy_ci": [lo, hi], "fidelity_ci": ..., "layer_token_speedup_ci": ...}` (and
    `accuracy_drop_ci` with `gold_final`) of `exit_samples`."""
    return {f"{name}_ci": _pairs(boot.interval(values))[0]
            for name, values in exit_samples(sim, boot, order, gold_final).items()}


@dataclass
class ThresholdGrid:
    """One policy's replays at every threshold of a grid, per example: (n, T) matrices of a
    calibration and a test run (`threshold_grid`)."""

    thresholds: np.ndarray
    calib: dict
    test: dict


def _replays(data, thresholds: np.ndarray, order: np.ndarray | None = None) -> dict:
    sims = [_simulate(data, float(t)) for t in thresholds]
    index = pd.Index(data.example_index)
    rows = np.arange(len(index)) if order is None else index.get_indexer(order)
    if (rows < 0).any():
        raise LensbenchError("the exit replay lacks some examples of the run")
    out = {name: np.stack([sim[name].to_numpy().astype(float)[rows] for sim in sims], axis=1)
           for name in ("correct", "agrees_final", "cost", "full_cost")}
    out["final_correct"] = (data.final_decision == data.gold).astype(float)[rows]
    return out


def threshold_grid(calib_data, test_data, order: np.ndarray) -> ThresholdGrid:
    """The replays `calibration_samples` needs: the grid `exits.choose_threshold` searches on
    the calibration run (`default_thresholds`), replayed on the calibration run and on the test
    run (its rows in `order`)."""
    thresholds = default_thresholds(calib_data)
    return ThresholdGrid(thresholds, _replays(calib_data, thresholds), _replays(test_data, thresholds, order))


def calibration_samples(grid: ThresholdGrid, target: str, calib_boot: Bootstrap, test_boot: Bootstrap,
                        epsilon: float = 0.01, max_drop: float = 0.01) -> dict:
    """The calibrated point's test numbers when calibration, too, is resampled: on resample
    `b`, the threshold is chosen again on the `b`-th resample of the calibration examples
    (`calib_boot`, the cheapest of the grid meeting `target`, ties to the higher accuracy, as
    `exits.choose_threshold` chooses) and reported on the `b`-th resample of the test examples
    (`test_boot`). Returns (B,) arrays: `accuracy`, `fidelity`, `layer_token_speedup`,
    `accuracy_drop`, `threshold`."""
    c, t = grid.calib, grid.test
    n = calib_boot.n
    sums = calib_boot.sums(np.concatenate([c["correct"], c["agrees_final"], c["cost"], c["final_correct"][:, None]], 1))
    k = len(grid.thresholds)
    accuracy, fidelity, cost, full = sums[:, :k] / n, sums[:, k:2 * k] / n, sums[:, 2 * k:3 * k] / n, sums[:, -1:] / n
    if target == "best-accuracy":
        ok = accuracy >= accuracy.max(axis=1, keepdims=True) - 1e-12
    elif target == "max-drop":
        ok = accuracy >= full - max_drop - 1e-12
    elif target == "fidelity":
        ok = fidelity >= 1 - epsilon - 1e-12
    else:
        raise LensbenchError(f"unknown calibration target '{target}'")
    ok[:, 0] |= ~ok.any(axis=1)  # cannot happen on the default grid: never exiting meets every target
    cheapest = np.where(ok, cost, np.inf)
    ok &= cheapest == cheapest.min(axis=1, keepdims=True)
    best = np.where(ok, accuracy, -np.inf)
    choice = np.argmax(ok & (best == best.max(axis=1, keepdims=True)), axis=1)
    rows = np.arange(len(choice))

    def at(matrix):
        return test_boot.sums(matrix)[rows, choice]

    correct, cost_sum, full_sum = at(t["correct"]), at(t["cost"]), at(t["full_cost"])
    with np.errstate(divide="ignore", invalid="ignore"):
        speedup = np.where(cost_sum > 0, full_sum / cost_sum, np.inf)
    return {"accuracy": correct / test_boot.n, "fidelity": at(t["agrees_final"]) / test_boot.n,
            "layer_token_speedup": speedup,
            "accuracy_drop": test_boot.sums(t["final_correct"]) / test_boot.n - correct / test_boot.n,
            "threshold": grid.thresholds[choice]}


def calibration_intervals(grid: ThresholdGrid, target: str, calib_boot: Bootstrap, test_boot: Bootstrap,
                          epsilon: float = 0.01, max_drop: float = 0.01) -> dict:
    """`{name: [lo, hi]}` of `calibration_samples`."""
    samples = calibration_samples(grid, target, calib_boot, test_boot, epsilon, max_drop)
    return {name: _pairs(test_boot.interval(values))[0] for name, values in samples.items()}
