"""The prediction trajectory over every input position: what a lens reads out at each readout
layer and each prompt position (the view of the tuned-lens and logit-lens plots), for the logit
lens, a fitted linear lens (Linear SimLens, the tuned lens) and SimLens at every position.

SimLens at position t continues the pair `[s]`, `x_t` (`[a]` = that position) from each
readout layer through the upper blocks, all pairs of all layers in one batched
`continuation.continue_slots` call; position 0 (`[s]` itself) continues alone. One forward
pass gathers the residuals of every position at every readout point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lensbench.continuation import continue_slots
from lensbench.errors import LensbenchError
from lensbench.lenses import Lens, LogitLens, SimLens
from lensbench.lenses.ablation import Ablation
from lensbench.lenses.linear import LinearLens
from lensbench.readout import ReadoutPoint, point_hooks, unembed


@dataclass
class PositionGrid:
    """One lens over every (readout layer, position): arrays of shape (layer, position[, k])."""

    lens: str
    layers: list[int]
    top_ids: np.ndarray  # (layer, position, k) the top-k next-token ids
    top_probs: np.ndarray  # (layer, position, k)
    entropy: np.ndarray  # (layer, position) nats, over the whole vocabulary
    kl_final: np.ndarray  # (layer, position) KL(final layer ‖ this layer), nats
    pinned: np.ndarray | None  # (layer, position) probability of the pinned token


def grid_lens_kind(lens: Lens) -> str:
    """Which grid a lens supports: "logit", "linear", "simlens"; an ablated SimLens has no
    grid (its slots are not the prompt's own)."""
    if isinstance(lens, LogitLens):
        return "logit"
    if isinstance(lens, LinearLens):
        return "linear"
    if isinstance(lens, SimLens) and lens.ablation == Ablation() and lens.positions == "consecutive":
        return "simlens"
    raise LensbenchError(f"lens '{lens.name}' has no position grid (logit, linear-simlens, tuned and plain SimLens do)")


def all_positions(model, tokens: list[int], points: list[ReadoutPoint]) -> torch.Tensor:
    """The residual of every position at every readout point: (point, position, d_model)."""
    kept: dict[str, torch.Tensor] = {}

    def keep(activation, hook):
        kept[hook.name] = activation[0].clone()

    names = sorted({p.hook_name for p in points})
    ids = torch.tensor([tokens], dtype=torch.long, device=model.cfg.device)
    with torch.inference_mode(), point_hooks(model, [(name, keep) for name in names]):
        model(ids, stop_at_layer=model.cfg.n_layers)
    device = kept[points[0].hook_name].device
    return torch.stack([kept[p.hook_name].to(device) for p in points])


def _final_residuals(model, lens: Lens, resid: torch.Tensor, points: list[ReadoutPoint]) -> torch.Tensor:
    kind = grid_lens_kind(lens)
    if kind == "logit":
        return resid
    if kind == "linear":
        return torch.stack([r if p.is_final else lens.transform(r, p.layer) for r, p in zip(resid, points)])
    n_points, n_pos, d_model = resid.shape
    out = resid.clone()
    upper = [i for i, p in enumerate(points) if not p.is_final]
    if not upper:
        return out
    # [s] alone at position 0 (it attends only to itself), every pair ([s], x_t) at t >= 1
    starts = [points[i] for i in upper]
    alone, _ = continue_slots(model, resid[upper, 0][:, None], starts)
    out[upper, 0] = alone
    if n_pos > 1:
        s = resid[upper, 0][:, None].expand(-1, n_pos - 1, -1)
        z = torch.stack([s, resid[upper, 1:]], dim=2).reshape(len(upper) * (n_pos - 1), 2, d_model)
        pair_starts = [points[i] for i in upper for _ in range(n_pos - 1)]
        continued, _ = continue_slots(model, z, pair_starts)
        out[upper, 1:] = continued.reshape(len(upper), n_pos - 1, d_model)
    return out


def position_grid(model, tokens: list[int], lens: Lens, points: list[ReadoutPoint], topk: int = 5,
                  pinned_id: int | None = None, threads: int | None = 1) -> PositionGrid:
    """`lens` at every readout point and every position of `tokens` (`[s]` first); on a CPU
    with `threads` intra-op threads (as `probe.Prober`)."""
    from lensbench.probe import cpu_threads

    with cpu_threads(model, threads):
        return _position_grid(model, tokens, lens, points, topk, pinned_id)


@torch.inference_mode()
def _position_grid(model, tokens, lens, points, topk, pinned_id) -> PositionGrid:
    resid = all_positions(model, tokens, points)
    final = _final_residuals(model, lens, resid, points)
    last = torch.log_softmax(unembed(model, final[-1]), -1)  # the model's own output, per position
    top_ids, top_probs, entropy, kl, pinned = [], [], [], [], []
    for p in range(len(points)):
        logprobs = torch.log_softmax(unembed(model, final[p]), -1)  # (position, vocab)
        probs = logprobs.exp()
        values, ids = probs.topk(topk, dim=-1)
        top_ids.append(ids)
        top_probs.append(values)
        entropy.append(-(probs * logprobs).sum(-1))
        kl.append((last.exp() * (last - logprobs)).sum(-1))
        if pinned_id is not None:
            pinned.append(probs[:, pinned_id])
    stack = lambda xs: torch.stack(xs).float().cpu().numpy()  # noqa: E731
    return PositionGrid(lens.name, [p.layer for p in points], torch.stack(top_ids).cpu().numpy(), stack(top_probs), stack(entropy),
                        stack(kl).clip(min=0), stack(pinned) if pinned else None)
