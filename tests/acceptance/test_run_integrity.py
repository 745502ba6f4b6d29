"""The run folder's integrity (docs/format.md): what `--overwrite` may remove, what identifies a
run (contents, not paths), what resume trusts (parts, outputs), checks before any compute,
interruptions, and the numbers read back from stored runs (map cost, Iso-Compute, attention).

Each test is a user's step through `lensbench eval` (in process, on a tiny random model, so it
is quick) and checks the one-line message, the exit status and the files on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lensbench import runner, store
from lensbench.commands import main
from lensbench.store import open_run

REPO = Path(__file__).resolve().parents[2]
MODEL = ["--model", "random:tiny-rotary:1"]


def cli(capsys, *args) -> tuple[int, str, str]:
    """`lensbench ARGS` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def evaluate(capsys, out, *extra, limit="4", batch="2", lenses="logit,simlens", task="capitals"):
    return cli(capsys, "eval", *MODEL, "--task", str(task), "--lenses", lenses, "--limit", limit,
               "--batch-size", batch, "--out", str(out), "--quiet", *extra)


def one_line_error(rc: int, err: str, fragment: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lensbench: error: "), err
    assert fragment in lines[0], err


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch):
    """Make loading a model an error: for checks that must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(runner, "load_model", refuse)


@pytest.fixture(scope="module")
def lens_dir(tmp_path_factory) -> Path:
    """A Linear SimLens fitted (two steps) at site `pre` for the tiny model."""
    out = tmp_path_factory.mktemp("lens") / "L"
    rc = main(["fit-linear", *MODEL, "--task", "capitals", "--split", "calib", "--steps", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def task_file(path: Path, n: int = 4, short: bool = False) -> Path:
    from lensbench.tasks import load_task

    with path.open("w") as f:
        for ex in load_task("capitals")[:n]:
            f.write(json.dumps({"id": ex.id, "prompt": ex.prompt, "choices": ex.choices, "gold": ex.gold}) + "\n")
        if short:
            f.write(json.dumps({"id": "short", "prompt": "Hi", "choices": [" a", " b"], "gold": 0}) + "\n")
    return path


# --- 1. --overwrite removes only a run's own files ---------------------------------------------------


def test_overwrite_of_the_current_directory_is_refused_and_deletes_nothing(tmp_path, capsys, monkeypatch):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("1,2")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    rc, _, err = evaluate(capsys, ".", "--overwrite")
    one_line_error(rc, err, "thesis.tex")
    assert "not a lensbench run" in err
    assert tree(tmp_path) == before


def test_empty_out_is_refused(tmp_path, capsys, monkeypatch, no_model_load):
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--overwrite"]):
        rc, _, err = evaluate(capsys, "", *extra)
        one_line_error(rc, err, "--out is empty")
    assert tree(tmp_path) == {"keep.txt": b"mine"}


def test_a_folder_that_is_not_a_run_is_refused_without_suggesting_overwrite(tmp_path, capsys, no_model_load):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8")
    rc, _, err = evaluate(capsys, out)
    one_line_error(rc, err, "is not a lensbench run")
    assert "cat.jpg" in err and "--overwrite" not in err
    rc, _, err = evaluate(capsys, out, "--overwrite")
    one_line_error(rc, err, "--overwrite only replaces a lensbench run")
    assert (out / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_overwrite_leaves_a_run_with_foreign_files_alone(tmp_path, capsys):
    out = tmp_path / "run"
    assert evaluate(capsys, out, limit="2")[0] == 0
    (out / "notes.txt").write_text("my notes")
    (out / "parts" / "keep.bin").write_bytes(b"x")
    before = tree(out)
    rc, _, err = evaluate(capsys, out, "--overwrite", limit="3")
    one_line_error(rc, err, "notes.txt")
    assert "parts/keep.bin" in err
    assert tree(out) == before


def test_overwrite_replaces_a_run_of_lensbench_files_only(tmp_path, capsys):
    out = tmp_path / "run"
    assert evaluate(capsys, out, limit="2")[0] == 0
    (out / ".predictions.parquet.12345.tmp").write_bytes(b"left by a crash")
    rc, _, err = evaluate(capsys, out, "--overwrite", limit="3")
    assert rc == 0, err
    assert open_run(out).manifest["n_examples"] == 3
    assert not (out / ".predictions.parquet.12345.tmp").exists()


# --- 2. what identifies a run: options and the inputs' contents ----------------------------------------


def test_a_different_run_says_what_differs(tmp_path, capsys):
    out = tmp_path / "run"
    assert evaluate(capsys, out, limit="2")[0] == 0
    rc, _, err = evaluate(capsys, out, "--topk", "3", limit="3")
    one_line_error(rc, err, "holds a different run")
    assert "limit: 2 → 3" in err and "topk: 5 → 3" in err


def test_an_edited_task_file_is_refused_and_a_copy_is_the_same_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = task_file(tmp_path / "t.jsonl")
    out = tmp_path / "run"
    assert evaluate(capsys, out, task="t.jsonl")[0] == 0
    # the same file by its absolute path, and a copy elsewhere, are the same run
    rc, _, err = evaluate(capsys, out, task=str(task.resolve()))
    assert rc == 0 and "already complete" in err, err
    (tmp_path / "copy").mkdir()
    shutil.copy(task, tmp_path / "copy" / "t.jsonl")
    rc, _, err = evaluate(capsys, out, task=str(tmp_path / "copy" / "t.jsonl"))
    assert rc == 0 and "already complete" in err, err
    # an edit (one gold label) is not
    old_sha = open_run(out).manifest["inputs"]["task"]["sha256"]
    lines = task.read_text().splitlines()
    first = json.loads(lines[0])
    first["gold"] = (first["gold"] + 1) % len(first["choices"])
    task.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    before = tree(out)
    rc, _, err = evaluate(capsys, out, task="t.jsonl")
    one_line_error(rc, err, "the task file t.jsonl changed since this run started")
    assert f"sha256 {old_sha[:12]}… → " in err and "--overwrite" in err
    assert tree(out) == before


def test_a_refitted_linear_lens_is_refused(tmp_path, capsys, lens_dir):
    from safetensors.torch import load_file, save_file

    lens = tmp_path / "L"
    shutil.copytree(lens_dir, lens)
    out = tmp_path / "run"
    args = ("--linear", str(lens))
    assert evaluate(capsys, out, *args, lenses="logit,linear-simlens")[0] == 0
    tensors = load_file(str(lens / "lens.safetensors"))
    save_file({"weight": tensors["weight"] * 1.5, "bias": tensors["bias"]}, str(lens / "lens.safetensors"))
    rc, _, err = evaluate(capsys, out, *args, lenses="logit,linear-simlens")
    one_line_error(rc, err, f"the --linear lens {lens.resolve()} changed since this run started (sha256 ")


def test_an_unreadable_manifest_is_not_called_a_different_run(tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text('{"format_version": 1, "fingerp')
    (out / "predictions.parquet").write_bytes(b"?")
    before = tree(out)
    for extra in ([], ["--overwrite"]):
        rc, _, err = evaluate(capsys, out, *extra)
        one_line_error(rc, err, "manifest.json is unreadable")
        assert "different run" not in err
    assert tree(out) == before


# --- 3. and 4. resume trusts only sound parts and outputs --------------------------------------------


def test_corrupt_parts_are_computed_again(tmp_path, capsys):
    out = tmp_path / "run"
    assert evaluate(capsys, out, limit="6")[0] == 0
    want = open_run(out).predictions()
    (out / "predictions.parquet").unlink()
    part = out / "parts" / "part-000001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # truncated
    (out / "parts" / "part-000002.attn.safetensors").write_bytes(b"")  # empty
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, status="interrupted")))
    rc, _, err = evaluate(capsys, out, limit="6")
    assert rc == 0, err
    assert "part-000001.parquet is unreadable" in err and "part-000002.attn.safetensors is unreadable" in err
    run = open_run(out)
    assert run.status == "complete"
    pd.testing.assert_frame_equal(run.predictions(), want)


@pytest.mark.parametrize("lost", ["predictions.parquet", "summary.json", "parts/part-000001.parquet"])
def test_a_complete_run_with_lost_outputs_is_rebuilt(tmp_path, capsys, lost):
    out = tmp_path / "run"
    assert evaluate(capsys, out, limit="6")[0] == 0
    want = open_run(out).predictions()
    summary = open_run(out).summary()
    (out / lost).unlink()
    if lost.startswith("parts/"):
        (out / "predictions.parquet").unlink()
    rc, _, err = evaluate(capsys, out, limit="6")
    assert rc == 0, err
    assert "nothing to do" not in err and "merging its parts again" in err
    pd.testing.assert_frame_equal(open_run(out).predictions(), want)
    assert open_run(out).summary() == summary
    assert cli(capsys, "report", str(out))[0] == 0


def test_atomic_table_writes_are_fsynced(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    synced = []
    real = os.fsync
    monkeypatch.setattr(store.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    store.atomic_write_table(tmp_path / "t.parquet", pa.table({"a": [1, 2]}))
    assert synced
    assert pq.read_table(tmp_path / "t.parquet").column("a").to_pylist() == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


# --- 5. checks before any compute --------------------------------------------------------------------


def test_an_ablation_position_outside_a_short_example_fails_before_compute(tmp_path, capsys):
    task = task_file(tmp_path / "t.jsonl", n=5, short=True)  # the short example comes last (longest first)
    out = tmp_path / "run"
    rc, _, err = evaluate(capsys, out, "--ablations", "a=position:-5", task=task, limit="6")
    one_line_error(rc, err, "ablation position -5 is outside example 'short'")
    assert not out.exists()


def test_a_lens_fitted_at_another_site_fails_before_the_model_loads(tmp_path, capsys, lens_dir, no_model_load):
    out = tmp_path / "run"
    rc, _, err = evaluate(capsys, out, "--site", "mid", "--linear", str(lens_dir), lenses="logit,linear-simlens")
    one_line_error(rc, err, "fitted at site 'pre'")
    assert not out.exists()


def test_an_unusable_out_fails_before_the_model_loads(tmp_path, capsys, no_model_load):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, _, err = evaluate(capsys, a_file)
    one_line_error(rc, err, "is a file, not a folder")
    rc, _, err = evaluate(capsys, a_file / "run")
    one_line_error(rc, err, f"is under {a_file}, which is a file")
    rc, _, err = evaluate(capsys, "/proc/lensbench-run")  # read-only for root too
    one_line_error(rc, err, "cannot write in /proc")
    assert a_file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_fails_before_the_model_loads(tmp_path, capsys, no_model_load):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        rc, _, err = evaluate(capsys, folder / "run")
        one_line_error(rc, err, "cannot write in")
    finally:
        folder.chmod(0o755)


# --- 6. interruptions --------------------------------------------------------------------------------


def test_a_resumed_run_keeps_its_interruptions(tmp_path, monkeypatch, tiny_rotary):
    import lensbench.evaluate as evaluate_module

    cfg = runner.EvalConfig(out=str(tmp_path / "r"), model="random:tiny-rotary:1", task="capitals", limit=6, batch_size=2)
    real = evaluate_module.evaluate_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(cfg, model=tiny_rotary, progress=False)
    interrupted = json.loads((tmp_path / "r" / "manifest.json").read_text())["interrupted"]
    monkeypatch.setattr(evaluate_module, "evaluate_batch", real)
    runner.run_eval(cfg, model=tiny_rotary, progress=False)
    manifest = open_run(tmp_path / "r").manifest
    assert manifest["status"] == "complete"
    assert manifest["interrupted"] == interrupted and manifest["interruptions"] == [interrupted]
    assert manifest["resumed"]


def test_ctrl_c_during_the_model_load_says_nothing_was_kept(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "load_model", interrupted)
    out = tmp_path / "run"
    rc, _, err = evaluate(capsys, out)
    assert rc == 130 and "Traceback" not in err
    assert "nothing was written" in err and "kept in" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_sigterm_during_the_model_load_exits_130(tmp_path):
    out = tmp_path / "run"
    script = f"""
