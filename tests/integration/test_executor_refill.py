"""The SimExit executor's batching with refill: every example is decided as it is alone, once,
in the order given, and slots freed by exited examples are really given to waiting ones."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from lensbench import exits
from lensbench.continuation import continue_slots, masked_block
from lensbench.errors import LensbenchError
from lensbench.lenses.linear import LinearLens, LinearLensConfig, unembed_fingerprint
from lensbench.readout import ReadoutPoint
from lensbench.tasks import EncodedExample, encode_examples, load_task, start_token_id

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def deep(tokenizer):
    """12 narrow layers in float64: batching changes a readout by ~1e-15, far below the gaps
    between the entropies and the thresholds, so no decision can flip on the batch."""
    from lensbench.models import random_model

    return random_model("tiny-deep", seed=2, dtype=torch.float64, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def examples(deep):
    """24 capitals prompts cut to lengths from 26 to 43 tokens, given neither length-sorted nor
    in index order."""
    tokenizer = deep.tokenizer
    start_id = start_token_id(tokenizer)
    encoded, _ = encode_examples(load_task("capitals"), tokenizer, start_id, 2048, skip_invalid=True)
    encoded = encoded[:24]
    for i, e in enumerate(encoded):
        e.tokens = [e.tokens[0]] + e.tokens[1 + (i * 5) % 17 :]
    assert len({len(e.tokens) for e in encoded}) > 10
    order = np.random.default_rng(0).permutation(len(encoded))
    return [encoded[i] for i in order], start_id


def random_linear_lens(model) -> LinearLens:
    """A Linear SimLens of the model's shape with random maps near the identity."""
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    digest, probes, norm = unembed_fingerprint(model)
    config = LinearLensConfig(
        kind="linear-simlens", target="simlens", objective="test", model="random:tiny-deep:2", model_sha256=None,
        unembed_sha256=digest, unembed_probe=probes, unembed_norm=norm, n_layers=n_layers, d_model=d_model,
        site="pre", layers=list(range(n_layers)), map_cost=0.1,
    )
    gen = torch.Generator().manual_seed(0)
    weight = torch.eye(d_model) + 0.5 * torch.randn(n_layers, d_model, d_model, generator=gen) / d_model**0.5
    return LinearLens(weight, 0.1 * torch.randn(n_layers, d_model, generator=gen), config)


