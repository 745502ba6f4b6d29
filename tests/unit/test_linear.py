"""Linear SimLens / tuned lens: recovering a known affine map, the lens, saving, model checks."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lensbench.errors import LensbenchError
from lensbench.lenses.base import LensBatch
from lensbench.lenses.fit import FitConfig, _kl, _Readout, fit_affine, lstsq_affine
from lensbench.lenses.linear import LinearLens, LinearLensConfig, load_linear_lenses, unembed_fingerprint
from lensbench.readout import ReadoutPoint, SlotResiduals


pytestmark = pytest.mark.usefixtures("one_thread")



def known_map(d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d**0.5
    bias = torch.randn(d, generator=g)
    return weight, bias


def test_lstsq_recovers_a_known_affine_map():
    d, n = 16, 300
    weight, bias = known_map(d)
    h = torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 3
    y = h @ weight.T + bias
    fit_w, fit_b = lstsq_affine(h, y, ridge=0.0)
    assert torch.allclose(fit_w, weight, atol=1e-4)
    assert torch.allclose(fit_b, bias, atol=1e-4)
    # ridge toward the identity: close, and pulled toward I, not toward 0
    ridge_w, _ = lstsq_affine(h, y, ridge=1e-2)
    assert (ridge_w - weight).abs().max() < 0.05
    assert (ridge_w - torch.eye(d)).norm() < (weight - torch.eye(d)).norm()


def _problem(model, n: int, seed: int):
    """Residual-like inputs and one fixed candidate set (like " A" .. " D") for every example."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, model.cfg.d_model, generator=g) * 2
    cand = torch.tensor([[330, 331, 332, 333]]).expand(n, 4)
    return h, cand, torch.ones(n, 4, dtype=torch.bool)


def test_candidate_kl_fit_recovers_the_known_maps_readout(tiny_rotary):
    """Data from a known affine map: the KL fit (from the identity) reproduces its candidate
    distributions on held-out data, far better than the identity does."""
    model = tiny_rotary
    d = model.cfg.d_model
    weight, bias = known_map(d, seed=3)
    weight = torch.eye(d) + 3 * (weight - torch.eye(d))  # far from the identity
    h, cand, mask = _problem(model, 700, seed=4)
    y = h @ weight.T + bias
    train, held = slice(0, 500), slice(500, None)
    fit_w, fit_b = fit_affine(model, h[train], y[train], cand[train], mask[train], "candidates-kl", init="identity",
                              steps=100, lr=2e-2, fit_batch=256)
    readout = _Readout(model, "cpu")
    target = readout.logprobs(y[held], cand[held], mask[held])
    fitted = readout.logprobs(h[held] @ fit_w.T + fit_b, cand[held], mask[held])
    identity = readout.logprobs(h[held], cand[held], mask[held])
    kl_fit, kl_identity = float(_kl(target, fitted, mask[held])), float(_kl(target, identity, mask[held]))
    assert kl_identity > 0.05
    assert kl_fit < 0.1 * kl_identity
    agreement = (fitted.argmax(-1) == target.argmax(-1)).float().mean()
    assert agreement > 0.9


def test_vocab_kl_fit_moves_toward_the_known_map(tiny_rotary):
    model = tiny_rotary
    d = model.cfg.d_model
    weight, bias = known_map(d, seed=5)
    weight = torch.eye(d) + 3 * (weight - torch.eye(d))
    h, cand, mask = _problem(model, 320, seed=6)
    y = h @ weight.T + bias
    fit_w, fit_b = fit_affine(model, h[:256], y[:256], cand[:256], mask[:256], "vocab-kl", init="identity",
                              steps=15, lr=2e-2, fit_batch=64)
    readout = _Readout(model, "cpu")
    target = readout.logprobs(y[256:], None, None)
    kl_fit = float(_kl(target, readout.logprobs(h[256:] @ fit_w.T + fit_b, None, None), None))
    kl_identity = float(_kl(target, readout.logprobs(h[256:], None, None), None))
    assert kl_fit < 0.5 * kl_identity


def _config(model, layers, kind="linear-simlens", sha="sha-a") -> LinearLensConfig:
    digest, probes, norm = unembed_fingerprint(model)
    return LinearLensConfig(
        kind=kind, target="simlens" if kind == "linear-simlens" else "final", objective="lstsq", model="tiny",
        model_sha256=sha, unembed_sha256=digest, unembed_probe=probes, unembed_norm=norm,
        n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, site="pre", layers=layers,
    )


def _lens(model, kind="linear-simlens", sha="sha-a") -> LinearLens:
    n, d = model.cfg.n_layers, model.cfg.d_model
    maps = [known_map(d, seed=10 + layer) for layer in range(n)]
    return LinearLens(torch.stack([w for w, _ in maps]), torch.stack([b for _, b in maps]),
                      _config(model, list(range(n)), kind, sha))


