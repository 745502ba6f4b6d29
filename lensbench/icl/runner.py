"""`lensbench icl`: an ICL run folder, in the conventions of `lensbench eval` (docs/format.md,
"ICL runs"): a manifest with a fingerprint and a status, one part per finished batch of queries
under `parts/` (an interrupted run resumes there), Parquet tables and `summary.json` at the end.
`--overwrite` removes only the files an ICL run writes.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from lensbench import store
from lensbench.errors import LensbenchError
from lensbench.icl import summary as icl_summary
from lensbench.icl.measure import DECIDE, LENSES, Setup, donor_vectors, measure_batch
from lensbench.icl.patching import MODES, SITES, patch_points
from lensbench.icl.tasks import (
    BASELINES, ICLPrompt, build_prompts, check_task, label_token_ids, load_icl_task,
)
from lensbench.models import DEFAULT_MODEL, DEFAULT_N_CTX, ModelInfo, load_model
from lensbench.runner import sigterm_as_interrupt
from lensbench.tasks import pad_token_id, start_token_id

KIND = "icl"
TABLES = ("predictions", "convergence", "decode", "attention")
OWN_FILES = (store.MANIFEST, "summary.json", "report.json", "queries.parquet", "donors.safetensors",
             *(f"{t}.parquet" for t in TABLES))


@dataclass
class ICLConfig:
    """Everything that defines an ICL run (the CLI's `icl` options)."""

    out: str
    model: str = DEFAULT_MODEL
    task: str = "antonyms"
    kind: str | None = None
    template: str | None = None
    shots: int = 8
    queries: int = 100
    donors: int = 32
    seed: int = 0
    baseline: str = "shuffle"
    site: str = "pre"
    mode: str = "replace"
    with_separator: bool = False
    lenses: str = "logit,simlens"
    decide: str = "candidates"
    points: str = "all"
    naive: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    n_ctx: int = DEFAULT_N_CTX
    overwrite: bool = False

    def validate(self) -> None:
        for name, value, choices in (("--baseline", self.baseline, BASELINES), ("--site", self.site, SITES),
                                     ("--mode", self.mode, MODES), ("--decide", self.decide, DECIDE)):
            if value not in choices:
                raise LensbenchError(f"{name} must be one of {', '.join(choices)} (got {value})")
        for name, value in (("--shots", self.shots), ("--queries", self.queries), ("--donors", self.donors),
                            ("--batch-size", self.batch_size)):
            if value < 1:
                raise LensbenchError(f"{name} must be at least 1 (got {value})")
        self.lens_list()

    def lens_list(self) -> tuple[str, ...]:
        lenses = tuple(x.strip() for x in self.lenses.split(",") if x.strip())
        bad = [x for x in lenses if x not in LENSES]
        if not lenses or bad:
            raise LensbenchError(f"--lenses must be a comma-separated subset of {', '.join(LENSES)} (got {self.lenses})")
        return lenses

    def identity(self) -> dict:
        """The options that change results (everything but where and how fast)."""
        skip = ("out", "device", "batch_size", "overwrite", "naive")
        return {k: v for k, v in asdict(self).items() if k not in skip}


def select_points(points, spec: str):
    """`all`, `every:N` (every N-th point and the last), or comma-separated layers."""
    if spec == "all":
        return points
    if spec.startswith("every:"):
        try:
            step = int(spec.split(":", 1)[1])
        except ValueError:
            step = 0
        if step < 1:
            raise LensbenchError(f"--points every:N needs a positive N (got {spec})")
        return [p for i, p in enumerate(points) if i % step == 0 or i == len(points) - 1]
    try:
        wanted = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise LensbenchError(f"--points must be all, every:N or comma-separated layers (got {spec})") from None
    by_layer = {p.layer: p for p in points}
    missing = [w for w in wanted if w not in by_layer]
    if missing or not wanted:
        raise LensbenchError(f"--points: no point {missing[0] if missing else spec} (points are {points[0].layer}..{points[-1].layer})")
    return [by_layer[w] for w in sorted(set(wanted))]


def remove_own_files(out: Path) -> None:
    """What `--overwrite` removes: the files an ICL or eval run writes, nothing else."""
    for name in OWN_FILES + ("predictions.parquet", "examples.parquet", "attention.safetensors"):
        (out / name).unlink(missing_ok=True)
    parts = out / "parts"
    if parts.is_dir():
        for p in parts.glob("part-*"):
            p.unlink()
        if not any(parts.iterdir()):
            parts.rmdir()


def _open_folder(cfg: ICLConfig, out: Path, fp: str) -> tuple[str, dict]:
    manifest_path = out / store.MANIFEST
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        if old.get("fingerprint") == fp and old.get("format_version") == store.FORMAT_VERSION:
            return ("complete" if old.get("status") == "complete" else "resume"), old
        if not cfg.overwrite:
            raise LensbenchError(f"{out} holds a different run; choose another --out or pass --overwrite")
        remove_own_files(out)
        return "new", {}
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise LensbenchError(f"{out} exists and is not a lensbench run; choose another --out or pass --overwrite")
    return "new", {}


def fingerprint(cfg: ICLConfig, info: ModelInfo, prompts: list[ICLPrompt]) -> str:
    ident = dict(cfg.identity(), model_sha256=info.source_sha256, prompts=[p.tokens for p in prompts])
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def prepare(cfg: ICLConfig, model=None, model_info: ModelInfo | None = None):
    """Every check before compute: options and task first (before the model loads), then the
    label tokens and prompt lengths for this tokenizer."""
    cfg.validate()
    task = load_icl_task(cfg.task, cfg.kind, cfg.template)
    check_task(task, cfg.shots)
    if model is None:
        model, model_info = load_model(cfg.model, cfg.device, cfg.dtype, cfg.n_ctx)
    elif model_info is None:
        model_info = ModelInfo(cfg.model, None, model.cfg.n_layers, model.cfg.d_model,
                               str(model.cfg.original_architecture), cfg.dtype, str(model.cfg.device))
    points = select_points(patch_points(model, cfg.site), cfg.points)
    tok = model.tokenizer
    start = start_token_id(tok)
    label_ids = label_token_ids(task, tok)
    prompts = build_prompts(task, tok, start, label_ids, cfg.queries, cfg.shots, cfg.seed, cfg.baseline)
    donors = build_prompts(task, tok, start, label_ids, cfg.donors, cfg.shots, cfg.seed, cfg.baseline, stream="donor")
    longest = max(p.length for p in prompts + donors)
    if longest > model.cfg.n_ctx:
        raise LensbenchError(f"the longest prompt is {longest} tokens, longer than the model's context ({model.cfg.n_ctx}); use fewer --shots")
    return model, model_info, task, points, start, label_ids, prompts, donors


def queries_table(task, prompts: list[ICLPrompt], tokenizer) -> pa.Table:
    items = task.items
    return pa.table({
        "query_index": pa.array([p.index for p in prompts], pa.int32()),
        "item_id": [items[p.item].id for p in prompts],
        "input": [items[p.item].input for p in prompts],
        "gold": pa.array([p.gold for p in prompts], pa.int16()),
        "gold_label": [task.labels[p.gold] for p in prompts],
        "demo_inputs": [[items[d].input for d in p.demos] for p in prompts],
        "demo_labels": [[task.labels[j] for j in p.demo_labels] for p in prompts],
        "baseline_labels": [[task.labels[j] for j in p.baseline_labels] for p in prompts],
        "label_positions": [p.label_positions for p in prompts],
        "n_tokens": pa.array([p.length for p in prompts], pa.int32()),
        "prompt": [tokenizer.decode(p.tokens[1:]) for p in prompts],
        "baseline_prompt": [tokenizer.decode(p.baseline_tokens[1:]) for p in prompts],
        "tokens": [tokenizer.convert_ids_to_tokens(p.tokens) for p in prompts],
    })


def run_icl(cfg: ICLConfig, model=None, model_info: ModelInfo | None = None, progress: bool = True) -> Path:
    """Measure and store an ICL run in `cfg.out`; resumes a matching unfinished run there."""
    out = Path(cfg.out)
    model, model_info, task, points, start, label_ids, prompts, donors = prepare(cfg, model, model_info)
    fp = fingerprint(cfg, model_info, prompts + donors)
    state, old = _open_folder(cfg, out, fp)
    if state == "complete":
        print(f"lensbench: {out} is already complete; nothing to do", file=sys.stderr)
        return out
    order = sorted(prompts, key=lambda p: (-p.length, p.index))
    plan = old.get("batch_plan") or [[p.index for p in order[i : i + cfg.batch_size]]
                                     for i in range(0, len(order), cfg.batch_size)]
    manifest = {
        "format_version": store.FORMAT_VERSION,
        "kind": KIND,
        "fingerprint": fp,
        "status": "running",
        "model": model_info.to_dict(),
        "task": task.name,
        "task_info": {"name": task.name, "kind": task.kind, "description": task.description, "template": task.template,
                      "source": task.source, "n_items": len(task.items), "labels": task.labels,
                      "label_token_ids": label_ids},
        "config": asdict(cfg),
        "readout_points": [{"layer": p.layer, "site": p.site, "hook": p.hook_name} for p in points],
        "start_token": {"id": start, "text": model.tokenizer.decode([start])},
        "n_queries": len(prompts),
        "n_donors": len(donors),
        "batch_plan": plan,
        "versions": store.versions(),
        "started": old.get("started", store.now()),
    }
    if state == "resume":
        manifest["resumed"] = store.now()
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    store.atomic_write_json(out / store.MANIFEST, manifest)
    if not (out / "queries.parquet").exists():
        store.atomic_write_table(out / "queries.parquet", queries_table(task, prompts, model.tokenizer))

    pad = pad_token_id(model.tokenizer, start)
    done = {int(p.name.split("-")[1]) for p in parts.glob("part-*-predictions.parquet")}
    todo = [i for i in range(len(plan)) if i not in done]
    by_index = {p.index: p for p in prompts}
    bar = tqdm(total=len(prompts), initial=sum(len(plan[i]) for i in done), desc="lensbench icl", unit="query",
               disable=not progress, file=sys.stderr)
    try:
        with sigterm_as_interrupt():
            donor_file = out / "donors.safetensors"
            if todo and donor_file.exists():
                from safetensors.torch import load_file

                vectors = load_file(str(donor_file))
            elif todo:
                bar.set_postfix_str("donor prompts")
                vectors = donor_vectors(model, points, donors, pad, cfg.batch_size)
                store.atomic_write_tensors(donor_file, vectors)
                bar.set_postfix_str("")
            if todo:
                setup = Setup(model, points, torch.tensor(label_ids), pad, vectors, cfg.lens_list(), cfg.mode,
                              cfg.with_separator, cfg.decide, fast=not cfg.naive)
            for i in todo:
                batch = [by_index[q] for q in plan[i]]
                tables = icl_summary.batch_tables(measure_batch(setup, batch), batch, points, task.labels)
                for name in (*[t for t in TABLES if t != "predictions"], "predictions"):
                    # predictions last: its file marks the part done
                    store.atomic_write_table(parts / f"part-{i:06d}-{name}.parquet", tables[name])
                bar.update(len(batch))
    except KeyboardInterrupt:
        bar.close()
        manifest.update(status="interrupted", interrupted=store.now())
        store.atomic_write_json(out / store.MANIFEST, manifest)
        raise
    except Exception:
        bar.close()
        manifest.update(status="failed", failed=store.now())
        store.atomic_write_json(out / store.MANIFEST, manifest)
        raise
    bar.close()
    icl_summary.finalize(out, manifest)
    return out
