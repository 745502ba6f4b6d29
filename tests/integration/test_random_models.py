"""Random-weight models (`random:PRESET[:SEED]`): built where they run, in the dtype asked for,
and reproducible from their seed. The n_ctx rule is in tests/unit/test_input_errors.py."""

from __future__ import annotations

import pytest
import torch

from lensbench.models import random_model


def _state(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("preset", ["tiny-rotary", "tiny-learned"])  # RMS + rotary + gated; LN + learned positions
def test_a_seed_gives_the_same_weights_and_another_seed_others(tokenizer, preset):
    first, again, other = (random_model(preset, seed, tokenizer=tokenizer) for seed in (5, 5, 6))
    a, b, c = _state(first), _state(again), _state(other)
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit
    matrices = [name for name in a if "W_" in name]
    assert len(matrices) > 4 * first.cfg.n_layers
    for name in matrices:
        assert not torch.equal(a[name], c[name]), name
    # every weight matrix has its own draw: no two are the same numbers
    firsts = {float(a[name].flatten()[0]) for name in matrices}
    assert len(firsts) == len(matrices)


def test_weights_follow_transformer_lens_initialisation(tokenizer):
    """Weight matrices ~ normal(0, initializer_range); norm weights ones; biases zeros."""
    model = random_model("tiny-learned", 3, tokenizer=tokenizer)
    std = model.cfg.initializer_range
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "W_" in name:
            assert abs(float(param.mean())) < 0.1 * std, name
            assert 0.9 < float(param.std()) / std < 1.1, name
        elif leaf == "w":
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert leaf.startswith("b"), name
            assert torch.equal(param, torch.zeros_like(param)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_built_in_the_dtype_asked_for(tokenizer, dtype):
    model = random_model("tiny-rotary", 1, dtype=dtype, tokenizer=tokenizer)
    floating = {name: t.dtype for name, t in _state(model).items() if t.is_floating_point()}
    assert floating and set(floating.values()) == {dtype}, {n: d for n, d in floating.items() if d != dtype}
    assert model.cfg.dtype == dtype
    again = random_model("tiny-rotary", 1, dtype=dtype, tokenizer=tokenizer)
    for name, tensor in _state(again).items():
        assert torch.equal(tensor, _state(model)[name]), name
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 20, 300, 4000]]))
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_load_model_builds_random_models_reproducibly(tokenizer):
    from lensbench.models import load_model

    (first, info), (again, _) = load_model("random:tiny-rotary:9"), load_model("random:tiny-rotary:9")
    assert info.source_sha256 == "random-tiny-rotary-9"
    for name, param in first.named_parameters():
        assert torch.equal(param, dict(again.named_parameters())[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_built_on_the_gpu_in_bfloat16(tokenizer):
    """Created on the device (no CPU copy to move), reproducible there; CUDA's generators are not
    the CPU's, so the weights differ from the CPU model's of the same seed."""
    model = random_model("tiny-rotary", 1, device="cuda", dtype=torch.bfloat16, tokenizer=tokenizer)
    again = random_model("tiny-rotary", 1, device="cuda", dtype=torch.bfloat16, tokenizer=tokenizer)
    for name, tensor in _state(model).items():
        assert tensor.is_cuda and (tensor.dtype == torch.bfloat16 or not tensor.is_floating_point()), name
        assert torch.equal(tensor, _state(again)[name]), name
    on_cpu = random_model("tiny-rotary", 1, dtype=torch.bfloat16, tokenizer=tokenizer)
    assert not torch.equal(model.embed.W_E.cpu(), on_cpu.embed.W_E)
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 20, 300]], device="cuda"))).all()


def test_rotary_tables_computed_once_equal_transformer_lens_own_per_layer():
    """`shared_rotary_tables` (used to build every model) computes each distinct table once; every
    layer's table equals the one TransformerLens computes for that layer alone, local layers with
    their own base included."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.components.abstract_attention import AbstractAttention

    from lensbench.models import shared_rotary_tables

    cfg = dict(n_layers=4, d_model=32, n_heads=2, d_head=16, d_mlp=64, act_fn="silu", normalization_type="RMS",
               positional_embedding_type="rotary", rotary_dim=16, gated_mlp=True, n_ctx=256, d_vocab=50,
               use_local_attn=True, attn_types=["global", "local", "global", "local"], window_size=8,
               rotary_base=1_000_000, rotary_base_local=10_000)
    original = AbstractAttention.calculate_sin_cos_rotary
    calls = []

    def counting(self, *args, **kwargs):
        calls.append(self.attn_type)
        return original(self, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        own = HookedTransformer(HookedTransformerConfig(**cfg))
        AbstractAttention.calculate_sin_cos_rotary = counting
        try:
            with shared_rotary_tables():
                shared = HookedTransformer(HookedTransformerConfig(**cfg))
        finally:
            AbstractAttention.calculate_sin_cos_rotary = original
    assert AbstractAttention.calculate_sin_cos_rotary is original  # restored
    assert sorted(calls) == ["global", "local"]  # once per distinct table, not once per layer
    for k in range(4):
        for table in ("rotary_sin", "rotary_cos"):
            assert torch.equal(getattr(own.blocks[k].attn, table), getattr(shared.blocks[k].attn, table)), (k, table)
    assert not torch.equal(own.blocks[0].attn.rotary_sin, own.blocks[1].attn.rotary_sin)  # the bases do differ
    tokens = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    shared.load_state_dict(own.state_dict())
    assert torch.equal(own(tokens), shared(tokens))


def test_models_built_in_threads_at_once_leave_transformer_lens_unpatched(tokenizer):
    """The app builds models in several threads: each build has its own memo, and the class
    attribute `shared_rotary_tables` patches is the original again afterwards."""
    import threading

    from transformer_lens.components.abstract_attention import AbstractAttention

    original = AbstractAttention.calculate_sin_cos_rotary
    built: dict[int, object] = {}

    def build(seed):
        built[seed] = random_model("tiny-rotary", seed, tokenizer=tokenizer)

    threads = [threading.Thread(target=build, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert AbstractAttention.calculate_sin_cos_rotary is original
    alone = random_model("tiny-rotary", 0, tokenizer=tokenizer)
    for seed, model in built.items():
        for k in range(model.cfg.n_layers):
            assert torch.equal(model.blocks[k].attn.rotary_sin, alone.blocks[k].attn.rotary_sin), (seed, k)
            assert torch.equal(model.blocks[k].attn.rotary_cos, alone.blocks[k].attn.rotary_cos), (seed, k)
