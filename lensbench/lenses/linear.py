"""Linear SimLens and the tuned lens: one affine map per readout point (METHOD.md).

At readout point `l < L` the lens reads `W_U · LN_final(A_l h_l[T-1] + b_l)`; at `l = L` the map
is the identity. The maps are fitted on cached residuals of a training split
(`lensbench fit-linear`) so that the readout matches

- SimLens's readout at `l` (`--target simlens`, the default): **Linear SimLens**, name
  `linear-simlens`, used for confidence (entropy) in SimExit;
- the model's final distribution (`--target final`): a **tuned lens** (Belrose et al. 2023),
  name `tuned`, a well-known baseline.

Objectives: `candidates-kl` (KL of the candidate distribution; the default for SimLens
targets), `vocab-kl` (KL over the whole vocabulary; the tuned lens's loss and its default),
`lstsq` (closed-form ridge least squares on the target's final residual, before `LN_final`).
KL fits start from the `lstsq` solution (`--init lstsq`) or from the identity
(`--init identity`, i.e. the logit lens) and run Adam.

A fitted lens is a folder: `lens.safetensors` (`weight` of shape (layer, d_model, d_model),
`bias` of shape (layer, d_model); `A_l = weight[l]`) and `config.json` (`LinearLensConfig`:
model, its sha256 and an unembedding fingerprint, layers, training data, options, fit loss per
layer). A lens is refused by a model other than the one it was fitted for (`check_model`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensbench.errors import LensbenchError
from lensbench.lenses.base import Lens, LensBatch, LensOutput, RunContext
from lensbench.models import DEFAULT_MODEL, DEFAULT_N_CTX

KINDS = ("linear-simlens", "tuned")
TARGETS = ("simlens", "final")
KIND_OF_TARGET = {"simlens": "linear-simlens", "final": "tuned"}
OBJECTIVES = ("candidates-kl", "vocab-kl", "lstsq")
INITS = ("lstsq", "identity")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "lens.safetensors"
FORMAT_VERSION = 1
N_PROBES = 8
PROBE_TOLERANCE = 2e-2  # of ||W_U||_F: far above bfloat16 rounding, far below another model


# --- configs ----------------------------------------------------------------------------------


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
        if not 0 <= self.val_fraction < 1:
            raise LensbenchError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if self.steps < 0 or self.lr <= 0 or self.fit_batch < 1 or self.ridge < 0 or self.weight_decay < 0:
            raise LensbenchError("--steps, --ridge and --weight-decay must be >= 0, --lr > 0 and --fit-batch >= 1")
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
        from lensbench.tasks import PARTS, parse_spec

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
class LinearLensConfig:
    """What a fitted lens records beside its weights (`config.json`)."""

    kind: str
    target: str
    objective: str
    model: str
    model_sha256: str | None
    unembed_sha256: str | None
    unembed_probe: list[float]
    unembed_norm: float
    n_layers: int
    d_model: int
    site: str
    layers: list[int]
    task: str = ""
    n_train: int = 0
    n_val: int = 0
    example_ids_sha256: str = ""
    map_cost: float | None = None  # one map in layer-token units (lensbench.compute)
    dims: dict | None = None
    fit: dict = field(default_factory=dict)  # the FitConfig
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    identity_val_loss: list[float] = field(default_factory=list)
    collect_seconds: float = 0.0
    fit_seconds: float = 0.0
    versions: dict = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LinearLensConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- the unembedding fingerprint ----------------------------------------------------------------


def unembed_fingerprint(model) -> tuple[str | None, list[float], float]:
    """`(sha256 of W_U in float32 or None, probes u_k^T W_U v_k, ||W_U||_F)`.

    The sha256 is exact but dtype-bound, so a lens fitted in float32 is accepted by the same
    model in bfloat16 through the probes, which survive rounding and differ between models.
    """
    w_u = model.W_U.detach()
    d_model, d_vocab = w_u.shape
    generator = torch.Generator().manual_seed(1234)
    u = torch.randn(N_PROBES, d_model, generator=generator, dtype=torch.float64)
    v = torch.randn(N_PROBES, d_vocab, generator=generator, dtype=torch.float64)
    projected = torch.zeros(N_PROBES, d_model, dtype=torch.float64)  # v_k^T W_U^T
    norm_sq = 0.0
    digest = hashlib.sha256() if w_u.dtype == torch.float32 else None
    chunk = 16384
    for start in range(0, d_vocab, chunk):
        block = w_u[:, start : start + chunk].float().cpu()
        if digest is not None:
            digest.update(block.contiguous().numpy().tobytes())
        block64 = block.double()
        projected += v[:, start : start + chunk] @ block64.T
        norm_sq += float((block64**2).sum())
    probes = (u * projected).sum(-1) / (d_model * d_vocab) ** 0.5
    return (digest.hexdigest() if digest else None), [float(p) for p in probes], norm_sq**0.5


def _short(digest: str) -> str:
    return digest if len(digest) <= 24 else digest[:12] + "..."


# --- the lens -----------------------------------------------------------------------------------


class LinearLens(Lens):
    """`A_l h_l[T-1] + b_l` per readout point, the identity at the final point."""

    def __init__(self, weight: Float[Tensor, "layer d_model d_model"], bias: Float[Tensor, "layer d_model"],
                 config: LinearLensConfig, name: str | None = None, path: str | None = None):
        if weight.shape[0] != len(config.layers) or bias.shape[0] != len(config.layers):
            raise LensbenchError("linear lens weights do not match its config's layers")
        self.weight = weight.float()
        self.bias = bias.float()
        self.config = config
        self.name = name or config.kind
        self.path = path
        self._index = {layer: i for i, layer in enumerate(config.layers)}
        self._on: dict = {}

    def _params(self, device) -> tuple[Tensor, Tensor]:
        key = str(device)
        if key not in self._on:
            self._on = {key: (self.weight.to(device), self.bias.to(device))}
        return self._on[key]

    def has_map(self, layer: int) -> bool:
        return layer in self._index

    def transform(self, h: Float[Tensor, "n d_model"], layer: int) -> Float[Tensor, "n d_model"]:
        """`A_l h + b_l` at readout layer `layer` (the identity at the final layer), in h's dtype."""
        if layer == self.config.n_layers:
            return h
        if layer not in self._index:
            raise LensbenchError(f"linear lens {self.name} has no map for layer {layer}")
        weight, bias = self._params(h.device)
        i = self._index[layer]
        return (h.float() @ weight[i].T + bias[i]).to(h.dtype)

    def prepare(self, ctx: RunContext) -> None:
        for point in ctx.points:
            if point.is_final:
                continue
            if point.site != self.config.site:
                raise LensbenchError(f"linear lens {self.name} was fitted at site '{self.config.site}', the run reads '{point.site}'")
            if point.layer not in self._index:
                raise LensbenchError(f"linear lens {self.name} has no map for readout layer {point.layer}")

    def final_residuals(self, batch: LensBatch) -> LensOutput:
        a = batch.slots.a[:, : batch.n_primary]
        out = torch.empty_like(a)
        for p, point in enumerate(batch.slots.points):
            out[p] = a[p] if point.is_final else self.transform(a[p], point.layer)
        return LensOutput(out)

    def check_model(self, model, model_info=None) -> None:
        """Refuse a model other than the one this lens was fitted for."""
        cfg = self.config
        where = f" ({self.path})" if self.path else ""
        if model.cfg.n_layers != cfg.n_layers or model.cfg.d_model != cfg.d_model:
            raise LensbenchError(
                f"linear lens{where} was fitted for {cfg.model} ({cfg.n_layers} layers, d_model {cfg.d_model}); "
                f"this model has {model.cfg.n_layers} layers, d_model {model.cfg.d_model}"
            )
        sha = getattr(model_info, "source_sha256", None) if model_info is not None else None
        if sha is not None and cfg.model_sha256 is not None and sha != cfg.model_sha256:
            raise LensbenchError(
                f"linear lens{where} was fitted for {cfg.model} (sha256 {_short(cfg.model_sha256)}); "
                f"this model ({getattr(model_info, 'spec', '?')}) has sha256 {_short(sha)}"
            )
        digest, probes, norm = unembed_fingerprint(model)
        if digest is not None and cfg.unembed_sha256 is not None and digest == cfg.unembed_sha256:
            return
        # each probe has a spread of about the RMS entry of W_U across models
        rms = cfg.unembed_norm / (cfg.d_model * model.cfg.d_vocab_out) ** 0.5
        gap = max(abs(p - q) for p, q in zip(probes, cfg.unembed_probe))
        if gap > PROBE_TOLERANCE * rms or abs(norm - cfg.unembed_norm) > PROBE_TOLERANCE * cfg.unembed_norm:
            raise LensbenchError(f"linear lens{where} was fitted for {cfg.model}: this model's unembedding differs (refit the lens)")

    def save(self, path: str | Path) -> Path:
        from lensbench import store

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        store.atomic_write_tensors(path / WEIGHTS_FILE, {"weight": self.weight.cpu(), "bias": self.bias.cpu()})
        store.atomic_write_json(path / CONFIG_FILE, self.config.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> "LinearLens":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise LensbenchError(f"{path} is not a fitted linear lens (expected {CONFIG_FILE} and {WEIGHTS_FILE}; see `lensbench fit-linear`)")
        try:
            data = json.loads((path / CONFIG_FILE).read_text())
        except ValueError:
            raise LensbenchError(f"{path / CONFIG_FILE} is not valid JSON") from None
        if data.get("format_version") != FORMAT_VERSION:
            raise LensbenchError(f"linear lens {path} has format version {data.get('format_version')}; this lensbench reads {FORMAT_VERSION}")
        config = LinearLensConfig.from_dict(data)
        tensors = load_file(str(path / WEIGHTS_FILE))
        return cls(tensors["weight"], tensors["bias"], config, name=name, path=str(path))


def load_linear_lenses(dirs: list[str], kind: str = "linear-simlens") -> list[Lens]:
    """The lenses of `kind` among the fitted-lens folders `dirs` (`--linear`, repeatable).

    One lens of a kind is named after the kind; several are named `KIND[FOLDER]`.
    """
    if kind not in KINDS:
        raise LensbenchError(f"unknown linear lens kind '{kind}' (expected linear-simlens or tuned)")
    if not dirs:
        hint = " --target final" if kind == "tuned" else ""
        raise LensbenchError(f"lens '{kind}' needs --linear DIR, a folder written by `lensbench fit-linear{hint}`")
    loaded = [LinearLens.load(d) for d in dirs]
    matching = [lens for lens in loaded if lens.config.kind == kind]
    if not matching:
        held = ", ".join(f"{lens.path}: {lens.config.kind}" for lens in loaded)
        raise LensbenchError(f"none of the --linear folders holds a {kind} lens ({held})")
    if len(matching) > 1:
        for lens in matching:
            lens.name = f"{kind}[{Path(lens.path).name}]"
    return matching


# --- fitting ------------------------------------------------------------------------------------


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
    from lensbench.lenses.simlens import Ablation, SimLens
    from lensbench.readout import collect_slots, pad_right
    from lensbench.runner import make_batches

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
    n_cand = max(len(e.candidate_ids) for e in order)
    cand = torch.zeros(len(order), n_cand, dtype=torch.long)
    mask = torch.zeros(len(order), n_cand, dtype=torch.bool)
    for row, e in enumerate(order):
        cand[row, : len(e.candidate_ids)] = torch.tensor(e.candidate_ids)
        mask[row, : len(e.candidate_ids)] = True
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


def fit_linear_lens(model, model_info, data: FitData, cfg: FitConfig, progress: bool = False) -> LinearLens:
    """Fit one map per readout layer on `data`; the config records losses and options."""
    from lensbench.compute import ModelDims
    from lensbench.runner import versions
    from lensbench.store import now

    objective = cfg.resolved_objective
    n = data.sources.shape[1]
    generator = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=generator)
    n_val = int(round(n * cfg.val_fraction)) if n >= 4 else 0
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
        val_loss.append(loss_on(val, weight, bias))
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
        identity_val_loss=identity_loss, fit_seconds=fit_seconds, versions=versions(), created=now(),
    )
    return LinearLens(torch.stack(weights), torch.stack(biases), config)


