"""SimLens and its slot ablations (METHOD.md), in two formulations that must agree:

- the reference, as TransformerLens hook functions: a forward pass over the two tokens
  `[x_0, x_{T-1}]` with a hook on the readout point's hook that writes the slot residuals
  (`simlens_logits_hooked`), and the equivalent `model(z, start_at_layer=l)` loop
  (`simlens_logits_naive`);
- a fast path for evaluation (`continue_slots`): the `[s]`/`[a]` pairs of every readout point
  of a batch run through the upper blocks together, each block once over all pairs that
  still need it.

Slot sources (`SlotSource`): `self`, `drop`, `position:P`, `token:T`, `layer:K`, `example:J`,
`swap[:SEED]` (a seeded cross-example derangement), `mean`, `zero`. An ablation gives a source
to each slot; readout is at the last remaining slot.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensbench.errors import LensbenchError
from lensbench.lenses.base import Lens, LensBatch, LensOutput, RunContext
from lensbench.readout import (
    ReadoutPoint,
    block_device,
    collect_slots,
    ensure_rotary_length,
    point_hooks,
    rotary_positions,
    unembed,
)

POSITION_MODES = ("consecutive", "original")
SOURCE_KINDS = ("self", "drop", "position", "token", "layer", "example", "swap", "mean", "zero")


@dataclass(frozen=True)
class SlotSource:
    """Where a slot's residual comes from."""

    kind: str = "self"
    arg: object = None

    def __str__(self) -> str:
        if self.kind == "token":
            return f"token:{json.dumps(self.arg)}"
        if self.kind == "swap":
            return "swap" if self.arg == 0 else f"swap:{self.arg}"
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


SELF = SlotSource()


@dataclass(frozen=True)
class Ablation:
    """A source for each SimLens slot; `Ablation()` is plain SimLens."""

    s: SlotSource = SELF
    a: SlotSource = SELF

    def __post_init__(self):
        if self.s.kind == "drop" and self.a.kind == "drop":
            raise LensbenchError("an ablation cannot drop both [s] and [a]")

    @property
    def label(self) -> str:
        if self == Ablation(SlotSource("drop"), SELF):
            return "drop-s"
        if self == Ablation(SELF, SlotSource("drop")):
            return "drop-a"
        parts = [f"{slot}={src}" for slot, src in (("s", self.s), ("a", self.a)) if src != SELF]
        return "+".join(parts) or "none"

    @property
    def slots(self) -> list[tuple[str, SlotSource]]:
        """The slots that remain, in sequence order (`[s]` first)."""
        return [(slot, src) for slot, src in (("s", self.s), ("a", self.a)) if src.kind != "drop"]


def parse_source(text: str) -> SlotSource:
    kind, sep, arg = text.strip().partition(":")
    kind = kind.strip()
    if kind not in SOURCE_KINDS:
        raise LensbenchError(f"unknown slot source '{text}' (expected one of {', '.join(SOURCE_KINDS)})")
    if kind in ("self", "drop", "mean", "zero"):
        if sep:
            raise LensbenchError(f"slot source '{kind}' takes no argument (got '{text}')")
        return SlotSource(kind)
    if kind == "token":
        if not arg:
            raise LensbenchError('token source needs a token, e.g. s=token:" the"')
        if arg.startswith('"'):
            try:
                arg = json.loads(arg)
            except json.JSONDecodeError:
                raise LensbenchError(f"bad quoted token in '{text}'") from None
        return SlotSource("token", arg)
    if kind == "swap" and not sep:
        return SlotSource("swap", 0)
    try:
        value = int(arg)
    except ValueError:
        raise LensbenchError(f"slot source '{kind}' needs an integer argument (got '{text}')") from None
    if kind in ("layer", "example", "swap") and value < 0:
        raise LensbenchError(f"slot source '{text}' needs a non-negative integer")
    return SlotSource(kind, value)


def parse_ablation(text: str) -> Ablation:
    """`drop-s`, `drop-a`, `swap-a`, `swap-s`, or `s=SRC`, `a=SRC`, `s=SRC+a=SRC`."""
    text = text.strip()
    aliases = {"drop-s": "s=drop", "drop-a": "a=drop", "swap-a": "a=swap", "swap-s": "s=swap"}
    text = aliases.get(text, text)
    sources = {}
    for part in text.split("+"):
        slot, sep, src = part.partition("=")
        slot = slot.strip()
        if not sep or slot not in ("s", "a"):
            raise LensbenchError(
                f"bad ablation '{part}': expected drop-s, drop-a, swap-a, swap-s or s=SOURCE / a=SOURCE joined by '+'"
            )
        if slot in sources:
            raise LensbenchError(f"ablation '{text}' sets slot {slot} twice")
        sources[slot] = parse_source(src)
    return Ablation(sources.get("s", SELF), sources.get("a", SELF))


