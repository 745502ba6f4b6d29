"""The evaluation runner: examples x lenses x readout points -> a stored run.

It composes a model, a task and lenses and knows nothing model- or lens-specific. Batches of
length-sorted, right-padded prompts; one hooked forward pass per batch gathers the slot
residuals; each lens maps them to final-layer residuals; one shared readout turns those into
decisions, entropies and top-k tokens. Each finished batch is written to `parts/`, so an
interrupted run resumes where it stopped and ends with the same files.
"""

from __future__ import annotations

import hashlib
import json
import platform
import signal
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

import lensbench
from lensbench import metrics, store
from lensbench.distributed import Dist
from lensbench.errors import LensbenchError
from lensbench.lenses import Lens, LensBatch, RunContext, SimLens, build_lenses
from lensbench.lenses.simlens import cuda_graphs_possible
from lensbench.models import DEFAULT_MODEL, DEFAULT_N_CTX, ModelInfo, load_model
from lensbench.readout import entropy as readout_entropy
from lensbench.readout import check_extra_positions, collect_slots, pad_right, readout_points, unembed
from lensbench.tasks import EncodedExample, Example, encode_examples, load_task, pad_token_id, start_token_id

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


@dataclass
class BatchResult:
    """Columns for one batch of predictions, plus attention sums for the role analyses."""

    columns: dict[str, list]
    attention_sum: torch.Tensor | None = None  # (point, block, head)
    attention_count: torch.Tensor | None = None  # (point, block)


