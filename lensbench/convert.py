"""Convert a GGUF file or a transformers folder into a cached TransformerLens checkpoint.

`lensbench.models` loads the result; this module never imports it.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import torch

from lensbench.errors import LensbenchError
from lensbench.layout import relayout_plan, save_aligned


def cache_root() -> Path:
    return Path(os.environ.get("LENSBENCH_CACHE", Path.home() / ".cache" / "lensbench"))


def _tl_config(config_source: str, device: str, n_ctx: int, **kwargs):
    """TransformerLens's config for a saved HF config folder (or an official name)."""
    import transformer_lens.loading_from_pretrained as loading

    try:
        return loading.get_pretrained_model_config(config_source, fold_ln=True, device=device, n_ctx=n_ctx, **kwargs)
    except NotImplementedError as exc:
        raise LensbenchError(f"TransformerLens cannot convert this architecture: {exc}") from None


def _open_to_others(folder: Path) -> None:
    """Modes as the umask allows for `folder` and all in it: mkdtemp makes 0700 and safetensors
    0600, which would shut other users of a shared cache out."""
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def check_gguf(path: Path) -> None:
    """A one-line error unless `path` is a whole GGUF file: magic bytes, header, tensor table,
    and every tensor's data inside the file."""
    from gguf import GGUFReader

    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise LensbenchError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise LensbenchError(f"{path} is not a valid GGUF file (it does not start with the GGUF magic bytes)")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        detail = f"its tensors need {end} bytes, the file has {size}"
    except MemoryError:
        raise
    except Exception as exc:  # the reader fails in many ways on cut or corrupt bytes
        end, detail = size + 1, (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    if end > size:
        raise LensbenchError(f"{path} is not a valid, complete GGUF file (truncated or corrupt: {detail})")


def _convert_to_cache(source: Path, kind: str, sha: str, n_ctx: int, tl_name: str | None = None) -> Path:
    """Convert a GGUF or transformers folder into a cached TransformerLens checkpoint."""
    # A neutral folder name: TransformerLens picks some architectures from the path's words
    # ("llama", "gemma-3"), which would bypass the config we saved.
    target = cache_root() / "models" / f"m-{sha[:16]}-ctx{n_ctx}"
    if (target / "meta.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    if kind == "gguf":
        check_gguf(source)
    print(f"lensbench: converting {source.name} to TransformerLens (once; cached in {target.parent})", flush=True)
    if kind == "gguf":
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            hf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        except (ValueError, KeyError, IndexError, struct.error) as exc:  # a GGUF transformers cannot read
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise LensbenchError(f"transformers cannot load the GGUF {source}: {first}") from None
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    hf_config = hf_model.config
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    hf_config.architectures = [type(hf_model).__name__]

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        hf_dir = staging / "hfconfig"
        hf_config.save_pretrained(hf_dir)
        tokenizer.save_pretrained(staging / "tokenizer")
        config_source = tl_name or str(hf_dir)
        cfg = _tl_config(config_source, "cpu", n_ctx)
        state = loading.get_pretrained_state_dict(config_source, cfg, hf_model)
        # Memory (what lets a 1.5B model convert in 24 GB): the transformers model goes before
        # the TransformerLens one is built; that one skips its random initialisation (every
        # parameter is loaded below); and as TransformerLens deep-copies the whole state dict
        # for each processing step while the caller still holds the original, value biases
        # are folded in place afterwards rather than by a third copy (same result).
        del hf_model
        gc.collect()
        cfg.init_weights = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        model.load_and_process_state_dict(
            state, fold_ln=True, center_writing_weights=False, center_unembed=False,
            fold_value_biases=False, refactor_factored_attn_matrices=False,
        )
        del state
        _fold_value_biases(model)
        # The weights TransformerLens re-lays out per call are written in that layout (meta's
        # "layout") and aligned as in memory, so that loading takes them as views of the file.
        layout = relayout_plan(model)
        # (views: `save_aligned` makes each contiguous as it writes it, one at a time, so a 1.5B
        # model is not held twice)
        params = {k: v.detach().permute(*layout[k]) if k in layout else v.detach() for k, v in model.named_parameters()}
        save_aligned(params, str(staging / "model.safetensors"))
        from lensbench.store import versions  # (here: pyarrow stays out of a model load's imports)

        meta = dict(source=str(source), sha256=sha, kind=kind, n_ctx=n_ctx,
                    architecture=hf_config.architectures[0], tl_name=tl_name,
                    layout={k: list(perm) for k, perm in layout.items()},
                    converted_with={**versions(), "threads": torch.get_num_threads()})
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        _open_to_others(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


@torch.no_grad()
def _fold_value_biases(model) -> None:
    """TransformerLens's `fold_value_biases`, in place: `b_O += Σ_h b_V[h] W_O[h]`, `b_V = 0`
    (attention patterns sum to one, so the value bias only ever adds that constant)."""
    for block in model.blocks:
        attn = block.attn
        b_v = attn.b_V  # (n_heads, d_head); grouped-query attention repeats its KV-head biases
        attn.b_O.add_(torch.einsum("hd,hdm->m", b_v.to(attn.W_O.dtype), attn.W_O))
        (attn._b_V if hasattr(attn, "_b_V") else attn.b_V).zero_()
