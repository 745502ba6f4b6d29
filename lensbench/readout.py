"""Readout points, slot residuals gathered by hooks, the shared unembedding readout, and the
block-by-block continuation that SimLens-style lenses use.

Readout point `l` (METHOD.md): `blocks.{l}.hook_resid_pre` for `l < L` and
`blocks.{L-1}.hook_resid_post` for `l = L`. With `site="mid"`, points `l < L` read
`blocks.{l}.hook_resid_mid` instead (after attention, before the MLP); point `L` is unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lensbench.errors import LensbenchError

SITES = ("pre", "mid")


@dataclass(frozen=True)
class ReadoutPoint:
    """A place in the residual stream: `layer` in 0..L, `site` "pre" or "mid"."""

    layer: int
    site: str
    n_layers: int

    @property
    def is_final(self) -> bool:
        return self.layer == self.n_layers

    @property
    def hook_name(self) -> str:
        if self.is_final:
            return f"blocks.{self.n_layers - 1}.hook_resid_post"
        return f"blocks.{self.layer}.hook_resid_{self.site}"

    @property
    def depth(self) -> float:
        """Blocks of the full pass computed before this point (a mid point is half a block on)."""
        return self.layer + (0.5 if self.site == "mid" and not self.is_final else 0.0)


def readout_points(model, site: str = "pre") -> list[ReadoutPoint]:
    """All readout points 0..L of a model at one site."""
    if site not in SITES:
        raise LensbenchError(f"unknown readout site '{site}' (expected pre or mid)")
    if site == "mid" and (model.cfg.parallel_attn_mlp or model.cfg.attn_only):
        raise LensbenchError("sub-layer (mid) readout needs sequential attention and MLP sublayers; this model has none")
    n = model.cfg.n_layers
    return [ReadoutPoint(layer, site, n) for layer in range(n + 1)]


@dataclass
class SlotResiduals:
    """Residuals at the readout points for the two SimLens slots (and any extra positions)."""

    points: list[ReadoutPoint]
    s: Float[Tensor, "point row d_model"]  # start token [s], position 0
    a: Float[Tensor, "point row d_model"]  # answer position [a], T-1
    lengths: Int[Tensor, " row"]
    extra: dict[int, Float[Tensor, "point row d_model"]] = field(default_factory=dict)

    def rows(self, index: Int[Tensor, " sel"]) -> "SlotResiduals":
        return SlotResiduals(
            self.points, self.s[:, index], self.a[:, index], self.lengths[index],
            {p: v[:, index] for p, v in self.extra.items()},
        )


def pad_right(token_lists: list[list[int]], pad_id: int, device) -> tuple[Int[Tensor, "row pos"], Int[Tensor, " row"]]:
    """Right padding: with a causal mask, real tokens never see the pads, so no mask is needed
    and positions stay 0..T-1 for every row."""
    lengths = torch.tensor([len(t) for t in token_lists], device=device)
    tokens = torch.full((len(token_lists), int(lengths.max())), pad_id, dtype=torch.long, device=device)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens, lengths


def pad_candidates(candidate_lists: list[list[int]], device=None) -> tuple[Int[Tensor, "row cand"], Bool[Tensor, "row cand"]]:
    """Candidate token ids padded with 0 to the longest list, and the mask of real candidates."""
    n_cand = max(len(c) for c in candidate_lists)
    ids = torch.tensor([list(c) + [0] * (n_cand - len(c)) for c in candidate_lists], dtype=torch.long, device=device)
    counts = torch.tensor([len(c) for c in candidate_lists], device=device)
    mask = torch.arange(n_cand, device=device)[None] < counts[:, None]
    return ids, mask


def _gather_positions(
    activation: Float[Tensor, "row pos d_model"], lengths: Int[Tensor, " row"], position: int | None
) -> Float[Tensor, "row d_model"]:
    """Position 0, the answer position (None), or prompt position p (negative: from the end)."""
    rows = torch.arange(activation.shape[0], device=activation.device)
    if position is None:
        index = lengths - 1
    elif position >= 0:
        index = torch.full_like(lengths, position)
    else:
        index = lengths + position
    return activation[rows, index.to(activation.device)]


def check_extra_positions(lengths: list[int], positions: list[int], ids: list[str]) -> None:
    for p in positions:
        for length, ex_id in zip(lengths, ids):
            if not -length <= p < length:
                raise LensbenchError(f"ablation position {p} is outside example '{ex_id}' ({length} tokens)")


def collect_slots(
    model,
    tokens: Int[Tensor, "row pos"],
    lengths: Int[Tensor, " row"],
    points: list[ReadoutPoint],
    extra_positions: tuple[int, ...] = (),
) -> SlotResiduals:
    """One forward pass that keeps only the slot residuals at each readout point.

    Hooks gather `[s]`, `[a]` and any extra positions and drop the rest, so memory stays that
    of a plain forward; the pass stops before the unembedding (`stop_at_layer=L`).
    """
    by_name: dict[str, list[int]] = {}
    for i, point in enumerate(points):
        by_name.setdefault(point.hook_name, []).append(i)
    s_out: list = [None] * len(points)
    a_out: list = [None] * len(points)
    extra_out = {p: [None] * len(points) for p in extra_positions}

    def gather_hook(activation, hook, indices):
        # A copy, not a view: a view would keep every layer's whole residual tensor alive.
        s = activation[:, 0].clone()
        a = _gather_positions(activation, lengths, None)
        extras = {p: _gather_positions(activation, lengths, p) for p in extra_positions}
        for i in indices:
            s_out[i], a_out[i] = s, a
            for p in extra_positions:
                extra_out[p][i] = extras[p]

    hooks = [(name, partial(gather_hook, indices=idx)) for name, idx in by_name.items()]
    # `point_hooks`, not `run_with_hooks`: the same hooks, without resetting every hook point
    # of the model afterwards (about 10 ms of Python for the embedded model).
    with torch.inference_mode(), point_hooks(model, hooks):
        model(tokens, stop_at_layer=model.cfg.n_layers)
    device = s_out[0].device
    return SlotResiduals(
        points,
        torch.stack([t.to(device) for t in s_out]),
        torch.stack([t.to(device) for t in a_out]),
        lengths.to(device),
        {p: torch.stack([t.to(device) for t in v]) for p, v in extra_out.items()},
    )


def unembed(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """`W_U · LN_final(resid) + b_U`, in float32 (softmax and entropy need it)."""
    device = model.ln_final.w.device if hasattr(model.ln_final, "w") else model.unembed.W_U.device
    resid = resid.to(device)
    logits = model.unembed(model.ln_final(resid.unsqueeze(-2) if resid.dim() == 2 else resid))
    if resid.dim() == 2:
        logits = logits.squeeze(-2)
    return logits.float()


def entropy(logprobs: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """Entropy (nats) of log-probabilities; -inf entries (masked candidates) count as zero."""
    probs = logprobs.exp()
    return -(probs * torch.where(probs > 0, logprobs, torch.zeros_like(logprobs))).sum(-1)


# --- rotary positions for continuations -------------------------------------------------


def ensure_rotary_length(model, needed: int) -> None:
    """Grow every rotary table to at least `needed` positions."""
    if model.cfg.positional_embedding_type != "rotary":
        return
    for block in model.blocks:
        attn = block.attn
        if needed > attn.rotary_cos.shape[0]:
            attn._extend_rotary_embeddings(max(needed, 2 * attn.rotary_cos.shape[0]))


def _apply_rotary_at(attn, position_ids: Int[Tensor, "row pos"], x, past_kv_pos_offset=0, attention_mask=None, check=True):
    """TransformerLens's rotary, at explicit per-row positions (e.g. the original (0, T-1))."""
    rotary_dim = attn.cfg.rotary_dim
    position_ids = position_ids.to(attn.rotary_cos.device)
    if check:
        needed = int(position_ids.max()) + 1
        if needed > attn.rotary_cos.shape[0]:
            attn._extend_rotary_embeddings(max(needed, 2 * attn.rotary_cos.shape[0]))
    x = x.to(attn.rotary_cos.device)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    cos = attn.rotary_cos[position_ids][:, :, None, :]
    sin = attn.rotary_sin[position_ids][:, :, None, :]
    rotated = x_rot * cos + attn.rotate_every_two(x_rot) * sin
    return torch.cat([rotated, x_pass], dim=-1)


