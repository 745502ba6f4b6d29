"""In-context learning tasks: items `(input, label)`, the prompt template, and the prompts an
ICL run measures (few-shot, zero-shot, uninformative demonstrations), as token ids with the
label-word positions marked.

A task is a JSONL file: an optional first line `{"task": {"name", "kind", "description",
"template"}}`, then one `{"id", "input", "label"[, "category"]}` object per line. The built-in
tasks are the files in `lensbench/data/icl/` (`lensbench icl --list`). Every label must be one
token (with the space the template puts before it) for the model's tokenizer.

The template (default `"{input} -> {label}\\n"`) splits into `prefix{input}middle{label}suffix`.
A demonstration is `prefix input middle` + the label token + `suffix`; the query is
`prefix input middle`, so the prompt's last token is the separator (the end of `middle`) and the
model's next token is the answer. A space at the end of `middle` belongs to the label token
(" Paris" is one token, "Paris" after a space would not be what the model predicts).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from lensbench.errors import LensbenchError
from lensbench.tasks import jsonl_objects, refuse_duplicate_ids

KINDS = ("rule", "categorization")
BASELINES = ("shuffle", "random")
DEFAULT_TEMPLATE = "{input} -> {label}\n"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "data" / "icl"


@dataclass(frozen=True)
class Template:
    """`prefix{input}middle{label}suffix`; `space` is the text the label token starts with."""

    text: str
    prefix: str
    middle: str
    suffix: str
    space: str

    @classmethod
    def parse(cls, text: str) -> "Template":
        if text.count("{input}") != 1 or text.count("{label}") != 1:
            raise LensbenchError(f"ICL template {text!r} must contain {{input}} and {{label}} once each")
        prefix, rest = text.split("{input}")
        if "{label}" not in rest:
            raise LensbenchError(f"ICL template {text!r}: {{label}} must come after {{input}}")
        middle, suffix = rest.split("{label}")
        if not middle.strip():
            raise LensbenchError(f"ICL template {text!r} needs a separator between {{input}} and {{label}}")
        if not suffix:
            raise LensbenchError(f"ICL template {text!r} needs text after {{label}} to separate demonstrations")
        space = ""
        if middle.endswith(" "):
            middle, space = middle.rstrip(" "), " "
        return cls(text, prefix, middle, suffix, space)

    def label_text(self, label: str) -> str:
        return self.space + label

    def render(self, demos: list[tuple[str, str]], query: str) -> str:
        parts = [f"{self.prefix}{i}{self.middle}{self.label_text(l)}{self.suffix}" for i, l in demos]
        return "".join(parts) + f"{self.prefix}{query}{self.middle}"


@dataclass(frozen=True)
class ICLItem:
    id: str
    input: str
    label: str
    category: str | None = None


@dataclass
class ICLTask:
    name: str
    kind: str
    description: str
    template: str
    items: list[ICLItem]
    source: str

    @property
    def labels(self) -> list[str]:
        """The distinct labels in order of first appearance: the candidates of every decision."""
        return list(dict.fromkeys(item.label for item in self.items))

    def label_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.label] = counts.get(item.label, 0) + 1
        return counts


def builtin_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.jsonl"))}


def describe_icl_tasks() -> str:
    lines = [f"{'task':<24} {'kind':<15} {'items':>5} {'labels':>6}  description"]
    for name, path in builtin_tasks().items():
        task = load_icl_jsonl(path)
        lines.append(f"{name:<24} {task.kind:<15} {len(task.items):>5} {len(task.labels):>6}  {task.description}")
    return "\n".join(lines)


def infer_kind(items: list[ICLItem]) -> str:
    """`categorization` when few labels each cover several items (at most 10 labels and at
    most a quarter as many labels as items), else `rule`."""
    n_labels = len({i.label for i in items})
    return "categorization" if n_labels <= 10 and n_labels * 4 <= len(items) else "rule"


def load_icl_jsonl(path: str | Path, name: str | None = None) -> ICLTask:
    """A task file; a malformed line is a one-line error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LensbenchError(f"ICL task file not found: {path}")
    header: dict = {}
    items: list[ICLItem] = []
    for where, obj in jsonl_objects(path):
        if "task" in obj and not items and not header:
            if not isinstance(obj["task"], dict):
                raise LensbenchError(f"{where}: 'task' must be an object")
            header = obj["task"]
            continue
        missing = [k for k in ("input", "label") if k not in obj]
        if missing:
            raise LensbenchError(f"{where}: missing field(s) {', '.join(missing)}")
        inp, label = obj["input"], obj["label"]
        if not isinstance(inp, str) or not inp.strip():
            raise LensbenchError(f"{where}: 'input' must be a non-empty string")
        if not isinstance(label, str) or not label.strip() or label != label.strip():
            raise LensbenchError(f"{where}: 'label' must be a non-empty word without surrounding spaces")
        category = obj.get("category")
        items.append(ICLItem(str(obj.get("id", f"{path.stem}-{len(items)}")), inp, label,
                             None if category is None else str(category)))
    if not items:
        raise LensbenchError(f"{path}: no items")
    refuse_duplicate_ids(path, [i.id for i in items], "item")
    kind = header.get("kind") or infer_kind(items)
    if kind not in KINDS:
        raise LensbenchError(f"{path}: task kind '{kind}' is not one of {', '.join(KINDS)}")
    template = header.get("template", DEFAULT_TEMPLATE)
    Template.parse(template)
    return ICLTask(name or header.get("name") or path.stem, kind, header.get("description", ""), template, items, str(path))


