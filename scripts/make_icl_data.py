"""Write the built-in ICL tasks (lensbench/data/icl/*.jsonl) from the word lists below.

Authored for lensbench. Every label must be one token (with its leading space) for the
embedded tokenizer and for Qwen2.5's; the script drops items whose label is not and says so.

    python scripts/make_icl_data.py [--check-only] [--tokenizer PATH ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "lensbench" / "data" / "icl"

ANTONYM_PAIRS = """hot cold|big small|fast slow|happy sad|high low|rich poor|strong weak|good bad|early late|easy difficult
full empty|wet dry|thick thin|loud quiet|clean dirty|up down|left right|true false|win lose|push pull|buy sell
give take|top bottom|day night|black white|love hate|yes no|first last|front back|inside outside|heavy light
young old|wide narrow|near far|alive dead|cheap expensive|deep shallow|above below|before after|always never
more less|male female|north south|east west|on off|over under|sweet sour|accept reject|friend enemy
question answer|begin end|enter exit|increase decrease|major minor|maximum minimum|positive negative|public private
remember forget|smooth rough|tall short|upper lower|war peace|winner loser|success failure|open closed|win lose
start stop|rise fall|soft hard|sharp dull|brave afraid|arrive leave|add remove|import export|input output""".replace("\n", "|")

PLURALS = """cat cats|dog dogs|car cars|book books|tree trees|house houses|bird birds|apple apples|child children|man men
woman women|foot feet|tooth teeth|box boxes|city cities|baby babies|leaf leaves|knife knives|wolf wolves|life lives
story stories|party parties|country countries|church churches|bus buses|class classes|glass glasses|dish dishes
watch watches|hero heroes|potato potatoes|person people|mouse mice|goose geese|day days|key keys|boy boys|toy toys
girl girls|table tables|chair chairs|door doors|window windows|friend friends|student students|teacher teachers
river rivers|mountain mountains|flower flowers|animal animals|game games|song songs|word words|name names|hand hands
eye eyes|ear ears|horse horses|cow cows|egg eggs|bag bags|bed beds|cup cups|pen pens|ship ships|train trains
road roads|street streets|star stars|planet planets|color colors|number numbers|letter letters|image images
file files|user users|event events|item items|page pages|line lines|group groups|team teams|model models
village villages|farm farms|market markets|shop shops|job jobs|idea ideas|problem problems|question questions
answer answers|plant plants|cell cells|bone bones|muscle muscles|skill skills|tool tools|rule rules""".replace("\n", "|")

PAST_TENSE = """go went|run ran|eat ate|see saw|take took|make made|come came|give gave|walk walked|play played
sing sang|swim swam|drink drank|write wrote|drive drove|ride rode|speak spoke|break broke|choose chose|fly flew
grow grew|know knew|throw threw|draw drew|begin began|sit sat|stand stood|understand understood|find found|buy bought
bring brought|think thought|teach taught|catch caught|fight fought|sell sold|tell told|feel felt|keep kept|sleep slept
leave left|meet met|send sent|spend spent|build built|lose lost|pay paid|say said|hear heard|hold held|win won
get got|forget forgot|fall fell|wear wore|steal stole|freeze froze|wake woke|hide hid|bite bit|shake shook
jump jumped|talk talked|look looked|work worked|help helped|call called|ask asked|move moved|live lived|love loved
open opened|close closed|start started|finish finished|watch watched|wait waited|want wanted|need needed
learn learned|turn turned|stay stayed|try tried|cry cried|carry carried|stop stopped|plan planned|drop dropped
visit visited|change changed|answer answered|follow followed|happen happened|kill killed|create created|decide decided""".replace("\n", "|")

FIRST_LETTER_WORDS = """apple anchor arrow basket bridge butter candle castle cotton desert dragon dinner engine eagle elbow
forest feather finger garden guitar ginger hammer harbor helmet island insect ivory jacket jungle jelly kettle
kitchen kingdom ladder lemon lizard marble meadow mirror needle noodle nickel orange oyster ocean pencil pepper
pillow quarter quilt queen rabbit ribbon rocket saddle silver spider tiger tunnel turtle umbrella uncle velvet
valley violin wagon walnut window yellow yogurt zebra zipper blanket circle dolphin eleven fountain goblet
honey iron jasmine kitten lantern monkey napkin orchid parrot quiver raven salmon thunder useful vessel winter
yard zone""".split()

CATEGORIES = {
    "animal-fruit": {
        "description": "animals -> foo, fruits -> bar (2 categories, arbitrary labels)",
        "labels": {"foo": "animal", "bar": "fruit"},
        "items": {
            "animal": """dog cat horse cow sheep goat pig lion tiger bear wolf fox rabbit deer mouse rat elephant
