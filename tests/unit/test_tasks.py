"""Tasks: JSONL validation, single-token candidates, start token, splits and parts."""

from __future__ import annotations

import json

import pytest

from lensbench.errors import ExampleError, LensbenchError
from lensbench.tasks import (
    Example, TASKS, encode_examples, in_part, load_jsonl, load_task, parse_spec, start_token_id,
)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"id": "a", "prompt": "Is the sky blue?", "choices": [" yes", " no"], "gold": 0})


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"id": "b", "prompt": "x", "choices": [" a", " b"]}), "missing field(s) gold"),
        (json.dumps({"id": "b", "prompt": "x", "choices": [" a", " b"], "gold": 2}), "'gold' must be an integer index"),
        (json.dumps({"id": "b", "prompt": "x", "choices": [" a", " b"], "gold": True}), "'gold' must be an integer index"),
        (json.dumps({"id": "b", "prompt": "x", "choices": [" a"], "gold": 0}), "at least two"),
        (json.dumps({"id": "b", "prompt": "", "choices": [" a", " b"], "gold": 0}), "'prompt' must be a non-empty string"),
        (json.dumps({"id": "b", "prompt": "x", "choices": [" a", " a"], "gold": 0}), "duplicates"),
    ],
)
def test_malformed_line_is_reported_with_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "task.jsonl", [GOOD, "", line])
    with pytest.raises(LensbenchError) as info:
        load_jsonl(path)
    assert f"{path}:3" in str(info.value)
    assert message in str(info.value)


def test_duplicate_ids_and_missing_file(tmp_path):
    with pytest.raises(LensbenchError, match="duplicate example id 'a'"):
        load_jsonl(write_lines(tmp_path / "dup.jsonl", [GOOD, GOOD]))
    with pytest.raises(LensbenchError, match="not found"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_multi_token_candidate_stops_before_compute(tokenizer):
    examples = [
        Example("ok", "The capital of France is", [" Paris", " Rome"], 0),
        Example("bad", "The capital of France is", [" Paris", " Ouagadougou-sur-mer"], 0),
    ]
    start = start_token_id(tokenizer)
    with pytest.raises(ExampleError) as info:
        encode_examples(examples, tokenizer, start, 4096)
    assert "'bad'" in str(info.value) and "Ouagadougou" in str(info.value)
    encoded, skipped = encode_examples(examples, tokenizer, start, 4096, skip_invalid=True)
    assert [e.id for e in encoded] == ["ok"]
    assert skipped[0]["id"] == "bad" and "not one" in skipped[0]["reason"]


def test_start_token_prepended_once_and_answer_position(tokenizer):
    start = start_token_id(tokenizer)
    assert start == tokenizer.bos_token_id
    plain = Example("p", "The capital of France is", [" Paris", " Rome"], 0)
    already = Example("q", tokenizer.decode([start]) + "The capital of France is", [" Paris", " Rome"], 0)
    (a, b), _ = encode_examples([plain, already], tokenizer, start, 4096)
    assert a.tokens[0] == start and a.tokens[1] != start
    assert a.tokens == b.tokens
    assert a.answer_pos == len(a.tokens) - 1
    assert tokenizer.decode([a.tokens[-1]]) == " is"
    assert a.candidate_ids == [tokenizer.encode(" Paris", add_special_tokens=False)[0],
                               tokenizer.encode(" Rome", add_special_tokens=False)[0]]


def test_start_token_option(tokenizer):
    eos = start_token_id(tokenizer, tokenizer.eos_token)
    assert eos == tokenizer.eos_token_id
    with pytest.raises(LensbenchError, match="exactly one"):
        start_token_id(tokenizer, "two words")


def test_too_long_prompt_is_an_example_error(tokenizer):
    ex = Example("long", "word " * 50, [" a", " b"], 0)
    with pytest.raises(ExampleError, match="longer than the model's context"):
        encode_examples([ex], tokenizer, start_token_id(tokenizer), 20)


def test_spec_parsing():
    assert parse_spec("arc-easy") == ("arc-easy", None, None)
    assert parse_spec("arc-easy:test@calib") == ("arc-easy", "test", "calib")
    assert parse_spec("data/my.jsonl@test") == ("data/my.jsonl", None, "test")


def test_unknown_task_and_split():
    with pytest.raises(LensbenchError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(LensbenchError, match="has no split 'test'"):
        load_task("boolq:test")


def test_parts_are_disjoint_and_cover_the_task():
    every = load_task("capitals")
    calib, test = load_task("capitals@calib"), load_task("capitals@test")
    assert {e.id for e in calib} & {e.id for e in test} == set()
    assert sorted(e.id for e in calib + test) == sorted(e.id for e in every)
    assert calib and test
    assert all(in_part(e.id, "calib") for e in calib)


@pytest.mark.parametrize("name, split, count, n_choices", [
    ("arc-easy", "validation", 570, 4), ("arc-easy", "test", 2376, 4), ("boolq", "validation", 3270, 2),
    ("arc-challenge", "test", 1172, 4),
])
def test_olmo_tasks_load_one_example_per_document(name, split, count, n_choices):
    examples = load_task(f"{name}:{split}")
    assert len(examples) == count
    assert len({e.id for e in examples}) == count
    assert all(0 <= e.gold < len(e.choices) for e in examples)
    assert examples[0].prompt.rstrip().endswith("Answer:")
    assert examples[0].choices[:2] == [" A", " B"] and max(len(e.choices) for e in examples) >= n_choices


def test_every_registered_task_loads():
    for name, info in TASKS.items():
        if name == "mmlu":
            continue  # its own test: 57 subjects
        examples = load_task(name)
        assert examples, name


def test_mmlu_prompts():
    examples = load_task("mmlu")
    assert len({e.metadata["subject"] for e in examples}) == 57
    first = examples[0]
    assert first.prompt.count("Question:") == 6  # five dev shots and the question
    assert first.prompt.endswith("Answer:") and first.choices == [" A", " B", " C", " D"]
