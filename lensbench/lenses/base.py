"""The lens abstraction.

A lens maps the slot residuals of a batch (see `readout.SlotResiduals`) to one residual per
readout point and example, in the space of the final layer; every lens then shares the same
readout, `W_U · LN_final(·)`. The runner knows nothing else about lenses: a new lens is a
subclass with a `name` and `final_residuals`, registered in `lensbench.lenses.build_lenses`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensbench.readout import ReadoutPoint, SlotResiduals, collect_slots, pad_right


@dataclass
class LensBatch:
    """What the runner hands a lens: slot residuals for `n_primary` examples plus any rows
    (donors of a cross-example swap) that the lenses asked for."""

    model: object
    slots: SlotResiduals
    n_primary: int
    example_index: Int[Tensor, " row"]  # data-set index of each row

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


@dataclass
class RunContext:
    """Run-wide state a lens may need once: the model, readout points, and the examples."""

    model: object
    points: list[ReadoutPoint]
    examples: dict[int, object]  # data-set index -> EncodedExample
    pad_id: int
    batch_size: int = 8
    mean_examples: int = 256
    cuda_graphs: bool = False  # replay SimLens continuations from CUDA graphs (one CUDA device only)
    _means: tuple | None = field(default=None, repr=False)
    _graphs: object = field(default=None, repr=False)

    def continuation_graphs(self):
        """The run's shared `ContinuationGraphs`, or None when graphs are off or unusable."""
        if not self.cuda_graphs:
            return None
        if self._graphs is None:
            from lensbench.lenses.simlens import ContinuationGraphs

            self._graphs = ContinuationGraphs(self.model)
        return self._graphs if self._graphs.enabled else None

    def slot_means(self) -> tuple[Float[Tensor, "point d_model"], Float[Tensor, "point d_model"]]:
        """Data-set means of `[s]` and `[a]` at every point, over the first `mean_examples` examples."""
        if self._means is None:
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
            self._means = ((s_sum / len(chosen)).to(dtype), (a_sum / len(chosen)).to(dtype))
        return self._means


class Lens(ABC):
    """Maps slot residuals to final-layer residuals at every readout point."""

    name: str

    def prepare(self, ctx: RunContext) -> None:
        """Run-wide set-up (token residuals, data-set means); called once before batches."""

    def extra_positions(self) -> tuple[int, ...]:
        """Prompt positions, besides `[s]` and `[a]`, whose residuals this lens reads."""
        return ()

    def donors(self, example_indices: list[int]) -> list[int]:
        """Data-set indices of other examples whose residuals this lens reads."""
        return []

    @abstractmethod
    def final_residuals(self, batch: LensBatch) -> LensOutput:
        """One final-layer residual per (readout point, primary example)."""


class LogitLens(Lens):
    """The direct linear readout: `W_U · LN_final(h_l[T-1])`."""

    name = "logit"

    def final_residuals(self, batch: LensBatch) -> LensOutput:
        return LensOutput(batch.slots.a[:, : batch.n_primary])
