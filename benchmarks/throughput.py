"""Throughput and peak memory of lensbench's evaluation, against a plain forward and a naive loop.

On one batch of a task's prompts (5-shot ARC-Easy by default) and one model, in one run:

  (a)  plain      `model(tokens)`: a plain batched HookedTransformer forward (logits at every
                  position); (a') plain-answer: the forward to the last block and the
                  unembedding of the answer position only (the least work that answers)
  (b)  sweep      `evaluate.evaluate_batch` with the logit lens and SimLens at every readout
                  point: slot gathering, continuation, readout, decisions, entropies, top-k and
                  the stored columns
  (b+) sweep+abl  the same with the SimLens slot ablations (default drop-s, drop-a)
  (c)  naive      one example at a time: a forward caching the residuals, then per readout
                  point one `model(z, start_at_layer=l)` call per SimLens variant
                  (simlens_logits_naive) and one unembedding for the logit lens; timed on a
                  few examples and given per example
  (d)  SimExit    `lensbench.exits.measure_speedup` (the SimExit executor against the full
                  model) at `--exit-batch-sizes` (default: 1 and the sweep's batch size) on
                  `--exit-examples` examples: with refill (freed slots go to waiting examples)
                  and, above batch size 1, also without (each batch until its last exit); on
                  CUDA also without CUDA graphs, and at batch size 1 the speedup attainable if
                  exit decisions were free (prompt blocks to the exit layer + the measured
                  two-token continuation). Refill needs more examples than the batch size
                  (several times as many) to show.

Prints examples/s, peak memory and the ratios; `--json PATH` writes them. CPU timings use
perf_counter; CUDA timings use CUDA events after warm-up. Peak memory on CUDA is
torch.cuda.max_memory_allocated; on CPU it is the process's resident high-water mark (VmHWM,
reset through /proc/self/clear_refs before each measurement, with glibc returning freed
blocks at once). "peak" counts the model's weights; "extra" is the peak above what was
resident before the step (activations and workspace only).

This is a benchmark that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_grad_enabled(False)
warnings.filterwarnings("ignore")

TARGETS = {  # issue 3: sweep/plain <= 1.5, naive/sweep >= 20, memory <= 1.3x; issue 6: <= 1.3, >= 20, <= 1.2x
    "sweep_over_plain": 1.3,
    "naive_over_sweep": 20.0,
    "sweep_peak_over_plain": 1.2,
    "exit_wall_vs_layer_token_bs1": 0.10,
    # issue 15, SimExit batched with refill at batch 8 and 64 on a GPU: wall-clock >= 0.8x the
    # layer-token speedup on the 7B shape, >= 1.5x the full model on the qwen-0.5B shape
    "exit_wall_over_layer_token_batched": 0.8,
    "exit_wall_clock_batched_small": 1.5,
}


# --- memory ---------------------------------------------------------------------------------------


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()
if LIBC is not None:
    LIBC.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: big blocks are mmapped, so freeing returns them


def _status_kb(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


class Memory:
    """Peak memory of one call: (peak bytes, bytes resident before)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device

    @contextlib.contextmanager
    def measure(self, box: dict):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            if LIBC is not None:
                LIBC.malloc_trim(0)
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            before = _status_kb("VmRSS") * 1024
        yield
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kb("VmHWM") * 1024
        box.update(peak=peak, before=before, extra=max(0, peak - before))


# --- timing ---------------------------------------------------------------------------------------


def timed(fn, device: str, budget: float, max_reps: int = 20, memory: Memory | None = None) -> dict:
    """Warm up once, measure peak memory on one call, then time calls until `budget` seconds
    are spent (at least one): the median seconds per call."""
    cuda = device.startswith("cuda")
    fn()  # warm-up: allocator, kernels, lazy tables
    mem: dict = {}
    if memory is not None:
        with memory.measure(mem):
            fn()
    times = []
    spent_start = time.perf_counter()
    while True:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= max_reps or time.perf_counter() - spent_start > budget:
            break
    return {"seconds": statistics.median(times), "reps": len(times), **mem}


# --- the measured steps -----------------------------------------------------------------------------


def load(spec: str, device: str, dtype: str, n_ctx: int):
    from lensbench.models import load_model, resolve_device

    device = resolve_device(device)
    # A random model is created and initialised on `device` by load_model itself.
    model, info = load_model(spec, device, dtype, n_ctx)
    return model, info, device


