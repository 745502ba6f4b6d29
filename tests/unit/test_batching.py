"""Batch planning and out-of-memory backoff: every example evaluated exactly once."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from lensbench import evaluate, runner
from lensbench.evaluate import BatchResult, BatchSizer, evaluate_with_backoff, is_out_of_memory
from lensbench.runner import EvalConfig
from lensbench.tasks import make_batches
from lensbench.tasks import EncodedExample


def _examples(lengths: list[int]) -> list[EncodedExample]:
    return [EncodedExample(index=i, id=f"ex{i}", tokens=list(range(n)), candidate_ids=[1, 2], gold=0)
            for i, n in enumerate(lengths)]


def _fake_oom_evaluate(max_rows: int, calls: list):
    """Stands in for evaluate_batch: raises a CUDA-style OOM above `max_rows` examples."""

    def evaluate(model, lenses, ctx, batch, topk=5, entropy="candidates"):
        calls.append(len(batch))
        if len(batch) > max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return BatchResult({"example_index": [e.index for e in batch]})

    return evaluate


def test_make_batches_sorted_and_complete():
    encoded = _examples([5, 9, 3, 9, 7, 1, 4])
    batches = make_batches(encoded, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = [e.index for b in batches for e in b]
    assert sorted(flat) == list(range(7))
    assert [len(e.tokens) for b in batches for e in b] == sorted([5, 9, 3, 9, 7, 1, 4], reverse=True)
    assert flat[:2] == [1, 3]  # ties broken by index: deterministic


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(ValueError("out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_sizer_halves_then_grows_back_for_shorter_prompts():
    sizer = BatchSizer(16)
    assert sizer.rows_for(100) == 16
    sizer.shrink(16, 100)
    assert sizer.rows_for(100) == 8
    assert sizer.rows_for(50) == 16  # shorter prompts: the same token budget holds more rows
    assert sizer.rows_for(10_000) == 1


@pytest.mark.parametrize("max_rows", [1, 3, 5])
def test_backoff_loses_and_repeats_nothing(monkeypatch, max_rows):
    calls: list = []
    monkeypatch.setattr(evaluate, "evaluate_batch", _fake_oom_evaluate(max_rows, calls))
    encoded = _examples([30, 28, 28, 20, 12, 12, 11, 9, 5, 3, 2, 1])
    sizer = BatchSizer(12)
    seen = []
    for batch in make_batches(encoded, 12):
        seen += evaluate_with_backoff(None, [], None, batch, sizer).columns["example_index"]
    assert sorted(seen) == list(range(12))
    assert len(seen) == len(set(seen))
    assert sizer.backoffs >= 1
    assert max(n for n in calls if n <= max_rows) <= max_rows


def test_backoff_gives_up_on_a_single_example(monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate_batch", _fake_oom_evaluate(0, []))
    with pytest.raises(torch.OutOfMemoryError):
        evaluate_with_backoff(None, [], None, _examples([4, 3]), BatchSizer(2))


def test_other_errors_are_not_retried(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(evaluate, "evaluate_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        evaluate_with_backoff(None, [], None, _examples([4, 3]), BatchSizer(2))
    assert calls == [1]


def _rows(path) -> list[tuple]:
    frame = pq.read_table(path / "predictions.parquet").to_pandas()
    return list(zip(frame.example_index, frame.lens, frame.layer, frame.decision))


def test_auto_batch_size_with_simulated_oom_matches_plain_run(tmp_path, monkeypatch, tiny_rotary):
    """A run whose batches 'run out of memory' above 2 examples stores the same predictions."""
    common = dict(model="random:tiny-rotary:1", task="capitals", lenses="logit,simlens", ablations="drop-s,a=swap", limit=9)
    plain = runner.run_eval(EvalConfig(out=str(tmp_path / "plain"), batch_size=4, **common), model=tiny_rotary, progress=False)
    real = evaluate.evaluate_batch
    calls = []

    def flaky(model, lenses, ctx, batch, topk=5, entropy="candidates"):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, lenses, ctx, batch, topk, entropy)

    monkeypatch.setattr(evaluate, "evaluate_batch", flaky)
    auto = runner.run_eval(EvalConfig(out=str(tmp_path / "auto"), batch_size="auto", max_batch_size=4, **common),
                           model=tiny_rotary, progress=False)
    assert max(calls) == 4 and 2 in calls
    rows = _rows(auto)
    assert len(rows) == len(set(r[:3] for r in rows))  # no (example, lens, layer) twice
    assert rows == _rows(plain)
    assert json.loads((auto / "manifest.json").read_text())["batch_plan"] == {"batch_size": 4}


def test_resume_keeps_the_batch_plan(tmp_path, tiny_rotary):
    """Resuming with another --batch-size must not mix part files of two different plans."""
    common = dict(model="random:tiny-rotary:1", task="capitals", lenses="logit", limit=7)
    out = runner.run_eval(EvalConfig(out=str(tmp_path / "run"), batch_size=3, **common), model=tiny_rotary, progress=False)
    expected = _rows(out)
    (out / "parts" / "part-000001.parquet").unlink()
    (out / "predictions.parquet").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["status"] = "interrupted"
    (out / "manifest.json").write_text(json.dumps(manifest))
    runner.run_eval(EvalConfig(out=str(out), batch_size=5, **common), model=tiny_rotary, progress=False)
    assert _rows(out) == expected
    assert sorted(p.name for p in (out / "parts").glob("*.parquet")) == [f"part-00000{i}.parquet" for i in range(3)]
