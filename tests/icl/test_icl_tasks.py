"""ICL tasks: the built-ins, user JSONL, one-line errors, and prompts with marked label positions."""

from __future__ import annotations

import json

import pytest

from lensbench.errors import LensbenchError
from lensbench.icl.tasks import (
    Template, build_prompts, builtin_tasks, check_task, label_token_ids, load_icl_jsonl, load_icl_task,
)
from lensbench.tasks import start_token_id


def write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_builtins_are_enough_and_single_token(tokenizer):
    tasks = {name: load_icl_task(name) for name in builtin_tasks()}
    kinds = [t.kind for t in tasks.values()]
    assert kinds.count("rule") >= 3 and kinds.count("categorization") >= 3
    for name, task in tasks.items():
        assert len(task.items) >= 80, name
        ids = label_token_ids(task, tokenizer)  # raises on a multi-token label
        assert len(ids) == len(task.labels)
        check_task(task, 8)
        if task.kind == "categorization":
            assert 2 <= len(task.labels) <= 3
            # arbitrary labels: no label word is the name of its category
            cats = {i.category for i in task.items}
            assert not set(task.labels) & cats


def test_template_parse_and_render():
    t = Template.parse("{input} -> {label}\n")
    assert (t.prefix, t.middle, t.suffix, t.space) == ("", " ->", "\n", " ")
    assert t.render([("hot", "cold")], "big") == "hot -> cold\nbig ->"
    for bad in ("{input} {label}", "{label} -> {input}\n", "{input} -> \n", "{input} -> {label}"):
        with pytest.raises(LensbenchError):
            Template.parse(bad)


def test_prompts_mark_label_positions(tokenizer):
    task = load_icl_task("animal-fruit")
    start = start_token_id(tokenizer)
    ids = label_token_ids(task, tokenizer)
    prompts = build_prompts(task, tokenizer, start, ids, n_queries=5, n_shots=6, seed=3)
    for p in prompts:
        assert p.tokens[0] == start and p.zero_tokens[0] == start
        assert [p.tokens[q] for q in p.label_positions] == [ids[j] for j in p.demo_labels]
        assert [p.baseline_tokens[q] for q in p.label_positions] == [ids[j] for j in p.baseline_labels]
        # few-shot and baseline differ only at label positions
        diff = [q for q, (a, b) in enumerate(zip(p.tokens, p.baseline_tokens)) if a != b]
        assert set(diff) <= set(p.label_positions)
        # balanced demonstrations, never the query itself
        assert sorted(p.demo_labels) == [0, 0, 0, 1, 1, 1] and p.item not in p.demos
        # the text is the template's rendering
        demos = [(task.items[d].input, task.labels[j]) for d, j in zip(p.demos, p.demo_labels)]
        assert tokenizer.decode(p.tokens[1:]) == Template.parse(task.template).render(demos, task.items[p.item].input)
        assert tokenizer.decode(p.zero_tokens[1:]) == f"{task.items[p.item].input} ->"
    again = build_prompts(task, tokenizer, start, ids, n_queries=5, n_shots=6, seed=3)
    assert [p.tokens for p in again] == [p.tokens for p in prompts]  # deterministic


def test_shuffle_baseline_is_a_derangement(tokenizer):
    task = load_icl_task("antonyms")
    ids = label_token_ids(task, tokenizer)
    for p in build_prompts(task, tokenizer, start_token_id(tokenizer), ids, 10, 5, seed=1):
        assert sorted(p.baseline_labels) == sorted(p.demo_labels)
        assert all(a != b for a, b in zip(p.baseline_labels, p.demo_labels))  # rule labels are distinct
    rand = build_prompts(task, tokenizer, start_token_id(tokenizer), ids, 10, 5, seed=1, baseline="random")
    assert any(p.baseline_labels != p.demo_labels for p in rand)


def test_user_jsonl(tmp_path, tokenizer):
    rows = [{"task": {"name": "mine", "kind": "categorization"}}]
    rows += [{"input": f"w{i}", "label": "foo" if i % 2 else "bar"} for i in range(20)]
    task = load_icl_task(str(write(tmp_path / "mine.jsonl", rows)))
    assert task.name == "mine" and task.kind == "categorization" and task.labels == ["bar", "foo"]
    check_task(task, 8)
    # the kind is inferred without a header
    plain = load_icl_task(str(write(tmp_path / "plain.jsonl", rows[1:])))
    assert plain.kind == "categorization" and plain.name == "plain"


@pytest.mark.parametrize("rows, message", [
    ([{"input": "a"}], "missing field(s) label"),
    ([{"input": "a", "label": " b"}], "'label' must be a non-empty word"),
    ([{"input": "", "label": "b"}], "'input' must be a non-empty string"),
    ([{"task": {"kind": "other"}}, {"input": "a", "label": "b"}], "task kind 'other'"),
    ([{"task": {"template": "{label}{input}"}}, {"input": "a", "label": "b"}], "must come after"),
])
def test_bad_jsonl_is_one_line(tmp_path, rows, message):
    with pytest.raises(LensbenchError) as err:
        load_icl_jsonl(write(tmp_path / "bad.jsonl", rows))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_task_and_too_few(tmp_path):
    with pytest.raises(LensbenchError, match="unknown ICL task 'nope'"):
        load_icl_task("nope")
    rows = [{"input": f"w{i}", "label": "foo"} for i in range(10)] + [{"input": "x", "label": "bar"}]
    task = load_icl_task(str(write(tmp_path / "few.jsonl", rows)), kind="categorization")
    with pytest.raises(LensbenchError, match="label 'bar' has 1 item"):
        check_task(task, 4)
    with pytest.raises(LensbenchError, match="demonstrations and a query need"):
        check_task(load_icl_task("antonyms"), 500)


def test_multi_token_label_is_an_error(tmp_path, tokenizer):
    rows = [{"input": f"w{i}", "label": "foo" if i % 2 else "Qzxvwkj"} for i in range(10)]
    task = load_icl_task(str(write(tmp_path / "multi.jsonl", rows)))
    with pytest.raises(LensbenchError, match="' Qzxvwkj' .* tokens for this tokenizer"):
        label_token_ids(task, tokenizer)


def test_builtin_labels_are_single_tokens_for_qwen():
    """Qwen2.5's tokenizer, when the shipped qwen2.5-coder-0.5b has been converted on this machine."""
    from lensbench.models import cache_root

    folders = sorted(cache_root().glob("models/m-1d9614638d18024d-*/tokenizer"))
    if not folders:
        pytest.skip("qwen2.5-coder-0.5b is not converted here (bash scripts/install-models.sh qwen05)")
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(folders[0])
    for name in builtin_tasks():
        label_token_ids(load_icl_task(name), qwen)
