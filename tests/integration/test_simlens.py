"""SimLens: the fast path agrees with the hook formulation (and with `start_at_layer`), the
boundary cases of METHOD.md hold, and every slot source builds the input it should."""

from __future__ import annotations

import pytest
import torch

from lensbench.lenses import LensBatch, RunContext, SimLens
from lensbench.continuation import simlens_logits_naive
from lensbench.lenses.ablation import Ablation, SlotSource, parse_ablation
from lensbench.readout import collect_slots, pad_right, readout_points, unembed
from lensbench.tasks import encode_examples, load_task, start_token_id

ABLATIONS = ["none", "drop-s", "drop-a", "a=swap", "s=zero", "s=mean", "a=layer:1", 's=token:" the"', "a=position:-2", "s=example:1"]


def make_batch(model, n=5, site="pre"):
    examples = load_task("capitals")[:n]
    start = start_token_id(model.tokenizer)
    encoded, _ = encode_examples(examples, model.tokenizer, start, model.cfg.n_ctx)
    points = readout_points(model, site)
    tokens, lengths = pad_right([e.tokens for e in encoded], start, "cpu")
    slots = collect_slots(model, tokens, lengths, points, extra_positions=(-2,))
    ctx = RunContext(model, points, {e.index: e for e in encoded}, start, batch_size=2)
    batch = LensBatch(model, slots, len(encoded), torch.tensor([e.index for e in encoded]))
    return ctx, batch, encoded, tokens, lengths


def lens_for(spec, ctx, positions="consecutive"):
    lens = SimLens(Ablation() if spec == "none" else parse_ablation(spec), positions)
    lens.prepare(ctx)
    return lens


@pytest.mark.parametrize("model_name", ["tiny_rotary", "tiny_learned", "embedded"])
@pytest.mark.parametrize("positions", ["consecutive", "original"])
def test_fast_path_equals_hook_formulation(request, model_name, positions):
    model = request.getfixturevalue(model_name)
    model = model[0] if isinstance(model, tuple) else model
    ctx, batch, *_ = make_batch(model)
    specs = ABLATIONS if model_name != "embedded" else ["none", "drop-s", "drop-a", "a=swap"]
    # Every point on the tiny models; a spread of points (both ends included) on the 30-layer one.
    points = range(len(ctx.points)) if model_name != "embedded" else [0, 1, 8, 15, 22, 29, 30]
    for spec in specs:
        lens = lens_for(spec, ctx, positions)
        out = lens.final_residuals(batch)
        # a shared lens (e.g. drop-a) computes one row per point: every example's reference must equal it
        assert out.shared == (spec in ("drop-a",)), spec
        fast = unembed(model, out.resid.expand(-1, batch.n_primary, -1))
        for point_index in points:
            reference = lens.logits_hooked(batch, point_index)
            assert torch.allclose(fast[point_index], reference, atol=2e-4, rtol=1e-4), (spec, point_index)
            assert torch.equal(fast[point_index].argmax(-1), reference.argmax(-1))


def test_start_at_layer_formulation_agrees(tiny_rotary):
    ctx, batch, *_ = make_batch(tiny_rotary)
    lens = lens_for("none", ctx)
    z, _ = lens.inputs(batch)
    fast = unembed(tiny_rotary, lens.final_residuals(batch).resid)
    for point_index, point in enumerate(ctx.points):
        naive = simlens_logits_naive(tiny_rotary, z[point_index], point)
        assert torch.allclose(fast[point_index], naive, atol=2e-4)


def test_mid_site_fast_path_equals_hooks(tiny_rotary):
    ctx, batch, *_ = make_batch(tiny_rotary, site="mid")
    assert ctx.points[1].hook_name == "blocks.1.hook_resid_mid"
    for spec in ["none", "drop-a"]:
        lens = lens_for(spec, ctx)
        fast = unembed(tiny_rotary, lens.final_residuals(batch).resid.expand(-1, batch.n_primary, -1))
        for point_index in range(len(ctx.points)):
            assert torch.allclose(fast[point_index], lens.logits_hooked(batch, point_index), atol=2e-4)


