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
from lensbench.errors import LensbenchError
from lensbench.lenses import Lens, LensBatch, RunContext, SimLens, build_lenses
from lensbench.models import DEFAULT_MODEL, DEFAULT_N_CTX, ModelInfo, load_model
from lensbench.readout import ReadoutPoint, check_extra_positions, collect_slots, pad_right, readout_points, unembed
from lensbench.tasks import EncodedExample, Example, encode_examples, load_task, start_token_id

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
    batch_size: int = 8
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
    shard: tuple[int, int] | None = None  # (rank, world): evaluate every world-th batch

    def validate(self) -> None:
        if self.batch_size < 1:
            raise LensbenchError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.limit is not None and self.limit < 1:
            raise LensbenchError(f"--limit must be at least 1 (got {self.limit})")
        if not 1 <= self.topk <= 100:
            raise LensbenchError(f"--topk must be between 1 and 100 (got {self.topk})")
        if self.entropy not in ENTROPY_MODES:
            raise LensbenchError(f"--entropy must be one of {', '.join(ENTROPY_MODES)} (got {self.entropy})")
        if self.mean_examples < 1:
            raise LensbenchError("--mean-examples must be at least 1")

    def identity(self) -> dict:
        """The options that change results: a different identity is a different run."""
        keep = ("model", "task", "lenses", "ablations", "limit", "dtype", "start_token", "positions", "site",
                "topk", "entropy", "skip_invalid", "linear", "mean_examples", "n_ctx")
        return {k: getattr(self, k) for k in keep}


@dataclass
class BatchResult:
    """Columns for one batch of predictions, plus attention sums for the role analyses."""

    columns: dict[str, list]
    attention_sum: torch.Tensor | None = None  # (point, block, head)
    attention_count: torch.Tensor | None = None  # (point, block)


def _entropy(logprobs: torch.Tensor) -> torch.Tensor:
    probs = logprobs.exp()
    return -(probs * torch.where(probs > 0, logprobs, torch.zeros_like(logprobs))).sum(-1)


