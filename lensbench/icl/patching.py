"""Residual patching at chosen positions and a layer, as TransformerLens hook functions, and a
batched fast path that must agree with them.

A *patch point* is a place in the residual stream where vectors are written (docs/METHOD.md,
"In-context learning"): with site `pre`, point `l` in `0..L` is lensbench's readout point `l`
(`blocks.{l}.hook_resid_pre`, and `blocks.{L-1}.hook_resid_post` for `l = L`); with site `post`,
point `l` in `0..L-1` is `blocks.{l}.hook_resid_post` (the same tensor as `pre` point `l + 1`).
A patch either replaces the residual at the positions (`replace`) or adds to it (`add`).

- the reference (`patch_hook`, `patched_logits_hooked`): a full forward pass with a hook at
  the point that writes the vectors; the logits of each row's last token;
- the fast path (`collect_residuals`, `patched_final_residuals`): the residuals of every point
  are gathered by hooks in one forward pass; for each (point, row) the patched residual runs
  through the blocks above the point only, all rows of all points together, each block once
  over the rows that have reached it (what `continuation.continue_slots` does for SimLens's two
  slots, here for whole prompts).

Rows are right-padded: with a causal mask the real tokens never see the pads, so positions stay
`0..T-1` and each row's answer is at `length - 1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensbench.errors import LensbenchError
from lensbench.readout import ReadoutPoint, block_device, unembed

SITES = ("pre", "post")
MODES = ("replace", "add")


@dataclass(frozen=True)
class PatchPoint:
    """Where a patch is written; `start_block` is the first block that runs after it."""

    layer: int
    site: str
    n_layers: int

    @property
    def hook_name(self) -> str:
        if self.site == "post":
            return f"blocks.{self.layer}.hook_resid_post"
        if self.layer == self.n_layers:
            return f"blocks.{self.n_layers - 1}.hook_resid_post"
        return f"blocks.{self.layer}.hook_resid_pre"

    @property
    def start_block(self) -> int:
        return self.layer + 1 if self.site == "post" else self.layer

    @property
    def readout(self) -> ReadoutPoint:
        """The equivalent lensbench readout point (for the logit lens and SimLens)."""
        return ReadoutPoint(self.start_block, "pre", self.n_layers)


def patch_points(model, site: str = "pre") -> list[PatchPoint]:
    if site not in SITES:
        raise LensbenchError(f"unknown patch site '{site}' (expected pre or post)")
    n = model.cfg.n_layers
    layers = range(n + 1) if site == "pre" else range(n)
    return [PatchPoint(layer, site, n) for layer in layers]


# --- the reference: TransformerLens hooks -----------------------------------------------------


def patch_hook(positions: Int[Tensor, "row pos"], vectors: Float[Tensor, "row pos d_model"], mode: str = "replace"):
    """A TransformerLens hook function that writes `vectors[r, i]` at position `positions[r, i]`
    of row `r` (replacing the residual there, or adding to it) and leaves every other position."""
    if mode not in MODES:
        raise LensbenchError(f"unknown patch mode '{mode}' (expected replace or add)")

    def hook(activation, hook):
        # A copy: the tensor may also be the previous hook point's (resid_post of the block
        # below is this block's resid_pre), which must keep its own value in a cache.
        activation = activation.clone()
        rows = torch.arange(activation.shape[0], device=activation.device)[:, None]
        pos = positions.to(activation.device)
        values = vectors.to(device=activation.device, dtype=activation.dtype)
        if mode == "replace":
            activation[rows, pos] = values
        else:
            activation[rows, pos] = activation[rows, pos] + values
        return activation

    return hook


def patched_logits_hooked(
    model,
    tokens: Int[Tensor, "row seq"],
    lengths: Int[Tensor, " row"],
    point: PatchPoint,
    positions: Int[Tensor, "row pos"],
    vectors: Float[Tensor, "row pos d_model"],
    mode: str = "replace",
) -> Float[Tensor, "row d_vocab"]:
    """The reference: one forward pass with `patch_hook` at `point`; each row's last-token logits."""
    with torch.inference_mode():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(point.hook_name, patch_hook(positions, vectors, mode))])
    rows = torch.arange(tokens.shape[0], device=logits.device)
    return logits[rows, lengths.to(logits.device) - 1].float()


# --- the fast path ----------------------------------------------------------------------------