def test_final_residuals_apply_each_layers_map_and_the_identity_at_L(tiny_rotary):
    model = tiny_rotary
    lens = _lens(model)
    n, d = model.cfg.n_layers, model.cfg.d_model
    points = [ReadoutPoint(layer, "pre", n) for layer in range(n + 1)]
    a = torch.randn(n + 1, 3, d)
    slots = SlotResiduals(points, torch.zeros_like(a), a, torch.tensor([5, 6, 7]))
    out = lens.final_residuals(LensBatch(model, slots, 2, torch.tensor([0, 1, 2]))).resid
    assert out.shape == (n + 1, 2, d)
    for layer in range(n):
        weight, bias = known_map(d, seed=10 + layer)
        assert torch.allclose(out[layer], a[layer, :2] @ weight.T + bias, atol=1e-5)
    assert torch.equal(out[n], a[n, :2])


def test_save_and_load_round_trip(tmp_path, tiny_rotary):
    lens = _lens(tiny_rotary)
    lens.save(tmp_path / "lens")
    data = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert data["layers"] == list(range(tiny_rotary.cfg.n_layers)) and data["kind"] == "linear-simlens"
    loaded = LinearLens.load(tmp_path / "lens")
    assert loaded.config == lens.config
    assert torch.equal(loaded.weight, lens.weight) and torch.equal(loaded.bias, lens.bias)
    assert LinearLensConfig.from_dict(lens.config.to_dict()) == lens.config


def test_check_model_accepts_its_model_and_refuses_another(tiny_rotary, tokenizer):
    from lensbench.models import ModelInfo, random_model

    lens = _lens(tiny_rotary)
    info = ModelInfo("tiny", "sha-a", 4, 64, "random", "float32", "cpu")
    lens.check_model(tiny_rotary, info)
    lens.check_model(tiny_rotary, None)
    half = copy.deepcopy(tiny_rotary).to(torch.bfloat16)
    lens.check_model(half, None)  # the same model in another dtype
    with pytest.raises(LensbenchError, match="sha256"):
        lens.check_model(tiny_rotary, ModelInfo("tiny", "sha-b", 4, 64, "random", "float32", "cpu"))
    other = random_model("tiny-rotary", seed=7, tokenizer=tokenizer)  # same shape, other weights
    with pytest.raises(LensbenchError, match="unembedding differs"):
        lens.check_model(other, None)


def test_load_linear_lenses_picks_the_kind(tmp_path, tiny_rotary):
    _lens(tiny_rotary).save(tmp_path / "sim")
    _lens(tiny_rotary, kind="tuned").save(tmp_path / "tuned")
    (sim,) = load_linear_lenses([str(tmp_path / "sim"), str(tmp_path / "tuned")], "linear-simlens")
    assert sim.name == "linear-simlens"
    (tuned,) = load_linear_lenses([str(tmp_path / "sim"), str(tmp_path / "tuned")], "tuned")
    assert tuned.name == "tuned"
    _lens(tiny_rotary).save(tmp_path / "sim2")
    names = {lens.name for lens in load_linear_lenses([str(tmp_path / "sim"), str(tmp_path / "sim2")], "linear-simlens")}
    assert names == {"linear-simlens[sim]", "linear-simlens[sim2]"}
    with pytest.raises(LensbenchError, match="needs --linear"):
        load_linear_lenses([], "linear-simlens")
    with pytest.raises(LensbenchError, match="none of the --linear folders"):
        load_linear_lenses([str(tmp_path / "tuned")], "linear-simlens")
    with pytest.raises(LensbenchError, match="not a fitted linear lens"):
        load_linear_lenses([str(tmp_path)], "linear-simlens")


@pytest.mark.parametrize(
    "task, split, expected",
    [("arc-easy", None, "arc-easy"), ("arc-easy", "calib", "arc-easy@calib"), ("boolq", "test", "boolq@test"),
     ("arc-easy", "validation", "arc-easy:validation"), ("arc-easy@calib", "validation", "arc-easy:validation@calib")],
)
def test_split_maps_to_a_task_spec(task, split, expected):
    assert FitConfig(out="x", task=task, split=split).task_spec() == expected


def test_split_conflicts_are_refused():
    with pytest.raises(LensbenchError, match="conflicts"):
        FitConfig(out="x", task="arc-easy@test", split="calib").task_spec()
    with pytest.raises(LensbenchError, match="conflicts"):
        FitConfig(out="x", task="arc-easy:test", split="validation").task_spec()


def test_default_objective_follows_the_target():
    assert FitConfig(out="x").resolved_objective == "candidates-kl"
    assert FitConfig(out="x", target="final").resolved_objective == "vocab-kl"
    assert FitConfig(out="x", target="final", objective="lstsq").resolved_objective == "lstsq"
