"""Compute accounting (METHOD.md, "Compute accounting"): the cost of a readout, per example.

Costs are per example, in *layer-token units* (one block applied to one position) by default:

| method | cost at readout point `l` of a prompt of `T` tokens, `L` blocks |
| --- | --- |
| `full` | `T·L` |
| `logit` | `T·l` (the unembedding is not a block: 0 layer-tokens; counted by `flop_cost`) |
| `simlens` | `T·l + 2·(L-l)` (the two-token post-forward is always counted, also at `l = L`, where it is 0) |
| `simexit` | `T·l + 2·(L-l) + linear_maps·map_cost` |

A Linear SimLens map is a `d_model × d_model` product on one position; in layer-token units
it costs `map_cost`, the ratio of its multiply-adds to those of one block at one position
(`ModelDims.map_cost`, recorded in each fitted lens's config). Without the model's shape the
default is `DEFAULT_MAP_COST = 1/12`: a standard block's `12·d²` (4d² attention projections,
8d² MLP) against the map's `d²`.

`flop_cost` counts FLOPs instead (2 per multiply-add): the blocks' projections and MLP, the
attention's quadratic term over the keys each position sees, the maps, and the readouts.

Iso-Compute accuracy over stored runs is in `lensbench.compute`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lensbench.errors import LensbenchError

METHODS = ("full", "logit", "simlens", "simexit")
COST_UNITS = ("layer-token", "flop")
DEFAULT_MAP_COST = 1.0 / 12.0


def layer_token_cost(method: str, n_tokens: int, n_layers: int, layer: float, linear_maps: int = 0,
                     map_cost: float = DEFAULT_MAP_COST) -> float:
    """Cost of one example in layer-token units.

    method: full, logit, simlens or simexit; n_tokens: the prompt length T (with `[s]`);
    n_layers: L; layer: the readout point (a float for sub-layer depths, e.g. 3.5 for `mid`);
    linear_maps: Linear SimLens maps evaluated (simexit); map_cost: one map in layer-tokens.
    """
    if method not in METHODS:
        raise LensbenchError(f"unknown method '{method}' (expected one of {', '.join(METHODS)})")
    if not 0 <= layer <= n_layers:
        raise LensbenchError(f"readout layer {layer} is outside 0..{n_layers}")
    if method == "full":
        return float(n_tokens * n_layers)
    cost = float(n_tokens * layer)
    if method in ("simlens", "simexit"):
        cost += 2.0 * (n_layers - layer)
    if method == "simexit":
        cost += linear_maps * map_cost
    return cost


@dataclass(frozen=True)
class ModelDims:
    """The shape numbers that FLOP counts need."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    gated_mlp: bool
    d_vocab: int
    attn_only: bool = False

    @classmethod
    def from_cfg(cls, cfg) -> "ModelDims":
        """From a `HookedTransformerConfig`."""
        return cls(
            n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
            n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads, d_head=cfg.d_head,
            d_mlp=cfg.d_mlp or 0, gated_mlp=bool(cfg.gated_mlp), d_vocab=cfg.d_vocab_out,
            attn_only=bool(cfg.attn_only),
        )

    @classmethod
    def from_dict(cls, data: dict) -> "ModelDims":
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    def position_flops(self) -> float:
        """FLOPs of one block on one position, without the attention's quadratic term."""
        attn = 2 * self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads)  # Q, O; K, V
        mlp = 0 if self.attn_only else (3 if self.gated_mlp else 2) * 2 * self.d_model * self.d_mlp
        return float(attn + mlp)

    def block_flops(self, n_positions: int) -> float:
        """FLOPs of one block over a causal sequence of `n_positions` (position t sees t+1 keys)."""
        keys = n_positions * (n_positions + 1) / 2
        return n_positions * self.position_flops() + 4.0 * self.n_heads * self.d_head * keys

    def map_flops(self) -> float:
        return 2.0 * self.d_model * self.d_model + self.d_model

    @property
    def map_cost(self) -> float:
        """One Linear SimLens map in layer-token units."""
        return self.map_flops() / self.position_flops()

    def readout_flops(self, n_outputs: int | None = None) -> float:
        """`W_U · LN_final(h)` at one position, over `n_outputs` logits (default: the vocabulary)."""
        return 2.0 * self.d_model * (self.d_vocab if n_outputs is None else n_outputs)


def flop_cost(method: str, n_tokens: int, dims: ModelDims, layer: float, linear_maps: int = 0,
              readout: str = "vocab", n_candidates: int = 4) -> float:
    """Cost of one example in FLOPs (2 per multiply-add), with attention's quadratic term.

    method, n_tokens, layer, linear_maps as in `layer_token_cost`; dims: the model's shape;
    readout: the answer's unembedding over the whole vocabulary ("vocab") or the candidates
    only ("candidates"); every Linear SimLens map is followed by a confidence readout over the
    `n_candidates` candidates. A fractional layer prorates the prompt's blocks.
    """
    if method not in METHODS:
        raise LensbenchError(f"unknown method '{method}' (expected one of {', '.join(METHODS)})")
    if readout not in ("vocab", "candidates"):
        raise LensbenchError(f"unknown readout '{readout}' (expected vocab or candidates)")
    n_layers = dims.n_layers
    if not 0 <= layer <= n_layers:
        raise LensbenchError(f"readout layer {layer} is outside 0..{n_layers}")
    answer = dims.readout_flops(None if readout == "vocab" else n_candidates)
    if method == "full":
        return n_layers * dims.block_flops(n_tokens) + answer
    cost = layer * dims.block_flops(n_tokens) + answer
    if method in ("simlens", "simexit"):
        cost += (n_layers - layer) * dims.block_flops(2)
    if method == "simexit":
        cost += linear_maps * (dims.map_flops() + dims.readout_flops(n_candidates))
    return float(cost)
