"""The SimLens continuation engine: short sequences of slot residuals continued through the
upper blocks of a `HookedTransformer`, in formulations that must agree:

- the reference, as TransformerLens hook functions: a forward pass over the two tokens
  `[x_0, x_{T-1}]` with a hook on the readout point's hook that writes the slot residuals
  (`simlens_logits_hooked`), and the equivalent `model(z, start_at_layer=l)` loop
  (`simlens_logits_naive`);
- a fast path for evaluation (`continue_slots`): the `[s]`/`[a]` pairs of every readout point
  of a batch run through the upper blocks together, each block once over all pairs that
  still need it, optionally replayed from CUDA graphs (`ContinuationGraphs`; per block for
  the SimExit executor: `GraphedContinuation`). With a start token's cached keys and values
  (`StartKV`) only `[a]` runs: `[s]`'s half of every pair is computed once per run, and
  sequences of `[a]` alone (`[s]` dropped) share the same block calls under an attention mask.

It knows nothing of lenses: `lensbench.lenses.simlens` and the exit executor build on it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensbench.errors import LensbenchError
from lensbench.readout import (
    ReadoutPoint,
    block_device,
    ensure_rotary_length,
    point_hooks,
    rotary_positions,
    unembed,
)


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


# --- the start token's keys and values -----------------------------------------------------


class StartKV:
    """The keys and values of a start token `[s]` at position 0 in every block: one
    TransformerLens forward pass of that token alone with a key-value cache.

    In SimLens's two-token continuation (consecutive positions) `[s]` attends only to itself,
    so its state at every block is the start token's own state there, whichever block the
    sequence started at (METHOD.md: `[s]` is a per-layer constant). Its keys and values are
    therefore the same for every sequence: the continuation runs `[a]` alone as a one-token
    query against these cached keys and values (`past_kv_cache_entry`, frozen), which is the
    two-token computation with `[s]`'s half done once instead of once per sequence and block.
    """

    def __init__(self, model, token_id: int):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        device = block_device(model, 0)
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, 1)
        with torch.inference_mode():
            # An explicit mask: TransformerLens would otherwise take a start token that is also
            # the pad token (Qwen's end-of-text) for padding and mask it out.
            model(torch.tensor([[int(token_id)]], device=device), past_kv_cache=cache, return_type=None,
                  attention_mask=torch.ones(1, 1, dtype=torch.long, device=device))
        self.token_id = int(token_id)
        self.keys = [entry.past_keys for entry in cache.entries]  # per block: (1, 1, kv_head, d_head)
        self.values = [entry.past_values for entry in cache.entries]

    @classmethod
    def of(cls, states: dict, model, token_id: int) -> "StartKV":
        """`token_id`'s `StartKV` from `states` (token -> StartKV), made there on first use."""
        token_id = int(token_id)
        if token_id not in states:
            states[token_id] = cls(model, token_id)
        return states[token_id]

    def entry(self, k: int, n: int):
        """Block k's frozen cache entry for `n` one-token queries at position 1."""
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        return TransformerLensKeyValueCacheEntry(
            self.keys[k].expand(n, -1, -1, -1), self.values[k].expand(n, -1, -1, -1), frozen=True
        )


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
    start: StartKV | None = None,
    alone: Tensor | None = None,
) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n block head"] | None]:
    """Continue each short sequence `z[i]` from readout point `starts[i]` to the last block.

    Sequences join the running batch at their start block, so block k runs once over every
    sequence that needs it. Returns the final residual at the last slot, and optionally the
    attention the last slot pays to the first in every block (NaN where not run).
    With `graphs` (consecutive positions on one CUDA device) the whole loop is replayed from
    a CUDA graph captured once per shape (`ContinuationGraphs`).

    With `start`, every `z[i]` is `[s, a]` with `s` the state of `start`'s token at the
    sequence's start point (consecutive positions): `[s]`'s part is taken from `start`'s keys
    and values and only `[a]` runs through the blocks (`StartKV`); `z[:, 0]` is not read.
    `alone` (a boolean per sequence, with `start`) marks sequences that are `[a]` alone (`[s]`
    dropped): an attention mask hides `[s]` from them and puts `[a]` at position 0, so they
    are the one-token continuation and share the block calls of the others.
    """
    if start is not None and (z.shape[1] != 2 or position_ids is not None):
        raise LensbenchError("the cached start token needs [s, a] sequences at consecutive positions")
    if alone is not None and start is None:
        raise LensbenchError("sequences of [a] alone share block calls only with a cached start token")
    plan = ContinuationPlan.of(starts, model.cfg.n_layers)
    if graphs is not None and position_ids is None and graphs.enabled and alone is None:
        result = graphs.run(z, plan, capture_attention, start)
        if result is not None:
            return result
    return _execute_plan(model, z, plan, *_plan_indices(plan, z.device), position_ids, capture_attention, start, alone)


