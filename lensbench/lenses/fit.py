"""Fitting Linear SimLens and the tuned lens (`lensbench fit-linear`): collect the slot residuals
of a training split and each readout point's target, then fit one affine map per point
(closed-form ridge least squares, or Adam on a KL objective from that start). METHOD.md
defines the objectives; `lensbench.lenses.linear` holds the lens and its folder format.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensbench.costs import ModelDims
from lensbench.errors import LensbenchError
from lensbench.lenses.ablation import Ablation
from lensbench.lenses.base import LensBatch, RunContext
from lensbench.lenses.linear import (
    CONFIG_FILE, INITS, KIND_OF_TARGET, OBJECTIVES, TARGETS, WEIGHTS_FILE, LinearLens, LinearLensConfig, unembed_fingerprint,
)
from lensbench.lenses.simlens import SimLens
from lensbench.models import DEFAULT_MODEL, DEFAULT_N_CTX, load_model
from lensbench.readout import collect_slots, pad_candidates, pad_right, readout_points
from lensbench.store import now, versions
from lensbench.tasks import PARTS, encode_examples, load_task, make_batches, pad_token_id, parse_spec, start_token_id


@dataclass
class FitConfig:
    """The options of `lensbench fit-linear`."""

    out: str
    model: str = DEFAULT_MODEL
    task: str = "capitals"
    split: str | None = None  # calib | test (a deterministic half) or a data-set split name
    limit: int | None = 1000
    target: str = "simlens"
    objective: str | None = None  # None: candidates-kl for simlens, vocab-kl for final
    init: str = "lstsq"
    steps: int = 300
    lr: float = 1e-3
    fit_batch: int = 256
    ridge: float = 1e-3
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    batch_size: int = 8
    positions: str = "consecutive"
    site: str = "pre"
    start_token: str | None = None
    skip_invalid: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    n_ctx: int = DEFAULT_N_CTX
    overwrite: bool = False

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise LensbenchError(f"--target must be simlens or final (got {self.target})")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise LensbenchError(f"--objective must be one of {', '.join(OBJECTIVES)} (got {self.objective})")
        if self.init not in INITS:
            raise LensbenchError(f"--init must be lstsq or identity (got {self.init})")
        if not 0 <= self.val_fraction < 1:  # also refuses NaN
            raise LensbenchError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        for option, value, low, strict in (("--lr", self.lr, 0.0, True), ("--ridge", self.ridge, 0.0, False),
                                           ("--weight-decay", self.weight_decay, 0.0, False)):
            if not math.isfinite(value) or value < low or (strict and value == low):
                raise LensbenchError(f"{option} must be a finite number {'>' if strict else '>='} 0 (got {value})")
        if self.steps < 0 or self.fit_batch < 1:
            raise LensbenchError("--steps must be >= 0 and --fit-batch >= 1")
        if self.limit is not None and self.limit < 2:
            raise LensbenchError("--limit must be at least 2")

    @property
    def resolved_objective(self) -> str:
        if self.objective is not None:
            return self.objective
        return "candidates-kl" if self.target == "simlens" else "vocab-kl"

    def task_spec(self) -> str:
        """`--task T --split S` as one task spec: `T@S` for calib/test, `T:S` for a data-set split."""
        if not self.split:
            return self.task
        _, split, part = parse_spec(self.task)
        if self.split in PARTS:
            if part is not None:
                raise LensbenchError(f"--split {self.split} conflicts with the task spec '{self.task}' (it already names @{part})")
            return f"{self.task}@{self.split}"
        if split is not None:
            raise LensbenchError(f"--split {self.split} conflicts with the task spec '{self.task}' (it already names :{split})")
        if part is not None:
            name = self.task.rsplit("@", 1)[0]
            return f"{name}:{self.split}@{part}"
        return f"{self.task}:{self.split}"


@dataclass
class FitData:
    """Cached residuals for fitting, on the CPU in float32."""

    sources: Float[Tensor, "point n d_model"]  # h_l[T-1]
    targets: Float[Tensor, "point n d_model"]  # the target's final residual (before LN_final)
    candidate_ids: Int[Tensor, "n cand"]
    candidate_mask: Float[Tensor, "n cand"]  # bool
    layers: list[int]
    example_ids: list[str]


def collect_fit_data(model, encoded, points, target: str = "simlens", positions: str = "consecutive",
                     batch_size: int = 8, pad_id: int = 0, progress: bool = False) -> FitData:
    """Slot residuals of `encoded` examples at `points` (the final point excluded) and the
    target's final residual at each: SimLens's continuation or the model's own output."""

    if target not in TARGETS:
        raise LensbenchError(f"unknown target '{target}' (expected simlens or final)")
    simlens = SimLens(Ablation(), positions, capture_attention=False)
    ctx = RunContext(model, points, {e.index: e for e in encoded}, pad_id, batch_size)
    simlens.prepare(ctx)
    inner = [i for i, p in enumerate(points) if not p.is_final]
    sources, targets, order = [], [], []
    batches = make_batches(encoded, batch_size)
    for n_done, batch in enumerate(batches):
        tokens, lengths = pad_right([e.tokens for e in batch], pad_id, model.cfg.device)
        slots = collect_slots(model, tokens, lengths, points)
        a = slots.a[inner]
        if target == "simlens":
            lens_batch = LensBatch(model, slots, len(batch), torch.tensor([e.index for e in batch]))
            output = simlens.final_residuals(lens_batch)
            goal = (output.resid.expand(-1, len(batch), -1) if output.shared else output.resid)[inner]
        else:
            goal = slots.a[-1:].expand_as(a)
        sources.append(a.float().cpu().clone())
        targets.append(goal.float().cpu().clone())
        order.extend(batch)
        if progress:
            print(f"\rlensbench fit-linear: residuals {n_done + 1}/{len(batches)} batches", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    cand, mask = pad_candidates([e.candidate_ids for e in order])
    return FitData(torch.cat(sources, 1), torch.cat(targets, 1), cand, mask,
                   [points[i].layer for i in inner], [e.id for e in order])


class _Readout:
    """`W_U · LN_final(x)` over the candidates or the vocabulary, differentiable in x only."""

    def __init__(self, model, device):
        self.model = model
        self.w_u = model.W_U.detach().float().to(device)
        self.b_u = model.b_U.detach().float().to(device)
        self.device = device

    def normed(self, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
        ln = self.model.ln_final
        params = list(ln.parameters())
        saved = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            dtype = params[0].dtype if params else x.dtype
            out = ln(x.to(dtype)[:, None, :])[:, 0]
        finally:
            for p, flag in zip(params, saved):
                p.requires_grad_(flag)
        return out.float()

    def logprobs(self, x: Float[Tensor, "n d_model"], cand: Int[Tensor, "n cand"] | None,
                 mask: Tensor | None) -> Float[Tensor, "n out"]:
        normed = self.normed(x)
        if cand is None:
            return torch.log_softmax(normed @ self.w_u + self.b_u, -1)
        logits = torch.einsum("nd,ncd->nc", normed, self.w_u.T[cand]) + self.b_u[cand]
        return torch.log_softmax(logits.masked_fill(~mask, -1e9), -1)


def _kl(target_logp: Tensor, lens_logp: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over rows of KL(target || lens)."""
    terms = target_logp.exp() * (target_logp - lens_logp)
    if mask is not None:
        terms = torch.where(mask, terms, torch.zeros_like(terms))
    return terms.sum(-1).mean()


def lstsq_affine(sources: Float[Tensor, "n d_model"], targets: Float[Tensor, "n d_model"], ridge: float = 0.0
                 ) -> tuple[Float[Tensor, "d_model d_model"], Float[Tensor, " d_model"]]:
    """Closed-form `A, b` minimising `||A h + b - y||² + λ||A - I||²` (λ = ridge × mean squared
    feature), i.e. ridge regression shrunk toward the identity; ridge 0 is plain least squares
    (minimum-norm deviation from the identity when underdetermined)."""
    x = sources.double().cpu()
    y = (targets.double().cpu() - x)  # fit the deviation from the identity
    n, d = x.shape
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    if ridge > 0:
        gram = design.T @ design
        scale = float(gram.diagonal()[:d].mean())
        penalty = torch.eye(d + 1, dtype=x.dtype) * ridge * scale
        penalty[d, d] = 0.0  # no shrinkage of the bias
        solution = torch.linalg.solve(gram + penalty, design.T @ y)
    else:
        solution = torch.linalg.lstsq(design, y, driver="gelsd").solution
    weight = solution[:d].T + torch.eye(d, dtype=x.dtype)
    return weight.float(), solution[d].float()


def _objective_loss(readout: _Readout, objective: str, x: Tensor, target: Tensor,
                    cand: Tensor, mask: Tensor) -> Tensor:
    if objective == "lstsq":
        return ((x - target) ** 2).sum(-1).mean() / target.pow(2).sum(-1).mean().clamp(min=1e-12)
    if objective == "candidates-kl":
        return _kl(readout.logprobs(target, cand, mask), readout.logprobs(x, cand, mask), mask)
    return _kl(readout.logprobs(target, None, None), readout.logprobs(x, None, None), None)


def _eval_loss(readout, objective, weight, bias, src, tgt, cand, mask, chunk: int = 256) -> float:
    if len(src) == 0:
        return float("nan")
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(src), chunk):
            sl = slice(start, start + chunk)
            x = src[sl] @ weight.T + bias
            total += float(_objective_loss(readout, objective, x, tgt[sl], cand[sl], mask[sl])) * len(src[sl])
    return total / len(src)


def fit_affine(model, sources: Float[Tensor, "n d_model"], targets: Float[Tensor, "n d_model"],
               candidate_ids: Int[Tensor, "n cand"], candidate_mask: Tensor, objective: str = "candidates-kl",
               init: str = "lstsq", steps: int = 300, lr: float = 1e-3, fit_batch: int = 256, ridge: float = 1e-3,
               weight_decay: float = 0.0, seed: int = 0, device=None, readout: "_Readout | None" = None
               ) -> tuple[Float[Tensor, "d_model d_model"], Float[Tensor, " d_model"]]:
    """One affine map so that `W_U · LN_final(A h + b)` matches `W_U · LN_final(y)` under
    `objective` (lstsq: closed form; KL: Adam from `init`, `weight_decay` pulls A toward I)."""
    if objective not in OBJECTIVES:
        raise LensbenchError(f"unknown objective '{objective}' (expected one of {', '.join(OBJECTIVES)})")
    device = device or model.cfg.device
    if objective == "lstsq" or init == "lstsq":
        weight, bias = lstsq_affine(sources, targets, ridge)
    else:
        weight, bias = torch.eye(sources.shape[1]), torch.zeros(sources.shape[1])
    if objective == "lstsq" or steps == 0:
        return weight, bias
    readout = readout if readout is not None else _Readout(model, device)
    src, tgt = sources.to(device), targets.to(device)
    cand, mask = candidate_ids.to(device), candidate_mask.to(device)
    eye = torch.eye(src.shape[1], device=device)
    delta = (weight.to(device) - eye).clone().requires_grad_(True)
    shift = bias.to(device).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([delta, shift], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n = len(src)
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(steps):
            rows = torch.randperm(n, generator=generator)[: min(fit_batch, n)].to(device)
            x = src[rows] + src[rows] @ delta.T + shift
            loss = _objective_loss(readout, objective, x, tgt[rows], cand[rows], mask[rows])
            if weight_decay:
                loss = loss + weight_decay * delta.pow(2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return (delta.detach() + eye).cpu(), shift.detach().cpu()


def held_out_count(n: int, val_fraction: float) -> int:
    """Examples held out of `n` to report the fit loss (none below 4 examples)."""
    return int(round(n * val_fraction)) if n >= 4 else 0


def fit_linear_lens(model, model_info, data: FitData, cfg: FitConfig, progress: bool = False) -> LinearLens:
    """Fit one map per readout layer on `data`; the config records losses and options."""

    objective = cfg.resolved_objective
    n = data.sources.shape[1]
    generator = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=generator)
    n_val = held_out_count(n, cfg.val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    readout = _Readout(model, model.cfg.device)
    weights, biases, train_loss, val_loss, identity_loss = [], [], [], [], []
    started = time.perf_counter()
    d = data.sources.shape[-1]
    eye, zero = torch.eye(d), torch.zeros(d)
    for p, layer in enumerate(data.layers):
        src, tgt = data.sources[p], data.targets[p]
        weight, bias = fit_affine(
            model, src[train], tgt[train], data.candidate_ids[train], data.candidate_mask[train], objective,
            cfg.init, cfg.steps, cfg.lr, cfg.fit_batch, cfg.ridge, cfg.weight_decay, cfg.seed + layer,
            readout=readout,
        )
        dev = model.cfg.device
        args = (data.candidate_ids, data.candidate_mask)
        def loss_on(rows, w, b):
            return _eval_loss(readout, objective, w.to(dev), b.to(dev), src[rows].to(dev), tgt[rows].to(dev),
                              args[0][rows].to(dev), args[1][rows].to(dev))
        train_loss.append(loss_on(train, weight, bias))
        val_loss.append(loss_on(val, weight, bias) if n_val else None)  # nothing held out: no held-out loss
        identity_loss.append(loss_on(val if n_val else train, eye, zero))
        weights.append(weight)
        biases.append(bias)
        if progress:
            print(f"\rlensbench fit-linear: layer {layer} fitted ({p + 1}/{len(data.layers)}), "
                  f"train {objective} {train_loss[-1]:.4f}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    fit_seconds = time.perf_counter() - started
    digest, probes, norm = unembed_fingerprint(model)
    dims = ModelDims.from_cfg(model.cfg)
    config = LinearLensConfig(
        kind=KIND_OF_TARGET[cfg.target], target=cfg.target, objective=objective, model=cfg.model,
        model_sha256=getattr(model_info, "source_sha256", None), unembed_sha256=digest, unembed_probe=probes,
        unembed_norm=norm, n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, site=cfg.site,
        layers=list(data.layers), task=cfg.task_spec(), n_train=len(train), n_val=n_val,
        example_ids_sha256=hashlib.sha256("\n".join(sorted(data.example_ids)).encode()).hexdigest(),
        map_cost=dims.map_cost, dims=dims.to_dict(), fit=asdict(cfg), train_loss=train_loss, val_loss=val_loss,
        identity_val_loss=identity_loss if n_val else [None] * len(identity_loss),
        identity_train_loss=None if n_val else identity_loss, fit_seconds=fit_seconds, versions=versions(), created=now(),
    )
    return LinearLens(torch.stack(weights), torch.stack(biases), config)


def fit_from_config(cfg: FitConfig, model=None, model_info=None, progress: bool = True) -> LinearLens:
    """Everything `lensbench fit-linear` does: load, encode, collect, fit, save to `cfg.out`."""

    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise LensbenchError(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise LensbenchError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    spec = cfg.task_spec()
    examples = load_task(spec)
    if model is None:
        model, model_info = load_model(cfg.model, cfg.device, cfg.dtype, cfg.n_ctx)
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    start_id = start_token_id(model.tokenizer, cfg.start_token)
    encoded, skipped = encode_examples(examples, model.tokenizer, start_id, model.cfg.n_ctx, cfg.skip_invalid)
    if len(encoded) < 2:
        raise LensbenchError(f"fitting needs at least 2 examples; {spec} gave {len(encoded)}")
    if held_out_count(len(encoded), cfg.val_fraction) >= len(encoded):
        raise LensbenchError(f"--val-fraction {cfg.val_fraction} holds out all {len(encoded)} examples of {spec}; "
                             "leave some to fit on")
    points = readout_points(model, cfg.site)
    pad_id = pad_token_id(model.tokenizer, start_id)
    started = time.perf_counter()
    data = collect_fit_data(model, encoded, points, cfg.target, cfg.positions, cfg.batch_size, pad_id, progress)
    collect_seconds = time.perf_counter() - started
    lens = fit_linear_lens(model, model_info, data, cfg, progress)
    lens.config.collect_seconds = collect_seconds
    if skipped:
        lens.config.fit["skipped"] = len(skipped)
    lens.refuse_nonfinite(out)  # before an old lens is removed
    if out.exists() and cfg.overwrite:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (out / name).unlink(missing_ok=True)
    lens.save(out)
    lens.path = str(out)
    return lens
