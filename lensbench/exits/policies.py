"""Exit policies: what gives the confidence at each readout point, and what a check costs.

A `Policy` is one record; the simulation (`simulate.exit_costs`), calibration, the executor
(`SimExitExecutor`) and the command line read everything policy-specific from it. A new policy
is one module of `lensbench/exits/` that calls `register_policy` (docs/architecture.md).

| policy | confidence | extra cost per checked layer |
| --- | --- | --- |
| `linear-simlens` | Linear SimLens's entropy (SimExit, the paper's) | one map (`map_cost` layer-tokens) |
| `logit` | the logit lens's entropy (early exit with no extra parameters, arXiv 2412.01455) | none |
| `simlens` | SimLens's entropy (a better confidence at a higher cost) | the two-token continuation, `2·(L-l)` |
| `oracle` | none: exits at the first layer from which the answer never changes again (headroom) | none |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

NO_EXIT = -np.inf  # a per-layer threshold that never exits
ANSWER_LENSES = ("simlens", "logit", "linear-simlens")


@dataclass(frozen=True)
class Policy:
    """An exit policy.

    confidence_lens: the stored lens whose entropy is the confidence (None: the oracle, which
    needs no confidence); check_cost(data, checked, exit_layer, answer_method): the
    layer-token cost of the checks at the points `checked` for an example exiting at
    `exit_layer` (`ExitData` gives depth, L and map_cost); confidence(executor, layer, s, h,
    lengths): the executor's readout input at `layer` for `[s]` states `s` and answer states
    `h` (None: the executor cannot run this policy); needs_linear: a fitted Linear SimLens is
    required.
    """

    name: str
    confidence_lens: str | None
    check_cost: Callable
    confidence: Callable | None = None
    needs_linear: bool = False
    help: str = ""


POLICIES: dict[str, Policy] = {}


def register_policy(policy: Policy) -> Policy:
    POLICIES[policy.name] = policy
    return policy


def executor_policies() -> list[str]:
    """The policies the executor (which really stops computing) can run."""
    return [name for name, p in POLICIES.items() if p.confidence is not None]


def _no_cost(data, checked, exit_layer, answer_method) -> float:
    return 0.0


def _map_per_check(data, checked, exit_layer, answer_method) -> float:
    return len(checked) * data.map_cost


def _continuation_per_check(data, checked, exit_layer, answer_method) -> float:
    # every check runs the continuation; the one at the exit is the answer's own
    L = data.n_layers
    return sum(2.0 * (L - data.depth[c]) for c in checked if not (c == exit_layer and answer_method == "simlens"))


register_policy(Policy(
    "linear-simlens", "linear-simlens", _map_per_check, needs_linear=True,
    confidence=lambda ex, layer, s, h, lengths: ex.linear_lens.transform(h, layer),
    help="SimExit: Linear SimLens's entropy"))
register_policy(Policy(
    "logit", "logit", _no_cost, confidence=lambda ex, layer, s, h, lengths: h,
    help="the logit lens's entropy"))
register_policy(Policy(
    "simlens", "simlens", _continuation_per_check,
    confidence=lambda ex, layer, s, h, lengths: ex._continue(s, h, [layer] * len(h), lengths),
    help="SimLens's entropy"))
register_policy(Policy("oracle", None, _no_cost, help="the first layer from which the answer never changes"))


def get_policy(name: str) -> Policy:
    from lensbench.errors import LensbenchError

    if name not in POLICIES:
        raise LensbenchError(f"unknown exit policy '{name}' (expected one of {', '.join(POLICIES)})")
    return POLICIES[name]