@torch.inference_mode()
def evaluate_batch(
    model,
    lenses: list[Lens],
    ctx: RunContext,
    batch: list[EncodedExample],
    topk: int = 5,
    entropy: str = "candidates",
) -> BatchResult:
    """Run every lens at every readout point on one batch of examples.

    Everything up to the decisions stays on the model's device; the results cross to the host
    once, at the end (no synchronisation per lens, point or row), and the columns are built
    from whole arrays rather than row by row.
    """
    points = ctx.points
    indices = [e.index for e in batch]
    aux = []
    for lens in lenses:
        for donor in lens.donors(indices):
            if donor not in indices and donor not in aux:
                aux.append(donor)
    rows = batch + [ctx.examples[i] for i in aux]
    extra = tuple(sorted({p for lens in lenses for p in lens.extra_positions()}))
    if extra:
        check_extra_positions([len(e.tokens) for e in rows], list(extra), [e.id for e in rows])
    device = model.cfg.device
    tokens, lengths = pad_right([e.tokens for e in rows], ctx.pad_id, device)
    slots = collect_slots(model, tokens, lengths, points, extra)
    lens_batch = LensBatch(model, slots, len(batch), torch.tensor(indices + aux))

    b = len(batch)
    n_cands = [len(e.candidate_ids) for e in batch]
    n_cand = max(n_cands)
    final_logits = unembed(model, slots.a[-1, :b])  # float32, on the unembedding's device
    out_device = final_logits.device
    cand_ids = torch.tensor([e.candidate_ids + [0] * (n_cand - len(e.candidate_ids)) for e in batch], device=out_device)
    cand_mask = torch.arange(n_cand, device=out_device)[None] < torch.tensor(n_cands, device=out_device)[:, None]
    final_decision = final_logits.gather(1, cand_ids).masked_fill(~cand_mask, -torch.inf).argmax(-1)

    attention_sum = attention_count = None
    vocab = model.cfg.d_vocab_out
    chunk = max(1, int(3e7 // (b * vocab)))  # bound the (point, batch, vocab) logits in memory
    per_lens = []  # (decision, entropy, candidate logprobs, top-k probs, top-k ids), each (point, b, ...)
    for lens in lenses:
        output = lens.final_residuals(lens_batch)
        if output.attention is not None:
            att = output.attention.float()
            valid = ~torch.isnan(att)
            sums = torch.where(valid, att, torch.zeros_like(att)).sum(1)
            counts = valid[..., 0].sum(1).float()
            attention_sum = sums if attention_sum is None else attention_sum + sums
            attention_count = counts if attention_count is None else attention_count + counts
        parts = []
        for start in range(0, len(points), chunk):
            # (p, b, vocab) float32 logits; (p, 1, vocab) for a lens shared by the whole batch,
            # read out once and broadcast (as views) to every example's candidates.
            logits = unembed(model, output.resid[start : start + chunk])
            # Two passes over the vocabulary (log-normaliser, top-k) instead of materialising
            # the full log-softmax and its exponential: the readout is memory-bound.
            log_norm = torch.logsumexp(logits, -1, keepdim=True)
            top_logits, top_i = logits.topk(topk, dim=-1)
            top_p = (top_logits - log_norm).exp()
            vocab_entropy = readout_entropy(logits - log_norm) if entropy == "vocab" else None
            if output.shared:
                logits, top_p, top_i = (t.expand(-1, b, -1) for t in (logits, top_p, top_i))
                vocab_entropy = None if vocab_entropy is None else vocab_entropy.expand(-1, b)
            cand_logits = logits.gather(2, cand_ids[None].expand(logits.shape[0], -1, -1))
            cand_logits = cand_logits.masked_fill(~cand_mask[None], -torch.inf)
            cand_logprobs = torch.log_softmax(cand_logits, -1)
            ent = readout_entropy(cand_logprobs) if entropy == "candidates" else vocab_entropy
            del logits
            parts.append((cand_logprobs.argmax(-1), ent, cand_logprobs, top_p, top_i))
        per_lens.append([torch.cat(field) for field in zip(*parts)])
    # The one transfer to the host: (lens, point, b, ...) arrays.
    decision, ent, cand_lp, top_p, top_i = (torch.stack(f).cpu().numpy() for f in zip(*per_lens))
    final_np = final_decision.cpu().numpy()
    if attention_sum is not None:
        attention_sum, attention_count = attention_sum.cpu(), attention_count.cpu()
    return BatchResult(
        _batch_columns(model.tokenizer, lenses, points, batch, decision, ent, cand_lp, top_p, top_i, final_np),
        attention_sum, attention_count,
    )


def _batch_columns(tokenizer, lenses, points, batch, decision, ent, cand_lp, top_p, top_i, final_decision) -> dict[str, list]:
    """The prediction columns, one entry per (lens, point, example) in that nesting order."""
    n_lens, n_points, b = decision.shape
    n_rows = n_lens * n_points * b
    row_of = np.tile(np.arange(b), n_lens * n_points)
    indices = [e.index for e in batch]
    gold = np.array([e.gold for e in batch])
    cand_tokens = [[tokenizer.decode([c]) for c in e.candidate_ids] for e in batch]
    donors = []
    for lens in lenses:
        donor = [-1] * b
        if isinstance(lens, SimLens):
            donor = [lens.donor_of(i) if lens.donor_of(i) is not None else -1 for i in indices]
            fixed = [src.arg for _, src in lens.ablation.slots if src.kind == "example"]
            if fixed:
                donor = [fixed[0]] * b
        donors.extend(donor * n_points)
    flat_decision = decision.reshape(-1)
    n_cands = [len(e.candidate_ids) for e in batch]
    cand_rows = cand_lp.reshape(n_rows, -1).tolist()
    if min(n_cands) != cand_lp.shape[-1]:
        cand_rows = [values[: n_cands[r]] for values, r in zip(cand_rows, row_of.tolist())]
    layers = [p.layer for p in points]
    sites = ["final" if p.is_final else p.site for p in points]
    return {
        "example_index": [indices[r] for r in row_of.tolist()],
        "example_id": [batch[r].id for r in row_of.tolist()],
        "lens": [lens.name for lens in lenses for _ in range(n_points * b)],
        "layer": np.repeat(layers, b).tolist() * n_lens,
        "site": [site for site in sites for _ in range(b)] * n_lens,
        "decision": flat_decision.tolist(),
        "decision_token": [cand_tokens[r][d] for r, d in zip(row_of.tolist(), flat_decision.tolist())],
        "gold": gold[row_of].tolist(),
        "correct": (flat_decision == gold[row_of]).tolist(),
        "final_decision": final_decision[row_of].tolist(),
        "agrees_final": (flat_decision == final_decision[row_of]).tolist(),
        "entropy": ent.reshape(-1).tolist(),
        "candidate_logprobs": cand_rows,
        "topk_ids": top_i.reshape(n_rows, -1).tolist(),
        "topk_probs": top_p.reshape(n_rows, -1).tolist(),
        "donor_index": donors,
    }


def _decode_each(tokenizer, ids: list[list[int]]) -> list[list[str]]:
    """`[[decode([i]) for i in row] for row in ids]`, decoding each distinct id once."""
    if not ids or len({len(row) for row in ids}) != 1 or not ids[0]:  # empty or ragged
        return [[tokenizer.decode([i]) for i in row] for row in ids]
    unique, inverse = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1), return_inverse=True)
    text = np.array([tokenizer.decode([int(i)]) for i in unique] + [None], dtype=object)[:-1]
    return text[inverse].reshape(len(ids), -1).tolist()