def _plan_indices(plan: ContinuationPlan, device) -> tuple[Tensor | None, Tensor | None]:
    final_t = torch.tensor(plan.final_rows, dtype=torch.long).to(device) if plan.final_rows else None
    order_t = torch.tensor(plan.order, dtype=torch.long).to(device) if plan.order else None
    return final_t, order_t


def _execute_plan(model, z, plan: ContinuationPlan, final_t, order_t, position_ids=None, capture_attention=False,
                  start: StartKV | None = None, alone: Tensor | None = None):
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
    z_ordered = z[order_t] if start is None else z[order_t][:, 1:]  # with `start`, [a] alone
    mask_ordered = None  # per running row: (sees [s], sees [a]) for the blocks' attention
    if alone is not None:
        sees_s = (~alone.to(z.device)).long()
        mask_ordered = torch.stack([sees_s, torch.ones_like(sees_s)], 1)[order_t]
    ordered_pos = None if position_ids is None else position_ids[order_t]
    if ordered_pos is not None:
        ensure_rotary_length(model, int(ordered_pos.max()) + 1)  # one sync, not one per block
    current: dict[str, Tensor] = {}
    armed = [False]  # the pattern is kept from the running rows' block call only (not a mid start's)

    def pattern_hook(pattern, hook):
        if armed[0]:
            current["pattern"] = pattern[:, :, -1, 0].float()  # the last query ([a]) on key 0 ([s])

    # The pattern hooks of every block at once: one hook context, not one per block.
    hooks = [(f"blocks.{k}.attn.hook_pattern", pattern_hook) for k in range(n_layers)] if attention is not None else []
    active: Tensor | None = None
    with torch.inference_mode(), point_hooks(model, hooks):
        for k in range(n_layers):
            device = block_device(model, k)
            pre_start, running, mid_end = plan.bounds[k]
            if running > pre_start:
                new = z_ordered[pre_start:running].to(device)
                active = new if active is None else torch.cat([active.to(device), new])
            if active is not None and running > 0:
                active = active.to(device)
                positions = None if ordered_pos is None else ordered_pos[:running]
                armed[0] = True
                with rotary_positions(model, positions, range(k, k + 1), check=False):
                    if start is None:
                        active = model.blocks[k](active)
                    else:
                        mask = None if mask_ordered is None else mask_ordered[:running].to(device)
                        active = model.blocks[k](active, past_kv_cache_entry=start.entry(k, active.shape[0]),
                                                 attention_mask=mask)
                armed[0] = False
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

    def run(self, z, plan: ContinuationPlan, capture_attention: bool, start: StartKV | None = None):
        key = (tuple(z.shape), z.dtype, plan, capture_attention, None if start is None else id(start))
        entry = self._cache.pop(key, None)
        if entry is None:
            try:
                entry = self._capture(z, plan, capture_attention, start)
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

    def _capture(self, z, plan: ContinuationPlan, capture_attention: bool, start: StartKV | None = None):
        final_t, order_t = _plan_indices(plan, z.device)
        with torch.inference_mode():
            z_in = z.clone()
            graph, (out, attention) = _capture(
                lambda: _execute_plan(self.model, z_in, plan, final_t, order_t, None, capture_attention, start)
            )
        # The index tensors (and the start token's keys and values) live outside the graph's
        # pool: the entry keeps them alive, or their memory would be reused while the graph
        # still reads it.
        return graph, z_in, out, attention, (final_t, order_t, start)


