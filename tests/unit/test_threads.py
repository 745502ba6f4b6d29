"""`EvalConfig.threads` / `eval --threads`: the run computes with that many intra-op threads,
records the count in its manifest, gives the caller's count back, and keeps the count out of
the run's identity (a run resumes under another count)."""

from __future__ import annotations

import json

import pytest
import torch

from lensbench import evaluate, runner
from lensbench.errors import LensbenchError
from lensbench.runner import EvalConfig

COMMON = dict(model="random:tiny-rotary:1", task="capitals", lenses="logit", limit=4, batch_size=2)


@pytest.fixture
def three_threads():
    """The caller's count is 3 (not the machine's, not run_eval's), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seen_threads(monkeypatch) -> list[int]:
    """torch's thread count at each batch the runner evaluates."""
    seen, real = [], evaluate.evaluate_batch

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_batch", spy)
    return seen


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_run_computes_with_the_configured_threads_and_restores_the_callers(tmp_path, tiny_rotary, three_threads,
                                                                            seen_threads):
    out = runner.run_eval(EvalConfig(out=str(tmp_path / "one"), threads=1, **COMMON), model=tiny_rotary, progress=False)
    assert seen_threads == [1, 1]
    assert _manifest(out)["threads"] == 1
    assert torch.get_num_threads() == 3


def test_default_is_the_callers_count(tmp_path, tiny_rotary, three_threads, seen_threads):
    out = runner.run_eval(EvalConfig(out=str(tmp_path / "default"), **COMMON), model=tiny_rotary, progress=False)
    assert seen_threads == [3, 3]
    assert _manifest(out)["threads"] == 3


def test_threads_restored_when_the_run_fails(tmp_path, tiny_rotary, three_threads):
    with pytest.raises(LensbenchError):
        runner.run_eval(EvalConfig(out=str(tmp_path / "bad"), threads=1, **dict(COMMON, lenses="nosuch")),
                        model=tiny_rotary, progress=False)
    assert torch.get_num_threads() == 3


def test_threads_must_be_positive():
    with pytest.raises(LensbenchError, match="--threads"):
        EvalConfig(out="x", threads=0).validate()


def test_a_run_resumes_under_another_thread_count(tmp_path, tiny_rotary):
    """Threads change the last bits of floats, not what the run is: resuming with another count
    (another machine) continues the run instead of refusing the folder."""
    out = runner.run_eval(EvalConfig(out=str(tmp_path / "run"), threads=1, **COMMON), model=tiny_rotary, progress=False)
    (out / "parts" / "part-000001.parquet").unlink()
    manifest = _manifest(out)
    manifest["status"] = "interrupted"
    (out / "manifest.json").write_text(json.dumps(manifest))
    runner.run_eval(EvalConfig(out=str(out), threads=2, **COMMON), model=tiny_rotary, progress=False)
    manifest = _manifest(out)
    assert manifest["status"] == "complete" and manifest["threads"] == 2 and "resumed" in manifest