def fit_from_config(cfg: FitConfig, model=None, model_info=None, progress: bool = True) -> LinearLens:
    """Everything `lensbench fit-linear` does: load, encode, collect, fit, save to `cfg.out`."""
    from lensbench.models import load_model
    from lensbench.readout import readout_points
    from lensbench.tasks import encode_examples, load_task, pad_token_id, start_token_id

    cfg.validate()
    out = Path(cfg.out)
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
    points = readout_points(model, cfg.site)
    pad_id = pad_token_id(model.tokenizer, start_id)
    started = time.perf_counter()
    data = collect_fit_data(model, encoded, points, cfg.target, cfg.positions, cfg.batch_size, pad_id, progress)
    collect_seconds = time.perf_counter() - started
    lens = fit_linear_lens(model, model_info, data, cfg, progress)
    lens.config.collect_seconds = collect_seconds
    if skipped:
        lens.config.fit["skipped"] = len(skipped)
    if out.exists() and cfg.overwrite:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (out / name).unlink(missing_ok=True)
    lens.save(out)
    lens.path = str(out)
    return lens


# --- command line -------------------------------------------------------------------------------


def add_cli(sub) -> None:
    from lensbench.cli import _positive_int, add_model_args

    p = sub.add_parser("fit-linear", help="fit Linear SimLens (or, with --target final, a tuned lens) on cached residuals")
    add_model_args(p)
    p.add_argument("--task", default="capitals", help="task spec name[:split][@calib|@test] (see `lensbench tasks`)")
    p.add_argument("--split", help="calib or test (a deterministic half, as @calib/@test) or a data-set split name")
    p.add_argument("--out", required=True, help="folder to write (lens.safetensors + config.json)")
    p.add_argument("--limit", type=_positive_int, default=1000, help="first N examples (default 1000)")
    p.add_argument("--target", default="simlens", choices=TARGETS,
                   help="match SimLens's readout (linear-simlens, default) or the final distribution (tuned)")
    p.add_argument("--objective", choices=OBJECTIVES,
                   help="candidates-kl (default for simlens), vocab-kl (default for final) or lstsq (closed form)")
    p.add_argument("--init", default="lstsq", choices=INITS, help="start of the KL fit (default lstsq)")
    p.add_argument("--steps", type=int, default=300, help="Adam steps per layer for KL objectives (default 300)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--fit-batch", type=_positive_int, default=256, help="examples per Adam step (default 256)")
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge strength toward the identity for lstsq (relative; default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="KL fits: penalty on ||A - I||² (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out to report the fit loss (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=8, help="examples per forward pass when collecting residuals")
    p.add_argument("--positions", default="consecutive", choices=["consecutive", "original"], help="SimLens continuation positions")
    p.add_argument("--site", default="pre", choices=["pre", "mid"], help="readout site the maps read")
    p.add_argument("--start-token", help="text of the start token [s] (default: BOS, else EOS)")
    p.add_argument("--skip-invalid", action="store_true", help="skip examples whose candidates are not single tokens")
    p.add_argument("--overwrite", action="store_true", help="replace a lens in --out")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's; 1 is fastest on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=cmd_fit_linear)


def cmd_fit_linear(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FitConfig(
        out=args.out, model=args.model, task=args.task, split=args.split, limit=args.limit, target=args.target,
        objective=args.objective, init=args.init, steps=args.steps, lr=args.lr, fit_batch=args.fit_batch,
        ridge=args.ridge, weight_decay=args.weight_decay, val_fraction=args.val_fraction, seed=args.seed,
        batch_size=args.batch_size, positions=args.positions, site=args.site, start_token=args.start_token,
        skip_invalid=args.skip_invalid, device=args.device, dtype=args.dtype, n_ctx=args.n_ctx, overwrite=args.overwrite,
    )
    lens = fit_from_config(cfg, progress=not args.quiet)
    c = lens.config
    print(f"{c.kind} for {c.model}: {len(c.layers)} maps, {c.objective}, {c.n_train} train / {c.n_val} held-out examples of {c.task}")
    print(f"{'layer':>5} {'train':>10} {'held-out':>10} {'identity':>10}")
    for layer, tr, va, idl in zip(c.layers, c.train_loss, c.val_loss, c.identity_val_loss):
        print(f"{layer:>5} {tr:>10.4f} {va:>10.4f} {idl:>10.4f}")
    print(f"time: residuals {c.collect_seconds:.1f} s, fitting {c.fit_seconds:.1f} s, total {c.collect_seconds + c.fit_seconds:.1f} s")
    print(f"lens: {lens.path}")
    return 0
