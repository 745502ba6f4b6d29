"""The memory layout lensbench keeps TransformerLens's weight matrices in.

TransformerLens 3.9 rearranges or transposes some weights and calls `.contiguous()` on every
forward, which copies the whole matrix: three reads of every weight per call instead of one.
Stored in the layout that rearrangement produces (same shape and values, other strides), the
same calls return views and `.contiguous()` is a no-op, with bit-identical results (F.linear
sees the same contiguous matrix as before). `lensbench.models.relayout_weights` puts a loaded
model's weights in this layout; `lensbench.convert` writes cached checkpoints in it, so that
loading one takes the file's tensors as views, without a copy (`lensbench.models._load_cached`).
"""

from __future__ import annotations

import json
import struct

import torch

# Where a weight may be used in place from a mapped file: PyTorch's CPU allocator aligns to 64
# bytes, and a matrix product's rounding can depend on its operand's alignment (MKL's
# matrix-vector path on one row differs at an 8-byte offset), so a weight used from the file
# must be aligned as a fresh copy would be (`aligned`). `save_aligned` starts tensors at page
# boundaries where their sizes allow (which is also 64-byte aligned).
ALIGN = 64
PAGE = 4096
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}

# (parameter path suffix, the permutation TransformerLens applies before its F.linear)
_LAYOUTS = {
    "attn.W_Q": (0, 2, 1), "attn.W_K": (0, 2, 1), "attn.W_V": (0, 2, 1),  # (h, d_model, d_head) -> (h d_head) d_model
    "attn._W_K": (0, 2, 1), "attn._W_V": (0, 2, 1),  # grouped-query attention
    "attn.W_O": (2, 0, 1),  # (h, d_head, d_model) -> d_model (h d_head)
    "mlp.W_gate": (1, 0), "mlp.W_in": (1, 0), "mlp.W_out": (1, 0),  # gated MLP: W.T.contiguous()
    "unembed.W_U": (1, 0),
}


def inverse_permutation(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(perm)), key=perm.__getitem__))


def relayout_plan(model) -> dict[str, tuple[int, ...]]:
    """{parameter name: the permutation TransformerLens applies to it per call} for the weights
    kept in that layout. Only the gated MLP copies its weights (`W.T.contiguous()`); the plain
    MLP's `addmm` reads W_in and W_out as stored, so those are left out."""
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    plan = {}
    for name, param in model.named_parameters():
        suffix = next((key for key in _LAYOUTS if name == key or name.endswith("." + key)), None)
        if suffix is None or param.dim() != len(_LAYOUTS[suffix]):
            continue
        if suffix.startswith("mlp.") and not isinstance(model.get_submodule(name.rsplit(".", 1)[0]), GatedMLP):
            continue
        plan[name] = _LAYOUTS[suffix]
    return plan


def in_layout(tensor: torch.Tensor, perm: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` (cast to `dtype`) stored so that `.permute(*perm)` is contiguous: one copy."""
    target = tensor.permute(*perm)
    out = torch.empty(target.shape, dtype=dtype or tensor.dtype, device=tensor.device)
    return out.copy_(target).permute(*inverse_permutation(perm))


def save_aligned(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Write `tensors` as a safetensors file in which the tensors start at page boundaries
    (`PAGE`) from the file's start, as far as their sizes allow: the header is padded with
    spaces (as the format allows), tensors whose sizes are multiples of `PAGE` come first, then
    those of `ALIGN`, then the rest. A mapped load can use the aligned ones in place (`aligned`).
    Readable by `safetensors.torch.load_file` like any other file. A tensor that is a view is
    written as its values, made contiguous one tensor at a time (no second copy of the whole)."""
    def nbytes(t):
        return t.numel() * t.element_size()

    names = sorted(tensors, key=lambda name: (nbytes(tensors[name]) % PAGE != 0, nbytes(tensors[name]) % ALIGN != 0, name))
    header, offset = {}, 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise ValueError(f"save_aligned: {name} has dtype {t.dtype}, not one of {sorted(map(str, _DTYPES))}")
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes(t)]}
        offset += nbytes(t)
    text = json.dumps(header, separators=(",", ":")).encode()
    size = len(text) + (-(8 + len(text))) % PAGE
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", size))
        f.write(text.ljust(size))
        for name in names:
            t = tensors[name].detach().cpu().contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def aligned(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % ALIGN == 0
