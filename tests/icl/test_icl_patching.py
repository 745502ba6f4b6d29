"""The patching hooks change exactly the intended positions, and the fast path equals the
TransformerLens hook formulation."""

from __future__ import annotations

import pytest
import torch

from lensbench.icl.patching import (
    PatchPoint, collect_residuals, patch_hook, patch_points, patched_logits_fast, patched_logits_hooked,
)
from lensbench.readout import pad_right

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(tokenizer, texts):
    ids = [[tokenizer.bos_token_id or 0, *tokenizer.encode(t, add_special_tokens=False)] for t in texts]
    return pad_right(ids, 0, "cpu")


TEXTS = ["hot -> cold\nbig -> small\nfast ->", "dog -> foo\napple -> bar\ncat ->", "up -> down\nleft ->"]


@pytest.mark.parametrize("site", ["pre", "post"])
def test_patching_a_vector_into_itself_changes_nothing(tiny_rotary, tokenizer, site):
    model = tiny_rotary
    tokens, lengths = batch(tokenizer, TEXTS)
    with torch.inference_mode():
        clean = model(tokens)
    rows = torch.arange(3)
    clean = clean[rows, lengths - 1].float()
    positions = torch.stack([torch.tensor([1, 3]), torch.tensor([2, 4]), lengths[2:] - 1 + torch.tensor([-1, 0])])
    for point in patch_points(model, site):
        resid, _ = collect_residuals(model, tokens, [point], positions)
        hooked = patched_logits_hooked(model, tokens, lengths, point, positions, resid[0])
        assert torch.equal(hooked, clean)


def test_a_patched_vector_is_read_back_from_the_cache(tiny_rotary, tokenizer):
    model = tiny_rotary
    tokens, lengths = batch(tokenizer, TEXTS)
    d = model.cfg.d_model
    positions = torch.tensor([[2, 4], [1, 5], [0, 3]])
    known = torch.randn(3, 2, d)
    point = PatchPoint(2, "pre", model.cfg.n_layers)
    with torch.inference_mode():
        _, clean = model.run_with_cache(tokens)
        with model.hooks(fwd_hooks=[(point.hook_name, patch_hook(positions, known))]):
            _, cache = model.run_with_cache(tokens)
    got = cache[point.hook_name]
    rows = torch.arange(3)[:, None]
    assert torch.equal(got[rows, positions], known)
    untouched = torch.ones(got.shape[:2], dtype=torch.bool)
    untouched[rows, positions] = False
    assert torch.equal(got[untouched], clean[point.hook_name][untouched])
    # below the point nothing changed; above it, only positions at or after the first patch
    assert torch.equal(cache["blocks.1.hook_resid_post"], clean["blocks.1.hook_resid_post"])
    after = cache["blocks.3.hook_resid_post"]
    assert torch.equal(after[1, :1], clean["blocks.3.hook_resid_post"][1, :1])
    assert not torch.allclose(after[1, 1:lengths[1]], clean["blocks.3.hook_resid_post"][1, 1:lengths[1]])
    # add mode adds
    with torch.inference_mode(), model.hooks(fwd_hooks=[(point.hook_name, patch_hook(positions, known, "add"))]):
        _, added = model.run_with_cache(tokens)
    assert torch.allclose(added[point.hook_name][rows, positions], clean[point.hook_name][rows, positions] + known, atol=1e-6)


@pytest.mark.parametrize("site, mode", [("pre", "replace"), ("post", "replace"), ("pre", "add")])
def test_fast_path_equals_hooks(tiny_rotary, tokenizer, site, mode):
    model = tiny_rotary
    tokens, lengths = batch(tokenizer, TEXTS)
    points = patch_points(model, site)
    positions = torch.stack([torch.tensor([1, 3]), torch.tensor([2, 4]), torch.tensor([1, 4])])
    vectors = torch.randn(len(points), 3, 2, model.cfg.d_model)
    resid, _ = collect_residuals(model, tokens, points)
    fast = patched_logits_fast(model, resid, lengths, points, positions, vectors, mode, max_tokens=20)
    for i, point in enumerate(points):
        ref = patched_logits_hooked(model, tokens, lengths, point, positions, vectors[i], mode)
        assert torch.allclose(fast[i], ref, atol=1e-4), (point, (fast[i] - ref).abs().max())


def test_fast_path_equals_hooks_on_the_embedded_model(embedded, tokenizer):
    model, _ = embedded
    tokens, lengths = batch(tokenizer, TEXTS[:2])
    points = [p for p in patch_points(model, "pre") if p.layer in (0, 7, 29, 30)]
    positions = (lengths - 1)[:, None]
    vectors = torch.randn(len(points), 2, 1, model.cfg.d_model)
    resid, _ = collect_residuals(model, tokens, points)
    fast = patched_logits_fast(model, resid, lengths, points, positions, vectors)
    for i, point in enumerate(points):
        ref = patched_logits_hooked(model, tokens, lengths, point, positions, vectors[i])
        assert torch.allclose(fast[i], ref, atol=2e-3, rtol=1e-4), (point, (fast[i] - ref).abs().max())
        assert (fast[i].argmax(-1) == ref.argmax(-1)).all()


def test_post_point_equals_next_pre_point(tiny_rotary, tokenizer):
    model = tiny_rotary
    tokens, lengths = batch(tokenizer, TEXTS)
    positions = (lengths - 1)[:, None]
    vec = torch.randn(3, 1, model.cfg.d_model)
    post = patched_logits_hooked(model, tokens, lengths, PatchPoint(1, "post", 4), positions, vec)
    pre = patched_logits_hooked(model, tokens, lengths, PatchPoint(2, "pre", 4), positions, vec)
    assert torch.allclose(post, pre, atol=1e-5)
