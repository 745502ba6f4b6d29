"""Sharding across processes: `lensbench eval --num-processes 2` (two CPU processes on gloo,
through torchrun and accelerate's process group) writes one run identical to a
single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from lensbench.models import load_model
from lensbench.runner import EvalConfig, run_eval

ARGS = dict(model="random:tiny-rotary:1", task="capitals", lenses="logit,simlens", ablations="drop-s,a=swap", limit=10)


def _cli(out, *extra) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "lensbench", "eval", "--model", ARGS["model"], "--task", ARGS["task"],
            "--lenses", ARGS["lenses"], "--ablations", ARGS["ablations"], "--limit", str(ARGS["limit"]),
            "--batch-size", "3", "--out", str(out), "--quiet", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_process_run_equals_single_process_run(tmp_path):
    """Two threads on both sides (whatever the machine's cores): the workers compute with the
    launcher's --threads, not with the OMP_NUM_THREADS=1 of their environment, so the tables
    agree bit for bit."""
    model, info = load_model(ARGS["model"])
    single = run_eval(EvalConfig(out=str(tmp_path / "single"), batch_size=3, threads=2, **ARGS), model, info,
                      progress=False)

    sharded = tmp_path / "sharded"
    proc = _cli(sharded, "--num-processes", "2", "--threads", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]

    manifest = json.loads((sharded / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["processes"] == 2
    assert manifest["threads"] == 2 and json.loads((single / "manifest.json").read_text())["threads"] == 2
    assert manifest["fingerprint"] == json.loads((single / "manifest.json").read_text())["fingerprint"]
    # 10 examples in batches of 3: 4 parts, two written by each rank
    assert len(list((sharded / "parts").glob("part-*.parquet"))) == 4
    assert pq.read_table(sharded / "predictions.parquet").equals(pq.read_table(single / "predictions.parquet"))
    assert pq.read_table(sharded / "examples.parquet").equals(pq.read_table(single / "examples.parquet"))
    assert json.loads((sharded / "summary.json").read_text()) == json.loads((single / "summary.json").read_text())
    a, b = load_file(str(single / "attention.safetensors")), load_file(str(sharded / "attention.safetensors"))
    assert all(torch.equal(a[k].nan_to_num(-1), b[k].nan_to_num(-1)) for k in a)



@pytest.mark.slow
def test_refusal_reaches_every_rank(tmp_path):
    """A folder that holds something else is refused once, by all ranks, without a hang."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("not a run")
    proc = _cli(out, "--num-processes", "2")
    assert proc.returncode != 0
    assert "is not a lensbench run" in proc.stderr
