"""`make figures` (analyses/results_figures.py): the stored runs its jobs name exist and are
complete runs, a missing one is a one-line error, and a job draws what the script draws."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analyses import results_figures  # noqa: E402


def _args(*extra):
    import argparse

    ns = argparse.Namespace(only="", out="OUT", formats="png", bootstrap=10, seed=0, root=ROOT)
    for key, value in extra:
        setattr(ns, key, value)
    return ns


def test_every_job_draws_complete_stored_runs():
    from analyses import common

    todo = results_figures.calls(_args())
    assert {script for script, _ in todo} >= {"per_layer", "iso_compute", "simexit", "main_table", "roles", "sizes", "icl"}
    for script, argv in todo:
        folders = argv[: argv.index("--out")]
        assert folders, script
        kind = "icl" if script == "icl" else "eval"
        for folder in folders:  # each folder a job names holds complete runs of the script's kind
            assert common.collect_runs([folder], kind=kind), (script, folder)


def test_a_glob_that_matches_nothing_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(results_figures, "JOBS", (results_figures.Job("x", ("per_layer",), ("results/nothing-*",)),))
    with pytest.raises(SystemExit) as exc:
        results_figures.calls(_args(("root", tmp_path)))
    assert "results/nothing-*" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        results_figures.main(["--only", "nosuchjob", "--dry-run"])
    assert "nosuchjob" in str(exc.value)


@pytest.mark.browser
@pytest.mark.skipif(not (os.environ.get("BROWSER_PATH") or os.path.exists("/usr/bin/chromium") or shutil.which("chromium")),
                    reason="PNG figures need Chromium: bash scripts/setup-browser.sh (make test installs it)")
def test_a_job_writes_what_its_script_writes(small_run, tmp_path, monkeypatch):
    from analyses import per_layer

    root = tmp_path / "repo"
    shutil.copytree(small_run, root / "results" / "stored" / small_run.name)
    monkeypatch.setattr(results_figures, "JOBS", (results_figures.Job("one", ("per_layer", "main_table"), ("results/stored",)),))
    assert results_figures.main(["--root", str(root), "--out", str(tmp_path / "via"), "--bootstrap", "20"]) == 0
    per_layer.main([str(root / "results" / "stored"), "--out", str(tmp_path / "direct"), "--formats", "png",
                    "--bootstrap", "20", "--seed", "0"])
    via = sorted(p.name for p in (tmp_path / "via").iterdir())
    assert "main_table.md" in via
    direct = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert direct and set(direct) <= set(via)
    assert not (root / "results" / "stored" / small_run.name / "report.json").exists()  # nothing written there


def test_the_results_page_cites_only_drawn_figures():
    page = (ROOT / "docs" / "results.md").read_text()
    cited = re.findall(r"\]\((figures/[^)]+\.png)\)", page)
    assert cited
    missing = [c for c in cited if not (ROOT / "docs" / c).is_file()]
    assert not missing, missing


def test_compact_png_keeps_the_picture_in_fewer_bytes(tmp_path):
    import numpy as np
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 360), "white")
    draw = ImageDraw.Draw(image)
    for x in range(40, 600):  # a shaded band and two lines, as in a per-layer figure
        draw.line([(x, 150 + (x % 50)), (x, 220 + (x % 30))], fill=(200, 220, 240))
    draw.line([(40, 300), (600, 60)], fill=(31, 119, 180), width=3)
    draw.line([(40, 250), (600, 200)], fill=(127, 127, 127), width=2)
    draw.text((50, 20), "Per-layer accuracy", fill=(42, 63, 95))
    path = tmp_path / "figure.png"
    image.save(path)
    before = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    size = path.stat().st_size
    saved = results_figures.compact_png(path)
    with Image.open(path) as after_image:
        assert after_image.mode == "P"
        after = np.asarray(after_image.convert("RGB"), dtype=float)
    assert saved > 0 and path.stat().st_size == size - saved
    assert after.shape == before.shape
    assert np.abs(after - before).mean() < 1.0 and np.abs(after - before).max() <= 48
