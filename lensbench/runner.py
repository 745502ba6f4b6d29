"""The evaluation runner: examples x lenses x readout points -> a stored run.

It composes a model, a task and lenses and knows nothing model- or lens-specific. Batches of
length-sorted, right-padded prompts; one hooked forward pass per batch gathers the slot
residuals; each lens maps them to final-layer residuals; one shared readout turns those into
decisions, entropies and top-k tokens. Each finished batch is written to `parts/`, so an
interrupted run resumes where it stopped and ends with the same files.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from lensbench import metrics, run_folder, store
from lensbench.continuation import cuda_graphs_possible
from lensbench.distributed import Dist
from lensbench.errors import LensbenchError
from lensbench.evaluate import BatchSizer, examples_table, predictions_table, evaluate_with_backoff
from lensbench.lenses import RunContext, build_lenses
from lensbench.models import DEFAULT_MODEL, DEFAULT_N_CTX, ModelInfo, load_model
from lensbench.readout import check_extra_positions, readout_points
from lensbench.tasks import encode_examples, load_task, make_batches, pad_token_id, start_token_id

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
        """The options that change results: a different identity is a different run. The run's
        identity (`run_folder.identity`) replaces the task file's and `--linear` folders' paths
        by their contents' sha256."""
        keep = ("model", "task", "lenses", "ablations", "limit", "dtype", "start_token", "positions", "site",
                "topk", "entropy", "skip_invalid", "linear", "mean_examples", "n_ctx")
        return {k: getattr(self, k) for k in keep}

    @property
    def plan_batch_size(self) -> int:
        """Examples per planned batch (one part file each); "auto" plans max_batch_size."""
        return self.max_batch_size if self.batch_size == "auto" else int(self.batch_size)


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM ends the run like Ctrl-C (a KeyboardInterrupt): the batch in flight is lost, the
    rest is kept. `lensbench eval` holds this around the whole command."""

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


def prepare(cfg: EvalConfig, examples: list, lenses: list, model=None, model_info: ModelInfo | None = None):
    """Load and check the model, encode the examples and check them against the lenses, all
    before compute. Returns `(model, model_info, encoded, skipped, ctx, start_id)`."""
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
    # Every example against the prompt positions the ablations read (e.g. position:-5), not batch by batch.
    extra = sorted({p for lens in lenses for p in lens.extra_positions()})
    if extra:
        check_extra_positions([len(e.tokens) for e in encoded], extra, [e.id for e in encoded])
    points = readout_points(model, cfg.site)
    pad_id = pad_token_id(model.tokenizer, start_id)
    graphs = cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and cuda_graphs_possible(model))
    ctx = RunContext(model, points, {e.index: e for e in encoded}, pad_id, cfg.plan_batch_size, cfg.mean_examples, graphs)
    return model, model_info, encoded, skipped, ctx, start_id


def _check_folder_early(out: Path, ident: dict, inputs: dict, overwrite: bool) -> None:
    """Before the model loads: refuse a folder that is not a run, an unreadable manifest, a run
    that differs in what is known without the model, and an overwrite that would touch files
    lensbench did not write. Reads only."""
    if not out.is_dir():
        return
    old = run_folder.read_manifest(out)
    if old is None:
        if any(out.iterdir()):
            raise LensbenchError(run_folder.not_a_run(out, overwrite))
        return
    why = run_folder.refusal(out, old, ident, inputs, keys=list(ident))
    if why and not overwrite:
        raise LensbenchError(why)
    if why:
        run_folder.check_removable(out)


def _open_run_folder(cfg: EvalConfig, out: Path, fp: str, ident: dict, inputs: dict) -> tuple[str, dict, str | None]:
    """What `out` holds for this run: ("complete", manifest, None), ("resume", manifest, note),
    ("replace", {}, None) (a different run, `--overwrite`) or ("new", {}, None). Reads only.

    A different run is refused (saying what differs) unless `cfg.overwrite`; a folder that is
    not a run, or whose manifest is unreadable, is refused even then. A complete run whose
    outputs are missing or unreadable is resumed: its parts are checked and merged again.
    """
    old = run_folder.read_manifest(out) if out.is_dir() else None
    if old is None:
        if out.is_dir() and any(out.iterdir()):
            raise LensbenchError(run_folder.not_a_run(out, cfg.overwrite))
        return "new", {}, None
    why = run_folder.refusal(out, old, ident, inputs)
    if why is None and old.get("fingerprint") != fp:
        why = f"{out} holds a different run (its fingerprint differs); choose another --out or pass --overwrite"
    if why:
        if not cfg.overwrite:
            raise LensbenchError(why)
        run_folder.check_removable(out)
        return "replace", {}, None
    if old.get("status") == "complete":
        problem = run_folder.outputs_problem(out, old)
        if problem is None:
            return "complete", old, None
        return "resume", old, f"{out} is complete but {problem}; merging its parts again"
    return "resume", old, None


def _new_manifest(cfg, old: dict, fp: str, ident: dict, inputs: dict, model, model_info, lenses, ctx, start_id,
                  encoded, skipped, dist) -> dict:
    # The batch plan fixes which examples share a part file: a resumed run keeps its own.
    plan = old.get("batch_plan", {"batch_size": cfg.plan_batch_size})
    map_cost = next((lens["map_cost"] for lens in inputs["linear"] if lens.get("kind") == "linear-simlens"), None)
    manifest = {
        "format_version": store.FORMAT_VERSION,
        "fingerprint": fp,
        "status": "running",
        "identity": ident,
        "inputs": inputs,
        "model": model_info.to_dict(),
        "task": cfg.task,
        "config": asdict(cfg),
        "lenses": [lens.name for lens in lenses],
        "readout_points": [{"layer": p.layer, "site": p.site, "hook": p.hook_name} for p in ctx.points],
        "map_cost": map_cost,
        "start_token": {"id": start_id, "text": model.tokenizer.decode([start_id])},
        "n_examples": len(encoded),
        "skipped": skipped,
        "batch_plan": plan,
        "processes": dist.world,
        "threads": torch.get_num_threads(),
        "versions": store.versions(),
        "started": old.get("started", store.now()),
    }
    # The run's history survives a resume: every interruption and failure, the last of each.
    for key, times in (("interrupted", "interruptions"), ("failed", "failures")):
        history = list(old.get(times, [old[key]] if old.get(key) else []))
        if history:
            manifest[times], manifest[key] = history, history[-1]
    if old:
        manifest["resumed"] = store.now()
    return manifest


def _record(manifest_path: Path, manifest: dict, status: str, **extra) -> None:
    """Set the manifest's status (appending the time to its history) and write it."""
    when = store.now()
    history = {"interrupted": "interruptions", "failed": "failures"}
    manifest.update(status=status, **extra)
    if status in history:
        manifest[status] = when
        manifest[history[status]] = [*manifest.get(history[status], []), when]
    store.atomic_write_json(manifest_path, manifest)