@contextlib.contextmanager
def rotary_positions(model, position_ids: Int[Tensor, "row pos"] | None, blocks: range | None = None, check: bool = True):
    """Make every attention layer (in `blocks`) use `position_ids` for its rotary embedding.

    A no-op for `None` or for models without rotary embeddings: learned absolute positions
    are added once to the embedding and are already inside the residuals a lens continues.
    """
    if position_ids is None or model.cfg.positional_embedding_type != "rotary":
        yield
        return
    patched = []
    for k in blocks if blocks is not None else range(model.cfg.n_layers):
        attn = model.blocks[k].attn
        attn.apply_rotary = partial(_apply_rotary_at, attn, position_ids, check=check)
        patched.append(attn)
    try:
        yield
    finally:
        for attn in patched:
            del attn.apply_rotary


@contextlib.contextmanager
def point_hooks(model, fwd_hooks: list[tuple[str, object]]):
    """`model.hooks(fwd_hooks)` for a few named hook points, at the cost of those points only.

    TransformerLens's `hooks()` context resets every hook point of the model on exit (about
    800 of them for a 30-block model, milliseconds of Python); a continuation that enters a
    context per block would spend more on that than on the block itself. This one adds the
    hooks at a fresh context level and removes exactly those, leaving the user's hooks alone.
    """
    if not fwd_hooks:
        yield
        return
    model.context_level += 1
    level = model.context_level
    points = [model.mod_dict[name] for name, _ in fwd_hooks]
    try:
        for point, (_, hook) in zip(points, fwd_hooks):
            point.add_hook(hook, dir="fwd", level=level)
        yield
    finally:
        for point in points:
            point.remove_hooks("fwd", including_permanent=False, level=level)
        model.context_level -= 1


def block_device(model, k: int):
    """The device of block `k`'s weights (its attention's query weights, else its first parameter:
    `parameters()` walks the block's modules, tens of microseconds a call)."""
    block = model.blocks[k]
    weight = getattr(block.attn, "W_Q", None) if hasattr(block, "attn") else None
    return weight.device if isinstance(weight, torch.Tensor) else next(block.parameters()).device