def test_boundaries_on_the_embedded_model(embedded):
    model, _ = embedded
    ctx, batch, encoded, tokens, lengths = make_batch(model)
    out = lens_for("none", ctx).final_residuals(batch).resid
    rows = torch.arange(len(encoded))
    # l = L: the model's own output at the answer position.
    full = model(tokens)[rows, lengths - 1]
    assert torch.allclose(unembed(model, out[-1]), full, atol=1e-3)
    assert torch.equal(unembed(model, out[-1]).argmax(-1), full.argmax(-1))
    # l = 0: the model on the two-token prompt [x_0, x_{T-1}].
    pair = torch.stack([tokens[:, 0], tokens[rows, lengths - 1]], dim=1)
    two = model(pair)[:, -1]
    assert torch.allclose(unembed(model, out[0]), two, atol=1e-3)
    # [s] is a per-layer constant: the same residual for every prompt.
    assert torch.allclose(batch.slots.s[5], batch.slots.s[5, :1].expand_as(batch.slots.s[5]), atol=1e-5)


def test_attention_a_to_s_is_a_probability_and_nan_below_the_point(tiny_rotary):
    ctx, batch, *_ = make_batch(tiny_rotary)
    out = lens_for("none", ctx).final_residuals(batch)
    att = out.attention  # (point, example, block, head)
    n_layers = tiny_rotary.cfg.n_layers
    assert att.shape == (n_layers + 1, batch.n_primary, n_layers, tiny_rotary.cfg.n_heads)
    for point in range(n_layers + 1):
        below, above = att[point, :, :point], att[point, :, point:]
        assert torch.isnan(below).all()
        assert not torch.isnan(above).any()
        assert ((above >= 0) & (above <= 1)).all()


def test_slot_sources_build_the_expected_inputs(tiny_rotary):
    """Each source against a hand-built input from the gathered residuals."""
    model = tiny_rotary
    ctx, batch, encoded, tokens, lengths = make_batch(model)
    s, a = batch.slots.s, batch.slots.a
    b = batch.n_primary

    def z_of(spec):
        return lens_for(spec, ctx).inputs(batch)[0]

    assert torch.equal(z_of("none"), torch.stack([s, a], dim=2))
    assert torch.equal(z_of("drop-s"), a[:, :, None])
    assert torch.equal(z_of("drop-a"), s[:, :, None])
    assert torch.equal(z_of("s=zero")[:, :, 0], torch.zeros_like(s))
    assert torch.equal(z_of("a=layer:1")[:, :, 1], a[1:2].expand_as(a))
    # position -2: the token before the answer position, gathered per example.
    rows = torch.arange(b)
    cache = {}
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.hook_resid_pre", lambda act, hook: cache.setdefault("h", act.clone()))])
    assert torch.allclose(z_of("a=position:-2")[2, :, 1], cache["h"][rows, lengths - 2])
    # example:1: example 1's [s] in every row.
    assert torch.equal(z_of("s=example:1")[:, :, 0], s[:, 1:2].expand_as(s))
    # token " the" at position 0 of a run of its own.
    the = model.tokenizer.encode(" the", add_special_tokens=False)
    own = {}
    model.run_with_hooks(torch.tensor([the]), fwd_hooks=[("blocks.3.hook_resid_pre", lambda act, hook: own.setdefault("h", act.clone()))])
    assert torch.allclose(z_of('s=token:" the"')[3, :, 0], own["h"][0, 0].expand(b, -1))
    # mean: the average over the run's examples (all five here).
    assert torch.allclose(z_of("a=mean")[:, :, 1], a.mean(1, keepdim=True).expand_as(a), atol=1e-5)
    # swap: a derangement, every example's [a] comes from its donor.
    lens = lens_for("a=swap", ctx)
    donors = [lens.donor_of(i) for i in range(b)]
    assert sorted(donors) == list(range(b)) and all(d != i for i, d in enumerate(donors))
    assert torch.equal(lens.inputs(batch)[0][:, :, 1], a[:, donors])
    other_seed = SimLens(Ablation(a=SlotSource("swap", 1)))
    other_seed.prepare(ctx)
    assert [other_seed.donor_of(i) for i in range(b)] != donors or b < 3