def load_icl_task(spec: str, kind: str | None = None, template: str | None = None) -> ICLTask:
    """A built-in task name or a JSONL path; `kind` / `template` override the file's."""
    builtin = builtin_tasks()
    if spec in builtin:
        task = load_icl_jsonl(builtin[spec], spec)
    elif spec.endswith(".jsonl") or Path(spec).is_file():
        task = load_icl_jsonl(spec)
    else:
        raise LensbenchError(f"unknown ICL task '{spec}': expected a JSONL file or one of {', '.join(builtin)}")
    if kind is not None:
        if kind not in KINDS:
            raise LensbenchError(f"--kind must be one of {', '.join(KINDS)} (got {kind})")
        task.kind = kind
    if template is not None:
        Template.parse(template)
        task.template = template
    return task


def check_task(task: ICLTask, n_shots: int) -> None:
    """Enough items for `n_shots` demonstrations besides the query; for categorization, enough
    per label for balanced demonstrations (`ceil(shots / labels)` besides the query)."""
    if n_shots < 1:
        raise LensbenchError(f"--shots must be at least 1 (got {n_shots})")
    labels = task.labels
    if len(labels) < 2:
        raise LensbenchError(f"ICL task '{task.name}' has {len(labels)} distinct label(s); it needs at least 2")
    if len(task.items) < n_shots + 1:
        raise LensbenchError(f"ICL task '{task.name}' has {len(task.items)} items; {n_shots} demonstrations and a query need {n_shots + 1}")
    if task.kind == "categorization":
        need = math.ceil(n_shots / len(labels)) + 1
        counts = task.label_counts()
        few = [(label, n) for label, n in counts.items() if n < need]
        if few:
            label, n = few[0]
            raise LensbenchError(f"ICL task '{task.name}': label '{label}' has {n} item(s); {n_shots} balanced demonstrations "
                                 f"over {len(labels)} labels need at least {need} per label ({len(few)} label(s) short)")


def label_token_ids(task: ICLTask, tokenizer) -> list[int]:
    """One token id per label (in `task.labels` order); a label that is not one token is an error."""
    space = Template.parse(task.template).space
    ids = []
    for label in task.labels:
        toks = tokenizer.encode(space + label, add_special_tokens=False)
        if len(toks) != 1:
            item = next(i for i in task.items if i.label == label)
            raise LensbenchError(f"ICL task '{task.name}': label {space + label!r} (item '{item.id}') is {len(toks)} tokens "
                                 f"for this tokenizer {toks}; every label must be one token")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise LensbenchError(f"ICL task '{task.name}': two labels map to the same token")
    return ids


# --- prompts ----------------------------------------------------------------------------------


