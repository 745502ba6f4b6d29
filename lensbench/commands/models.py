"""`lensbench models`: the model specs."""

from __future__ import annotations

from lensbench.models import RANDOM_PRESETS, SHIPPED

NAME = "models"


def add_parser(sub) -> None:
    sub.add_parser(NAME, help="list the model specs")


def run(args) -> int:
    for name, m in SHIPPED.items():
        print(f"{name:<20} {m.note}\n{'':<20} install: {m.pip}")
    print(f"{'random:PRESET[:SEED]':<20} random weights, presets: {', '.join(RANDOM_PRESETS)}")
    print(f"{'PATH.gguf / FOLDER':<20} a GGUF file or a local transformers folder")
    print(f"{'official name':<20} any TransformerLens official model (downloads; needs a network)")
    return 0
