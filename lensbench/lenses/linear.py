"""Linear SimLens and the tuned lens: one affine map per readout point (METHOD.md).

At readout point `l < L` the lens reads `W_U · LN_final(A_l h_l[T-1] + b_l)`; at `l = L` the map
is the identity. The maps are fitted on cached residuals of a training split
(`lensbench fit-linear`, `lensbench.lenses.fit`) so that the readout matches

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
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from lensbench.errors import LensbenchError
from lensbench.lenses.base import LENSES, Lens, LensBatch, LensOptions, LensOutput, RunContext, register

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


# --- the config ---------------------------------------------------------------------------------


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
    val_loss: list[float | None] = field(default_factory=list)  # None per layer when nothing was held out
    identity_val_loss: list[float | None] = field(default_factory=list)
    identity_train_loss: list[float] | None = None  # the identity's loss on the training examples (n_val = 0 only)
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

    cost_method = "logit"  # a logit readout after one map
    linear_maps = 1

    @classmethod
    def build(cls, options: LensOptions) -> list[Lens]:
        return load_linear_lenses(options.linear, kind=cls.kind)

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

    def check_site(self, site: str) -> None:
        if site != self.config.site:
            where = f" ({self.path})" if self.path else ""
            raise LensbenchError(f"linear lens {self.name}{where} was fitted at site '{self.config.site}', "
                                 f"the run reads '{site}' (--site {self.config.site}, or refit with --site {site})")

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

    def nonfinite_layers(self) -> list[int]:
        """The readout layers whose map has a NaN or infinite weight or bias."""
        bad = ~(torch.isfinite(self.weight).flatten(1).all(1) & torch.isfinite(self.bias).all(1))
        return [self.config.layers[i] for i in torch.nonzero(bad).flatten().tolist()]

    def refuse_nonfinite(self, path: str | Path) -> None:
        """Refuse to write a lens whose maps hold NaN or infinite values (a diverged fit)."""
        bad = self.nonfinite_layers()
        if bad:
            raise LensbenchError(f"the fitted maps of layer(s) {', '.join(map(str, bad))} have NaN or infinite weights; "
                                 f"nothing written to {path} (lower --lr, or raise --ridge / --weight-decay)")

    def save(self, path: str | Path) -> Path:
        """Write `lens.safetensors` and `config.json` to `path`; a lens with non-finite
        weights is refused (nothing written), and an interrupted save removes what it wrote."""
        from lensbench import store

        path = Path(path)
        self.refuse_nonfinite(path)
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        written = []
        try:
            for name, write, value in (
                (WEIGHTS_FILE, store.atomic_write_tensors, {"weight": self.weight.cpu(), "bias": self.bias.cpu()}),
                (CONFIG_FILE, store.atomic_write_json, self.config.to_dict()),  # last: it marks a complete lens
            ):
                written.append(path / name)
                write(path / name, value)
        except BaseException:
            for file in written:
                file.unlink(missing_ok=True)
            if created:
                try:
                    path.rmdir()
                except OSError:
                    pass
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> "LinearLens":
        """A fitted lens folder; a folder that is not one, or is damaged, is one clear error."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise LensbenchError(f"{path} is not a fitted linear lens (expected {CONFIG_FILE} and {WEIGHTS_FILE}; see `lensbench fit-linear`)")
        try:
            data = json.loads((path / CONFIG_FILE).read_text())
        except (ValueError, OSError):
            raise LensbenchError(f"{path / CONFIG_FILE} is not valid JSON") from None
        if not isinstance(data, dict):
            raise LensbenchError(f"{path / CONFIG_FILE} is not a linear lens config (expected a JSON object)")
        if data.get("format_version") != FORMAT_VERSION:
            raise LensbenchError(f"linear lens {path} has format version {data.get('format_version')}; this lensbench reads {FORMAT_VERSION}")
        config = _config_of(path, data)
        try:
            tensors = load_file(str(path / WEIGHTS_FILE))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise LensbenchError(f"linear lens {path}: {WEIGHTS_FILE} is damaged or truncated ({exc}); refit it") from None
        shapes = {"weight": (len(config.layers), config.d_model, config.d_model), "bias": (len(config.layers), config.d_model)}
        for key, shape in shapes.items():
            if key not in tensors:
                raise LensbenchError(f"linear lens {path}: {WEIGHTS_FILE} has no '{key}' tensor; refit it")
            if tuple(tensors[key].shape) != shape:
                raise LensbenchError(f"linear lens {path}: '{key}' has shape {tuple(tensors[key].shape)}, "
                                     f"its config says {shape}; refit it")
        kind_class = LENSES.get(config.kind, cls)  # the registered class of its kind
        lens = kind_class(tensors["weight"], tensors["bias"], config, name=name, path=str(path))
        bad = lens.nonfinite_layers()
        if bad:
            raise LensbenchError(f"linear lens {path} has NaN or infinite weights at layer(s) {', '.join(map(str, bad))}; refit it")
        return lens


def _config_of(path: Path, data: dict) -> LinearLensConfig:
    """`LinearLensConfig` from a config.json's object, naming what is missing or malformed."""
    required = [f.name for f in fields(LinearLensConfig)
                if f.default is MISSING and f.default_factory is MISSING]
    missing = [key for key in required if key not in data]
    if missing:
        raise LensbenchError(f"linear lens {path}: {CONFIG_FILE} lacks {', '.join(missing)}; refit it")
    if data["kind"] not in KINDS:
        raise LensbenchError(f"linear lens {path}: unknown kind '{data['kind']}' in {CONFIG_FILE} (expected {' or '.join(KINDS)})")
    layers, d_model = data["layers"], data["d_model"]
    if (not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
            or not isinstance(d_model, int) or isinstance(d_model, bool) or d_model < 1):
        raise LensbenchError(f"linear lens {path}: {CONFIG_FILE} has malformed 'layers' or 'd_model'; refit it")
    return LinearLensConfig.from_dict(data)


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


@register
class LinearSimLens(LinearLens):
    """Linear SimLens: maps fitted to SimLens's readout (`fit-linear --target simlens`)."""

    kind = "linear-simlens"


@register
class TunedLens(LinearLens):
    """The tuned-lens baseline: maps fitted to the final distribution (`fit-linear --target final`)."""

    kind = "tuned"