@dataclass
class ICLPrompt:
    """One query's prompts as token ids (`[s]` first). The few-shot and the baseline prompt have
    the same tokens except the labels, so their positions line up."""

    index: int  # query index in the run
    item: int  # the query item (index into task.items)
    demos: list[int]  # demonstration items, in prompt order
    demo_labels: list[int]  # label index (into task.labels) shown after each demonstration
    baseline_labels: list[int]  # the labels the uninformative prompt shows instead
    gold: int  # the query's label index
    tokens: list[int]  # few-shot prompt
    baseline_tokens: list[int]  # the same demonstrations with uninformative labels
    zero_tokens: list[int]  # the query alone
    label_positions: list[int] = field(default_factory=list)

    @property
    def sep_positions(self) -> list[int]:
        return [p - 1 for p in self.label_positions]

    @property
    def length(self) -> int:
        return len(self.tokens)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _sample_demos(task: ICLTask, query: int, n_shots: int, rng: random.Random, by_label: dict[str, list[int]]) -> list[int]:
    others = [i for i in range(len(task.items)) if i != query and task.items[i].input != task.items[query].input]
    if task.kind != "categorization":
        return rng.sample(others, n_shots)
    labels = task.labels
    counts = [n_shots // len(labels)] * len(labels)
    for j in rng.sample(range(len(labels)), n_shots % len(labels)):
        counts[j] += 1
    chosen: list[int] = []
    for label, count in zip(labels, counts):
        pool = [i for i in by_label[label] if i != query and task.items[i].input != task.items[query].input]
        chosen += rng.sample(pool, count)
    rng.shuffle(chosen)
    return chosen


def _uninformative(labels: list[int], n_labels: int, mode: str, rng: random.Random) -> list[int]:
    """`shuffle`: the same labels in a random derangement of the demonstrations (no label stays
    on its own demonstration's position; equal labels may still coincide); `random`: each label
    drawn uniformly from the task's labels."""
    if mode == "random":
        return [rng.randrange(n_labels) for _ in labels]
    if len(labels) < 2:
        return list(labels)
    while True:
        perm = list(range(len(labels)))
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return [labels[p] for p in perm]


def encode_prompt(task: ICLTask, template: Template, tokenizer, start_id: int, label_ids: list[int],
                  demos: list[int], labels: list[int], query: int) -> tuple[list[int], list[int]]:
    """Token ids of demonstrations `demos` (showing `labels`) and the query; and the label positions."""
    tokens = [start_id]
    positions = []
    for j, (item, label) in enumerate(zip(demos, labels)):
        lead = template.suffix if j else ""
        tokens += _encode(tokenizer, f"{lead}{template.prefix}{task.items[item].input}{template.middle}")
        positions.append(len(tokens))
        tokens.append(label_ids[label])
    lead = template.suffix if demos else ""
    tokens += _encode(tokenizer, f"{lead}{template.prefix}{task.items[query].input}{template.middle}")
    return tokens, positions


def build_prompts(task: ICLTask, tokenizer, start_id: int, label_ids: list[int], n_queries: int, n_shots: int,
                  seed: int = 0, baseline: str = "shuffle", stream: str = "query") -> list[ICLPrompt]:
    """`n_queries` prompts: query `i` is item `perm[i % n_items]` of a seeded permutation, with
    `n_shots` demonstrations drawn (seeded by `seed`, `stream` and `i`) from the other items;
    balanced over the labels for categorization tasks."""
    if baseline not in BASELINES:
        raise LensbenchError(f"--baseline must be one of {', '.join(BASELINES)} (got {baseline})")
    template = Template.parse(task.template)
    label_index = {label: j for j, label in enumerate(task.labels)}
    by_label: dict[str, list[int]] = {}
    for i, item in enumerate(task.items):
        by_label.setdefault(item.label, []).append(i)
    order = list(range(len(task.items)))
    random.Random(f"{seed}:{stream}:order").shuffle(order)
    prompts = []
    for i in range(n_queries):
        rng = random.Random(f"{seed}:{stream}:{i}")
        query = order[i % len(order)]
        demos = _sample_demos(task, query, n_shots, rng, by_label)
        labels = [label_index[task.items[d].label] for d in demos]
        base_labels = _uninformative(labels, len(task.labels), baseline, rng)
        tokens, positions = encode_prompt(task, template, tokenizer, start_id, label_ids, demos, labels, query)
        base_tokens, base_positions = encode_prompt(task, template, tokenizer, start_id, label_ids, demos, base_labels, query)
        zero_tokens, _ = encode_prompt(task, template, tokenizer, start_id, label_ids, [], [], query)
        assert base_positions == positions and len(base_tokens) == len(tokens)
        prompts.append(ICLPrompt(i, query, demos, labels, base_labels, label_index[task.items[query].label],
                                 tokens, base_tokens, zero_tokens, positions))
    return prompts
