"""Lenses: every module of this package that registers a `Lens` (`@register`) is loaded here,
so adding a lens is adding its module (docs/architecture.md). `build_lenses` turns the run's
`--lenses` and `--ablations` into lens objects; `lens_cost` tells compute accounting how a
stored lens is charged.
"""

from __future__ import annotations

import importlib
import pkgutil

from lensbench.errors import LensbenchError
from lensbench.lenses.ablation import Ablation, SlotSource, parse_ablation, parse_ablations
from lensbench.lenses.base import LENSES, Lens, LensBatch, LensOptions, LensOutput, RunContext, lens_class, lens_cost, register

from lensbench.lenses.logit import LogitLens
from lensbench.lenses.simlens import SimLens
from lensbench.lenses import linear  # noqa: F401 - registers linear-simlens and tuned

# Every other module of the package that registers a lens (after the built-in ones, which keep
# their order in help texts and errors). Modules that hold no lens of their own are skipped.
_NOT_LENSES = {"base", "ablation", "fit"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _NOT_LENSES:
        importlib.import_module(f"{__name__}.{_module.name}")  # an import error is an error, never a missing lens

LENS_NAMES = tuple(LENSES)


def build_lenses(names: str | list[str], ablations: str = "", positions: str = "consecutive",
                 linear_dirs: list[str] | None = None) -> list[Lens]:
    """Lenses from CLI-style names; each ablation adds a `simlens[...]` lens."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise LensbenchError("no lenses given (expected a comma-separated list of " + ", ".join(LENSES) + ")")
    options = LensOptions(positions=positions, linear=list(linear_dirs or []))
    lenses: list[Lens] = []
    for name in names:
        if name not in LENSES:
            raise LensbenchError(f"unknown lens '{name}' (expected one of {', '.join(LENSES)})")
        lenses.extend(LENSES[name].build(options))
    lenses.extend(SimLens.ablations(ablations, positions))
    seen = set()
    for lens in lenses:
        if lens.name in seen:
            raise LensbenchError(f"lens '{lens.name}' is given twice")
        seen.add(lens.name)
    return lenses


__all__ = [
    "Ablation", "LENSES", "LENS_NAMES", "Lens", "LensBatch", "LensOptions", "LensOutput", "LogitLens", "RunContext",
    "SimLens", "SlotSource", "build_lenses", "lens_class", "lens_cost", "parse_ablation", "parse_ablations", "register",
]