giraffe zebra monkey camel donkey kangaroo koala panda otter beaver squirrel hamster leopard cheetah moose
buffalo hippo rhino gorilla raccoon badger hedgehog ferret weasel bison llama""".split(),
            "fruit": """apple banana cherry grape lemon lime mango orange peach pear plum melon kiwi papaya apricot
fig date guava lychee coconut pineapple strawberry blueberry raspberry blackberry cranberry watermelon
grapefruit tangerine nectarine pomegranate persimmon quince mulberry gooseberry currant kumquat clementine
avocado olive passionfruit""".split(),
        },
    },
    "sport-instrument-body": {
        "description": "sports -> lamp, musical instruments -> door, body parts -> cloud (3 categories, arbitrary labels)",
        "labels": {"lamp": "sport", "door": "instrument", "cloud": "body part"},
        "items": {
            "sport": """soccer tennis golf hockey rugby cricket baseball basketball volleyball boxing wrestling
swimming cycling rowing skiing surfing fencing archery badminton bowling karate judo sailing climbing
running diving skating polo handball lacrosse""".split(),
            "instrument": """piano guitar violin cello flute trumpet drum harp clarinet saxophone trombone tuba
banjo ukulele harmonica accordion oboe bassoon mandolin organ xylophone tambourine bagpipes sitar lute
cymbal viola piccolo bugle harpsichord""".split(),
            "body part": """hand foot knee elbow shoulder ankle wrist finger thumb toe neck chin nose ear eye
mouth lip tongue tooth cheek forehead heart liver lung kidney stomach spine hip thigh skull""".split(),
        },
    },
    "sentiment": {
        "description": "positive adjectives -> alpha, negative adjectives -> beta (2 categories, arbitrary labels)",
        "labels": {"alpha": "positive", "beta": "negative"},
        "items": {
            "positive": """wonderful excellent great happy joyful delightful pleasant lovely brilliant amazing
fantastic marvelous superb cheerful kind generous friendly gentle graceful charming beautiful elegant
splendid glorious radiant peaceful hopeful grateful calm proud brave honest clever gorgeous terrific
perfect awesome fabulous nice sunny warm bright lucky smart""".split(),
            "negative": """terrible awful horrible sad miserable dreadful unpleasant nasty ugly cruel rude
hostile bitter gloomy angry hateful wicked vile disgusting painful tragic lousy dismal grim harsh selfish
greedy lazy boring stupid dull anxious lonely jealous scary filthy rotten toxic evil mean weak sick broken""".split(),
        },
    },
    "color-country-job": {
        "description": "colors -> sun, countries -> moon, professions -> star (3 categories, arbitrary labels)",
        "labels": {"sun": "color", "moon": "country", "star": "profession"},
        "items": {
            "color": """red blue green yellow orange purple pink brown black white gray violet indigo crimson
scarlet maroon navy teal turquoise beige ivory lavender magenta cyan olive amber gold silver bronze
charcoal""".split(),
            "country": """France Germany Italy Spain Portugal Japan China India Brazil Mexico Canada Egypt Kenya