import os, signal, sys, time
import lensbench.runner as runner
def load(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
    raise SystemExit("SIGTERM was not delivered")
runner.load_model = load
from lensbench.commands import main
sys.exit(main(["eval", "--model", "random:tiny-rotary:1", "--limit", "2", "--out", {str(out)!r}, "--quiet"]))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "nothing was written" in proc.stderr
    assert not out.exists()


# --- 7. numbers read back from stored runs -----------------------------------------------------------


def test_map_cost_is_the_recorded_one_and_the_app_shows_the_reports_curves(tmp_path, capsys, monkeypatch, lens_dir):
    sys.path.insert(0, str(REPO))
    from app import data
    from lensbench import exits
    from lensbench.report import build_report

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(lens_dir, work / "L")
    monkeypatch.chdir(work)  # --linear L, relative: the run's config holds "L"
    rc, _, err = evaluate(capsys, "run", "--linear", "L", lenses="logit,simlens,linear-simlens", limit="6")
    assert rc == 0, err
    expected = json.loads((lens_dir / "config.json").read_text())["map_cost"]
    assert abs(expected - 1 / 12) > 1e-3
    run = open_run(work / "run")
    # the app's Iso-Compute curves are the report's (the same map cost, computed once)
    report = build_report(run, write=False)
    lenses = ("logit", "simlens", "linear-simlens")
    app = data.iso_compute(*data.key(run), lenses)
    for lens in lenses:
        want = report["iso_compute"]["curves"][lens]
        got = app["curves"][lens]
        assert got["budget"].tolist() == want["budget"], lens
        assert got["layer"].tolist() == want["layer"], lens
        assert [None if pd.isna(a) else a for a in got["accuracy"]] == want["accuracy"], lens
    assert app["gain"] == report["iso_compute"]["gains"]["simlens_vs_logit"]["gain"]
    # from elsewhere, where "L" is no lens, the run still has its recorded map cost
    monkeypatch.chdir(tmp_path)
    assert run.manifest["map_cost"] == expected
    assert exits.run_map_cost(run) == expected
    assert build_report(run, write=False)["map_cost"] == report["map_cost"] == expected


# --- 8. attention keeps its points' sites and its lens -------------------------------------------------


def test_attention_records_its_points_sites_and_lens(tmp_path, capsys):
    out = tmp_path / "run"
    assert evaluate(capsys, out, "--site", "mid")[0] == 0
    entry = open_run(out).summary()["attention_a_to_s"]
    n_layers = open_run(out).manifest["model"]["n_layers"]
    assert entry["lens"] == "simlens"
    assert entry["layers"] == list(range(n_layers + 1))
    assert entry["sites"] == ["mid"] * n_layers + ["final"]
    mean, points = open_run(out).attention()
    assert points.tolist() == entry["layers"] and list(mean.shape) == entry["shape"]


# --- docs/format.md matches the manifest -------------------------------------------------------------


def test_every_manifest_key_is_documented(tmp_path, capsys, lens_dir, monkeypatch):
    out = tmp_path / "run"
    assert evaluate(capsys, out, "--linear", str(lens_dir), lenses="logit,linear-simlens")[0] == 0
    text = (REPO / "docs" / "format.md").read_text()
    section = text.split("## manifest.json", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            documented |= set(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    manifest = open_run(out).manifest
    assert set(manifest) - documented == set()
    identity_section = text.split("## What identifies a run", 1)[1].split("\n## ", 1)[0]
    listed = identity_section.split("holds:", 1)[1].split("A JSONL task")[0]
    assert set(manifest["identity"]) == set(re.findall(r"`([a-z_0-9]+)`", listed))