def _write_folder(out: Path, state: str, manifest: dict, examples, encoded, tokenizer, batches, lens_names, n_points):
    """Rank 0: replace a different run (`--overwrite`), write the manifest and examples, and
    check the finished parts. Returns the sound batches' indices."""
    if state == "replace":
        run_folder.remove_run(out)
    out.mkdir(parents=True, exist_ok=True)
    store.atomic_write_json(out / store.MANIFEST, manifest)  # first: a folder with parts always has a manifest
    (out / "parts").mkdir(exist_ok=True)
    try:
        readable = pq.read_metadata(out / "examples.parquet").num_rows == len(encoded)
    except Exception:  # noqa: BLE001 - missing or unreadable: written (again)
        readable = False
    if not readable:
        store.atomic_write_table(out / "examples.parquet", examples_table(examples, encoded, tokenizer))
    schema = predictions_table(defaultdict(list), tokenizer).schema
    done, notes = run_folder.sound_parts(out / "parts", batches, lens_names, n_points, schema)
    for note in notes:
        print(f"lensbench: {note}", file=sys.stderr)
    return sorted(done)


@_with_threads
def run_eval(
    cfg: EvalConfig, model=None, model_info: ModelInfo | None = None, progress: bool = True, dist: Dist | None = None
) -> Path:
    """Evaluate and store a run in `cfg.out`; resumes a matching unfinished run there.

    Everything a user can get wrong is checked before compute (docs/format.md, "Resume"): the
    options and `--out` before the model loads, then the model, the examples, the lenses and
    the folder's run before anything is written.

    With `dist` (a `lensbench.distributed.Dist` of several processes) every process calls
    this with the same configuration; each evaluates its share of the batches, and rank 0
    merges them once all have finished (see `lensbench.distributed`).
    """
    dist = dist or Dist()
    cfg.validate()
    out = run_folder.check_out(cfg.out)
    examples = load_task(cfg.task)
    # Lenses and ablations are checked before the (slow) model load, so a typo fails at once.
    lenses = build_lenses(cfg.lenses, cfg.ablations, cfg.positions, cfg.linear)
    for lens in lenses:
        lens.check_site(cfg.site)
    lens_names = [lens.name for lens in lenses]
    inputs = run_folder.input_digests(cfg.task, cfg.linear)
    ident = run_folder.identity(cfg.identity(), lens_names, inputs)
    _check_folder_early(out, ident, inputs, cfg.overwrite)
    model, model_info, encoded, skipped, ctx, start_id = prepare(cfg, examples, lenses, model, model_info)
    ident = run_folder.complete_identity(ident, model_info.source_sha256, [e.id for e in encoded])
    fp = run_folder.fingerprint(ident)

    old: dict = {}
    if dist.is_main:
        try:
            state, old, note = _open_run_folder(cfg, out, fp, ident, inputs)
            outcome = (state, None, old.get("batch_plan", {"batch_size": cfg.plan_batch_size})["batch_size"], note)
        except LensbenchError as exc:
            outcome = ("error", str(exc), None, None)
    else:
        outcome = None
    state, error, plan_size, note = dist.broadcast(outcome)
    if state == "error":
        raise LensbenchError(error)
    if state == "complete":
        if dist.is_main:
            print(f"lensbench: {out} is already complete; nothing to do", file=sys.stderr)
        return out
    if note and dist.is_main:
        print(f"lensbench: {note}", file=sys.stderr)
    # Lens set-up checks the lenses against the run (e.g. a lens fitted at another site) before
    # anything is written.
    for lens in lenses:
        lens.prepare(ctx)
    batches = make_batches(encoded, plan_size)

    manifest: dict = {}
    written = None
    if dist.is_main:
        manifest = _new_manifest(cfg, old, fp, ident, inputs, model, model_info, lenses, ctx, start_id, encoded,
                                 skipped, dist)
        try:
            written = ("ok", _write_folder(out, state, manifest, examples, encoded, model.tokenizer, batches,
                                           lens_names, len(ctx.points)))
        except LensbenchError as exc:
            written = ("error", str(exc))
        except OSError as exc:  # e.g. the disk is full: one line on every rank, none left waiting
            written = ("error", f"cannot write the run in {out} ({exc.strerror or exc})")
    status, done = dist.broadcast(written)
    if status == "error":
        raise LensbenchError(done)
    try:
        _evaluate_and_merge(cfg, out, manifest, model, lenses, ctx, batches, plan_size, set(done), progress, dist)
    except KeyboardInterrupt:
        if dist.is_main:
            _record(out / store.MANIFEST, manifest, "interrupted")
        raise
    return out