@torch.inference_mode()
def evaluate_batch(
    model,
    lenses: list[Lens],
    ctx: RunContext,
    batch: list[EncodedExample],
    topk: int = 5,
    entropy: str = "candidates",
) -> BatchResult:
    """Run every lens at every readout point on one batch of examples."""
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
    n_cand = max(len(e.candidate_ids) for e in batch)
    cand_ids = torch.zeros(b, n_cand, dtype=torch.long)
    cand_mask = torch.zeros(b, n_cand, dtype=torch.bool)
    for row, e in enumerate(batch):
        cand_ids[row, : len(e.candidate_ids)] = torch.tensor(e.candidate_ids)
        cand_mask[row, : len(e.candidate_ids)] = True
    final_logits = unembed(model, slots.a[-1, :b]).cpu()
    final_decision = final_logits.gather(1, cand_ids).masked_fill(~cand_mask, -torch.inf).argmax(-1)
    gold = torch.tensor([e.gold for e in batch])

    columns: dict[str, list] = {k: [] for k in (
        "example_index", "example_id", "lens", "layer", "site", "decision", "decision_token", "gold", "correct",
        "final_decision", "agrees_final", "entropy", "candidate_logprobs", "topk_ids", "topk_probs", "donor_index",
    )}
    attention_sum = attention_count = None
    tokenizer = model.tokenizer
    vocab = model.cfg.d_vocab_out
    chunk = max(1, int(3e7 // (b * vocab)))  # bound the (point, batch, vocab) logits in memory
    for lens in lenses:
        output = lens.final_residuals(lens_batch)
        if output.attention is not None:
            att = output.attention.float().cpu()
            valid = ~torch.isnan(att)
            sums = torch.where(valid, att, torch.zeros_like(att)).sum(1)
            counts = valid[..., 0].sum(1).float()
            attention_sum = sums if attention_sum is None else attention_sum + sums
            attention_count = counts if attention_count is None else attention_count + counts
        donor = [-1] * b
        if isinstance(lens, SimLens):
            donor = [lens.donor_of(i) if lens.donor_of(i) is not None else -1 for i in indices]
            fixed = [src.arg for _, src in lens.ablation.slots if src.kind == "example"]
            if fixed:
                donor = [fixed[0]] * b
        for start in range(0, len(points), chunk):
            logits = unembed(model, output.resid[start : start + chunk]).cpu()  # (p, b, vocab)
            full_logprobs = torch.log_softmax(logits, -1)
            cand_logits = logits.gather(2, cand_ids[None].expand(logits.shape[0], -1, -1))
            cand_logits = cand_logits.masked_fill(~cand_mask[None], -torch.inf)
            cand_logprobs = torch.log_softmax(cand_logits, -1)
            decision = cand_logprobs.argmax(-1)
            ent = _entropy(cand_logprobs) if entropy == "candidates" else _entropy(full_logprobs)
            top_p, top_i = full_logprobs.exp().topk(topk, dim=-1)
            for p_off in range(logits.shape[0]):
                point: ReadoutPoint = points[start + p_off]
                for row, ex in enumerate(batch):
                    d = int(decision[p_off, row])
                    columns["example_index"].append(ex.index)
                    columns["example_id"].append(ex.id)
                    columns["lens"].append(lens.name)
                    columns["layer"].append(point.layer)
                    columns["site"].append("final" if point.is_final else point.site)
                    columns["decision"].append(d)
                    columns["decision_token"].append(tokenizer.decode([ex.candidate_ids[d]]))
                    columns["gold"].append(ex.gold)
                    columns["correct"].append(d == ex.gold)
                    columns["final_decision"].append(int(final_decision[row]))
                    columns["agrees_final"].append(d == int(final_decision[row]))
                    columns["entropy"].append(float(ent[p_off, row]))
                    columns["candidate_logprobs"].append(cand_logprobs[p_off, row, : len(ex.candidate_ids)].tolist())
                    columns["topk_ids"].append(top_i[p_off, row].tolist())
                    columns["topk_probs"].append(top_p[p_off, row].tolist())
                    columns["donor_index"].append(donor[row])
    return BatchResult(columns, attention_sum, attention_count)


def _to_table(columns: dict[str, list], tokenizer) -> pa.Table:
    top_tokens = [[tokenizer.decode([i]) for i in ids] for ids in columns["topk_ids"]]
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
    import transformer_lens  # noqa: F401
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
    if model is None:
        model, model_info = load_model(cfg.model, cfg.device, cfg.dtype, cfg.n_ctx)
    elif model_info is None:
        model_info = ModelInfo(cfg.model, None, model.cfg.n_layers, model.cfg.d_model,
                               str(model.cfg.original_architecture), cfg.dtype, str(model.cfg.device))
    lenses = build_lenses(cfg.lenses, cfg.ablations, cfg.positions, cfg.linear)
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
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else start_id
    ctx = RunContext(model, points, {e.index: e for e in encoded}, pad_id, cfg.batch_size, cfg.mean_examples)
    return model, model_info, examples, encoded, skipped, lenses, ctx, start_id


def fingerprint(cfg: EvalConfig, model_info: ModelInfo, encoded: list[EncodedExample]) -> str:
    ident = dict(cfg.identity(), model_sha256=model_info.source_sha256, examples=[e.id for e in encoded])
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def run_eval(cfg: EvalConfig, model=None, model_info: ModelInfo | None = None, progress: bool = True) -> Path:
    """Evaluate and store a run in `cfg.out`; resumes a matching unfinished run there."""
    out = Path(cfg.out)
    model, model_info, examples, encoded, skipped, lenses, ctx, start_id = prepare(cfg, model, model_info)
    fp = fingerprint(cfg, model_info, encoded)
    parts_dir = out / "parts"
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
        elif old.get("status") == "complete" and cfg.shard is None:
            print(f"lensbench: {out} is already complete; nothing to do", file=sys.stderr)
            return out
    elif out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise LensbenchError(f"{out} exists and is not a lensbench run; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    parts_dir.mkdir(parents=True, exist_ok=True)

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
        "versions": versions(),
        "started": store.now(),
    }
    if manifest_path.exists():  # resuming: keep the original start time
        manifest["started"] = json.loads(manifest_path.read_text()).get("started", manifest["started"])
        manifest["resumed"] = store.now()
    store.atomic_write_json(manifest_path, manifest)
    if not (out / "examples.parquet").exists():
        store.atomic_write_table(out / "examples.parquet", _examples_table(examples, encoded, model.tokenizer))

    batches = make_batches(encoded, cfg.batch_size)
    done = {int(p.stem.split("-")[1]) for p in parts_dir.glob("part-*.parquet")}
    todo = [i for i in range(len(batches)) if i not in done]
    if cfg.shard is not None:
        rank, world = cfg.shard
        todo = [i for i in todo if i % world == rank]
    for lens in lenses:
        lens.prepare(ctx)
    n_done = sum(len(batches[i]) for i in done)
    bar = tqdm(total=len(encoded), initial=n_done, desc="lensbench eval", unit="ex", disable=not progress, file=sys.stderr)
    try:
        with _sigterm_as_interrupt():
            for i in todo:
                result = evaluate_batch(model, lenses, ctx, batches[i], cfg.topk, cfg.entropy)
                if result.attention_sum is not None:
                    store.atomic_write_tensors(parts_dir / f"part-{i:06d}.attn.safetensors",
                                               {"sum": result.attention_sum, "count": result.attention_count})
                store.atomic_write_table(parts_dir / f"part-{i:06d}.parquet", _to_table(result.columns, model.tokenizer))
                bar.update(len(batches[i]))
    except KeyboardInterrupt:
        bar.close()
        manifest.update(status="interrupted", interrupted=store.now())
        store.atomic_write_json(manifest_path, manifest)
        raise
    except BaseException:
        bar.close()
        manifest.update(status="failed", failed=store.now())
        store.atomic_write_json(manifest_path, manifest)
        raise
    bar.close()
    if cfg.shard is not None and len({int(p.stem.split("-")[1]) for p in parts_dir.glob("part-*.parquet")}) < len(batches):
        return out  # other shards still running; the last one to finish merges
    finalize(out, manifest)
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