Nigeria Peru Chile Norway Sweden Finland Poland Greece Turkey Russia Australia Argentina Vietnam Thailand
Ireland Austria Belgium""".split(),
            "profession": """doctor teacher lawyer farmer nurse pilot chef baker plumber carpenter dentist
engineer architect painter writer singer actor dancer soldier sailor judge banker barber butcher tailor
surgeon pharmacist journalist librarian mechanic""".split(),
        },
    },
}

RULE_TASKS = {
    "antonyms": ("word -> its antonym (both directions of each pair)", None),
    "plurals": ("singular noun -> plural", None),
    "past-tense": ("verb -> simple past", None),
    "first-letter": ("word -> its first letter, upper case", None),
}

TEMPLATE = "{input} -> {label}\n"


def pairs(text: str) -> list[tuple[str, str]]:
    out = []
    for chunk in text.split("|"):
        chunk = chunk.strip()
        if chunk:
            a, b = chunk.split()
            out.append((a, b))
    return out


def rule_items(name: str) -> list[tuple[str, str]]:
    if name == "antonyms":
        seen, items = set(), []
        for a, b in pairs(ANTONYM_PAIRS):
            for x, y in ((a, b), (b, a)):
                if x not in seen:
                    seen.add(x)
                    items.append((x, y))
        return items
    if name == "plurals":
        return pairs(PLURALS)
    if name == "past-tense":
        return pairs(PAST_TENSE)
    if name == "first-letter":
        return [(w, w[0].upper()) for w in dict.fromkeys(FIRST_LETTER_WORDS)]
    raise KeyError(name)


def category_items(spec: dict) -> list[tuple[str, str]]:
    by_category = {cat: label for label, cat in spec["labels"].items()}
    items = []
    for cat, words in spec["items"].items():
        for w in dict.fromkeys(words):
            items.append((w, by_category[cat], cat))
    # interleave categories so any prefix is balanced
    return items


def load_tokenizers(paths: list[str]):
    sys.path.insert(0, str(ROOT))
    from lensbench.models import embedded_tokenizer

    toks = [("smollm2-135m", embedded_tokenizer())]
    from transformers import AutoTokenizer

    for p in paths:
        toks.append((p, AutoTokenizer.from_pretrained(p)))
    return toks


def single(tok, label: str) -> bool:
    return len(tok.encode(" " + label, add_special_tokens=False)) == 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", action="append", default=[], help="another tokenizer folder to check labels with")
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args()
    toks = load_tokenizers(args.tokenizer)
    OUT.mkdir(parents=True, exist_ok=True)
    ok = True
    tasks = {}
    for name, (desc, _) in RULE_TASKS.items():
        tasks[name] = ("rule", desc, [(i, l, None) for i, l in rule_items(name)])
    for name, spec in CATEGORIES.items():
        tasks[name] = ("categorization", spec["description"], category_items(spec))
    for name, (kind, desc, items) in tasks.items():
        kept = []
        for inp, label, cat in items:
            bad = [tname for tname, tok in toks if not single(tok, label)]
            if bad:
                print(f"{name}: drop {inp!r} -> {label!r}: not one token for {', '.join(bad)}")
                continue
            kept.append((inp, label, cat))
        inputs = [k[0] for k in kept]
        assert len(set(inputs)) == len(inputs), (name, [i for i in inputs if inputs.count(i) > 1])
        n_labels = len({k[1] for k in kept})
        print(f"{name:<24} {kind:<15} {len(kept):>4} items, {n_labels} labels")
        if len(kept) < 80:
            ok = False
            print(f"  {name}: only {len(kept)} items (need >= 80)")
        if args.check_only:
            continue
        lines = [json.dumps({"task": {"name": name, "kind": kind, "description": desc, "template": TEMPLATE}})]
        for i, (inp, label, cat) in enumerate(kept):
            row = {"id": f"{name}-{i:03d}", "input": inp, "label": label}
            if cat is not None:
                row["category"] = cat
            lines.append(json.dumps(row))
        (OUT / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
