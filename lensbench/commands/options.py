"""Option groups shared by the subcommands (one definition each), argument types, and the
copy of parsed options into a config dataclass. Choices come from the library's registries, so
a new lens, policy or dtype needs no change here."""

from __future__ import annotations

import argparse
from dataclasses import fields

from lensbench.lenses.ablation import POSITION_MODES
from lensbench.models import DEFAULT_MODEL, DEFAULT_N_CTX, DTYPES
from lensbench.readout import SITES

GRAPH_MODES = ("auto", "on", "off")
GRAPH_OPTIONS = {"auto": None, "on": True, "off": False}  # --cuda-graphs -> the executor's argument


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def batch_size(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes, got '{text}'")
    return sizes


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL}; see `lensbench models`)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    add_dtype_arg(p)
    p.add_argument("--n-ctx", type=positive_int, default=DEFAULT_N_CTX, help="context length to build (default %(default)s)")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))


def add_cuda_graphs_arg(p: argparse.ArgumentParser, what: str = "SimLens continuations") -> None:
    p.add_argument("--cuda-graphs", default="auto", choices=GRAPH_MODES,
                   help=f"replay {what} from CUDA graphs (auto: on for one CUDA device)")


def add_positions_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--positions", default="consecutive", choices=POSITION_MODES, help=help)


def add_site_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--site", default="pre", choices=SITES, help=help)


def config_from_args(config_class, args: argparse.Namespace, **overrides):
    """`config_class(...)` from the parsed options of the same names (and `overrides`)."""
    values = {f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)}
    values.update(overrides)
    return config_class(**values)
