"""The ablation mini-language of `--ablations`."""

import pytest

from lensbench.errors import LensbenchError
from lensbench.lenses import build_lenses, parse_ablations
from lensbench.lenses.ablation import Ablation, SlotSource


def test_aliases_and_labels():
    drop_s, drop_a, swap = parse_ablations("drop-s, drop-a,swap-a")
    assert drop_s == Ablation(SlotSource("drop"), SlotSource()) and drop_s.label == "drop-s"
    assert drop_a.label == "drop-a" and drop_a.slots == [("s", SlotSource())]
    assert swap.a == SlotSource("swap", 0) and swap.label == "a=swap"


def test_sources_with_arguments_and_quotes():
    token, both, pos = parse_ablations('s=token:" the",s=zero+a=layer:3,a=position:-2')
    assert token.s == SlotSource("token", " the") and token.label == 's=token:" the"'
    assert both.s == SlotSource("zero") and both.a == SlotSource("layer", 3)
    assert pos.a == SlotSource("position", -2)
    comma = parse_ablations('s=token:","')[0]
    assert comma.s == SlotSource("token", ",")


@pytest.mark.parametrize("text, message", [
    ("drop", "bad ablation"), ("x=zero", "bad ablation"), ("s=bogus", "unknown slot source"),
    ("s=drop+a=drop", "cannot drop both"), ("s=layer:x", "integer"), ("s=zero:1", "takes no argument"),
    ('s=token:" the', "unbalanced"), ("s=zero+s=mean", "twice"), ("a=example:-1", "non-negative"),
])
def test_bad_specs_are_clear_errors(text, message):
    with pytest.raises(LensbenchError, match=message):
        parse_ablations(text)


def test_lens_names():
    names = [lens.name for lens in build_lenses("logit,simlens", "drop-s,drop-a,a=swap")]
    assert names == ["logit", "simlens", "simlens[drop-s]", "simlens[drop-a]", "simlens[a=swap]"]
    with pytest.raises(LensbenchError, match="unknown lens"):
        build_lenses("logit,bogus")
    with pytest.raises(LensbenchError, match="given twice"):
        build_lenses("simlens", "s=self")