def naive_example(model, example, points, ablation_slots: list[str], topk: int = 5) -> list:
    """The naive loop for one example: cache its residuals, then one call per point and lens."""
    from lensbench.continuation import simlens_logits_naive
    from lensbench.readout import unembed

    device = model.cfg.device
    tokens = torch.tensor([example.tokens], device=device)
    names = {p.hook_name for p in points}
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    cand = torch.tensor(example.candidate_ids, device=device)
    rows = []

    def readout(logits):
        logprobs = torch.log_softmax(logits.float(), -1)
        cand_lp = torch.log_softmax(logits[..., cand].float(), -1)
        entropy = -(cand_lp.exp() * cand_lp).sum(-1)
        top_p, top_i = logprobs.exp().topk(topk, -1)
        rows.append((int(cand_lp.argmax()), float(entropy), cand_lp.tolist(), top_i.tolist(), top_p.tolist()))

    answer = len(example.tokens) - 1
    for point in points:
        h = cache[point.hook_name][0]
        readout(unembed(model, h[answer : answer + 1])[0])  # logit lens
        for slots in ["sa", *ablation_slots]:
            z = torch.stack([h[0] if slot == "s" else h[answer] for slot in slots])[None]
            readout(simlens_logits_naive(model, z, point)[0])
    return rows


ABLATION_SLOTS = {"drop-s": "a", "drop-a": "s"}


