"""The logit lens: the direct linear readout `W_U · LN_final(h_l[T-1])` (nostalgebraist 2020)."""

from __future__ import annotations

from lensbench.lenses.base import Lens, LensBatch, LensOutput, register


@register
class LogitLens(Lens):
    """The direct linear readout: `W_U · LN_final(h_l[T-1])`."""

    kind = "logit"
    name = "logit"

    def final_residuals(self, batch: LensBatch) -> LensOutput:
        return LensOutput(batch.slots.a[:, : batch.n_primary])