def collect_residuals(
    model,
    tokens: Int[Tensor, "row seq"],
    points: list[PatchPoint],
    positions: Int[Tensor, "row pos"] | None = None,
    pattern_rows: Int[Tensor, " row"] | None = None,
) -> tuple[Float[Tensor, "point row pos d_model"], Float[Tensor, "block row head seq"] | None]:
    """One forward pass whose hooks keep the residual at every point: all positions, or only
    `positions` (per row). With `pattern_rows` (one query position per row), also the attention
    pattern from that position in every block. Stops before the unembedding."""
    by_name: dict[str, list[int]] = {}
    for i, point in enumerate(points):
        by_name.setdefault(point.hook_name, []).append(i)
    out: list = [None] * len(points)
    patterns: list = [None] * model.cfg.n_layers
    rows = torch.arange(tokens.shape[0], device=tokens.device)

    def keep(activation, hook, indices):
        if positions is None:
            kept = activation.clone()
        else:
            kept = activation[rows.to(activation.device)[:, None], positions.to(activation.device)]
        for i in indices:
            out[i] = kept

    def keep_pattern(pattern, hook, block):
        q = pattern_rows.to(pattern.device)
        patterns[block] = pattern[rows.to(pattern.device), :, q].float()  # (row, head, key)

    hooks = [(name, partial(keep, indices=idx)) for name, idx in by_name.items()]
    if pattern_rows is not None:
        hooks += [(f"blocks.{k}.attn.hook_pattern", partial(keep_pattern, block=k)) for k in range(model.cfg.n_layers)]
    with torch.inference_mode():
        model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=model.cfg.n_layers)
    device = out[0].device
    resid = torch.stack([t.to(device) for t in out])
    pattern = torch.stack([p.to(device) for p in patterns]) if pattern_rows is not None else None
    return resid, pattern


def apply_patch(
    resid: Float[Tensor, "row seq d_model"],
    positions: Int[Tensor, "row pos"],
    vectors: Float[Tensor, "row pos d_model"],
    mode: str = "replace",
) -> Float[Tensor, "row seq d_model"]:
    """`patch_hook`'s write on a copy of a cached residual."""
    return patch_hook(positions, vectors, mode)(resid, None)


def continue_prompts(
    model,
    z: Float[Tensor, "n seq d_model"],
    start_blocks: list[int],
    lengths: Int[Tensor, " n"],
    max_tokens: int = 16384,
) -> Float[Tensor, "n d_model"]:
    """Run each residual sequence `z[i]` from block `start_blocks[i]` to the last block and
    return its final residual at `lengths[i] - 1`. Rows sorted by start block are processed in
    chunks of at most `max_tokens` positions; within a chunk, rows join at their start block, so
    each row goes through exactly the blocks above its point."""
    n, seq, _ = z.shape
    n_layers = model.cfg.n_layers
    out = torch.empty(n, z.shape[-1], dtype=z.dtype, device=z.device)
    order = sorted(range(n), key=lambda i: (start_blocks[i], i))
    per_chunk = max(1, max_tokens // max(seq, 1))
    lengths = lengths.to(z.device)
    with torch.inference_mode():
        for c in range(0, n, per_chunk):
            chunk = order[c : c + per_chunk]
            finished = [i for i in chunk if start_blocks[i] >= n_layers]
            if finished:
                idx = torch.tensor(finished, device=z.device)
                out[idx] = z[idx, lengths[idx] - 1]
            running = [i for i in chunk if start_blocks[i] < n_layers]
            if not running:
                continue
            joined: list[int] = []
            active = None
            for k in range(start_blocks[running[0]], n_layers):
                device = block_device(model, k)
                new = [i for i in running if start_blocks[i] == k]
                if new:
                    rows = z[torch.tensor(new, device=z.device)].to(device)
                    active = rows if active is None else torch.cat([active.to(device), rows])
                    joined += new
                active = model.blocks[k](active.to(device))
            idx = torch.tensor(joined, device=z.device)
            out[idx] = active.to(z.device)[torch.arange(len(joined), device=z.device), lengths[idx] - 1]
    return out


def patched_final_residuals(
    model,
    resid: Float[Tensor, "point row seq d_model"],
    lengths: Int[Tensor, " row"],
    points: list[PatchPoint],
    positions: Int[Tensor, "row pos"],
    vectors: Float[Tensor, "point row pos d_model"],
    mode: str = "replace",
    max_tokens: int = 16384,
) -> Float[Tensor, "point row d_model"]:
    """The fast path: for every point and row, the cached residual at the point with `vectors`
    written at `positions`, continued to the end; the final residual at each row's last token."""
    n_points, n_rows = resid.shape[:2]
    z = torch.cat([apply_patch(resid[i], positions, vectors[i], mode) for i in range(n_points)])
    starts = [p.start_block for p in points for _ in range(n_rows)]
    final = continue_prompts(model, z, starts, lengths.repeat(n_points), max_tokens)
    return final.view(n_points, n_rows, -1)


def patched_logits_fast(model, resid, lengths, points, positions, vectors, mode="replace", max_tokens=16384):
    """`patched_final_residuals` read out by the model's unembedding: (point, row, d_vocab)."""
    return unembed(model, patched_final_residuals(model, resid, lengths, points, positions, vectors, mode, max_tokens))