def _to_table(columns: dict[str, list], tokenizer) -> pa.Table:
    top_tokens = _decode_each(tokenizer, columns["topk_ids"])
    return pa.table({
        "example_index": pa.array(columns["example_index"], pa.int32()),
        "example_id": pa.array(columns["example_id"], pa.string()),
        "lens": pa.array(columns["lens"], pa.string()),
        "layer": pa.array(columns["layer"], pa.int16()),
        "site": pa.array(columns["site"], pa.string()),
        "decision": pa.array(columns["decision"], pa.int16()),
        "decision_token": pa.array(columns["decision_token"], pa.string()),
        "gold": pa.array(columns["gold"], pa.int16()),
        "correct": pa.array(columns["correct"], pa.bool_()),
        "final_decision": pa.array(columns["final_decision"], pa.int16()),
        "agrees_final": pa.array(columns["agrees_final"], pa.bool_()),
        "entropy": pa.array(columns["entropy"], pa.float32()),
        "candidate_logprobs": pa.array(columns["candidate_logprobs"], pa.list_(pa.float32())),
        "topk_ids": pa.array(columns["topk_ids"], pa.list_(pa.int32())),
        "topk_tokens": pa.array(top_tokens, pa.list_(pa.string())),
        "topk_probs": pa.array(columns["topk_probs"], pa.list_(pa.float32())),
        "donor_index": pa.array(columns["donor_index"], pa.int32()),
    })


def _examples_table(examples: list[Example], encoded: list[EncodedExample], tokenizer) -> pa.Table:
    by_index = {e.index: e for e in encoded}
    rows = [(i, examples[i], by_index[i]) for i in sorted(by_index)]
    return pa.table({
        "example_index": pa.array([i for i, _, _ in rows], pa.int32()),
        "example_id": [e.id for _, e, _ in rows],
        "prompt": [e.prompt for _, e, _ in rows],
        "choices": pa.array([e.choices for _, e, _ in rows], pa.list_(pa.string())),
        "gold": pa.array([e.gold for _, e, _ in rows], pa.int16()),
        "n_tokens": pa.array([len(enc.tokens) for _, _, enc in rows], pa.int32()),
        "start_token": [tokenizer.decode([enc.tokens[0]]) for _, _, enc in rows],
        "answer_token": [tokenizer.decode([enc.tokens[-1]]) for _, _, enc in rows],
        "metadata": [json.dumps(e.metadata, default=str) for _, e, _ in rows],
    })


