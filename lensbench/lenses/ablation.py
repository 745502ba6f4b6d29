"""SimLens slot ablations: where each of the `[s]` and `[a]` slots comes from (METHOD.md).

Slot sources (`SlotSource`): `self`, `drop`, `position:P`, `token:T`, `layer:K`, `example:J`,
`swap[:SEED]` (a seeded cross-example derangement), `mean`, `zero`. An ablation gives a source
to each slot; readout is at the last remaining slot. The syntax (`drop-s`, `a=swap`,
`s=token:" the"+a=zero`, ...) is parsed here; docs/lenses.md lists it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lensbench.errors import LensbenchError

POSITION_MODES = ("consecutive", "original")
SOURCE_KINDS = ("self", "drop", "position", "token", "layer", "example", "swap", "mean", "zero")


@dataclass(frozen=True)
class SlotSource:
    """Where a slot's residual comes from."""

    kind: str = "self"
    arg: object = None

    def __str__(self) -> str:
        if self.kind == "token":
            return f"token:{json.dumps(self.arg)}"
        if self.kind == "swap":
            return "swap" if self.arg == 0 else f"swap:{self.arg}"
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


SELF = SlotSource()


@dataclass(frozen=True)
class Ablation:
    """A source for each SimLens slot; `Ablation()` is plain SimLens."""

    s: SlotSource = SELF
    a: SlotSource = SELF

    def __post_init__(self):
        if self.s.kind == "drop" and self.a.kind == "drop":
            raise LensbenchError("an ablation cannot drop both [s] and [a]")

    @property
    def label(self) -> str:
        if self == Ablation(SlotSource("drop"), SELF):
            return "drop-s"
        if self == Ablation(SELF, SlotSource("drop")):
            return "drop-a"
        parts = [f"{slot}={src}" for slot, src in (("s", self.s), ("a", self.a)) if src != SELF]
        return "+".join(parts) or "none"

    @property
    def slots(self) -> list[tuple[str, SlotSource]]:
        """The slots that remain, in sequence order (`[s]` first)."""
        return [(slot, src) for slot, src in (("s", self.s), ("a", self.a)) if src.kind != "drop"]


def parse_source(text: str) -> SlotSource:
    kind, sep, arg = text.strip().partition(":")
    kind = kind.strip()
    if kind not in SOURCE_KINDS:
        raise LensbenchError(f"unknown slot source '{text}' (expected one of {', '.join(SOURCE_KINDS)})")
    if kind in ("self", "drop", "mean", "zero"):
        if sep:
            raise LensbenchError(f"slot source '{kind}' takes no argument (got '{text}')")
        return SlotSource(kind)
    if kind == "token":
        if not arg:
            raise LensbenchError('token source needs a token, e.g. s=token:" the"')
        if arg.startswith('"'):
            try:
                arg = json.loads(arg)
            except json.JSONDecodeError:
                raise LensbenchError(f"bad quoted token in '{text}'") from None
        return SlotSource("token", arg)
    if kind == "swap" and not sep:
        return SlotSource("swap", 0)
    try:
        value = int(arg)
    except ValueError:
        raise LensbenchError(f"slot source '{kind}' needs an integer argument (got '{text}')") from None
    if kind in ("layer", "example", "swap") and value < 0:
        raise LensbenchError(f"slot source '{text}' needs a non-negative integer")
    return SlotSource(kind, value)


def parse_ablation(text: str) -> Ablation:
    """`drop-s`, `drop-a`, `swap-a`, `swap-s`, or `s=SRC`, `a=SRC`, `s=SRC+a=SRC`."""
    text = text.strip()
    aliases = {"drop-s": "s=drop", "drop-a": "a=drop", "swap-a": "a=swap", "swap-s": "s=swap"}
    text = aliases.get(text, text)
    sources = {}
    for part in text.split("+"):
        slot, sep, src = part.partition("=")
        slot = slot.strip()
        if not sep or slot not in ("s", "a"):
            raise LensbenchError(
                f"bad ablation '{part}': expected drop-s, drop-a, swap-a, swap-s or s=SOURCE / a=SOURCE joined by '+'"
            )
        if slot in sources:
            raise LensbenchError(f"ablation '{text}' sets slot {slot} twice")
        sources[slot] = parse_source(src)
    return Ablation(sources.get("s", SELF), sources.get("a", SELF))


def parse_ablations(text: str) -> list[Ablation]:
    """A comma-separated list; double quotes protect commas inside a token, as in CSV."""
    fields, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            fields.append(current)
            current = ""
        else:
            current += char
    if quoted:
        raise LensbenchError(f"unbalanced double quote in ablations '{text}'")
    fields.append(current)
    return [parse_ablation(f) for f in fields if f.strip()]
