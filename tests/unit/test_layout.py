"""`layout.save_aligned`: a safetensors file whose tensors sit where PyTorch would put a fresh copy."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from lensbench import layout


def test_saved_tensors_load_equal_and_aligned(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(64, 32, generator=generator),          # 8192 bytes: two pages
        "e.weight": torch.randn(48, 32, generator=generator),          # 6144 bytes: a multiple of 64, not of a page
        "a.bias": torch.randn(3, generator=generator),                 # 12 bytes: not
        "c.half": torch.randn(16, 8, generator=generator).to(torch.bfloat16),  # 256 bytes
        "d.view": torch.randn(32, 16, generator=generator).T,           # not contiguous: written as its values
    }
    path = tmp_path / "x.safetensors"
    layout.save_aligned(tensors, str(path))
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    for name in ("b.weight", "c.half", "d.view", "e.weight"):  # every tensor whose size allows it is aligned
        assert layout.aligned(loaded[name]), name
    assert loaded["b.weight"].data_ptr() % layout.PAGE == 0  # and the page-sized one starts a page
    assert not layout.aligned(torch.empty(20)[2:])  # the check itself can fail


def test_inverse_permutation_undoes_the_permutation():
    x = torch.arange(24).reshape(2, 3, 4)
    for perm in [(0, 2, 1), (2, 0, 1), (1, 2, 0)]:
        assert torch.equal(x.permute(*perm).permute(*layout.inverse_permutation(perm)), x)
