"""`lensbench tasks`: the registered tasks."""

from __future__ import annotations

from lensbench.tasks import describe_tasks

NAME = "tasks"


def add_parser(sub) -> None:
    sub.add_parser(NAME, help="list the registered tasks")


def run(args) -> int:
    print(describe_tasks())
    print("\nAppend :SPLIT for another split, @calib / @test for a deterministic half. A JSONL file path also works.")
    print("In-context learning tasks (lensbench icl): lensbench icl --list")
    return 0