def _evaluate_and_merge(cfg, out, manifest, model, lenses, ctx, batches, plan_size, done, progress, dist) -> None:
    """Every rank: its share of the batches not `done`, one part file each; then rank 0 merges."""
    parts_dir = out / "parts"
    manifest_path = out / store.MANIFEST
    todo = [i for i in range(len(batches)) if i not in done and i % dist.world == dist.rank]
    sizer = BatchSizer(plan_size)
    n_done = sum(len(batches[i]) for i in done)
    bar = tqdm(total=n_done + sum(len(batches[i]) for i in todo), initial=n_done, desc="lensbench eval", unit="ex",
               disable=not progress or not dist.is_main, file=sys.stderr)
    failure = None
    try:
        with sigterm_as_interrupt():
            for i in todo:
                result = evaluate_with_backoff(model, lenses, ctx, batches[i], sizer, cfg.topk, cfg.entropy)
                if result.attention_sum is not None:
                    _write_attention_part(parts_dir / f"part-{i:06d}.attn.safetensors", result)
                store.atomic_write_table(parts_dir / f"part-{i:06d}.parquet", predictions_table(result.columns, model.tokenizer))
                bar.update(len(batches[i]))
    except KeyboardInterrupt:
        bar.close()
        raise
    except Exception as exc:
        if dist.world == 1:
            bar.close()
            _record(manifest_path, manifest, "failed")
            raise
        failure = exc
    bar.close()
    # Every rank reports; nobody waits on a rank that has already failed.
    reports = dist.gather(None if failure is None else f"rank {dist.rank}: {type(failure).__name__}: {failure}")
    errors = [r for r in reports if r is not None]
    if errors:
        if dist.is_main:
            _record(manifest_path, manifest, "failed", errors=errors)
        if failure is not None:
            raise failure
        raise LensbenchError("another process failed: " + "; ".join(errors))
    final_error = None
    if dist.is_main:
        try:
            with sigterm_as_interrupt():
                finalize(out, manifest)
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised here
            final_error = f"{type(exc).__name__}: {exc}"
            _record(manifest_path, manifest, "failed", errors=[f"merging the parts: {final_error}"])
            if dist.world == 1:
                raise
    final_error = dist.broadcast(final_error)  # also holds the other ranks until the run is complete
    if final_error is not None:
        raise LensbenchError(f"merging the parts failed on rank 0: {final_error}")


