"""docs/architecture.md's extension examples, taken from the doc itself: a lens is two files
(its module and its test) and an exit policy one file plus its test. Each file is dropped into
the checkout, then the command line, the report and the app must pick the new lens or policy
up with nothing else changed; the files are removed afterwards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
MODEL = "random:tiny-rotary:1"


def doc_files(section: str) -> dict[str, str]:
    """{path: code} of the python blocks of `section` whose first line names their path."""
    text = DOC.read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"```python\n(.*?)```", body, re.S):
        first, _, rest = block.partition("\n")
        assert first.startswith("# "), f"a block of '{section}' does not name its file"
        files[first[2:].strip()] = rest
    return files


@pytest.fixture
def dropped(request):
    """Write a section's files into the checkout; remove them (and their bytecode) after."""
    written: list[Path] = []

    def drop(section: str) -> dict[str, str]:
        files = doc_files(section)
        for rel, code in files.items():
            path = ROOT / rel
            assert not path.exists(), f"{rel} already exists"
            path.write_text(code)
            written.append(path)
        return files

    yield drop
    for path in written:
        path.unlink(missing_ok=True)
        for cached in path.parent.glob(f"__pycache__/{path.stem}.*"):
            cached.unlink()


def lensbench(*argv, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lensbench", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"lensbench {' '.join(argv)}: {proc.stderr[-2000:]}"
    return proc


def run_tests(path: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / path)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_a_lens_is_two_files(dropped, tmp_path, monkeypatch):
    files = dropped("Adding a lens: two files")
    assert sorted(files) == ["lensbench/lenses/mean_s.py", "tests/unit/test_mean_s.py"]
    run_tests("tests/unit/test_mean_s.py")

    lensbench("eval", "--model", MODEL, "--task", "capitals", "--limit", "6", "--lenses", "logit,simlens,mean-s",
              "--out", "runs/r", "--quiet", cwd=tmp_path)
    import pyarrow.parquet as pq

    lenses = set(pq.read_table(tmp_path / "runs/r/predictions.parquet", columns=["lens"])["lens"].to_pylist())
    assert lenses == {"logit", "simlens", "mean-s"}
    printed = lensbench("report", "runs/r", cwd=tmp_path).stdout
    assert "mean-s" in printed
    import json

    report = json.loads((tmp_path / "runs/r/report.json").read_text())
    assert "mean-s" in report["iso_compute"]["curves"], "compute accounting does not charge the new lens"

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "app"))
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.session_state["run"] = str(tmp_path / "runs" / "r")
    at.run()
    at.switch_page("app_pages/runs.py").run()
    assert not at.exception, [e.value for e in at.exception]
    specs = " ".join(el.proto.spec for el in at.get("plotly_chart"))
    assert "mean-s" in specs, "the app's Runs page does not draw the new lens"


def test_an_exit_policy_is_one_file(dropped, tmp_path):
    files = dropped("Adding an exit policy: one file")
    assert sorted(files) == ["lensbench/exits/tuned_entropy.py", "tests/unit/test_tuned_entropy.py"]
    run_tests("tests/unit/test_tuned_entropy.py")

    lensbench("fit-linear", "--model", MODEL, "--task", "capitals", "--split", "calib", "--target", "final",
              "--steps", "2", "--out", "tuned", "--quiet", cwd=tmp_path)
    for part in ("calib", "test"):
        lensbench("eval", "--model", MODEL, "--task", f"capitals@{part}", "--lenses", "logit,simlens,tuned",
                  "--linear", "tuned", "--out", part, "--quiet", cwd=tmp_path)
    printed = lensbench("calibrate", "--calib", "calib", "--test", "test", "--policy", "tuned", "--target",
                        "best-accuracy", cwd=tmp_path).stdout
    assert printed.startswith("tuned "), printed
    printed = lensbench("report", "test", cwd=tmp_path).stdout
    assert re.search(r"^tuned\s", printed, re.M), "the report has no operating points for the new policy"