def parse_ablations(text: str) -> list[Ablation]:
    """A comma-separated list; double quotes protect commas inside a token, as in CSV."""
    fields, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            fields.append(current)
            current = ""
        else:
            current += char
    if quoted:
        raise LensbenchError(f"unbalanced double quote in ablations '{text}'")
    fields.append(current)
    return [parse_ablation(f) for f in fields if f.strip()]


# --- the reference: TransformerLens hooks ---------------------------------------------------


def replace_residual_hook(z: Float[Tensor, "batch slot d_model"]):
    """A hook function that replaces a residual activation by `z` (the SimLens input)."""

    def hook(activation, hook):
        return z.to(device=activation.device, dtype=activation.dtype)

    return hook


def simlens_logits_hooked(
    model,
    z: Float[Tensor, "batch slot d_model"],
    point: ReadoutPoint,
    tokens: Int[Tensor, "batch slot"] | None = None,
    position_ids: Int[Tensor, "batch slot"] | None = None,
) -> Float[Tensor, "batch d_vocab"]:
    """SimLens at `point`, the reference way: run the slot tokens with a hook at
    `point.hook_name` that writes `z`, and read out the last slot."""
    if tokens is None:  # the tokens are overwritten at the hook; only their count matters
        tokens = torch.zeros(z.shape[:2], dtype=torch.long, device=z.device)
    with torch.inference_mode(), rotary_positions(model, position_ids):
        logits = model.run_with_hooks(tokens, fwd_hooks=[(point.hook_name, replace_residual_hook(z))])
    return logits[:, -1].float()


def simlens_logits_naive(
    model, z: Float[Tensor, "batch slot d_model"], point: ReadoutPoint
) -> Float[Tensor, "batch d_vocab"]:
    """SimLens at a `pre` point as `model(z, start_at_layer=l)` (consecutive positions)."""
    if point.site != "pre":
        raise LensbenchError("the start_at_layer formulation only covers resid_pre points")
    with torch.inference_mode():
        if point.is_final:
            return unembed(model, z[:, -1])
        return model(z, start_at_layer=point.layer)[:, -1].float()


# --- the fast path --------------------------------------------------------------------------


def _mlp_half(model, k: int, z: Float[Tensor, "n slot d_model"]) -> Float[Tensor, "n slot d_model"]:
    """Finish block k from its `hook_resid_mid` (attention is computed on `z` and discarded)."""
    with point_hooks(model, [(f"blocks.{k}.hook_resid_mid", replace_residual_hook(z))]):
        return model.blocks[k](z)


@dataclass(frozen=True)
class ContinuationPlan:
    """Where every sequence of a `continue_slots` call joins the running batch, built on the
    host: rows are laid out in joining order, so the block loop never synchronises."""

    n_layers: int
    final_rows: tuple[int, ...]
    order: tuple[int, ...]
    bounds: tuple[tuple[int, int, int], ...]  # per block: (pre start, rows running block k, mid end)

    @classmethod
    def of(cls, starts: list[ReadoutPoint], n_layers: int) -> "ContinuationPlan":
        final_rows: list[int] = []
        joining_pre: dict[int, list[int]] = {}
        joining_mid: dict[int, list[int]] = {}
        for i, point in enumerate(starts):
            if point.is_final:
                final_rows.append(i)
            elif point.site == "mid":
                joining_mid.setdefault(point.layer, []).append(i)
            else:
                joining_pre.setdefault(point.layer, []).append(i)
        order: list[int] = []
        bounds = []
        for k in range(n_layers):
            pre_start = len(order)
            order += joining_pre.get(k, [])
            running = len(order)
            order += joining_mid.get(k, [])
            bounds.append((pre_start, running, len(order)))
        return cls(n_layers, tuple(final_rows), tuple(order), tuple(bounds))


def continue_slots(
    model,
    z: Float[Tensor, "n slot d_model"],
    starts: list[ReadoutPoint],
    position_ids: Int[Tensor, "n slot"] | None = None,
    capture_attention: bool = False,
    graphs: "ContinuationGraphs | None" = None,
) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n block head"] | None]:
    """Continue each short sequence `z[i]` from readout point `starts[i]` to the last block.

    Sequences join the running batch at their start block, so block k runs once over every
    sequence that needs it. Returns the final residual at the last slot, and optionally the
    attention the last slot pays to the first in every block (NaN where not run).
    With `graphs` (consecutive positions on one CUDA device) the whole loop is replayed from
    a CUDA graph captured once per shape (`ContinuationGraphs`).
    """
    plan = ContinuationPlan.of(starts, model.cfg.n_layers)
    if graphs is not None and position_ids is None and graphs.enabled:
        result = graphs.run(z, plan, capture_attention)
        if result is not None:
            return result
    return _execute_plan(model, z, plan, *_plan_indices(plan, z.device), position_ids, capture_attention)


