"""Fixtures of the app tests: runs folders built from the real small run (`small_run`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bigrun import copy_run


@pytest.fixture(scope="session")
def source_run(request) -> Path:
    """The real run the app tests show: `small_run` (the runner, inside this test session), or
    for quick local iterations an existing run folder named by `LENSBENCH_APP_TEST_RUN`."""
    given = os.environ.get("LENSBENCH_APP_TEST_RUN")
    if given:
        return Path(given)
    return request.getfixturevalue("small_run")


@pytest.fixture(scope="session")
def app_runs(tmp_path_factory, source_run) -> Path:
    """A runs folder: two complete real runs, one still in progress, one of an older format."""
    root = tmp_path_factory.mktemp("app-runs")
    copy_run(source_run, root / "small")
    copy_run(source_run, root / "small-b")
    running = root / "zz-running"
    running.mkdir()
    manifest = json.loads((source_run / "manifest.json").read_text())
    (running / "manifest.json").write_text(json.dumps(dict(manifest, status="running")))
    old = root / "zz-old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps(dict(manifest, format_version=0)))
    return root


RESULTS = Path(__file__).resolve().parents[2] / "results"
STORED = {  # the stored result runs the tests show: 24, 28 layers; calibration, BoolQ, 7 lenses
    "arc-easy-0.5b": RESULTS / "h200-qwen2.5-coder-0.5b" / "qwen2.5-coder-0.5b-arc-easy-test-test",
    "boolq-0.5b": RESULTS / "h200-qwen2.5-coder-0.5b" / "qwen2.5-coder-0.5b-boolq-test",
    "arc-easy-1.5b": RESULTS / "cpu-qwen2.5-coder-1.5b" / "qwen2.5-coder-1.5b-arc-easy-test-test",
}


@pytest.fixture(scope="session")
def stored_runs(tmp_path_factory, source_run) -> Path:
    """A runs folder of stored result runs (results/) next to the small run of the embedded model."""
    root = tmp_path_factory.mktemp("stored-runs")
    for name, path in STORED.items():
        if not (path / "manifest.json").exists():
            pytest.skip(f"stored result run {path} is missing")
        copy_run(path, root / name)
    copy_run(source_run, root / "small")
    return root
