"""`lensbench icl`: a small end-to-end run on the embedded model, the run folder's conventions
(resume, interrupt, --overwrite), the report, fast = hooks for whole measurements, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lensbench.commands import main
from lensbench.icl import measure, runner
from lensbench.icl.runner import ICLConfig, run_icl
from lensbench.store import open_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory, embedded):
    model, info = embedded
    out = tmp_path_factory.mktemp("icl") / "run"
    cfg = ICLConfig(out=str(out), model="smollm2-135m", task="antonyms", shots=3, queries=4, donors=3,
                    batch_size=2, points="0,5,10,20,29,30", with_separator=True)
    return run_icl(cfg, model=model, model_info=info, progress=False)


def test_end_to_end_on_the_embedded_model(embedded_run):
    run = open_run(embedded_run)
    assert run.status == "complete" and run.manifest["kind"] == "icl"
    for name in ("queries", "predictions", "convergence", "decode", "attention"):
        assert (embedded_run / f"{name}.parquet").exists()
    s = run.summary()
    assert s["n_queries"] == 4 and s["final_layer"] == 30
    assert {"few-shot/logit", "few-shot/simlens", "zero-shot/logit", "baseline/logit", "global/output",
            "local/output", "local+sep/output"} <= set(s["accuracy"])
    pred = pd.read_parquet(embedded_run / "predictions.parquet")

    def decisions(condition, lens, layer):
        f = pred[(pred.condition == condition) & (pred.lens == lens) & (pred.layer == layer)]
        return f.sort_values("query_index")["decision"].to_numpy()

    # patching every label position at point 0 turns the baseline prompt into the few-shot one;
    # patching them at the output changes nothing of the last position
    assert (decisions("local", "output", 0) == decisions("few-shot", "logit", 30)).all()
    assert (decisions("local", "output", 30) == decisions("baseline", "logit", 30)).all()
    assert (decisions("few-shot", "simlens", 30) == decisions("few-shot", "logit", 30)).all()
    assert len(set(decisions("global", "output", 30))) == 1  # the same vector for every query
    conv = pd.read_parquet(embedded_run / "convergence.parquet")
    assert conv["within"].between(-1, 1).all() and len(conv) == 4 * 6
    att = pd.read_parquet(embedded_run / "attention.parquet")
    sums = att.groupby(["query_index", "block"])["mean_heads"].sum()
    assert np.allclose(sums, 1, atol=1e-4)  # the five targets partition the prompt
    dec = pd.read_parquet(embedded_run / "decode.parquet")
    assert set(dec["lens"]) == {"logit", "simlens"} and len(dec) == 2 * 4 * 3 * 6


def test_report_understands_an_icl_run(embedded_run, capsys):
    assert main(["report", str(embedded_run)]) == 0
    out = capsys.readouterr().out
    assert "ICL run: task antonyms (rule)" in out and "local patch, best layer" in out
    report = json.loads((embedded_run / "report.json").read_text())
    assert report["kind"] == "icl" and "few-shot" in report["headline"]


def test_fast_path_equals_hooks_for_a_batch(tiny_rotary):
    from lensbench.icl.patching import patch_points
    from lensbench.icl.tasks import build_prompts, label_token_ids, load_icl_task
    from lensbench.tasks import start_token_id

    model = tiny_rotary
    task = load_icl_task("sport-instrument-body")
    tok = model.tokenizer
    ids = label_token_ids(task, tok)
    start = start_token_id(tok)
    prompts = build_prompts(task, tok, start, ids, 3, 4, seed=2)
    donors = build_prompts(task, tok, start, ids, 3, 4, seed=2, stream="donor")
    points = patch_points(model, "pre")
    vectors = measure.donor_vectors(model, points, donors, 0)
    fast = measure.measure_batch(measure.Setup(model, points, torch.tensor(ids), 0, vectors, with_separator=True), prompts)
    naive = measure.measure_batch(measure.Setup(model, points, torch.tensor(ids), 0, vectors, with_separator=True,
                                                fast=False), prompts)
    for condition in ("global", "local", "local+sep"):
        assert torch.equal(fast[condition][0], naive[condition][0])
        assert torch.allclose(fast[condition][1], naive[condition][1], atol=1e-4)


def cli(out, *extra):
    return main(["icl", "--model", "random:tiny-rotary:1", "--task", "animal-fruit", "--shots", "4", "--queries", "6",
                 "--donors", "3", "--batch-size", "2", "--out", str(out), "--quiet", *extra])


def test_interrupt_resume_and_overwrite(tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    assert cli(ref) == 0
    out = tmp_path / "run"
    real = runner.measure_batch
    calls = {"n": 0}

    def flaky(setup, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(setup, batch)

    monkeypatch.setattr(runner, "measure_batch", flaky)
    assert cli(out) == 130  # Ctrl-C: exit 130, the finished batch kept
    assert "Run the same command to resume" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert len(list((out / "parts").glob("part-*-predictions.parquet"))) == 1
    monkeypatch.setattr(runner, "measure_batch", real)
    assert cli(out) == 0
    assert open_run(out).status == "complete"
    for name in ("predictions", "convergence", "decode", "attention"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"), pd.read_parquet(ref / f"{name}.parquet"))
    # a different run is refused; --overwrite removes only lensbench's files
    (out / "notes.txt").write_text("mine")
    assert cli(out, "--seed", "1") == 2
    assert "holds a different run" in capsys.readouterr().err
    assert cli(out, "--seed", "1", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and open_run(out).manifest["config"]["seed"] == 1


@pytest.mark.parametrize("extra, rows, message", [
    (["--task", "no-such-task"], None, "unknown ICL task 'no-such-task'"),
    ([], [{"input": f"w{i}", "label": "foo" if i % 2 else "Qzxvwkj"} for i in range(20)], "tokens for this tokenizer"),
    (["--kind", "categorization"], [{"input": f"w{i}", "label": "foo"} for i in range(20)] + [{"input": "z", "label": "bar"}],
     "label 'bar' has 1 item"),
    (["--points", "99"], None, "--points: no point 99"),
])
def test_bad_input_is_one_line_before_compute(tmp_path, capsys, extra, rows, message):
    argv = ["icl", "--model", "random:tiny-rotary:1", "--out", str(tmp_path / "out"), "--quiet"]
    if rows is not None:
        path = tmp_path / "mine.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        argv += ["--task", str(path)]
    elif "--task" not in extra:
        argv += ["--task", "antonyms"]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lensbench: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_list(capsys):
    assert main(["icl", "--list"]) == 0
    out = capsys.readouterr().out
    assert "antonyms" in out and "categorization" in out