def _plan_indices(plan: ContinuationPlan, device) -> tuple[Tensor | None, Tensor | None]:
    final_t = torch.tensor(plan.final_rows, dtype=torch.long).to(device) if plan.final_rows else None
    order_t = torch.tensor(plan.order, dtype=torch.long).to(device) if plan.order else None
    return final_t, order_t


def _execute_plan(model, z, plan: ContinuationPlan, final_t, order_t, position_ids=None, capture_attention=False):
    """The block loop of `continue_slots`: device work only, so it can be captured in a graph."""
    n, n_slots, _ = z.shape
    n_layers = plan.n_layers
    attention = None
    if capture_attention and n_slots == 2:
        attention = torch.full((n, n_layers, model.cfg.n_heads), float("nan"), device=z.device)
    out = torch.empty(n, z.shape[-1], dtype=z.dtype, device=z.device)
    if final_t is not None:
        out[final_t] = z[final_t, -1]
    if order_t is None:
        return out, attention
    z_ordered = z[order_t]
    ordered_pos = None if position_ids is None else position_ids[order_t]
    if ordered_pos is not None:
        ensure_rotary_length(model, int(ordered_pos.max()) + 1)  # one sync, not one per block
    current: dict[str, Tensor] = {}

    def pattern_hook(pattern, hook):
        current["pattern"] = pattern[:, :, 1, 0].float()

    active: Tensor | None = None
    with torch.inference_mode():
        for k in range(n_layers):
            device = block_device(model, k)
            pre_start, running, mid_end = plan.bounds[k]
            if running > pre_start:
                new = z_ordered[pre_start:running].to(device)
                active = new if active is None else torch.cat([active.to(device), new])
            if active is not None and running > 0:
                active = active.to(device)
                positions = None if ordered_pos is None else ordered_pos[:running]
                hooks = [(f"blocks.{k}.attn.hook_pattern", pattern_hook)] if attention is not None else []
                with rotary_positions(model, positions, range(k, k + 1), check=False), point_hooks(model, hooks):
                    active = model.blocks[k](active)
                if attention is not None:
                    attention[order_t[:running], k] = current.pop("pattern").to(z.device)
            if mid_end > running:
                positions = None if ordered_pos is None else ordered_pos[running:mid_end]
                with rotary_positions(model, positions, range(k, k + 1), check=False):
                    new = _mlp_half(model, k, z_ordered[running:mid_end].to(device))
                active = new if active is None else torch.cat([active, new])
        out[order_t] = active[:, -1].to(z.device)
    return out, attention


def cuda_graphs_possible(model) -> bool:
    """Whether CUDA graphs can replay this model's blocks: all of it on one CUDA device."""
    return str(model.cfg.device).startswith("cuda") and torch.cuda.is_available() and model.cfg.n_devices == 1