def test_bad_sources_are_clear_errors(tiny_rotary):
    from lensbench.errors import LensbenchError

    ctx, batch, *_ = make_batch(tiny_rotary)
    with pytest.raises(LensbenchError, match="beyond the model"):
        lens_for("a=layer:99", ctx)
    with pytest.raises(LensbenchError, match="not an example of this run"):
        lens_for("s=example:40", ctx)
    with pytest.raises(LensbenchError, match="must be one"):
        lens_for('s=token:" the cat"', ctx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (run on a GPU machine)")
def test_cuda_graph_sweep_equals_the_eager_one(tiny_rotary):
    """The sweep with continuations replayed from CUDA graphs stores what the eager sweep stores."""
    import copy

    from lensbench.lenses import build_lenses
    from lensbench.evaluate import evaluate_batch
    from lensbench.tasks import make_batches

    model = copy.deepcopy(tiny_rotary).to("cuda")
    examples = load_task("capitals")[:7]
    start = start_token_id(model.tokenizer)
    encoded, _ = encode_examples(examples, model.tokenizer, start, model.cfg.n_ctx)
    points = readout_points(model)
    columns = {}
    for graphs in (False, True):
        ctx = RunContext(model, points, {e.index: e for e in encoded}, start, batch_size=3, cuda_graphs=graphs)
        lenses = build_lenses("logit,simlens", "drop-s,drop-a,a=swap", "consecutive", [])
        for lens in lenses:
            lens.prepare(ctx)
        runs = [evaluate_batch(model, lenses, ctx, batch) for batch in make_batches(encoded, 3) * 2]  # replays too
        columns[graphs] = [r.columns for r in runs]
        assert (ctx._graphs is not None and len(ctx._graphs._cache) > 0) == graphs
    for eager, graphed in zip(columns[False], columns[True]):
        assert eager["decision"] == graphed["decision"]
        assert eager["topk_ids"] == graphed["topk_ids"]
        assert eager["entropy"] == pytest.approx(graphed["entropy"], abs=1e-5)


@pytest.mark.parametrize("spec", ["drop-a", "s=layer:1+a=drop", "s=self+a=zero", 's=token:" the"+a=drop'])
def test_shared_lenses_store_what_per_example_computation_stores(tiny_rotary, monkeypatch, spec):
    """A lens whose input is the same for every example is computed once per point; the stored
    columns equal those of computing it for each example."""
    from lensbench.lenses import build_lenses
    from lensbench.evaluate import evaluate_batch
    from lensbench.tasks import make_batches

    examples = load_task("capitals")[:6]
    start = start_token_id(tiny_rotary.tokenizer)
    encoded, _ = encode_examples(examples, tiny_rotary.tokenizer, start, tiny_rotary.cfg.n_ctx)
    ctx = RunContext(tiny_rotary, readout_points(tiny_rotary), {e.index: e for e in encoded}, start, batch_size=6)
    lenses = build_lenses("simlens", spec, "consecutive", [])[1:]
    for lens in lenses:
        lens.prepare(ctx)
    batch = make_batches(encoded, 6)[0]
    original = SimLens.example_independent
    seen = []
    monkeypatch.setattr(SimLens, "example_independent", lambda self, b: seen.append(original(self, b)) or seen[-1])
    shared = evaluate_batch(tiny_rotary, lenses, ctx, batch).columns
    assert seen == [True]  # the shared path was taken
    monkeypatch.setattr(SimLens, "example_independent", lambda self, b: False)
    each = evaluate_batch(tiny_rotary, lenses, ctx, batch).columns
    for key in ("decision", "topk_ids", "example_index", "layer"):
        assert shared[key] == each[key], key
    assert shared["entropy"] == pytest.approx(each["entropy"], abs=1e-5)
    for ours, theirs in zip(shared["candidate_logprobs"], each["candidate_logprobs"]):
        assert ours == pytest.approx(theirs, abs=1e-5)


# --- the start token's cached keys and values, and the shared continuation ---------------------


@pytest.mark.parametrize("model_name", ["tiny_rotary", "tiny_learned", "embedded"])
@pytest.mark.parametrize("site", ["pre", "mid"])
def test_cached_start_token_continues_as_the_two_token_sequence(request, model_name, site):
    """`[a]` against the start token's cached keys and values is the two-token continuation,
    and `[a]` marked alone is the one-token continuation (`[s]` dropped), at every point."""
    from lensbench.continuation import StartKV, continue_slots

    model = request.getfixturevalue(model_name)
    model = model[0] if isinstance(model, tuple) else model
    _, batch, encoded, *_ = make_batch(model, n=3, site=site)
    z = torch.stack([batch.slots.s, batch.slots.a], dim=2).reshape(-1, 2, model.cfg.d_model)
    starts = [p for p in batch.slots.points for _ in range(3)]
    start = StartKV(model, encoded[0].tokens[0])
    scale = float(z.abs().max())
    two, att_two = continue_slots(model, z, starts, capture_attention=True)
    one, _ = continue_slots(model, z[:, 1:], starts)
    both = torch.cat([z, z.flip(0)])  # another order: rows are independent
    alone = torch.tensor([False] * len(z) + [True] * len(z))
    cached, att_cached = continue_slots(model, both, starts + starts[::-1], capture_attention=True, start=start, alone=alone)
    tol = 1e-5 * max(1.0, float(two.abs().max()), scale)
    assert torch.allclose(cached[: len(z)], two, atol=tol)
    assert torch.allclose(cached[len(z):].flip(0), one, atol=tol)
    # the attention [a] pays to [s]: as in the two-token sequence; zero where [s] is hidden
    assert torch.equal(att_cached[: len(z)].isnan(), att_two.isnan())
    assert torch.allclose(att_cached[: len(z)].nan_to_num(), att_two.nan_to_num(), atol=1e-5)
    assert att_cached[len(z):].nan_to_num().abs().max() == 0


def test_cached_start_token_that_is_also_the_pad_token(tiny_rotary, monkeypatch):
    """A start token that is also the tokenizer's pad token (Qwen's end-of-text) is not
    taken for padding: its keys and values are those of the token itself."""
    from lensbench.continuation import StartKV, continue_slots

    _, batch, encoded, *_ = make_batch(tiny_rotary, n=2)
    token = encoded[0].tokens[0]
    z = torch.stack([batch.slots.s, batch.slots.a], dim=2).reshape(-1, 2, tiny_rotary.cfg.d_model)
    starts = [p for p in batch.slots.points for _ in range(2)]
    expected, _ = continue_slots(tiny_rotary, z, starts)
    tokenizer = tiny_rotary.tokenizer
    saved = tokenizer.pad_token
    monkeypatch.setattr(tiny_rotary.cfg, "default_prepend_bos", False)  # as Qwen's
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(token)
    try:
        assert tokenizer.pad_token_id == token
        got, _ = continue_slots(tiny_rotary, z, starts, start=StartKV(tiny_rotary, token))
    finally:
        tokenizer.pad_token = saved
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("model_name", ["tiny_rotary", "embedded"])
def test_shared_continuation_stores_what_each_lens_alone_stores(request, model_name, monkeypatch):
    """SimLens and its ablations that keep `[a]` run through the same block calls (one
    continuation for all of them); the stored columns are those of each lens computed alone,
    up to float32 rounding, decisions and top-k tokens exactly."""
    import lensbench.lenses.simlens as simlens_module
    from lensbench.evaluate import evaluate_batch
    from lensbench.lenses import build_lenses
    from lensbench.tasks import make_batches

    model = request.getfixturevalue(model_name)
    model = model[0] if isinstance(model, tuple) else model
    examples = load_task("capitals")[:6]
    start = start_token_id(model.tokenizer)
    encoded, _ = encode_examples(examples, model.tokenizer, start, model.cfg.n_ctx)
    calls = []
    real = simlens_module.continue_slots
    monkeypatch.setattr(simlens_module, "continue_slots", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    columns = {}
    for fuse in (True, False):
        ctx = RunContext(model, readout_points(model), {e.index: e for e in encoded}, start, batch_size=3,
                         fuse_continuations=fuse)
        lenses = build_lenses("logit,simlens", 'drop-s,drop-a,a=swap,s=token:" the",s=zero,a=zero', "consecutive", [])
        others = build_lenses("simlens", "drop-s", "consecutive", [])  # prepared on the context, not asked for
        for lens in lenses + others:
            lens.prepare(ctx)
        calls.clear()
        columns[fuse] = [evaluate_batch(model, lenses, ctx, batch).columns for batch in make_batches(encoded, 3)]
        rows = len(readout_points(model)) * 3  # one lens on one batch
        # fused: simlens, drop-s and a=swap in one call per batch (s=token has another start
        # token, s=zero no start token's states; drop-a and a=zero are one row per point; the
        # lenses not asked for this batch are not computed with it)
        assert max(calls) == (3 * rows if fuse else rows), calls
    for fused, alone in zip(columns[True], columns[False]):
        for key in ("lens", "layer", "example_index", "decision", "topk_ids"):
            assert fused[key] == alone[key], key
        assert fused["entropy"] == pytest.approx(alone["entropy"], abs=1e-4)
        for ours, theirs in zip(fused["candidate_logprobs"], alone["candidate_logprobs"]):
            assert ours == pytest.approx(theirs, abs=1e-4)
