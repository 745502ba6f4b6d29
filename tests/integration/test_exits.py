"""Exit policies: hand-checked simulation and calibration, and the executor that really stops
computing agrees with the offline simulation from a stored run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lensbench import exits, store
from lensbench.errors import LensbenchError


pytestmark = pytest.mark.usefixtures("one_thread")


# --- hand-made predictions ----------------------------------------------------------------------


def frames(entropy: dict, decisions: dict, final: list[int], gold: list[int], n_tokens: list[int],
           ids: list[str] | None = None):
    """Predictions and examples tables: per lens, entropy[lens][example][layer] and
    decisions[lens][example][layer]."""
    rows = []
    n_layers = len(next(iter(decisions.values()))[0]) - 1
    for lens in decisions:
        for example, per_layer in enumerate(decisions[lens]):
            for layer, decision in enumerate(per_layer):
                rows.append({
                    "example_index": example, "example_id": (ids or [f"e{i}" for i in range(len(final))])[example],
                    "lens": lens, "layer": layer, "site": "final" if layer == n_layers else "pre",
                    "decision": decision, "gold": gold[example], "correct": decision == gold[example],
                    "final_decision": final[example], "agrees_final": decision == final[example],
                    "entropy": entropy[lens][example][layer] if lens in entropy else 0.0,
                })
    examples = pd.DataFrame({"example_index": range(len(final)), "example_id": ids or [f"e{i}" for i in range(len(final))],
                             "n_tokens": n_tokens})
    return pd.DataFrame(rows), examples


def simple_frames():
    """L = 3; example 0: 10 tokens, example 1: 20 tokens."""
    ent = [[0.9, 0.2, 0.1, 0.0], [0.9, 0.8, 0.7, 0.0]]
    dec = [[1, 2, 0, 0], [0, 1, 1, 1]]
    return frames({"linear-simlens": ent, "simlens": ent, "logit": ent},
                  {"linear-simlens": dec, "simlens": dec, "logit": dec}, final=[0, 1], gold=[2, 1], n_tokens=[10, 20])


def test_simulate_exits_hand_checked():
    predictions, examples = simple_frames()
    sim = exits.simulate_exits(predictions, examples, "linear-simlens", 0.5, map_cost=0.5)
    assert list(sim.columns[:7]) == ["example_index", "exit_layer", "decision", "correct", "agrees_final", "cost", "full_cost"]
    assert sim["exit_layer"].tolist() == [1, 3]
    assert sim["decision"].tolist() == [2, 1]
    assert sim["correct"].tolist() == [True, True]
    assert sim["agrees_final"].tolist() == [False, True]
    # 10·1 + 2·(3-1) + 2 maps · 0.5; 20·3 + 3 maps (layers 0..2) · 0.5
    assert sim["cost"].tolist() == [15.0, 61.5]
    assert sim["full_cost"].tolist() == [30, 60]


def test_min_layer_and_per_layer_thresholds():
    predictions, examples = simple_frames()
    sim = exits.simulate_exits(predictions, examples, "linear-simlens", 0.5, min_layer=2, map_cost=0.5)
    assert sim["exit_layer"].tolist() == [2, 3]
    assert sim["decision"].tolist() == [0, 1]
    assert sim["cost"].tolist() == [20 + 2 + 0.5, 60 + 0.5]
    per_layer = exits.simulate_exits(predictions, examples, "linear-simlens", {1: 0.1, 2: 0.8}, map_cost=0.5)
    assert per_layer["exit_layer"].tolist() == [2, 2]


def test_policy_costs_differ_as_documented():
    predictions, examples = simple_frames()
    logit = exits.simulate_exits(predictions, examples, "logit", 0.5)
    assert logit["cost"].tolist() == [10 + 4, 60]
    # SimLens confidence: the continuation at layer 0 (2·3) besides the answer's at layer 1 (2·2)
    simlens = exits.simulate_exits(predictions, examples, "simlens", 0.5)
    assert simlens["cost"].tolist() == [10 + 4 + 6, 60 + 6 + 4 + 2]
    answer_logit = exits.simulate_exits(predictions, examples, "logit", 0.5, answer_lens="logit")
    assert answer_logit["cost"].tolist() == [10, 60]


def test_oracle_exits_where_the_answer_settles():
    predictions, examples = simple_frames()
    oracle = exits.simulate_exits(predictions, examples, "oracle", None)
    assert oracle["exit_layer"].tolist() == [2, 1]
    assert oracle["agrees_final"].all()
    assert oracle["cost"].tolist() == [20 + 2, 20 + 4]
    assert exits.simulate_exits(predictions, examples, "oracle", None, min_layer=2)["exit_layer"].tolist() == [2, 2]


def test_operating_curve_hand_checked():
    predictions, examples = simple_frames()
    curve = exits.operating_curve(predictions, examples, "linear-simlens", [0.0, 1.0], map_cost=0.5)
    assert list(curve.columns[:5]) == ["threshold", "accuracy", "fidelity", "mean_exit_layer", "layer_token_speedup"]
    never, always = curve.iloc[0], curve.iloc[1]
    assert (never["accuracy"], never["fidelity"], never["mean_exit_layer"]) == (0.5, 1.0, 3.0)
    assert never["layer_token_speedup"] == pytest.approx(90 / (31.5 + 61.5))
    assert (always["accuracy"], always["fidelity"], always["mean_exit_layer"]) == (0.0, 0.0, 0.0)
    assert always["layer_token_speedup"] == pytest.approx(90 / 13)


def test_unknown_policy_and_missing_lens_are_refused():
    predictions, examples = simple_frames()
    with pytest.raises(LensbenchError, match="unknown exit policy"):
        exits.simulate_exits(predictions, examples, "entropy", 0.5)
    with pytest.raises(LensbenchError, match="lacks"):
        exits.simulate_exits(predictions[predictions["lens"] != "linear-simlens"], examples, "linear-simlens", 0.5)


# --- calibration ------------------------------------------------------------------------------------

G, W = 1, 0  # the gold answer and a wrong one


def calib_frames():
    """L = 2, 10 tokens each (costs: exit at 0 → 4, at 1 → 12, none → 20). Full accuracy 3/4.
    Hand-computed operating points (threshold just above v): 0.1 → acc .75 fid 1 cost 16;
    0.2 → acc 1 fid .75 cost 12; 0.3 → acc .75 fid .5 cost 10; lower costs lose accuracy."""
    entropy = [[0.1, 0.05, 0], [0.3, 0.2, 0], [0.6, 0.4, 0], [0.8, 0.15, 0]]
    decisions = [[G, G, G], [W, G, G], [W, W, G], [W, G, W]]
    return frames({"logit": entropy}, {"simlens": decisions, "logit": decisions}, final=[G, G, G, W], gold=[G] * 4,
                  n_tokens=[10] * 4, ids=["c0", "c1", "c2", "c3"])


def held_out_frames():
    """t0 stays above the thresholds until L; t1 is confident (and wrong) at layer 0."""
    entropy = [[0.25, 0.21, 0], [0.19, 0.0, 0]]
    decisions = [[W, G, G], [W, W, G]]
    return frames({"logit": entropy}, {"simlens": decisions, "logit": decisions}, final=[G, G], gold=[G, G],
                  n_tokens=[10, 10], ids=["t0", "t1"])


def write_run(path, predictions, examples, sha="model-a"):
    """A run folder from hand-made tables (what `calibrate` reads)."""
    import pyarrow as pa

    path.mkdir(parents=True)
    store.atomic_write_json(path / store.MANIFEST, {
        "format_version": store.FORMAT_VERSION, "status": "complete", "model": {"spec": "m", "source_sha256": sha},
        "task": "t", "lenses": sorted(predictions["lens"].unique()), "config": {}, "start_token": {"id": 0, "text": ""},
    })
    store.atomic_write_table(path / "predictions.parquet", pa.Table.from_pandas(predictions, preserve_index=False))
    store.atomic_write_table(path / "examples.parquet", pa.Table.from_pandas(examples, preserve_index=False))
    return path


@pytest.fixture
def calib_and_test(tmp_path):
    return write_run(tmp_path / "calib", *calib_frames()), write_run(tmp_path / "test", *held_out_frames())


@pytest.mark.parametrize("target, low, high", [
    ("best-accuracy", 0.2, 0.3),  # accuracy 1 at cost 12
    ("max-drop", 0.3, 0.4),  # accuracy .75 >= .75 - .01 at cost 10
    ("fidelity", 0.1, 0.15),  # fidelity 1 >= .99 at cost 16
])
def test_calibration_picks_the_cheapest_threshold_meeting_the_target(calib_and_test, target, low, high):
    calib, test = calib_and_test
    result = exits.calibrate(calib, test, "logit", target)
    assert low < result["threshold"] <= high
    assert result["calib"]["full_accuracy"] == 0.75


def test_calibrated_threshold_is_reported_on_the_test_run(calib_and_test):
    calib, test = calib_and_test
    result = exits.calibrate(calib, test, "logit", "best-accuracy")
    # threshold just above 0.2: t0 runs to L (right), t1 exits at 0 (wrong)
    assert result["test"]["accuracy"] == 0.5
    assert result["test"]["fidelity"] == 0.5
    assert result["test"]["mean_exit_layer"] == 1.0
    assert result["test"]["layer_token_speedup"] == pytest.approx(40 / (20 + 4))
    assert result["test"]["full_accuracy"] == 1.0
    json.dumps(result)  # the CLI writes it


def test_calibration_never_sees_the_test_split(tmp_path, calib_and_test, monkeypatch):
    calib, test = calib_and_test
    chosen_on = []
    original = exits.choose_threshold

    def spy(data, *args, **kwargs):
        chosen_on.append(set(data.example_index.tolist()))
        return original(data, *args, **kwargs)

    monkeypatch.setattr(exits.calibration, "choose_threshold", spy)  # where calibrate looks it up
    first = exits.calibrate(calib, test, "logit", "max-drop")
    assert chosen_on == [{0, 1, 2, 3}]  # the calibration run's examples only
    # a completely different test run leaves the threshold where it was
    predictions, examples = held_out_frames()
    flipped = predictions.assign(entropy=1.0 - predictions["entropy"], decision=W)
    other = write_run(tmp_path / "other", flipped, examples)
    assert exits.calibrate(calib, other, "logit", "max-drop")["threshold"] == first["threshold"]


def test_calibration_refuses_overlapping_or_mismatched_runs(tmp_path, calib_and_test):
    calib, test = calib_and_test
    with pytest.raises(LensbenchError, match="share 4 example"):
        exits.calibrate(calib, calib, "logit", "fidelity")
    predictions, examples = held_out_frames()
    overlapping = examples.assign(example_id=["t0", "c2"])
    with pytest.raises(LensbenchError, match="share 1 example"):
        exits.calibrate(calib, write_run(tmp_path / "overlap", predictions, overlapping), "logit", "fidelity")
    with pytest.raises(LensbenchError, match="different models"):
        exits.calibrate(calib, write_run(tmp_path / "model-b", predictions, examples, sha="model-b"), "logit", "fidelity")


def test_per_layer_calibration_is_precision_calibrated(calib_and_test):
    calib, test = calib_and_test
    result = exits.calibrate(calib, test, "logit", "fidelity", per_layer=True)
    thresholds = exits.parse_threshold(result["threshold"])
    # layer 0: only c0 (0.1) agrees with the final answer among the most confident -> cut
    # between 0.1 and 0.3; layer 1: c0 (.05) agrees, c3 (.15) does not -> cut between .05 and .15
    assert thresholds[0] == pytest.approx(0.2)
    assert thresholds[1] == pytest.approx(0.1)
    assert result["calib"]["fidelity"] == 1.0


# --- the executor against the simulation -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_exit_run(tmp_path_factory, tiny_rotary):
    """A Linear SimLens fitted on capitals@calib and a run of capitals@test with the logit
    lens, SimLens and Linear SimLens, all on the tiny rotary model."""
    from lensbench.lenses.fit import FitConfig, fit_from_config
    from lensbench.runner import EvalConfig, run_eval

    root = tmp_path_factory.mktemp("exits")
    lens = fit_from_config(FitConfig(out=str(root / "lens"), model="random:tiny-rotary:1", task="capitals", split="calib",
                                     objective="lstsq", batch_size=8), model=tiny_rotary, progress=False)
    cfg = EvalConfig(out=str(root / "run"), model="random:tiny-rotary:1", task="capitals@test",
                     lenses="logit,simlens,linear-simlens", linear=[lens.path], batch_size=8)
    return run_eval(cfg, model=tiny_rotary, progress=False), lens


def between_entropies(data: exits.ExitData, quantile: float) -> float:
    """A threshold halfway between two observed entropies (no float ties with the executor)."""
    values = np.unique(data.confidence[:, data.min_layer : data.n_layers])
    i = max(1, int(quantile * (len(values) - 1)))
    return float((values[i - 1] + values[i]) / 2)


# The quantiles depend on the random model's weights: each is chosen so that some examples leave
# early and some do not (the test's first assertion checks it).
@pytest.mark.parametrize("policy, answer, quantile, batch_size, min_layer", [
    ("linear-simlens", "simlens", 0.5, 1, 0),
    ("linear-simlens", "simlens", 0.3, 4, 1),
    ("logit", "simlens", 0.3, 4, 0),
    ("simlens", "simlens", 0.4, 3, 0),
    ("linear-simlens", "logit", 0.5, 4, 0),
])
def test_executor_decides_as_the_simulation_predicts(tiny_exit_run, tiny_rotary, policy, answer, quantile, batch_size, min_layer):
    run_path, lens = tiny_exit_run
    run = store.open_run(run_path)
    predictions, examples = run.predictions(), run.examples()
    data = exits.prepare_exits(predictions, examples, policy, answer, min_layer)
    tau = between_entropies(data, quantile)
    sim = exits.simulate_exits(predictions, examples, policy, tau, answer, min_layer)
    # the case is informative: some examples leave early, some do not
    assert 0 < (sim["exit_layer"] < data.n_layers).sum() < len(sim)
    encoded, start_id = exits.encoded_examples_of(run, tiny_rotary.tokenizer)
    executor = exits.SimExitExecutor(tiny_rotary, lens, tau, policy, answer, min_layer, pad_id=start_id)
    got = executor.run(encoded, batch_size).frame().set_index("example_index").loc[sim["example_index"]]
    assert got["exit_layer"].tolist() == sim["exit_layer"].tolist()
    assert got["decision"].tolist() == sim["decision"].tolist()


def test_executor_follows_per_layer_thresholds(tiny_exit_run, tiny_rotary):
    run_path, lens = tiny_exit_run
    run = store.open_run(run_path)
    predictions, examples = run.predictions(), run.examples()
    data = exits.prepare_exits(predictions, examples, "linear-simlens", min_layer=1)
    thresholds = {layer: float(np.median(data.confidence[:, layer])) + 1e-4 for layer in (1, 3)}
    sim = exits.simulate_exits(predictions, examples, "linear-simlens", thresholds, min_layer=1)
    assert set(sim["exit_layer"]) <= {1, 3, 4} and len(set(sim["exit_layer"])) > 1
    encoded, start_id = exits.encoded_examples_of(run, tiny_rotary.tokenizer)
    executor = exits.SimExitExecutor(tiny_rotary, lens, thresholds, "linear-simlens", min_layer=1, pad_id=start_id)
    got = executor.run(encoded, 5).frame().set_index("example_index").loc[sim["example_index"]]
    assert got["exit_layer"].tolist() == sim["exit_layer"].tolist()
    assert got["decision"].tolist() == sim["decision"].tolist()


@pytest.mark.slow
def test_executor_on_the_embedded_model(small_run, embedded):
    """The logit-lens policy on a real model (the shared small run has logit lens and SimLens)."""
    model, _ = embedded
    run = store.open_run(small_run)
    predictions, examples = run.predictions(), run.examples()
    data = exits.prepare_exits(predictions, examples, "logit", "simlens", min_layer=10)
    tau = between_entropies(data, 0.5)
    sim = exits.simulate_exits(predictions, examples, "logit", tau, "simlens", min_layer=10)
    assert 0 < (sim["exit_layer"] < data.n_layers).sum() < len(sim)
    encoded, start_id = exits.encoded_examples_of(run, model.tokenizer)
    executor = exits.SimExitExecutor(model, None, tau, "logit", "simlens", min_layer=10, pad_id=start_id)
    got = executor.run(encoded, 4).frame().set_index("example_index").loc[sim["example_index"]]
    assert got["exit_layer"].tolist() == sim["exit_layer"].tolist()
    assert got["decision"].tolist() == sim["decision"].tolist()


def test_measure_speedup_reports_both_speedups(tiny_exit_run, tiny_rotary):
    run_path, lens = tiny_exit_run
    run = store.open_run(run_path)
    encoded, start_id = exits.encoded_examples_of(run, tiny_rotary.tokenizer, limit=6)
    executor = exits.SimExitExecutor(tiny_rotary, lens, 10.0, "linear-simlens", min_layer=2, pad_id=start_id)
    rows = exits.measure_speedup(tiny_rotary, encoded, executor, batch_sizes=(1, 3), repeats=1, warmup=0)
    assert [r["batch_size"] for r in rows] == [1, 3]
    for row in rows:
        # entropy over 4 candidates is at most log 4 < 10: everyone exits at layer 2
        assert row["mean_exit_layer"] == 2.0
        lengths = [len(e.tokens) for e in encoded]
        map_cost = lens.config.map_cost
        expected = sum(4 * t for t in lengths) / sum(2 * t + 2 * 2 + map_cost for t in lengths)
        assert row["layer_token_speedup"] == pytest.approx(expected)
        assert row["full_seconds"] > 0 and row["exit_seconds"] > 0
    # batch size 1 carries the attainable bound: every example exits at 2 of 4 layers, so the
    # prompt half of the full time plus one measured continuation from layer 2 per example
    bs1 = rows[0]
    cont = bs1["continuation_seconds"]
    assert list(cont) == ["2"] and cont["2"] > 0
    ideal = bs1["full_seconds"] / 2 + len(encoded) * cont["2"]
    assert bs1["attainable_exit_seconds"] == pytest.approx(ideal)
    assert bs1["attainable_wall_clock_speedup"] == pytest.approx(bs1["full_seconds"] / ideal)
    assert "attainable_wall_clock_speedup" not in rows[1]


def test_executor_refuses_what_it_cannot_run(tiny_rotary):
    with pytest.raises(LensbenchError, match="needs a fitted Linear SimLens"):
        exits.SimExitExecutor(tiny_rotary, None, 0.5, "linear-simlens")
    with pytest.raises(LensbenchError, match="executor runs"):
        exits.SimExitExecutor(tiny_rotary, None, 0.5, "oracle")


def test_cuda_graphs_are_refused_off_cuda(tiny_exit_run, tiny_rotary):
    _, lens = tiny_exit_run
    with pytest.raises(LensbenchError, match="CUDA device"):
        exits.SimExitExecutor(tiny_rotary, lens, 0.5, cuda_graphs=True)
    assert exits.SimExitExecutor(tiny_rotary, lens, 0.5).cuda_graphs is False  # auto: off on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (run on a GPU machine)")
def test_cuda_graph_executor_decides_as_the_eager_one(tiny_exit_run, tiny_rotary):
    import copy

    from lensbench.continuation import GraphedContinuation, continue_slots
    from lensbench.readout import ReadoutPoint

    run_path, lens = tiny_exit_run
    model = copy.deepcopy(tiny_rotary).to("cuda")
    assert str(model.cfg.device).startswith("cuda")
    run = store.open_run(run_path)
    data = exits.prepare_exits(run.predictions(), run.examples(), "linear-simlens")
    tau = between_entropies(data, 0.5)
    encoded, start_id = exits.encoded_examples_of(run, model.tokenizer)
    eager = exits.SimExitExecutor(model, lens, tau, pad_id=start_id, cuda_graphs=False).run(encoded, 3)
    graphed = exits.SimExitExecutor(model, lens, tau, pad_id=start_id)
    assert graphed.cuda_graphs
    got = graphed.run(encoded, 3)
    assert graphed._graphs, "the graphed path was not taken"
    assert got.exit_layer == eager.exit_layer and got.decision == eager.decision
    captured = next(iter(graphed._graphs.values()))  # captured under inference mode, replayed outside it
    assert captured.run(torch.randn(captured.n, 2, model.cfg.d_model, device="cuda"), 1).shape == (captured.n, model.cfg.d_model)
    z = torch.randn(2, 2, model.cfg.d_model, device="cuda")
    runner = GraphedContinuation(model, 2)
    for layer in range(model.cfg.n_layers):
        want, _ = continue_slots(model, z, [ReadoutPoint(layer, "pre", model.cfg.n_layers)] * 2)
        torch.testing.assert_close(runner.run(z, layer), want, rtol=1e-4, atol=1e-4)