def versions() -> dict:
    from importlib.metadata import version

    return {
        "lensbench": lensbench.__version__,
        "transformer_lens": version("transformer-lens"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def make_batches(encoded: list[EncodedExample], batch_size: int) -> list[list[EncodedExample]]:
    """Length-sorted (longest first, so memory trouble shows at once) batches, deterministic."""
    ordered = sorted(encoded, key=lambda e: (-len(e.tokens), e.index))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error, which a smaller batch may avoid."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


class BatchSizer:
    """The largest sub-batch believed to fit, learnt from out-of-memory errors.

    It starts at the plan's batch size. An out-of-memory error on `rows` prompts padded to
    `length` tokens halves the token budget to `rows * length / 2`; a later sub-batch gets as
    many rows as the budget allows at its own padded length, so the size grows back as the
    (length-sorted) prompts get shorter, never beyond the plan's batch size.
    """

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.token_budget: int | None = None
        self.backoffs = 0

    def rows_for(self, length: int) -> int:
        if self.token_budget is None:
            return self.max_rows
        return max(1, min(self.max_rows, self.token_budget // max(1, length)))

    def shrink(self, rows: int, length: int) -> None:
        self.token_budget = max(1, rows * length // 2)
        self.backoffs += 1


def merge_results(results: list[BatchResult]) -> BatchResult:
    """One BatchResult from those of consecutive sub-batches (rows concatenated, sums added)."""
    if len(results) == 1:
        return results[0]
    columns = {k: [v for r in results for v in r.columns[k]] for k in results[0].columns}
    sums = [r.attention_sum for r in results if r.attention_sum is not None]
    counts = [r.attention_count for r in results if r.attention_count is not None]
    return BatchResult(columns, sum(sums) if sums else None, sum(counts) if counts else None)


def evaluate_with_backoff(
    model, lenses: list[Lens], ctx: RunContext, batch: list[EncodedExample], sizer: BatchSizer,
    topk: int = 5, entropy: str = "candidates",
) -> BatchResult:
    """`evaluate_batch` on `batch`, split into smaller sub-batches while they run out of memory.

    Every example is evaluated exactly once: a sub-batch that fails is retried whole, smaller,
    and only finished sub-batches are kept. A single example that does not fit is an error.
    """
    results = []
    done = 0
    while done < len(batch):
        length = max(len(e.tokens) for e in batch[done:])
        rows = min(sizer.rows_for(length), len(batch) - done)
        sub = batch[done : done + rows]
        try:
            results.append(evaluate_batch(model, lenses, ctx, sub, topk, entropy))
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(exc) or rows == 1:
                raise
            failed_length = max(len(e.tokens) for e in sub)
        else:
            done += rows
            continue
        # Outside the except block, so the failed attempt's tensors are already released.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        sizer.shrink(rows, failed_length)
        print(f"lensbench: out of memory at {rows} x {failed_length} tokens; "
              f"retrying with {sizer.rows_for(failed_length)} example(s) per batch", file=sys.stderr)
    return merge_results(results)


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
        check = getattr(lens, "check_model", None)
        if check is not None:
            check(model, model_info)
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
                "versions": versions(),
                "started": old.get("started", store.now()),
            }
            if state == "resume":
                manifest["resumed"] = store.now()
            parts_dir.mkdir(parents=True, exist_ok=True)
            store.atomic_write_json(manifest_path, manifest)
            if not (out / "examples.parquet").exists():
                store.atomic_write_table(out / "examples.parquet", _examples_table(examples, encoded, model.tokenizer))
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
                store.atomic_write_table(parts_dir / f"part-{i:06d}.parquet", _to_table(result.columns, model.tokenizer))
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


def format_table(summary: dict, lenses: list[str] | None = None) -> str:
    """The per-layer accuracy / fidelity table printed at the end of a run."""
    names = lenses or list(summary["lenses"])
    header = f"{'layer':>5} " + " ".join(f"{name[:22]:>23}" for name in names)
    sub = f"{'':>5} " + " ".join(f"{'acc':>11} {'fid':>11}" for _ in names)
    lines = [header, sub]
    layers = summary["lenses"][names[0]]["layer"]
    for i, layer in enumerate(layers):
        cells = []
        for name in names:
            s = summary["lenses"][name]
            cells.append(f"{s['accuracy'][i]:>11.3f} {s['fidelity'][i]:>11.3f}")
        lines.append(f"{layer:>5} " + " ".join(cells))
    lines.append(f"final model accuracy: {summary['final_accuracy']:.3f} on {summary['n_examples']} examples")
    return "\n".join(lines)
