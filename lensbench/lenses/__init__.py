"""Lenses: logit lens, SimLens and its ablations, Linear SimLens (see `build_lenses`)."""

from __future__ import annotations

from lensbench.errors import LensbenchError
from lensbench.lenses.base import Lens, LensBatch, LensOutput, LogitLens, RunContext
from lensbench.lenses.simlens import Ablation, SimLens, SlotSource, parse_ablation, parse_ablations

LENS_NAMES = ("logit", "simlens", "linear-simlens", "tuned")


def build_lenses(names: str | list[str], ablations: str = "", positions: str = "consecutive", linear_dirs: list[str] | None = None) -> list[Lens]:
    """Lenses from CLI-style names; each ablation adds a `simlens[...]` lens."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise LensbenchError("no lenses given (expected a comma-separated list of " + ", ".join(LENS_NAMES) + ")")
    lenses: list[Lens] = []
    for name in names:
        if name == "logit":
            lenses.append(LogitLens())
        elif name == "simlens":
            lenses.append(SimLens(Ablation(), positions))
        elif name in ("linear-simlens", "tuned"):
            from lensbench.lenses.linear import load_linear_lenses

            lenses.extend(load_linear_lenses(linear_dirs or [], kind=name))
        else:
            raise LensbenchError(f"unknown lens '{name}' (expected one of {', '.join(LENS_NAMES)})")
    for ablation in parse_ablations(ablations):
        lenses.append(SimLens(ablation, positions))
    seen = set()
    for lens in lenses:
        if lens.name in seen:
            raise LensbenchError(f"lens '{lens.name}' is given twice")
        seen.add(lens.name)
    return lenses


__all__ = [
    "Ablation", "Lens", "LensBatch", "LensOutput", "LogitLens", "RunContext", "SimLens", "SlotSource",
    "build_lenses", "parse_ablation", "parse_ablations", "LENS_NAMES",
]
