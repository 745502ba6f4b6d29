"""The live probe (`lensbench.probe`): the rows a stored run holds for the same prompt, in memory,
with nothing of one probe reaching the next; and the position grid agrees with it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lensbench.errors import LensbenchError
from lensbench.probe import Prober, answer_attention
from lensbench.store import open_run
from lensbench.trajectory import position_grid

FLOATS = ["entropy", "candidate_logprobs", "topk_probs"]


@pytest.fixture(scope="module")
def prober(embedded):
    model, _ = embedded
    return Prober(model, "smollm2-135m")


def _same(stored: pd.DataFrame, probed: pd.DataFrame) -> None:
    stored, probed = stored.reset_index(drop=True), probed.reset_index(drop=True)
    assert list(probed.columns) == list(stored.columns)
    assert len(probed) == len(stored)
    for column in stored.columns:
        a, b = stored[column].tolist(), probed[column].tolist()
        if column in FLOATS:
            assert np.allclose(np.array(a, dtype=float), np.array(b, dtype=float), atol=2e-4), column
        elif column == "topk_tokens" or column == "topk_ids":
            agree = np.mean([x[:2] == y[:2] for x, y in zip(a, b)])
            assert agree > 0.95, column  # the top of the list; near-ties further down may swap
        else:
            assert [list(x) if hasattr(x, "__len__") and not isinstance(x, str) else x for x in a] == \
                   [list(y) if hasattr(y, "__len__") and not isinstance(y, str) else y for y in b], column


def test_probe_rows_equal_a_stored_run(small_run, prober):
    run = open_run(small_run)
    examples = run.examples()
    lenses = ["logit", "simlens", "simlens[drop-s]", "simlens[drop-a]"]
    stored = run.predictions(lenses=lenses)
    for _, example in examples.iloc[[0, 5]].iterrows():
        result = prober.probe(example["prompt"], list(example["choices"]), int(example["gold"]), ["logit", "simlens"],
                              ["drop-s", "drop-a"], example_id=example["example_id"], index=int(example["example_index"]))
        _same(stored[stored["example_index"] == example["example_index"]], result.predictions)
        row = result.example
        for column in ("example_id", "prompt", "gold", "n_tokens", "start_token", "answer_token"):
            assert row[column] == example[column], column
        assert list(row["choices"]) == list(example["choices"])


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory, embedded):
    """A run of 3 examples one per batch on one thread (the probe's thread count) with every
    lens the probe offers: a Linear SimLens and a tuned lens (closed-form fits on 8 examples),
    SimLens with [s] and [a] dropped; and the fitted folders."""
    from lensbench.commands import main
    from lensbench.runner import EvalConfig, run_eval

    model, info = embedded
    root = tmp_path_factory.mktemp("exact")
    folders = []
    for target in ("simlens", "final"):
        folder = root / target
        assert main(["fit-linear", "--model", "smollm2-135m", "--task", "capitals", "--limit", "8", "--objective", "lstsq",
                     "--target", target, "--out", str(folder), "--threads", "1", "--quiet"]) == 0
        folders.append(str(folder))
    cfg = EvalConfig(out=str(root / "run"), model="smollm2-135m", task="capitals", limit=3, batch_size=1, threads=1,
                     lenses="logit,simlens,linear-simlens,tuned", ablations="drop-s,drop-a", linear=folders)
    return run_eval(cfg, model=model, model_info=info, progress=False), folders


def _plain(values: list) -> list:
    return [list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v for v in values]


def test_probe_rows_are_a_stored_run_of_one_example_per_batch_exactly(exact_run, embedded):
    """What the runner computes for a batch of one, the probe computes for its prompt: every
    lens, every column, bit for bit (floats included, whatever the pinned tokens)."""
    path, folders = exact_run
    model, _ = embedded
    run = open_run(path)
    stored = run.predictions()
    prober = Prober(model, "smollm2-135m", linear_dirs=folders)
    assert prober.available() == ["logit", "simlens", "linear-simlens", "tuned"]
    assert set(stored["lens"]) == {"logit", "simlens", "linear-simlens", "tuned", "simlens[drop-s]", "simlens[drop-a]"}
    for _, example in run.examples().iterrows():
        result = prober.probe(example["prompt"], list(example["choices"]), int(example["gold"]), prober.available(),
                              ["drop-s", "drop-a"], pinned=[" Paris"], example_id=example["example_id"],
                              index=int(example["example_index"]))
        ours = stored[stored["example_index"] == example["example_index"]].reset_index(drop=True)
        probed = result.predictions
        assert list(probed.columns) == list(ours.columns)
        assert len(probed) == len(ours) == 6 * 31
        for column in ours.columns:
            assert _plain(probed[column].tolist()) == _plain(ours[column].tolist()), column
        for column in ("example_id", "prompt", "gold", "n_tokens", "start_token", "answer_token"):
            assert result.example[column] == example[column], column


def test_probes_leave_nothing_behind(prober):
    """A probe after another equals the same probe on its own (a data-set-mean ablation would
    carry the previous prompt if the context were kept)."""
    a = ("The capital of Italy is", [" Rome", " Paris"], 0)
    b = ("Q: What is the capital of Spain?\nA:", [" Madrid", " Lisbon", " Rome"], 0)
    args = (["logit", "simlens"], ["drop-s", "s=mean"])
    first = prober.probe(*a, *args).predictions
    prober.probe(*b, *args)
    again = prober.probe(*a, *args).predictions
    pd.testing.assert_frame_equal(first, again)


def test_probe_messages_and_pins(prober):
    with pytest.raises(LensbenchError, match=r"' Buenos' \+ ' Aires'.*single token") as caught:
        prober.probe("Capital of Argentina:", [" Buenos Aires", " Lima"], 0, ["logit"])
    assert "--skip-invalid" not in str(caught.value)
    with pytest.raises(LensbenchError, match="swap"):
        prober.probe("Capital of Peru:", [" Lima", " Rome"], 0, ["simlens"], ["a=swap"])
    result = prober.probe("The capital of France is", [" Paris", " Rome"], None, ["logit", "simlens"], pinned=[" Paris"])
    assert (result.predictions["gold"] == -1).all() and not result.predictions["correct"].any()
    pinned = result.tracked[" Paris"]
    final = result.predictions[result.predictions["layer"] == result.predictions["layer"].max()]
    top1 = final.iloc[0]["topk_tokens"][0]
    assert (pinned["simlens"]["rank"][-1] == 1) == (top1 == " Paris")
    assert pinned["logit"]["prob"][-1] == pytest.approx(pinned["simlens"]["prob"][-1], rel=1e-4)
    attention = answer_attention(prober.model, result.tokens)
    assert attention.shape == (30, 9, len(result.tokens)) and np.allclose(attention.sum(-1), 1, atol=1e-4)


def test_position_grid_agrees_with_the_probe(prober):
    result = prober.probe("Q: What is the capital of France?\nA:", [" Paris", " Rome"], 0, ["logit", "simlens"])
    for lens in prober.lenses(("logit", "simlens")):
        grid = position_grid(prober.model, result.tokens, lens, prober.points)
        rows = result.predictions[result.predictions["lens"] == lens.name].sort_values("layer")
        # the grid's last position is the probe's [a]
        assert np.allclose(np.stack(rows["topk_probs"].to_list()), grid.top_probs[:, -1], atol=2e-4)
        assert grid.top_ids.shape[:2] == (31, len(result.tokens))
        assert np.allclose(grid.kl_final[-1], 0, atol=1e-5)  # the final layer is the model's own output


def test_the_prior_is_computed_once(prober, monkeypatch):
    """SimLens with [a] dropped reads only the start token's states, the same for every prompt:
    a second probe reuses its continuation (compared exactly) and stores the same rows."""
    import lensbench.lenses.simlens as simlens

    calls = []
    original = simlens.continue_slots
    monkeypatch.setattr(simlens, "continue_slots", lambda *a, **k: calls.append(a[1].shape) or original(*a, **k))
    first = prober.probe("The capital of Italy is", [" Rome", " Paris"], 0, ["simlens"], ["drop-a"]).predictions
    second = prober.probe("Q: The capital of Spain?\nA:", [" Madrid", " Rome"], 0, ["simlens"], ["drop-a"]).predictions
    prior = [shape for shape in calls if shape[1] == 1]  # the one-slot [s] continuations
    assert len(prior) <= 1
    a, b = (f[f["lens"] == "simlens[drop-a]"] for f in (first, second))
    assert np.allclose(np.stack(a["topk_probs"].to_list()), np.stack(b["topk_probs"].to_list()))