def masked_block(model, k: int, x: Float[Tensor, "n slot d_model"], starts: Int[Tensor, " n"],
                 start: StartKV | None = None) -> Tensor:
    """Block k on the sequences that have joined (`starts <= k`); the others pass unchanged.
    Chaining it from the lowest start continues every sequence from its own start block.
    With `start`, `x` holds `[a]` alone and `[s]` comes from the start token's keys and values."""
    entry = None if start is None else start.entry(k, x.shape[0])
    return torch.where((starts <= k)[:, None, None], model.blocks[k](x, past_kv_cache_entry=entry), x)


class GraphedContinuation:
    """`continue_slots` for `n` sequences of `n_slots` slots at consecutive positions, replayed
    from CUDA graphs: one graph per block, chained through static buffers, so continuing from
    block l is L-l graph launches instead of L-l Python block calls (hundreds of kernel
    launches each). At batch size 1 a two-token block is launch-bound on a GPU: this is what
    makes an early exit's continuation cheap in wall-clock, not only in layer-tokens.

    The sequences may start at different blocks (`run(z, [l_1, ..., l_n])`): each graph runs
    `masked_block`, so one pass from the lowest start continues all of them (a sequence below
    its start is computed and discarded; for two-token sequences on a GPU that costs nothing
    next to a launch). A start of L leaves a row untouched (padding).

    Captured on first use (one warm-up and one capture per block); CUDA only. The buffers are
    reused, so `run` returns a copy. Results equal `continue_slots` up to kernel choice.
    With `start` (`StartKV`) the buffers hold `[a]` alone, as in `continue_slots(start=...)`.
    """

    def __init__(self, model, n: int, n_slots: int = 2, start: StartKV | None = None):
        if not cuda_graphs_possible(model):
            raise LensbenchError("CUDA graphs of the continuation need the model on one CUDA device")
        if start is not None and n_slots != 2:
            raise LensbenchError("the cached start token needs [s, a] sequences")
        self.model = model
        self.start = start  # with it, the buffers hold [a] alone (`StartKV`)
        self.n, self.n_slots = n, n_slots
        n_slots = 1 if start is not None else n_slots
        n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
        dtype = next(model.blocks[0].parameters()).dtype
        device = next(model.blocks[0].parameters()).device
        self.buffers = [torch.zeros(n, n_slots, d_model, dtype=dtype, device=device) for _ in range(n_layers + 1)]
        self.starts = torch.zeros(n, dtype=torch.long, device=device)
        self.graphs: list = []
        with torch.inference_mode():
            for k in range(n_layers):
                graph, _ = _capture(
                    lambda: self.buffers[k + 1].copy_(masked_block(model, k, self.buffers[k], self.starts, start))
                )
                self.graphs.append(graph)

    def run(self, z: Float[Tensor, "n slot d_model"], start_layer: int | list[int]) -> Float[Tensor, "n d_model"]:
        """The last slot's final residual, continuing `z` from `blocks.{start_layer}.hook_resid_pre`
        (one block for every sequence, or one per sequence)."""
        starts = [int(start_layer)] * self.n if isinstance(start_layer, int) else [int(x) for x in start_layer]
        first = min(starts)
        with torch.inference_mode():  # the buffers may be inference tensors (captured in that mode)
            self.starts.copy_(torch.tensor(starts, dtype=torch.long))
            self.buffers[first].copy_(z if self.start is None else z[:, 1:])
            for k in range(first, len(self.graphs)):
                self.graphs[k].replay()
            return self.buffers[-1][:, -1].clone()
