"""The evaluation runner: examples x lenses x readout points -> a stored run.

It composes a model, a task and lenses and knows nothing model- or lens-specific. Batches of
length-sorted, right-padded prompts; one hooked forward pass per batch gathers the slot
residuals; each lens maps them to final-layer residuals; one shared readout turns those into
decisions, entropies and top-k tokens. Each finished batch is written to `parts/`, so an
interrupted run resumes where it stopped and ends with the same files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from lensbench import metrics, store
from lensbench.continuation import cuda_graphs_possible
from lensbench.distributed import Dist
from lensbench.errors import LensbenchError
from lensbench.evaluate import BatchSizer, examples_table, predictions_table, evaluate_with_backoff
from lensbench.lenses import RunContext, build_lenses
from lensbench.models import DEFAULT_MODEL, DEFAULT_N_CTX, ModelInfo, load_model
from lensbench.readout import readout_points
from lensbench.tasks import EncodedExample, encode_examples, load_task, make_batches, pad_token_id, start_token_id

ENTROPY_MODES = ("candidates", "vocab")


@dataclass
class EvalConfig:
    """Everything that defines a run (the CLI's `eval` options)."""

    out: str
    model: str = DEFAULT_MODEL
    task: str = "capitals"
    lenses: str = "logit"
    ablations: str = ""
    limit: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int | str = 8  # or "auto": batches of max_batch_size, split on out-of-memory
    start_token: str | None = None
    positions: str = "consecutive"
    site: str = "pre"
    topk: int = 5
    entropy: str = "candidates"
    skip_invalid: bool = False
    overwrite: bool = False
    linear: list[str] = field(default_factory=list)
    mean_examples: int = 256
    n_ctx: int = DEFAULT_N_CTX
    max_batch_size: int = 64  # the batch plan's size under batch_size="auto"
    n_devices: int = 1  # GPUs one model's blocks are split across (TransformerLens's n_devices)
    cuda_graphs: str = "auto"  # SimLens continuations from CUDA graphs: auto (on for one CUDA device), on, off
    # torch's intra-op CPU threads during the run (None: torch's current count). Float sums are
    # split by thread, so results are bit-identical only at the same count; not in the identity.
    threads: int | None = None

    def validate(self) -> None:
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise LensbenchError(f"--batch-size must be a positive integer or auto (got {self.batch_size})")
        if self.n_devices < 1:
            raise LensbenchError(f"--n-devices must be at least 1 (got {self.n_devices})")
        if self.max_batch_size < 1:
            raise LensbenchError(f"--max-batch-size must be at least 1 (got {self.max_batch_size})")
        if self.limit is not None and self.limit < 1:
            raise LensbenchError(f"--limit must be at least 1 (got {self.limit})")
        if not 1 <= self.topk <= 100:
            raise LensbenchError(f"--topk must be between 1 and 100 (got {self.topk})")
        if self.entropy not in ENTROPY_MODES:
            raise LensbenchError(f"--entropy must be one of {', '.join(ENTROPY_MODES)} (got {self.entropy})")
        if self.mean_examples < 1:
            raise LensbenchError("--mean-examples must be at least 1")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise LensbenchError(f"--threads must be a positive integer (got {self.threads})")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise LensbenchError(f"--cuda-graphs must be auto, on or off (got {self.cuda_graphs})")
        if self.cuda_graphs == "on" and (not str(self.device).startswith("cuda") or self.n_devices > 1):
            raise LensbenchError("--cuda-graphs on needs one CUDA device (--device cuda, no --n-devices)")

    def identity(self) -> dict:
        """The options that change results: a different identity is a different run."""
        keep = ("model", "task", "lenses", "ablations", "limit", "dtype", "start_token", "positions", "site",
                "topk", "entropy", "skip_invalid", "linear", "mean_examples", "n_ctx")
        return {k: getattr(self, k) for k in keep}

    @property
    def plan_batch_size(self) -> int:
        """Examples per planned batch (one part file each); "auto" plans max_batch_size."""
        return self.max_batch_size if self.batch_size == "auto" else int(self.batch_size)


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends the run like Ctrl-C: the batch in flight is lost, the rest is kept."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _with_threads(run):
    """`run(cfg, ...)` with `cfg.threads` intra-op threads (set before any compute); the caller's
    count is restored afterwards."""

    @functools.wraps(run)
    def wrapper(cfg: EvalConfig, *args, **kwargs):
        before = torch.get_num_threads()
        if cfg.threads is not None:
            cfg.validate()
            torch.set_num_threads(cfg.threads)
        try:
            return run(cfg, *args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def prepare(cfg: EvalConfig, model=None, model_info: ModelInfo | None = None):
    """Load and check everything before compute: model, task, lenses, encoded examples."""
    cfg.validate()
    examples = load_task(cfg.task)
    # Lenses and ablations are checked before the (slow) model load, so a typo fails at once.
    lenses = build_lenses(cfg.lenses, cfg.ablations, cfg.positions, cfg.linear)
    if model is None:
        model, model_info = load_model(cfg.model, cfg.device, cfg.dtype, cfg.n_ctx, cfg.n_devices)
    elif model_info is None:
        model_info = ModelInfo(cfg.model, None, model.cfg.n_layers, model.cfg.d_model,
                               str(model.cfg.original_architecture), cfg.dtype, str(model.cfg.device))
    for lens in lenses:
        lens.check_model(model, model_info)
    start_id = start_token_id(model.tokenizer, cfg.start_token)
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    encoded, skipped = encode_examples(examples, model.tokenizer, start_id, model.cfg.n_ctx, cfg.skip_invalid)
    if not encoded:
        raise LensbenchError("no examples left to evaluate" + (f" ({len(skipped)} skipped)" if skipped else ""))
    points = readout_points(model, cfg.site)
    pad_id = pad_token_id(model.tokenizer, start_id)
    graphs = cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and cuda_graphs_possible(model))
    ctx = RunContext(model, points, {e.index: e for e in encoded}, pad_id, cfg.plan_batch_size, cfg.mean_examples, graphs)
    return model, model_info, examples, encoded, skipped, lenses, ctx, start_id


def fingerprint(cfg: EvalConfig, model_info: ModelInfo, encoded: list[EncodedExample]) -> str:
    ident = dict(cfg.identity(), model_sha256=model_info.source_sha256, examples=[e.id for e in encoded])
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _open_run_folder(cfg: EvalConfig, out: Path, fp: str) -> tuple[str, dict]:
    """Check `out` for this run: ("complete", manifest), ("resume", manifest) or ("new", {}).

    A different run, or a folder that is not a run, is refused unless `cfg.overwrite`.
    """
    manifest_path = out / store.MANIFEST
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        if old.get("fingerprint") != fp or old.get("format_version") != store.FORMAT_VERSION:
            if not cfg.overwrite:
                raise LensbenchError(f"{out} holds a different run; choose another --out or pass --overwrite")
            shutil.rmtree(out)
            return "new", {}
        return ("complete" if old.get("status") == "complete" else "resume"), old
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise LensbenchError(f"{out} exists and is not a lensbench run; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    return "new", {}


@_with_threads
def run_eval(
    cfg: EvalConfig, model=None, model_info: ModelInfo | None = None, progress: bool = True, dist: Dist | None = None
) -> Path:
    """Evaluate and store a run in `cfg.out`; resumes a matching unfinished run there.

    With `dist` (a `lensbench.distributed.Dist` of several processes) every process calls
    this with the same configuration; each evaluates its share of the batches, and rank 0
    merges them once all have finished (see `lensbench.distributed`).
    """
    dist = dist or Dist()
    out = Path(cfg.out)
    model, model_info, examples, encoded, skipped, lenses, ctx, start_id = prepare(cfg, model, model_info)
    fp = fingerprint(cfg, model_info, encoded)
    parts_dir = out / "parts"
    manifest_path = out / store.MANIFEST

    manifest: dict = {}
    if dist.is_main:
        try:
            state, old = _open_run_folder(cfg, out, fp)
        except LensbenchError as exc:
            state, old = "error", {"error": str(exc)}
        if state in ("new", "resume"):
            # The batch plan fixes which examples share a part file: a resumed run keeps its own.
            plan = old.get("batch_plan", {"batch_size": cfg.plan_batch_size})
            manifest = {
                "format_version": store.FORMAT_VERSION,
                "fingerprint": fp,
                "status": "running",
                "model": model_info.to_dict(),
                "task": cfg.task,
                "config": asdict(cfg),
                "lenses": [lens.name for lens in lenses],
                "readout_points": [{"layer": p.layer, "site": p.site, "hook": p.hook_name} for p in ctx.points],
                "start_token": {"id": start_id, "text": model.tokenizer.decode([start_id])},
                "n_examples": len(encoded),
                "skipped": skipped,
                "batch_plan": plan,
                "processes": dist.world,
                "threads": torch.get_num_threads(),
                "versions": store.versions(),
                "started": old.get("started", store.now()),
            }
            if state == "resume":
                manifest["resumed"] = store.now()
            parts_dir.mkdir(parents=True, exist_ok=True)
            store.atomic_write_json(manifest_path, manifest)
            if not (out / "examples.parquet").exists():
                store.atomic_write_table(out / "examples.parquet", examples_table(examples, encoded, model.tokenizer))
        outcome = (state, old.get("error"), manifest.get("batch_plan", {}).get("batch_size"))
    else:
        outcome = None
    state, error, plan_size = dist.broadcast(outcome)
    if state == "error":
        raise LensbenchError(error)
    if state == "complete":
        if dist.is_main:
            print(f"lensbench: {out} is already complete; nothing to do", file=sys.stderr)
        return out

    batches = make_batches(encoded, plan_size)
    done = {int(p.stem.split("-")[1]) for p in parts_dir.glob("part-*.parquet")}
    todo = [i for i in range(len(batches)) if i not in done and i % dist.world == dist.rank]
    for lens in lenses:
        lens.prepare(ctx)
    sizer = BatchSizer(plan_size)
    n_done = sum(len(batches[i]) for i in done)
    bar = tqdm(total=n_done + sum(len(batches[i]) for i in todo), initial=n_done, desc="lensbench eval", unit="ex",
               disable=not progress or not dist.is_main, file=sys.stderr)
    failure = None
    try:
        with _sigterm_as_interrupt():
            for i in todo:
                result = evaluate_with_backoff(model, lenses, ctx, batches[i], sizer, cfg.topk, cfg.entropy)
                if result.attention_sum is not None:
                    store.atomic_write_tensors(parts_dir / f"part-{i:06d}.attn.safetensors",
                                               {"sum": result.attention_sum, "count": result.attention_count})
                store.atomic_write_table(parts_dir / f"part-{i:06d}.parquet", predictions_table(result.columns, model.tokenizer))
                bar.update(len(batches[i]))
    except KeyboardInterrupt:
        bar.close()
        if dist.is_main:
            manifest.update(status="interrupted", interrupted=store.now())
            store.atomic_write_json(manifest_path, manifest)
        raise
    except Exception as exc:
        if dist.world == 1:
            bar.close()
            manifest.update(status="failed", failed=store.now())
            store.atomic_write_json(manifest_path, manifest)
            raise
        failure = exc
    bar.close()
    # Every rank reports; nobody waits on a rank that has already failed.
    reports = dist.gather(None if failure is None else f"rank {dist.rank}: {type(failure).__name__}: {failure}")
    errors = [r for r in reports if r is not None]
    if errors:
        if dist.is_main:
            manifest.update(status="failed", failed=store.now(), errors=errors)
            store.atomic_write_json(manifest_path, manifest)
        if failure is not None:
            raise failure
        raise LensbenchError("another process failed: " + "; ".join(errors))
    final_error = None
    if dist.is_main:
        try:
            finalize(out, manifest)
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised here
            final_error = f"{type(exc).__name__}: {exc}"
            if dist.world == 1:
                raise
    final_error = dist.broadcast(final_error)  # also holds the other ranks until the run is complete
    if final_error is not None:
        raise LensbenchError(f"merging the parts failed on rank 0: {final_error}")
    return out


def finalize(out: Path, manifest: dict | None = None) -> dict:
    """Merge the batch parts into predictions.parquet, attention and summary.json."""
    out = Path(out)
    manifest = manifest or json.loads((out / store.MANIFEST).read_text())
    parts_dir = out / "parts"
    tables = [pq.read_table(p) for p in sorted(parts_dir.glob("part-*.parquet"))]
    table = pa.concat_tables(tables)
    lens_order = {name: i for i, name in enumerate(manifest["lenses"])}
    frame = table.to_pandas()
    frame["_lens_order"] = frame["lens"].map(lens_order)
    frame = frame.sort_values(["example_index", "_lens_order", "layer"], kind="stable").drop(columns="_lens_order")
    sorted_table = pa.Table.from_pandas(frame.reset_index(drop=True), schema=table.schema, preserve_index=False)
    store.atomic_write_table(out / "predictions.parquet", sorted_table)

    extra = {"skipped": manifest.get("skipped", [])}
    attn_parts = sorted(parts_dir.glob("part-*.attn.safetensors"))
    if attn_parts:
        from safetensors.torch import load_file

        total = count = None
        for path in attn_parts:
            t = load_file(str(path))
            total = t["sum"] if total is None else total + t["sum"]
            count = t["count"] if count is None else count + t["count"]
        mean = total / count.clamp(min=1)[..., None]
        mean[count == 0] = float("nan")
        points = torch.tensor([p["layer"] for p in manifest["readout_points"]])
        store.atomic_write_tensors(out / "attention.safetensors", {"mean": mean, "points": points})
        extra["attention_a_to_s"] = {"file": "attention.safetensors", "shape": list(mean.shape), "lens": "simlens"}
    summary = metrics.summarize(frame, extra)
    store.atomic_write_json(out / "summary.json", summary)
    manifest.update(status="complete", finished=store.now())
    store.atomic_write_json(out / store.MANIFEST, manifest)
    return summary