def _capture(fn):
    """Warm `fn` up on a side stream (as capture requires), then capture one call of it in a
    CUDA graph; returns the graph and what the captured call returned (its static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class ContinuationGraphs:
    """CUDA graphs of whole `continue_slots` calls, one per shape (rows, slots, plan,
    attention), captured on first use and replayed after: the continuation of a batch is then
    one launch instead of thousands, which is what a small model's sweep is bound by on a GPU.

    Keeps the `max_graphs` most recently used (each holds its own memory pool). A model that
    cannot be captured turns graphs off with one warning and runs eagerly. Hooks added to the
    model after a capture are not seen by that graph.
    """

    def __init__(self, model, max_graphs: int = 6):
        self.model = model
        self.max_graphs = max_graphs
        self.enabled = cuda_graphs_possible(model)
        self._cache: dict = {}

    def run(self, z, plan: ContinuationPlan, capture_attention: bool):
        key = (tuple(z.shape), z.dtype, plan, capture_attention)
        entry = self._cache.pop(key, None)
        if entry is None:
            try:
                entry = self._capture(z, plan, capture_attention)
            except Exception as exc:  # noqa: BLE001 - eager still works
                warnings.warn(f"CUDA graphs of the SimLens continuation unavailable ({type(exc).__name__}: {exc}); running eagerly")
                self.enabled = False
                self._cache.clear()
                return None
            while len(self._cache) >= self.max_graphs:
                self._cache.pop(next(iter(self._cache)))
        self._cache[key] = entry  # most recently used last
        graph, z_in, out, attention, _indices = entry
        with torch.inference_mode():
            z_in.copy_(z)
            graph.replay()
            return out.clone(), (None if attention is None else attention.clone())

    def _capture(self, z, plan: ContinuationPlan, capture_attention: bool):
        final_t, order_t = _plan_indices(plan, z.device)
        with torch.inference_mode():
            z_in = z.clone()
            graph, (out, attention) = _capture(
                lambda: _execute_plan(self.model, z_in, plan, final_t, order_t, None, capture_attention)
            )
        # The index tensors live outside the graph's pool: the entry keeps them alive, or their
        # memory would be reused while the graph still reads it.
        return graph, z_in, out, attention, (final_t, order_t)


class GraphedContinuation:
    """`continue_slots` for `n` sequences of `n_slots` slots at consecutive positions, replayed
    from CUDA graphs: one graph per block, chained through static buffers, so continuing from
    block l is L-l graph launches instead of L-l Python block calls (hundreds of kernel
    launches each). At batch size 1 a two-token block is launch-bound on a GPU: this is what
    makes an early exit's continuation cheap in wall-clock, not only in layer-tokens.

    Captured on first use (one warm-up and one capture per block); CUDA only. The buffers are
    reused, so `run` returns a copy. Results equal `continue_slots` up to kernel choice.
    """

    def __init__(self, model, n: int, n_slots: int = 2):
        if not cuda_graphs_possible(model):
            raise LensbenchError("CUDA graphs of the continuation need the model on one CUDA device")
        self.model = model
        self.n, self.n_slots = n, n_slots
        n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
        dtype = next(model.blocks[0].parameters()).dtype
        device = next(model.blocks[0].parameters()).device
        self.buffers = [torch.zeros(n, n_slots, d_model, dtype=dtype, device=device) for _ in range(n_layers + 1)]
        self.graphs: list = []
        with torch.inference_mode():
            for k in range(n_layers):
                graph, _ = _capture(lambda: self.buffers[k + 1].copy_(model.blocks[k](self.buffers[k])))
                self.graphs.append(graph)

    def run(self, z: Float[Tensor, "n slot d_model"], start_layer: int) -> Float[Tensor, "n d_model"]:
        """The last slot's final residual, continuing `z` from `blocks.{start_layer}.hook_resid_pre`."""
        with torch.inference_mode():  # the buffers may be inference tensors (captured in that mode)
            self.buffers[start_layer].copy_(z)
            for k in range(start_layer, len(self.graphs)):
                self.graphs[k].replay()
            return self.buffers[-1][:, -1].clone()


# --- the lens -------------------------------------------------------------------------------


class SimLens(Lens):
    """SimLens, optionally with an ablation of its `[s]`/`[a]` slots."""

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

    def extra_positions(self) -> tuple[int, ...]:
        return tuple(src.arg for _, src in self.ablation.slots if src.kind == "position")

    def prepare(self, ctx: RunContext) -> None:
        self._ctx = ctx
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
                order = sorted(ctx.examples)
                generator = torch.Generator().manual_seed(int(src.arg))
                perm = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
                # A cyclic shift of a random order: a derangement, so no example is its own donor.
                self._donor = {perm[i]: perm[(i + 1) % len(perm)] for i in range(len(perm))}

    def donors(self, example_indices: list[int]) -> list[int]:
        fixed = [src.arg for _, src in self.ablation.slots if src.kind == "example"]
        return [self._donor[i] for i in example_indices if i in self._donor] + fixed

    def donor_of(self, example_index: int) -> int | None:
        """The swap donor of an example (None without a swap)."""
        return self._donor.get(example_index)

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
        return all(e is not None for e in examples) and len({e.tokens[0] for e in examples}) == 1

    def final_residuals(self, batch: LensBatch) -> LensOutput:
        z, position_ids = self.inputs(batch)
        shared = self.example_independent(batch)
        if shared:  # one row per point stands for the whole batch
            z = z[:, :1]
            position_ids = None if position_ids is None else position_ids[:, :1]
        n_points, b, n_slots, d_model = z.shape
        starts = [p for p in batch.slots.points for _ in range(b)]
        flat_pos = None if position_ids is None else position_ids.reshape(n_points * b, n_slots)
        graphs = self._ctx.continuation_graphs() if self._ctx is not None else None
        resid, attention = continue_slots(
            batch.model, z.reshape(n_points * b, n_slots, d_model), starts, flat_pos, self.capture_attention, graphs
        )
        attention = None if attention is None else attention.reshape(n_points, b, *attention.shape[1:])
        return LensOutput(resid.reshape(n_points, b, d_model), attention, shared)

    def logits_hooked(self, batch: LensBatch, point_index: int) -> Float[Tensor, "primary d_vocab"]:
        """The reference formulation at one readout point, for the same batch."""
        z, position_ids = self.inputs(batch)
        pos = None if position_ids is None else position_ids[point_index]
        return simlens_logits_hooked(batch.model, z[point_index], batch.slots.points[point_index], position_ids=pos)
