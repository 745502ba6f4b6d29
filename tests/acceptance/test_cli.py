"""`lensbench eval` as a user runs it: files, the final-layer invariant, bad input, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lensbench.runner import EvalConfig, run_eval
from lensbench.store import open_run

REPO = Path(__file__).resolve().parents[2]


def lensbench(*args, timeout=600, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "lensbench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO, **kwargs)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """A user's JSONL file: ten built-in examples written out."""
    from lensbench.tasks import load_task

    path = tmp_path_factory.mktemp("task") / "capitals10.jsonl"
    with path.open("w") as f:
        for ex in load_task("capitals")[:10]:
            f.write(json.dumps({"id": ex.id, "prompt": ex.prompt, "choices": ex.choices, "gold": ex.gold}) + "\n")
    return path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, task_file):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = lensbench("eval", "--model", "smollm2-135m", "--task", str(task_file), "--lenses", "logit,simlens",
                       "--ablations", "drop-s,drop-a", "--out", str(out), "--batch-size", "4", "--quiet")
    assert result.returncode == 0, result.stderr
    return out, result


def test_eval_writes_the_documented_files(cli_run):
    out, result = cli_run
    for name in ("manifest.json", "predictions.parquet", "summary.json", "examples.parquet", "attention.safetensors"):
        assert (out / name).exists(), name
    run = open_run(out)
    manifest = run.manifest
    assert manifest["status"] == "complete"
    assert manifest["model"]["spec"] == "smollm2-135m" and len(manifest["model"]["source_sha256"]) == 64
    assert manifest["start_token"]["text"] == "<|im_start|>"
    assert set(manifest["versions"]) >= {"lensbench", "transformer_lens", "torch"}
    assert manifest["started"] and manifest["finished"]
    preds = run.predictions()
    required = {"example_id", "lens", "layer", "decision", "gold", "correct", "final_decision", "agrees_final",
                "entropy", "candidate_logprobs", "topk_tokens", "topk_probs"}
    assert required <= set(preds.columns)
    assert set(preds["lens"]) == {"logit", "simlens", "simlens[drop-s]", "simlens[drop-a]"}
    assert len(preds) == 10 * 4 * 31
    assert all(len(t) == 5 for t in preds["topk_tokens"])
    # The printed table is the summary's numbers.
    summary = run.summary()
    assert "final model accuracy" in result.stdout
    assert summary["lenses"]["logit"]["layer"] == list(range(31))


def test_last_readout_point_is_the_models_own_decision(cli_run, embedded, task_file):
    """At l = L every lens equals the model's decision, checked against a plain forward."""
    import torch

    from lensbench.tasks import encode_examples, load_jsonl, start_token_id

    out, _ = cli_run
    model, _ = embedded
    preds = open_run(out).predictions()
    # drop-[a] reads out at [s] (the prompt-independent prior), so it is not the model there.
    last = preds[(preds["layer"] == 30) & (preds["lens"] != "simlens[drop-a]")]
    assert set(last["lens"]) == {"logit", "simlens", "simlens[drop-s]"}
    assert (last["decision"] == last["final_decision"]).all()
    assert last["agrees_final"].all()
    encoded, _ = encode_examples(load_jsonl(task_file), model.tokenizer, start_token_id(model.tokenizer), 4096)
    for ex in encoded:
        logits = model(torch.tensor([ex.tokens]))[0, -1]
        own = int(logits[ex.candidate_ids].argmax())
        rows = last[last["example_id"] == ex.id]
        assert (rows["decision"] == own).all(), ex.id
    # fidelity is 1 at the last point, and accuracy there is the final accuracy
    summary = open_run(out).summary()
    for lens in ("logit", "simlens", "simlens[drop-s]"):
        assert summary["lenses"][lens]["fidelity"][-1] == 1.0, lens
        assert summary["lenses"][lens]["accuracy"][-1] == summary["final_accuracy"], lens