def _write_attention_part(path: Path, result) -> None:
    """A batch's attention sums, with the name of the lens they came from (safetensors metadata)."""
    from safetensors.torch import save

    tensors = {"sum": result.attention_sum.contiguous(), "count": result.attention_count.contiguous()}
    store.atomic_write_bytes(path, save(tensors, metadata={"lens": result.attention_lens or ""}))


def _attention(parts_dir: Path, manifest: dict) -> tuple[dict, dict] | None:
    """The mean attention over the batches' parts, and its summary entry (None without parts)."""
    from safetensors import safe_open

    # only the attention of finished batches (a part without its predictions is a leftover)
    paths = [p for p in sorted(parts_dir.glob("part-*.attn.safetensors"))
             if (parts_dir / p.name.replace(".attn.safetensors", ".parquet")).exists()]
    if not paths:
        return None
    total = count = lens = None
    for path in paths:
        with safe_open(str(path), "pt") as f:
            lens = lens or (f.metadata() or {}).get("lens") or None
            t = {k: f.get_tensor(k) for k in ("sum", "count")}
        total = t["sum"] if total is None else total + t["sum"]
        count = t["count"] if count is None else count + t["count"]
    mean = total / count.clamp(min=1)[..., None]
    mean[count == 0] = float("nan")
    layers = [p["layer"] for p in manifest["readout_points"]]
    sites = ["final" if p["layer"] == max(layers) else p["site"] for p in manifest["readout_points"]]
    entry = {"file": "attention.safetensors", "shape": list(mean.shape), "lens": lens or "simlens",
             "layers": layers, "sites": sites}
    return {"mean": mean, "points": torch.tensor(layers)}, entry


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
    attention = _attention(parts_dir, manifest)
    if attention is not None:
        tensors, extra["attention_a_to_s"] = attention
        store.atomic_write_tensors(out / "attention.safetensors", tensors)
    summary = metrics.summarize(frame, extra)
    store.atomic_write_json(out / "summary.json", summary)
    manifest.update(status="complete", finished=store.now())
    store.atomic_write_json(out / store.MANIFEST, manifest)
    return summary
