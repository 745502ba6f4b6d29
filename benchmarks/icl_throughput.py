"""Throughput of `lensbench icl`'s measurements: queries per second of the fast batched path
(and, with --naive, of the TransformerLens hook reference) at every patch point, and the time
200 queries would take at that rate.

    python benchmarks/icl_throughput.py --model qwen2.5-coder-0.5b --queries 16 [--naive]

Prints figures, asserts nothing. The whole measurement of a batch is timed (three forward
passes, readouts, global and local patching at every point, convergence, decoding, attention);
the donor pass (once per run) is timed separately.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lensbench.icl.measure import Setup, donor_vectors, measure_batch  # noqa: E402
from lensbench.icl.patching import patch_points  # noqa: E402
from lensbench.icl.tasks import build_prompts, label_token_ids, load_icl_task  # noqa: E402
from lensbench.models import load_model  # noqa: E402
from lensbench.tasks import pad_token_id, start_token_id  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="antonyms")
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--donors", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lenses", default="logit,simlens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--naive", action="store_true", help="also time the hook reference on one batch")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model, _ = load_model(args.model, args.device)
    tok = model.tokenizer
    task = load_icl_task(args.task)
    ids = label_token_ids(task, tok)
    start = start_token_id(tok)
    pad = pad_token_id(tok, start)
    prompts = build_prompts(task, tok, start, ids, args.queries, args.shots)
    donors = build_prompts(task, tok, start, ids, args.donors, args.shots, stream="donor")
    points = patch_points(model)
    t = time.perf_counter()
    vectors = donor_vectors(model, points, donors, pad, args.batch_size)
    donor_s = time.perf_counter() - t
    lenses = tuple(args.lenses.split(","))
    setup = Setup(model, points, torch.tensor(ids), pad, vectors, lenses)
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), args.batch_size):
        measure_batch(setup, prompts[i : i + args.batch_size])
    fast_s = time.perf_counter() - t
    cpu_s = time.process_time() - cpu
    rate = len(prompts) / fast_s
    mean_len = sum(p.length for p in prompts) / len(prompts)
    print(f"model {args.model}: {model.cfg.n_layers} layers, {len(points)} patch points, task {args.task}, "
          f"{args.shots} shots ({mean_len:.0f} tokens per prompt), lenses {args.lenses}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"donor pass ({args.donors} prompts): {donor_s:.1f} s")
    print(f"fast path: {len(prompts)} queries in {fast_s:.1f} s = {rate:.3f} queries/s; "
          f"200 queries x all points: {200 / rate / 60:.1f} min (+ the donor pass)")
    # On a shared machine the wall clock includes waiting for the CPU; the process's CPU time
    # divided by its threads is what the same work takes when the cores are its own.
    per_query = cpu_s / len(prompts)
    print(f"CPU time: {per_query:.1f} CPU-s per query; with {torch.get_num_threads()} free cores: "
          f"200 queries x all points in about {200 * per_query / torch.get_num_threads() / 60:.1f} min")
    if args.naive:
        naive = Setup(model, points, torch.tensor(ids), pad, vectors, lenses, fast=False)
        batch = prompts[: args.batch_size]
        t = time.perf_counter()
        measure_batch(naive, batch)
        naive_s = time.perf_counter() - t
        print(f"hook reference: {len(batch)} queries in {naive_s:.1f} s = {len(batch) / naive_s:.3f} queries/s "
              f"(fast path {naive_s / len(batch) * rate:.1f}x faster)")


if __name__ == "__main__":
    main()