def test_batched_equals_one_at_a_time(tmp_path, embedded):
    model, info = embedded
    common = dict(model="smollm2-135m", task="capitals", lenses="logit,simlens", ablations="drop-a,a=swap", limit=6)
    batched = run_eval(EvalConfig(out=str(tmp_path / "b"), batch_size=6, **common), model, info, progress=False)
    single = run_eval(EvalConfig(out=str(tmp_path / "s"), batch_size=1, **common), model, info, progress=False)
    a, b = open_run(batched).predictions(), open_run(single).predictions()
    assert list(a["decision"]) == list(b["decision"])
    assert (a["entropy"] - b["entropy"]).abs().max() < 1e-3
    flat_a = [x for row in a["candidate_logprobs"] for x in row]
    flat_b = [x for row in b["candidate_logprobs"] for x in row]
    assert max(abs(x - y) for x, y in zip(flat_a, flat_b)) < 1e-3


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model"),
    (["--task", "no-such-task"], "unknown task"),
    (["--task", "/nonexistent.jsonl"], "task file not found"),
    (["--device", "cuda"], "not available"),
    (["--lenses", "logit,bogus"], "unknown lens"),
    (["--ablations", "x=1"], "bad ablation"),
    (["--batch-size", "0"], "positive integer"),
    (["--limit", "-3"], "positive integer"),
    (["--cuda-graphs", "on"], "needs one CUDA device"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, args, message):
    result = lensbench("eval", "--out", str(tmp_path / "r"), "--quiet", *args, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r" / "predictions.parquet").exists()


def test_bad_task_file_line_is_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x", "choices": [" a", " b"], "gold": 0}\n{"id": "b", "prompt": "x"}\n')
    result = lensbench("eval", "--task", str(bad), "--out", str(tmp_path / "r"), "--quiet", timeout=300)
    assert result.returncode == 2 and f"{bad}:2" in result.stderr and "Traceback" not in result.stderr


def test_multi_token_candidate_stops_before_compute(tmp_path):
    bad = tmp_path / "multi.jsonl"
    bad.write_text('{"id": "q1", "prompt": "The capital of France is", "choices": [" Paris", " Ouagadougou-sur-mer"], "gold": 0}\n')
    result = lensbench("eval", "--task", str(bad), "--out", str(tmp_path / "r"), "--quiet", timeout=300)
    assert result.returncode == 2 and "'q1'" in result.stderr and "Ouagadougou" in result.stderr
    assert not (tmp_path / "r").exists()


def test_a_different_run_is_not_overwritten(tmp_path, embedded):
    model, info = embedded
    out = tmp_path / "r"
    run_eval(EvalConfig(out=str(out), task="capitals", limit=2), model, info, progress=False)
    with pytest.raises(Exception, match="holds a different run"):
        run_eval(EvalConfig(out=str(out), task="capitals", limit=3), model, info, progress=False)
    run_eval(EvalConfig(out=str(out), task="capitals", limit=3, overwrite=True), model, info, progress=False)
    assert open_run(out).manifest["n_examples"] == 3


def test_sigterm_then_resume_gives_the_uninterrupted_files(tmp_path, embedded):
    """Kill a run with SIGTERM after its first batch; the same command resumes, and the
    finished files equal an uninterrupted run's."""
    model, info = embedded
    args = ["eval", "--task", "capitals", "--lenses", "logit,simlens", "--ablations", "drop-s", "--limit", "12",
            "--batch-size", "2", "--quiet"]
    out = tmp_path / "interrupted"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "lensbench", *args, "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def finished_parts():
        return list((out / "parts").glob("part-*.parquet")) if (out / "parts").exists() else []

    deadline = time.time() + 300
    while time.time() < deadline and not finished_parts() and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.fail("the run finished before it could be interrupted; make it longer")
    assert proc.returncode == 130, stderr
    assert "resume" in stderr and "Traceback" not in stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    n_parts = len(list((out / "parts").glob("part-*.parquet")))
    assert 1 <= n_parts < 6
    resumed = lensbench(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    reference = run_eval(EvalConfig(out=str(tmp_path / "whole"), task="capitals", lenses="logit,simlens",
                                    ablations="drop-s", limit=12, batch_size=2), model, info, progress=False)
    got, want = open_run(out).predictions(), open_run(reference).predictions()
    pd.testing.assert_frame_equal(got, want, check_exact=False, atol=1e-5)
    assert open_run(out).summary() == open_run(reference).summary()
    assert open_run(out).manifest["status"] == "complete"


def test_keyboard_interrupt_in_process_keeps_finished_batches(tmp_path, embedded, monkeypatch):
    import lensbench.evaluate as evaluate

    model, info = embedded
    cfg = EvalConfig(out=str(tmp_path / "r"), task="capitals", limit=8, batch_size=2)
    real = evaluate.evaluate_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, model, info, progress=False)
    assert len(list((tmp_path / "r" / "parts").glob("part-*.parquet"))) == 2
    monkeypatch.setattr(evaluate, "evaluate_batch", real)
    run_eval(cfg, model, info, progress=False)
    preds = open_run(tmp_path / "r").predictions()
    assert sorted(preds["example_index"].unique()) == list(range(8))
    assert len(preds) == 8 * 31