def run(args) -> dict:
    from lensbench.lenses import build_lenses
    from lensbench.lenses.base import RunContext
    from lensbench.readout import readout_points
    from lensbench.evaluate import evaluate_batch, is_out_of_memory
    from lensbench.tasks import make_batches
    from lensbench.tasks import encode_examples, load_task, pad_token_id, start_token_id

    t0 = time.perf_counter()
    model, info, device = load(args.model, args.device, args.dtype, args.n_ctx)
    load_s = time.perf_counter() - t0
    memory = Memory(device)
    cuda = device.startswith("cuda")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    start_id = start_token_id(model.tokenizer, None)
    n_pool = args.max_batch_size if args.batch_size == "auto" else args.batch_size
    examples = load_task(args.task)[: max(n_pool, args.exit_examples, args.naive_examples)]
    encoded, _ = encode_examples(examples, model.tokenizer, start_id, model.cfg.n_ctx, skip_invalid=True)
    points = readout_points(model)
    pad_id = pad_token_id(model.tokenizer, start_id)
    from lensbench.commands.options import GRAPH_OPTIONS
    from lensbench.continuation import cuda_graphs_possible

    graphs = GRAPH_OPTIONS[args.cuda_graphs]
    graphs = cuda_graphs_possible(model) if graphs is None else graphs
    ctx = RunContext(model, points, {e.index: e for e in encoded}, pad_id, n_pool, cuda_graphs=graphs)
    lenses = build_lenses("logit,simlens", "", "consecutive", [])
    lenses_abl = build_lenses("logit,simlens", args.ablations, "consecutive", [])
    for lens in lenses + lenses_abl:
        lens.prepare(ctx)
    lenses_eager = []
    if graphs:  # the same sweep without CUDA graphs, for comparison
        ctx_eager = RunContext(model, points, ctx.examples, pad_id, n_pool, cuda_graphs=False)
        lenses_eager = build_lenses("logit,simlens", args.ablations, "consecutive", [])
        for lens in lenses_eager:
            lens.prepare(ctx_eager)

    # Batch size: given, or the largest (halving from --max-batch-size) whose full sweep fits.
    batch_size = n_pool
    while True:
        batch = make_batches(encoded[:batch_size], batch_size)[0]
        if args.exit_only and args.batch_size != "auto":
            break
        try:
            evaluate_batch(model, lenses_abl, ctx, batch)
            break
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc) or batch_size == 1 or args.batch_size != "auto":
                raise
        batch_size //= 2
        if cuda:
            torch.cuda.empty_cache()
    from lensbench.readout import pad_right, unembed

    tokens, lengths = pad_right([e.tokens for e in batch], pad_id, device)
    n_layers = model.cfg.n_layers

    def plain():
        return model(tokens)

    def plain_answer():
        resid = model(tokens, stop_at_layer=n_layers)
        return unembed(model, resid[torch.arange(len(batch), device=resid.device), (lengths - 1).to(resid.device)])

    figures: dict = {}
    if not args.exit_only:
        steps_a_to_c(args, model, ctx, batch, lenses, lenses_abl, lenses_eager, ctx_eager if lenses_eager else None,
                     plain, plain_answer, points, device, memory, figures)

    exit_rows = None
    if args.exit_examples > 0:
        exit_rows = simexit(model, info, encoded[: args.exit_examples], batch_size, pad_id, args, lenses, ctx)

    def ratio(a, b, key="seconds"):
        return figures[a][key] / figures[b][key] if a in figures and b in figures and figures[b].get(key) else None

    per_ex = {k: 1 / v["examples_per_s"] for k, v in figures.items()}
    ratios = {
        "sweep_over_plain": ratio("sweep", "plain"),
        "sweep_ablations_over_plain": ratio("sweep_ablations", "plain"),
        "sweep_ablations_eager_over_plain": ratio("sweep_ablations_eager", "plain"),
        "sweep_over_plain_answer": ratio("sweep", "plain_answer"),
        "sweep_ablations_over_plain_answer": ratio("sweep_ablations", "plain_answer"),
        "naive_over_sweep": per_ex["naive"] / per_ex["sweep"] if "naive" in per_ex else None,
        "naive_ablations_over_sweep_ablations": per_ex["naive_ablations"] / per_ex["sweep_ablations"] if "naive_ablations" in per_ex else None,
        "sweep_peak_over_plain": ratio("sweep", "plain", "peak"),
        "sweep_ablations_peak_over_plain": ratio("sweep_ablations", "plain", "peak"),
        "sweep_extra_over_plain": ratio("sweep", "plain", "extra"),
        "sweep_ablations_extra_over_plain": ratio("sweep_ablations", "plain", "extra"),
        "sweep_ablations_extra_over_plain_answer": ratio("sweep_ablations", "plain_answer", "extra"),
    }
    if exit_rows:
        for row in exit_rows:
            if row["batch_size"] > 1:
                ratios[f"exit_wall_over_layer_token_bs{row['batch_size']}"] = row["wall_over_layer_token"]
                if row.get("no_refill_exit_seconds"):
                    ratios[f"exit_no_refill_over_refill_seconds_bs{row['batch_size']}"] = (
                        row["no_refill_exit_seconds"] / row["exit_seconds"])
        bs1 = next((r for r in exit_rows if r["batch_size"] == 1), None)
        if bs1:
            ratios["exit_wall_over_layer_token_bs1"] = bs1["wall_clock_speedup"] / bs1["layer_token_speedup"]
            if bs1.get("attainable_wall_clock_speedup"):
                ratios["exit_wall_over_attainable_bs1"] = bs1["wall_clock_speedup"] / bs1["attainable_wall_clock_speedup"]
                ratios["exit_attainable_over_layer_token_bs1"] = bs1["attainable_wall_clock_speedup"] / bs1["layer_token_speedup"]
    return {
        "model": args.model, "task": args.task, "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "dtype": args.dtype, "batch_size": len(batch), "batch_size_option": str(args.batch_size),
        "prompt_tokens": {"min": int(lengths.min()), "max": int(lengths.max()),
                          "mean": float(lengths.float().mean())},
        "n_layers": n_layers, "d_model": model.cfg.d_model, "weights_bytes": weights, "load_seconds": load_s,
        "ablations": args.ablations, "threads": torch.get_num_threads(),
        "figures": figures, "ratios": ratios, "simexit": exit_rows,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def steps_a_to_c(args, model, ctx, batch, lenses, lenses_abl, lenses_eager, ctx_eager, plain, plain_answer, points,
                 device, memory, figures) -> None:
    """(a) the plain forwards, (b) the sweeps, (c) the naive loop: into `figures`."""
    from lensbench.evaluate import evaluate_batch

    cuda = device.startswith("cuda")
    print(f"  measuring (a) plain forward ...", file=sys.stderr, flush=True)
    figures["plain"] = timed(plain, device, args.budget, memory=memory)
    figures["plain_answer"] = timed(plain_answer, device, args.budget, memory=memory)
    print(f"  measuring (b) sweep ...", file=sys.stderr, flush=True)
    figures["sweep"] = timed(lambda: evaluate_batch(model, lenses, ctx, batch), device, args.budget, memory=memory)
    figures["sweep_ablations"] = timed(lambda: evaluate_batch(model, lenses_abl, ctx, batch), device, args.budget, memory=memory)
    if lenses_eager:
        figures["sweep_ablations_eager"] = timed(lambda: evaluate_batch(model, lenses_eager, ctx_eager, batch), device,
                                                 args.budget, memory=memory)
    if cuda:
        figures["sweep_ablations"]["reserved"] = torch.cuda.memory_reserved()
    for name in figures:
        figures[name]["examples_per_s"] = len(batch) / figures[name]["seconds"]
    if args.profile:
        profile_step(lambda: evaluate_batch(model, lenses_abl, ctx, batch), cuda, "(b+) sweep + ablations")
        profile_step(plain, cuda, "(a) plain forward")

    if args.naive_examples > 0:
        print(f"  measuring (c) naive loop ...", file=sys.stderr, flush=True)
        chosen = batch[: args.naive_examples]
        ablation_slots = [ABLATION_SLOTS[a] for a in args.ablations.split(",") if a in ABLATION_SLOTS]
        naive_example(model, chosen[0], points, [])  # warm-up
        for key, slots in (("naive", []), ("naive_ablations", ablation_slots)):
            mem: dict = {}
            per_example = []
            spent = time.perf_counter()
            with memory.measure(mem):
                for example in chosen:
                    if cuda:
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    naive_example(model, example, points, slots)
                    if cuda:
                        torch.cuda.synchronize()
                    per_example.append(time.perf_counter() - t)
                    if time.perf_counter() - spent > args.budget * 2:
                        break
            seconds = statistics.mean(per_example)
            figures[key] = {"seconds_per_example": seconds, "examples_timed": len(per_example),
                            "examples_per_s": 1 / seconds, **mem}


def profile_step(fn, cuda: bool, label: str, rows: int = 14) -> None:
    """One call under torch.profiler: the operators that took the most device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"profile of {label}:", file=sys.stderr)
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48), file=sys.stderr, flush=True)


def identity_linear_lens(model, spec: str):
    """Identity maps with a real lens's shape and cost: times SimExit's machinery without a fit."""
    from lensbench.lenses.linear import LinearLens, LinearLensConfig, unembed_fingerprint

    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    digest, probes, norm = unembed_fingerprint(model)
    config = LinearLensConfig(
        kind="linear-simlens", target="simlens", objective="identity", model=spec, model_sha256=None,
        unembed_sha256=digest, unembed_probe=probes, unembed_norm=norm, n_layers=n_layers, d_model=d_model,
        site="pre", layers=list(range(n_layers)),
    )
    eye = torch.eye(d_model).expand(n_layers, d_model, d_model)
    return LinearLens(eye, torch.zeros(n_layers, d_model), config)


def simexit(model, info, encoded, batch_size, pad_id, args, lenses, ctx):
    """(d): the SimExit executor (lensbench.exits, when present) against the full model."""
    try:
        from lensbench import exits
    except ImportError:
        print("  (d) skipped: lensbench.exits is not there yet", file=sys.stderr)
        return None
    from lensbench.lenses.linear import LinearLens
    from lensbench.evaluate import evaluate_batch

    print(f"  measuring (d) SimExit ...", file=sys.stderr, flush=True)
    lens = LinearLens.load(args.linear) if args.linear else identity_linear_lens(model, args.model)
    n_layers = model.cfg.n_layers
    min_layer = args.exit_min_layer if args.exit_min_layer is not None else n_layers // 4
    # The threshold: the median confidence (the linear lens's entropy) at the middle layer, so
    # that about half the examples leave by then and the rest spread over the upper layers.
    ctx_lenses = [lens]
    result = evaluate_batch(model, ctx_lenses, ctx, encoded[: min(len(encoded), batch_size)])
    cols = result.columns
    middle = [e for e, layer in zip(cols["entropy"], cols["layer"]) if layer == n_layers // 2]
    tau = args.exit_threshold if args.exit_threshold is not None else float(statistics.median(middle))
    executor = exits.SimExitExecutor(model, lens, threshold=tau, policy="linear-simlens", min_layer=min_layer, pad_id=pad_id)
    sizes = args.exit_batch_sizes or sorted({1, batch_size})
    rows = exits.measure_speedup(model, encoded, executor, batch_sizes=sizes, repeats=args.exit_repeats, warmup=1,
                                 no_refill=True)
    for row in rows:
        row.update(threshold=tau, min_layer=min_layer, linear=args.linear or "identity maps",
                   cuda_graphs=executor.cuda_graphs)
    if executor.cuda_graphs:  # the same without graphs, for comparison
        eager = exits.SimExitExecutor(model, lens, threshold=tau, policy="linear-simlens", min_layer=min_layer,
                                      pad_id=pad_id, cuda_graphs=False)
        for row, plain_row in zip(rows, exits.measure_speedup(model, encoded, eager, batch_sizes=sizes,
                                                              repeats=args.exit_repeats, warmup=1)):
            row["eager_exit_seconds"] = plain_row["exit_seconds"]
            row["eager_wall_clock_speedup"] = row["full_seconds"] / plain_row["exit_seconds"]
    return rows  # the batch-1 row carries the attainable speedup (exits.attainable_speedup)


def _gib(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def report(res: dict) -> str:
    f, r = res["figures"], res["ratios"]
    lines = [
        f"model {res['model']} ({res['n_layers']} layers, d_model {res['d_model']}, weights {_gib(res['weights_bytes'])}), "
        f"task {res['task']}, device {res['device']} [{res['device_name']}], dtype {res['dtype']}, "
        f"batch size {res['batch_size']} ({res['batch_size_option']}), prompt tokens "
        f"{res['prompt_tokens']['min']}..{res['prompt_tokens']['max']} (mean {res['prompt_tokens']['mean']:.0f}), "
        f"threads {res['threads']}",
        f"{'step':<34} {'s/batch':>9} {'ex/s':>9} {'peak':>11} {'extra':>11}",
    ]
    names = {"plain": "(a) plain forward", "plain_answer": "(a') plain, answer position only",
             "sweep": "(b) sweep: logit + SimLens", "sweep_ablations": f"(b+) sweep + {res['ablations']}",
             "sweep_ablations_eager": "(b+) the same, no CUDA graphs",
             "naive": "(c) naive loop: logit + SimLens", "naive_ablations": f"(c+) naive + {res['ablations']}"}
    for key, label in names.items():
        if key not in f:
            continue
        v = f[key]
        sec = v.get("seconds", v.get("seconds_per_example", 0) * res["batch_size"])
        lines.append(f"{label:<34} {sec:>9.3f} {v['examples_per_s']:>9.2f} {_gib(v.get('peak', 0)):>11} {_gib(v.get('extra', 0)):>11}")
    lines.append("ratios:")
    for key, value in r.items():
        if value is not None:
            lines.append(f"  {key:<40} {value:8.3f}")
    if res.get("simexit"):
        lines.append("SimExit (lensbench.exits.measure_speedup):")
        for row in res["simexit"]:
            lines.append(
                f"  batch {row['batch_size']:>3}: full {row['full_seconds']:.3f}s, exit {row['exit_seconds']:.3f}s, "
                f"wall-clock speedup {row['wall_clock_speedup']:.2f}x, layer-token speedup {row['layer_token_speedup']:.2f}x, "
                f"wall/layer-token {row['wall_over_layer_token']:.2f}, mean exit layer {row['mean_exit_layer']:.1f} "
                f"(tau {row['threshold']:.3f}, from layer {row['min_layer']}, {row['linear']}, CUDA graphs "
                f"{'on' if row.get('cuda_graphs') else 'off'}, {row['n_examples']} examples)"
            )
            lines.append(f"           block calls {row['block_calls']} ({row['rows_per_call']:.1f} rows each; the full model "
                         f"{row['full_block_calls']})" + (f", refill pool {row['pool']:g}x the batch" if row.get("refill") else ""))
            if "no_refill_exit_seconds" in row:
                lines.append(f"           without refill: exit {row['no_refill_exit_seconds']:.3f}s, wall-clock speedup "
                             f"{row['no_refill_wall_clock_speedup']:.2f}x, block calls {row['no_refill_block_calls']} "
                             f"({row['no_refill_rows_per_call']:.1f} rows each)")
            if "eager_wall_clock_speedup" in row:
                lines.append(f"           without CUDA graphs: exit {row['eager_exit_seconds']:.3f}s, wall-clock speedup "
                             f"{row['eager_wall_clock_speedup']:.2f}x")
            if "attainable_wall_clock_speedup" in row:
                lines.append(f"           attainable with free exit decisions: {row['attainable_wall_clock_speedup']:.2f}x "
                             f"(prompt blocks to the exit layer + the measured continuation)")
    checks = [
        ("sweep/plain", r.get("sweep_ablations_over_plain"), "<=", TARGETS["sweep_over_plain"]),
        ("naive/sweep", r.get("naive_ablations_over_sweep_ablations"), ">=", TARGETS["naive_over_sweep"]),
        ("sweep peak/plain peak", r.get("sweep_ablations_peak_over_plain"), "<=", TARGETS["sweep_peak_over_plain"]),
    ]
    if "exit_wall_over_layer_token_bs1" in r:
        checks.append(("|SimExit wall/layer-token - 1| at bs 1", abs(r["exit_wall_over_layer_token_bs1"] - 1), "<=",
                       TARGETS["exit_wall_vs_layer_token_bs1"]))
    for row in res.get("simexit") or []:  # issue 15 (GPU targets): the 7B shape's ratio, the qwen shape's speedup
        if row["batch_size"] in (8, 64) and "7b" in res["model"]:
            checks.append((f"SimExit wall/layer-token at bs {row['batch_size']}", row["wall_over_layer_token"], ">=",
                           TARGETS["exit_wall_over_layer_token_batched"]))
        elif row["batch_size"] in (8, 64) and "qwen2.5-0.5b" in res["model"]:
            checks.append((f"SimExit wall-clock speedup at bs {row['batch_size']}", row["wall_clock_speedup"], ">=",
                           TARGETS["exit_wall_clock_batched_small"]))
    lines.append("targets (issue 6; issue 3 allows 1.5 and 1.3x):")
    for label, value, op, bound in checks:
        if value is None:
            continue
        ok = value <= bound if op == "<=" else value >= bound
        lines.append(f"  {label:<40} {value:8.3f} {op} {bound:<6} {'met' if ok else 'NOT met'}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="arc-easy")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", default="8", help="examples in the batch, or auto (the largest that fits, halving from --max-batch-size)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--ablations", default="drop-s,drop-a")
    p.add_argument("--naive-examples", type=int, default=2, help="examples timed in the naive loop (0: skip)")
    p.add_argument("--exit-examples", type=int, default=8, help="examples timed for SimExit (0: skip)")
    p.add_argument("--exit-repeats", type=int, default=2)
    p.add_argument("--exit-only", action="store_true", help="time only (d) SimExit (skip the forwards, sweeps and naive loop)")
    p.add_argument("--exit-batch-sizes", help="SimExit batch sizes, comma-separated (default: 1 and the sweep's batch size)")
    p.add_argument("--exit-threshold", type=float, help="SimExit threshold (default: median entropy at the middle layer)")
    p.add_argument("--exit-min-layer", type=int)
    p.add_argument("--linear", help="a fitted Linear SimLens folder for SimExit (default: identity maps)")
    p.add_argument("--budget", type=float, default=5.0, help="seconds spent timing each step")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="SimLens continuations of the sweep from CUDA graphs (auto: on CUDA; also timed without)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one sweep and one plain forward")
    p.add_argument("--quick", action="store_true", help="tiny sizes (2 examples, 0.5 s per step), to check the script")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.naive_examples, args.exit_examples, args.budget = "2", 1, 2, 0.5
        args.exit_repeats = 1
    if args.batch_size != "auto":
        args.batch_size = int(args.batch_size)
    if args.exit_batch_sizes:
        try:
            args.exit_batch_sizes = sorted({int(x) for x in args.exit_batch_sizes.split(",")})
        except ValueError:
            p.error(f"--exit-batch-sizes takes whole numbers separated by commas (got '{args.exit_batch_sizes}')")
        if args.exit_batch_sizes[0] < 1:
            p.error("--exit-batch-sizes must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(report(res), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
