"""The lens abstraction and the lens registry.

A lens maps the slot residuals of a batch (see `readout.SlotResiduals`) to one residual per
readout point and example, in the space of the final layer; every lens then shares the same
readout, `W_U · LN_final(·)`. The runner, compute accounting, reports and the app know nothing
else about lenses: a new lens is a `Lens` subclass decorated with `@register` in a module of
`lensbench/lenses/` (docs/architecture.md shows one), with

- `kind`: the name `--lenses` takes (and the stored lens name, or its prefix before `[`);
- `build(options)`: the lenses of that kind for a run (`LensOptions`: the run's options);
- `cost_method`, `linear_maps`: how compute accounting charges a readout (`lens_cost`);
- `final_residuals`, and optionally `prepare`, `extra_positions`, `donors`, `donor_column`,
  `check_model`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensbench.errors import LensbenchError
from lensbench.readout import ReadoutPoint, SlotResiduals, collect_slots, pad_right


@dataclass
class LensBatch:
    """What the runner hands a lens: slot residuals for `n_primary` examples plus any rows
    (donors of a cross-example swap) that the lenses asked for."""

    model: object
    slots: SlotResiduals
    n_primary: int
    example_index: Int[Tensor, " row"]  # data-set index of each row
    # The lenses asked for this batch together (`evaluate_batch`): siblings that may share work,
    # which they keep in `memo` for one another (it lives as long as the batch).
    lenses: tuple = ()
    memo: dict = field(default_factory=dict, repr=False)

    def row_of(self, indices: Int[Tensor, " sel"]) -> Int[Tensor, " sel"]:
        lookup = {int(i): r for r, i in enumerate(self.example_index.tolist())}
        return torch.tensor([lookup[int(i)] for i in indices], device=self.slots.s.device)


@dataclass
class LensOutput:
    resid: Float[Tensor, "point primary d_model"]
    # Attention weight [a] -> [s] per head in each continuation block (NaN below the point).
    attention: Float[Tensor, "point primary block head"] | None = None
    # True when the lens's input is the same for every example (e.g. SimLens with [a] dropped:
    # the start token's state is a per-layer constant): `resid` then has one row per point,
    # shape (point, 1, d_model), computed and read out once and shared by the batch.
    shared: bool = False
    # The runner's readout of a shared output (its logits, log-normaliser, top-k), kept with it:
    # a lens that hands back this same object for a later batch (a memoized input) is not read
    # out again (`evaluate.read_out`).
    readout: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class RunContext:
    """Run-wide state a lens may need once: the model, readout points, and the examples.

    `shared(key, make)` keeps run-wide objects that several lenses share (the continuation's
    CUDA graphs, the data-set slot means), made on first use: the context itself knows no lens.
    """

    model: object
    points: list[ReadoutPoint]
    examples: dict[int, object]  # data-set index -> EncodedExample
    pad_id: int
    batch_size: int = 8
    mean_examples: int = 256
    cuda_graphs: bool = False  # replay continuations from CUDA graphs (one CUDA device only)
    fuse_continuations: bool = True  # SimLens and its [a]-keeping ablations share block calls (`SimLens._fused`)
    # start token -> its cached keys and values (`continuation.StartKV`): a function of the model
    # alone, so a caller that keeps the model unchanged may hand the same dict to several
    # contexts (the live probe does); computed on first use otherwise.
    start_states: dict = field(default_factory=dict, repr=False)
    _shared: dict = field(default_factory=dict, repr=False)

    def shared(self, key: str, make: Callable[[], object]):
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def slot_means(self) -> tuple[Float[Tensor, "point d_model"], Float[Tensor, "point d_model"]]:
        """Data-set means of `[s]` and `[a]` at every point, over the first `mean_examples` examples."""
        return self.shared("slot_means", self._slot_means)

    def _slot_means(self):
        chosen = [self.examples[i] for i in sorted(self.examples)[: self.mean_examples]]
        s_sum = a_sum = None
        device = self.model.cfg.device
        for start in range(0, len(chosen), self.batch_size):
            chunk = chosen[start : start + self.batch_size]
            tokens, lengths = pad_right([e.tokens for e in chunk], self.pad_id, device)
            slots = collect_slots(self.model, tokens, lengths, self.points)
            s_part, a_part = slots.s.double().sum(1), slots.a.double().sum(1)
            s_sum = s_part if s_sum is None else s_sum + s_part
            a_sum = a_part if a_sum is None else a_sum + a_part
        dtype = self.model.cfg.dtype
        return (s_sum / len(chosen)).to(dtype), (a_sum / len(chosen)).to(dtype)


@dataclass
class LensOptions:
    """The run options a lens may be built from (`Lens.build`)."""

    positions: str = "consecutive"  # SimLens continuation positions
    linear: list[str] = field(default_factory=list)  # fitted-lens folders (`--linear`)


class Lens(ABC):
    """Maps slot residuals to final-layer residuals at every readout point."""

    kind: ClassVar[str] = ""  # the `--lenses` name; registered lenses only
    cost_method: ClassVar[str] = "logit"  # charged as a logit readout ("logit") or a continuation ("simlens")
    linear_maps: ClassVar[int] = 0  # affine maps applied per readout below the final layer
    name: str

    @classmethod
    def build(cls, options: LensOptions) -> list["Lens"]:
        """The lenses of this kind for a run; by default one, built without arguments."""
        return [cls()]

    def prepare(self, ctx: RunContext) -> None:
        """Run-wide set-up (token residuals, data-set means); called once before batches."""

    def extra_positions(self) -> tuple[int, ...]:
        """Prompt positions, besides `[s]` and `[a]`, whose residuals this lens reads."""
        return ()

    def donors(self, example_indices: list[int]) -> list[int]:
        """Data-set indices of other examples whose residuals this lens reads."""
        return []

    def donor_column(self, example_indices: list[int]) -> list[int]:
        """The stored `donor_index` of each example's rows (-1: no donor)."""
        return [-1] * len(example_indices)

    def check_model(self, model, model_info=None) -> None:
        """Refuse a model this lens cannot read (e.g. one it was not fitted for)."""

    def check_site(self, site: str) -> None:
        """Refuse a readout site this lens cannot read (checked before the model loads)."""

    @abstractmethod
    def final_residuals(self, batch: LensBatch) -> LensOutput:
        """One final-layer residual per (readout point, primary example)."""


# --- the registry -------------------------------------------------------------------------------

LENSES: dict[str, type[Lens]] = {}


def register(cls: type[Lens]) -> type[Lens]:
    """Class decorator: make a lens available to `--lenses` under its `kind`."""
    if not cls.kind:
        raise TypeError(f"{cls.__name__} needs a `kind` to be registered")
    LENSES[cls.kind] = cls
    return cls


def lens_class(name: str) -> type[Lens]:
    """The registered class of a stored lens name (`simlens[drop-s]` -> SimLens)."""
    kind = name.split("[", 1)[0]
    if kind not in LENSES:
        raise LensbenchError(f"unknown lens '{name}' (registered: {', '.join(LENSES)})")
    return LENSES[kind]


def lens_cost(name: str) -> tuple[str, int]:
    """How a stored lens is charged: (method, maps per readout below the final layer)."""
    cls = lens_class(name)
    return cls.cost_method, cls.linear_maps