# policy, answer lens, threshold, min_layer, positions: exits spread over many layers (checked)
CASES = {
    "logit": ("logit", "simlens", 1.1, 0, "consecutive"),
    "linear-simlens": ("linear-simlens", "simlens", 1.1, 1, "consecutive"),
    "simlens": ("simlens", "simlens", 1.2, 4, "consecutive"),
    "answer-linear": ("logit", "linear-simlens", 1.1, 0, "consecutive"),
    "answer-logit": ("linear-simlens", "logit", 1.1, 0, "consecutive"),
    "per-layer": ("logit", "simlens", {layer: 1.0 + 0.02 * layer for layer in range(2, 12)}, 2, "consecutive"),
    "original-positions": ("logit", "simlens", 1.1, 0, "original"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refilled_batches_decide_as_one_example_at_a_time(deep, examples, case):
    encoded, start_id = examples
    policy, answer, threshold, min_layer, positions = CASES[case]
    executor = exits.SimExitExecutor(deep, random_linear_lens(deep), threshold, policy, answer, min_layer,
                                     positions=positions, pad_id=start_id)
    alone = executor.run(encoded, 1)
    n_layers = deep.cfg.n_layers
    # informative: exits at many layers, some examples never exit
    assert len(set(alone.exit_layer)) >= 5 and n_layers in alone.exit_layer and min(alone.exit_layer) < n_layers
    tolerance = 1e-5 if "linear-simlens" in (policy, answer) else 1e-9  # Linear SimLens maps in float32
    for batch_size in (3, 8):
        for refill in (True, False):
            got = executor.run(encoded, batch_size, refill=refill)
            assert got.example_index == [e.index for e in encoded]
            assert got.exit_layer == alone.exit_layer, (batch_size, refill)
            assert got.decision == alone.decision, (batch_size, refill)
            np.testing.assert_allclose(got.entropy, alone.entropy, rtol=tolerance, atol=tolerance)
            # every row ran each block below its exit layer exactly once
            assert got.stats.row_layers == sum(alone.exit_layer)
            assert max(got.stats.calls_per_block) <= len(encoded)


def test_results_come_in_the_order_given_once_each(deep, examples):
    encoded, start_id = examples
    executor = exits.SimExitExecutor(deep, None, 1.1, "logit", pad_id=start_id)
    forward = executor.run(encoded, 5)
    backward = executor.run(encoded[::-1], 5)
    assert forward.example_index == [e.index for e in encoded]
    assert backward.example_index == [e.index for e in encoded[::-1]]
    assert set(Counter(forward.example_index).values()) == {1}
    frame, other = forward.frame().set_index("example_index"), backward.frame().set_index("example_index")
    assert frame[["exit_layer", "decision"]].equals(other.loc[frame.index, ["exit_layer", "decision"]])
    assert exits.SimExitExecutor(deep, None, 1.1, "logit", pad_id=start_id).run([], 4).example_index == []


def late_and_early(deep, start_id: int) -> list[EncodedExample]:
    """Four examples that never exit (four candidates, a threshold below any of their
    entropies) and twelve that exit at the first check (one candidate: entropy 0), lengths
    chosen so that each length-sorted batch of four holds one late example."""
    base = deep.tokenizer.encode("The capital of France is Paris. The capital of Italy is Rome. " * 4)
    late_lengths, out = (40, 30, 20, 10), []
    for k, late in enumerate(late_lengths):
        out.append(EncodedExample(len(out), f"late{k}", [start_id] + base[: late - 1], [11, 12, 13, 14], 0))
        for j in range(1, 4):
            out.append(EncodedExample(len(out), f"early{k}{j}", [start_id] + base[: late - j - 1], [11], 0))
    return out


def test_a_late_example_does_not_hold_the_slots_of_the_others(deep):
    """Without refill each batch of four carries its late example through the upper blocks
    alone (one call per batch and block); with refill the early examples' slots go to the
    waiting ones, the late examples gather at the first check and share one call per block."""
    start_id = start_token_id(deep.tokenizer)
    encoded = late_and_early(deep, start_id)
    n_layers, min_layer = deep.cfg.n_layers, 2
    executor = exits.SimExitExecutor(deep, None, 1e-9, "logit", "logit", min_layer, pad_id=start_id, pool=2)
    expected = [n_layers if e.id.startswith("late") else min_layer for e in encoded]
    batches = executor.run(encoded, 4, refill=False)
    refilled = executor.run(encoded, 4)
    assert batches.exit_layer == expected and refilled.exit_layer == expected
    assert refilled.decision == batches.decision
    assert batches.stats.calls_per_block[min_layer:] == [4] * (n_layers - min_layer)  # the case discriminates
    assert refilled.stats.calls_per_block[min_layer:] == [1] * (n_layers - min_layer)
    assert refilled.stats.row_layers == batches.stats.row_layers == sum(expected)
    assert refilled.stats.block_calls < batches.stats.block_calls
    assert refilled.stats.max_in_flight <= 2 * 4


def test_masked_blocks_continue_each_pair_from_its_own_layer(deep):
    """What the CUDA graphs of the continuation replay (`masked_block` from the lowest start),
    checked eagerly against `continue_slots` with mixed start layers."""
    n_layers = deep.cfg.n_layers
    z = torch.randn(5, 2, deep.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    starts = [3, 0, 7, 3, 11]
    want, _ = continue_slots(deep, z, [ReadoutPoint(layer, "pre", n_layers) for layer in starts])
    x, starts_t = z.clone(), torch.tensor(starts)
    with torch.inference_mode():
        for k in range(min(starts), n_layers):
            x = masked_block(deep, k, x, starts_t)
    torch.testing.assert_close(x[:, -1], want, rtol=1e-10, atol=1e-10)


class EagerGraphs:
    """A stand-in for `GraphedContinuation` that runs `masked_block` eagerly (CPU)."""

    sizes: list[int] = []

    def __init__(self, model, n):
        self.model, self.n = model, n

    def run(self, z, starts):
        assert len(z) == self.n == len(starts)
        EagerGraphs.sizes.append(self.n)
        x, starts_t = z.clone(), torch.tensor(starts)
        for k in range(min(starts), self.model.cfg.n_layers):
            x = masked_block(self.model, k, x, starts_t)
        return x[:, -1]


def test_graphed_continuation_chunks_and_pads_pending_pairs(deep, examples, monkeypatch):
    """The executor's graphed path (chunks of at most MAX_GRAPHED_PAIRS pairs, padded to a power
    of two with pairs starting at L) answers as the eager `continue_slots`."""
    encoded, start_id = examples
    eager = exits.SimExitExecutor(deep, None, 1.25, "logit", pad_id=start_id).run(encoded, 8)
    graphed = exits.SimExitExecutor(deep, None, 1.25, "logit", pad_id=start_id, flush_pairs=100)
    graphed.cuda_graphs = True  # as on a GPU; the graphs are the eager stand-in
    monkeypatch.setattr(graphed, "_graphed", lambda n: EagerGraphs(deep, n))
    EagerGraphs.sizes = []
    got = graphed.run(encoded, 8)
    n_exited = sum(layer < deep.cfg.n_layers for layer in got.exit_layer)
    assert n_exited > exits.MAX_GRAPHED_PAIRS  # more than one chunk
    assert sum(EagerGraphs.sizes) >= n_exited and all(n & (n - 1) == 0 for n in EagerGraphs.sizes)
    assert max(EagerGraphs.sizes) <= exits.MAX_GRAPHED_PAIRS
    assert got.decision == eager.decision and got.exit_layer == eager.exit_layer


def test_bad_batching_options_are_one_line_errors(deep, examples):
    encoded, start_id = examples
    with pytest.raises(LensbenchError, match="pool"):
        exits.SimExitExecutor(deep, None, 1.0, "logit", pool=0.5)
    with pytest.raises(LensbenchError, match="flush_pairs"):
        exits.SimExitExecutor(deep, None, 1.0, "logit", flush_pairs=0)
    with pytest.raises(LensbenchError, match="batch_size"):
        exits.SimExitExecutor(deep, None, 1.0, "logit", pad_id=start_id).run(encoded, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (run on a GPU machine)")
def test_graphed_continuation_from_mixed_layers_on_cuda(tiny_rotary):
    import copy

    from lensbench.continuation import GraphedContinuation

    model = copy.deepcopy(tiny_rotary).to("cuda")
    n_layers = model.cfg.n_layers
    z = torch.randn(4, 2, model.cfg.d_model, device="cuda")
    starts = [0, 2, 1, n_layers]  # the last one is padding: returned untouched
    want, _ = continue_slots(model, z, [ReadoutPoint(layer, "pre", n_layers) for layer in starts])
    got = GraphedContinuation(model, 4).run(z, starts)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_measure_speedup_reports_the_refilled_run_and_the_one_without(deep, examples):
    encoded, start_id = examples
    encoded = encoded[:10]
    executor = exits.SimExitExecutor(deep, None, 1.1, "logit", pad_id=start_id)
    rows = exits.measure_speedup(deep, encoded, executor, batch_sizes=(1, 3), repeats=1, warmup=0, no_refill=True)
    n_layers = deep.cfg.n_layers
    for row in rows:
        assert row["wall_over_layer_token"] == pytest.approx(row["wall_clock_speedup"] / row["layer_token_speedup"])
        assert row["full_block_calls"] == -(-len(encoded) // row["batch_size"]) * n_layers
        stats = executor.run(encoded, row["batch_size"]).stats
        assert (row["block_calls"], row["rows_per_call"]) == (stats.block_calls, stats.rows_per_call())
    bs1, bs3 = rows
    assert not bs1["refill"] and "no_refill_exit_seconds" not in bs1
    assert bs3["refill"] and bs3["no_refill_exit_seconds"] > 0
    assert bs3["no_refill_block_calls"] == executor.run(encoded, 3, refill=False).stats.block_calls
    table = exits.speed_table(rows)
    assert "without refill" in table and "wall/lt" in table
