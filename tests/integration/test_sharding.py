"""Sharding across processes: `lensbench eval --num-processes 2` (two CPU processes on gloo,
through torchrun and accelerate's process group) writes one run identical to a
single-process run at the same thread count; a signal to the launcher stops every worker, and
an error is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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


def _processes_of(out) -> list:
    """Live processes whose command line names the run folder `out` (launcher, torchrun, workers)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(out) in " ".join(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _kill_processes_of(out) -> None:
    import psutil

    procs = _processes_of(out)
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


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
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lensbench: error:") and "is not a lensbench run" in lines[0], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_before_any_worker(tmp_path):
    proc = _cli(tmp_path / "run", "--num-processes", "2", "--device", "cuda")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "lensbench: error: device 'cuda' is not available on this machine (no CUDA); use --device cpu"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_worker(tmp_path):
    """SIGTERM to `--num-processes 2` once a batch is written: exit 130 with one line, no worker
    left running, no part written afterwards; the workers computed with the launcher's thread
    count (its environment sets none: torchrun alone would give them 1)."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "lensbench", "eval", "--model", ARGS["model"], "--task", "capitals",
            "--lenses", "logit,simlens", "--ablations", "drop-s,drop-a,a=swap,s=zero", "--batch-size", "1",
            "--num-processes", "2", "--out", str(out), "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    threads = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                                 capture_output=True, text=True, timeout=120, check=True).stdout)
    parts = lambda: sorted((out / "parts").glob("part-*.parquet")) if (out / "parts").exists() else []  # noqa: E731
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not parts() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be interrupted:\n{proc.stderr.read()[-3000:]}"
        assert parts(), "no batch finished in time"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 130, stderr[-3000:]
        assert stderr.strip().splitlines() == [
            f"lensbench: interrupted; finished batches are kept in {out}. Run the same command to resume."
        ]
        assert _processes_of(out) == [], "processes left running after the launcher exited"
        kept = parts()
        time.sleep(3)
        assert parts() == kept, "a part was written after the launcher exited"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "interrupted"
        assert manifest["threads"] == threads
        assert len(kept) < manifest["n_examples"]
    finally:
        proc.kill()
        proc.communicate()
        _kill_processes_of(out)
