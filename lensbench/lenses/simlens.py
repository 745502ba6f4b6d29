"""SimLens and its slot ablations as a lens (METHOD.md): the slot sources of an `Ablation`
(`lensbench.lenses.ablation`) give the input sequences, the continuation engine
(`lensbench.continuation`) runs them through the upper blocks.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensbench.continuation import ContinuationGraphs, StartKV, continue_slots, simlens_logits_hooked
from lensbench.errors import LensbenchError
from lensbench.lenses.ablation import POSITION_MODES, Ablation, SlotSource, parse_ablations
from lensbench.lenses.base import Lens, LensBatch, LensOptions, LensOutput, RunContext, register
from lensbench.readout import collect_slots
from lensbench.tasks import shared_start_token


def continuation_graphs(ctx: RunContext) -> ContinuationGraphs | None:
    """The run's shared `ContinuationGraphs`, or None when graphs are off or unusable."""
    if not ctx.cuda_graphs:
        return None
    graphs = ctx.shared("continuation_graphs", lambda: ContinuationGraphs(ctx.model))
    return graphs if graphs.enabled else None

@register
class SimLens(Lens):
    """SimLens, optionally with an ablation of its `[s]`/`[a]` slots."""

    kind = "simlens"
    cost_method = "simlens"

    @classmethod
    def build(cls, options: LensOptions) -> list[Lens]:
        return [cls(Ablation(), options.positions)]

    @classmethod
    def ablations(cls, text: str, positions: str = "consecutive") -> list[Lens]:
        """One lens per ablation of the comma-separated `--ablations` text."""
        return [cls(ablation, positions) for ablation in parse_ablations(text)]

    def __init__(self, ablation: Ablation = Ablation(), positions: str = "consecutive", capture_attention: bool = True):
        if positions not in POSITION_MODES:
            raise LensbenchError(f"unknown continuation positions '{positions}' (expected consecutive or original)")
        self.ablation = ablation
        self.positions = positions
        self.capture_attention = capture_attention and ablation == Ablation()
        self.name = "simlens" if ablation == Ablation() else f"simlens[{ablation.label}]"
        self._token_resid: dict[str, Tensor] = {}
        self._means = None
        self._donor: dict[int, int] = {}
        self._ctx: RunContext | None = None
        self._start_token: int | None = None  # the [s] slot's token when it is a start token's own state
        self._shared_memo: tuple | None = None  # (z, points, LensOutput) of the last shared input

    def extra_positions(self) -> tuple[int, ...]:
        return tuple(src.arg for _, src in self.ablation.slots if src.kind == "position")

    def prepare(self, ctx: RunContext) -> None:
        self._ctx = ctx
        self._start_token = None
        tokenizer = ctx.model.tokenizer
        for slot, src in self.ablation.slots:
            if src.kind == "token" and src.arg not in self._token_resid:
                ids = tokenizer.encode(src.arg, add_special_tokens=False)
                if len(ids) != 1:
                    raise LensbenchError(f"token source {src.arg!r} is {len(ids)} tokens for this tokenizer; it must be one")
                tokens = torch.tensor([ids], device=ctx.model.cfg.device)
                slots = collect_slots(ctx.model, tokens, torch.tensor([1], device=tokens.device), ctx.points)
                self._token_resid[src.arg] = slots.s[:, 0]
            if src.kind == "layer" and src.arg > ctx.model.cfg.n_layers:
                raise LensbenchError(f"slot source layer:{src.arg} is beyond the model's {ctx.model.cfg.n_layers} layers")
            if src.kind == "example" and src.arg not in ctx.examples:
                raise LensbenchError(f"slot source example:{src.arg} is not an example of this run (indices 0..{max(ctx.examples)})")
            if src.kind == "mean":
                self._means = ctx.slot_means()
            if src.kind == "swap":
                if len(ctx.examples) < 2:
                    raise LensbenchError(f"ablation '{self.ablation.label}': a swap needs at least 2 examples "
                                         f"(the run has {len(ctx.examples)}); an example cannot be its own donor")
                order = sorted(ctx.examples)
                generator = torch.Generator().manual_seed(int(src.arg))
                perm = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
                # A cyclic shift of a random order: a derangement, so no example is its own donor.
                self._donor = {perm[i]: perm[(i + 1) % len(perm)] for i in range(len(perm))}
        self._start_token = self._cached_start_token(ctx)

    def _cached_start_token(self, ctx: RunContext) -> int | None:
        """The token whose own states fill the `[s]` slot at every point, when the
        continuation may take `[s]` from that token's cached keys and values (`StartKV`):
        consecutive positions, both slots kept, and `[s]` from a start token (`self`, another
        example's with the same start token, or `token:t`, a start token of its own)."""
        slots = self.ablation.slots
        if self.positions != "consecutive" or [slot for slot, _ in slots] != ["s", "a"]:
            return None
        src = slots[0][1]
        if src.kind == "token":
            return int(ctx.model.tokenizer.encode(src.arg, add_special_tokens=False)[0])
        if src.kind in ("self", "example", "swap"):
            return shared_start_token(ctx.examples.values())
        return None

    def _fusion_role(self) -> str | None:
        """How this lens's continuation shares block calls with its siblings' (`_fused`):
        "pair" (`[a]` after the cached `[s]`), "alone" (`[a]` alone: `[s]` dropped) or None."""
        if self.positions != "consecutive":
            return None
        slots = [slot for slot, _ in self.ablation.slots]
        if slots == ["s", "a"] and self._start_token is not None:
            return "pair"
        return "alone" if slots == ["a"] else None

    def _fused(self, batch: LensBatch) -> LensOutput | None:
        """This lens's output from one continuation shared with its sibling SimLens lenses.

        With the start token's keys and values cached (`StartKV`), SimLens and its ablations
        that keep `[a]` and either keep `[s]` as a start token's own state or drop it are all
        one-token queries at `[a]`: their sequences run through the same block calls (each
        block once per batch, not once per lens), an attention mask hiding `[s]` from the
        "alone" ones (`continue_slots(alone=...)`). The siblings are the lenses asked for the
        same batch (`LensBatch.lenses`); the first of them asked computes all and keeps the
        others' outputs in the batch's memo. Not with CUDA graphs, which replay each lens's whole
        continuation already. None when there is nothing to share."""
        ctx = self._ctx
        if (ctx is None or not ctx.fuse_continuations or self._fusion_role() is None
                or continuation_graphs(ctx) is not None):
            return None
        kept = batch.memo.pop(("simlens_fused", id(self)), None)
        if kept is not None:
            return kept
        siblings = [lens for lens in batch.lenses if isinstance(lens, SimLens) and lens._ctx is ctx
                    and lens._fusion_role() is not None and not lens.example_independent(batch)]
        pairs = [lens for lens in siblings if lens._fusion_role() == "pair"]
        if self not in siblings or not pairs:
            return None
        token = pairs[0]._start_token
        group = [lens for lens in siblings if lens._fusion_role() == "alone" or lens._start_token == token]
        if len(group) < 2:
            return None
        zs, alone = [], []
        for lens in group:
            z, _ = lens.inputs(batch)
            if lens._fusion_role() == "alone":  # an unread [s] slot, hidden by the mask
                z = torch.cat([torch.zeros_like(z), z], dim=2)
            zs.append(z.reshape(-1, 2, z.shape[-1]))
            alone.append(torch.full((zs[-1].shape[0],), lens._fusion_role() == "alone", dtype=torch.bool))
        n_points, b = len(batch.slots.points), batch.n_primary
        starts = [p for p in batch.slots.points for _ in range(b)] * len(group)
        capture = any(lens.capture_attention for lens in group)
        resid, attention = continue_slots(batch.model, torch.cat(zs), starts, None, capture, None,
                                          pairs[0].start_kv(), torch.cat(alone))
        rows = n_points * b
        mine = None
        for i, lens in enumerate(group):
            part = slice(i * rows, (i + 1) * rows)
            att = attention[part].reshape(n_points, b, *attention.shape[1:]) if lens.capture_attention else None
            output = LensOutput(resid[part].reshape(n_points, b, -1), att, False)
            if lens is self:
                mine = output
            else:
                batch.memo[("simlens_fused", id(lens))] = output
        return mine

    def start_kv(self) -> StartKV | None:
        """The cached start token of this lens's continuation (shared by the run's lenses)."""
        if self._start_token is None or self._ctx is None:
            return None
        return StartKV.of(self._ctx.start_states, self._ctx.model, self._start_token)

    def donors(self, example_indices: list[int]) -> list[int]:
        fixed = [src.arg for _, src in self.ablation.slots if src.kind == "example"]
        return [self._donor[i] for i in example_indices if i in self._donor] + fixed

    def donor_of(self, example_index: int) -> int | None:
        """The swap donor of an example (None without a swap)."""
        return self._donor.get(example_index)

    def donor_column(self, example_indices: list[int]) -> list[int]:
        fixed = [src.arg for _, src in self.ablation.slots if src.kind == "example"]
        if fixed:
            return [fixed[0]] * len(example_indices)
        return [self._donor.get(i, -1) for i in example_indices]

    def _source_values(self, slot: str, src: SlotSource, batch: LensBatch) -> Float[Tensor, "point primary d_model"]:
        slots, b = batch.slots, batch.n_primary
        own = slots.s if slot == "s" else slots.a
        n_points, _, d_model = own.shape
        if src.kind == "self":
            return own[:, :b]
        if src.kind == "position":
            return slots.extra[src.arg][:, :b]
        if src.kind == "token":
            return self._token_resid[src.arg][:, None, :].expand(n_points, b, d_model)
        if src.kind == "layer":
            index = next(i for i, p in enumerate(slots.points) if p.layer == src.arg)
            return own[index : index + 1, :b].expand(n_points, b, d_model)
        if src.kind in ("example", "swap"):
            primary = batch.example_index[:b].tolist()
            donors = [src.arg] * b if src.kind == "example" else [self._donor[i] for i in primary]
            return own[:, batch.row_of(torch.tensor(donors))]
        if src.kind == "mean":
            mean = self._means[0] if slot == "s" else self._means[1]
            return mean[:, None, :].expand(n_points, b, d_model).to(own.device)
        if src.kind == "zero":
            return torch.zeros(n_points, b, d_model, dtype=own.dtype, device=own.device)
        raise AssertionError(src.kind)

    def inputs(self, batch: LensBatch) -> tuple[Float[Tensor, "point primary slot d_model"], Int[Tensor, "point primary slot"] | None]:
        """The SimLens input sequences `z` for every (point, example), and their positions."""
        values = [self._source_values(slot, src, batch) for slot, src in self.ablation.slots]
        z = torch.stack(values, dim=2)
        if self.positions == "consecutive":
            return z, None
        lengths = batch.slots.lengths[: batch.n_primary]
        pos = [torch.zeros_like(lengths) if slot == "s" else lengths - 1 for slot, _ in self.ablation.slots]
        position_ids = torch.stack(pos, dim=1)[None].expand(z.shape[0], -1, -1)
        return z, position_ids

    def example_independent(self, batch: LensBatch) -> bool:
        """Whether every example of the batch gets the same input: each remaining slot is the
        start token's own state (`s=self`, `s=layer:K`) or a fixed vector (`token`, `mean`,
        `zero`), at positions that do not depend on the prompt, and the examples share their
        start token. Such a lens is computed once per point (METHOD.md: `[s]` is a per-layer
        constant, so "drop [a]" is the prompt-independent prior)."""
        slots = self.ablation.slots
        fixed = all((slot == "s" and src.kind in ("self", "layer")) or src.kind in ("token", "mean", "zero")
                    for slot, src in slots)
        if not fixed or (self.positions == "original" and any(slot == "a" for slot, _ in slots)):
            return False
        if self._ctx is None:
            return False
        examples = [self._ctx.examples.get(int(i)) for i in batch.example_index[: batch.n_primary].tolist()]
        return all(e is not None for e in examples) and shared_start_token(examples) is not None

    def final_residuals(self, batch: LensBatch) -> LensOutput:
        shared = self.example_independent(batch)
        if not shared:
            fused = self._fused(batch)
            if fused is not None:
                return fused
        z, position_ids = self.inputs(batch)
        if shared:  # one row per point stands for the whole batch
            z = z[:, :1]
            position_ids = None if position_ids is None else position_ids[:, :1]
            # The same input as the previous batch's (the start token's states): the same output,
            # computed once (a pure function of `z`, compared exactly). The very same
            # `LensOutput` is handed back, so its readout is kept too (`evaluate.read_out`).
            memo = self._shared_memo
            if (memo is not None and memo[0].shape == z.shape and memo[0].device == z.device
                    and torch.equal(memo[0], z) and memo[1] == batch.slots.points):
                return memo[2]
        n_points, b, n_slots, d_model = z.shape
        starts = [p for p in batch.slots.points for _ in range(b)]
        flat_pos = None if position_ids is None else position_ids.reshape(n_points * b, n_slots)
        graphs = continuation_graphs(self._ctx) if self._ctx is not None else None
        resid, attention = continue_slots(
            batch.model, z.reshape(n_points * b, n_slots, d_model), starts, flat_pos, self.capture_attention, graphs,
            self.start_kv(),
        )
        attention = None if attention is None else attention.reshape(n_points, b, *attention.shape[1:])
        resid = resid.reshape(n_points, b, d_model)
        output = LensOutput(resid, attention, shared)
        if shared:
            self._shared_memo = (z.clone(), list(batch.slots.points), output)
        return output

    def logits_hooked(self, batch: LensBatch, point_index: int) -> Float[Tensor, "primary d_vocab"]:
        """The reference formulation at one readout point, for the same batch."""
        z, position_ids = self.inputs(batch)
        pos = None if position_ids is None else position_ids[point_index]
        return simlens_logits_hooked(batch.model, z[point_index], batch.slots.points[point_index], position_ids=pos)
