"""Every analysis script on a tiny real run (`small_run`: logit lens, SimLens, drop-[s],
drop-[a], an [a] swap; no Linear SimLens): its files appear and are valid, non-empty PNG and
HTML; lenses the run lacks are skipped with a note; run folders are left untouched."""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEM = "smollm2-135m_capitals"
FIGURES = {
    "per_layer": [f"per_layer_{STEM}"],
    "iso_compute": [f"iso_compute_{STEM}"],
    "roles": [f"roles_ablations_{STEM}", f"roles_swap_{STEM}", f"roles_attention_{STEM}", f"roles_attention_heads_{STEM}"],
    "simexit": [f"simexit_{STEM}"],
    "main_table": ["main_table"],
}
# What each figure's HTML must hold: its plotly trace type and a label proving it drew the data.
CONTENT = {
    "per_layer": ('"type":"scatter"', "SimLens"),
    "iso_compute": ('"type":"scatter"', "logit lens"),
    "roles_ablations": ('"type":"scatter"', "[s] dropped"),
    "roles_swap": ('"type":"scatter"', "follows donor"),
    "roles_attention": ('"type":"heatmap"', "readout layer"),
    "roles_attention_heads": ('"type":"heatmap"', "head"),
    "simexit": ('"type":"scatter"', "best accuracy"),
    "main_table": ('"type":"table"', "smollm2-135m"),
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, runs: list[Path], out: Path, formats: str) -> list[Path]:
    module = importlib.import_module(f"analyses.{name}")
    return module.main([*map(str, runs), "--out", str(out), "--formats", formats])


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*") if p.is_file()}


def check_html(path: Path, kind: str) -> None:
    text = path.read_text()
    assert text.lstrip().lower().startswith(("<!doctype html>", "<html")) and text.rstrip().endswith("</html>"), path
    assert 'class="plotly-graph-div"' in text and "Plotly.newPlot" in text, path
    trace, label = CONTENT[kind]
    assert trace in text and label in text, f"{path} lacks {trace} / {label}"
    # plotly.js is one file beside the pages (offline, not embedded in each)
    assert 'src="plotly.min.js"' in text
    assert (path.parent / "plotly.min.js").stat().st_size > 1_000_000


def check_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 20_000, f"{path} is suspiciously small ({len(data)} bytes)"
    image = Image.open(io.BytesIO(data))
    image.verify()
    image = Image.open(io.BytesIO(data)).convert("L")
    assert image.width >= 600 and image.height >= 300
    low, high = image.getextrema()
    assert high - low > 100, f"{path} is blank"
    # a drawn figure has many grey levels (lines, text, antialiasing), a blank page a few
    assert len(image.getcolors(256) or []) > 20


def kind_of(stem: str) -> str:
    return stem[: -len(STEM) - 1] if stem.endswith(STEM) else stem


@pytest.fixture(scope="module")
def html_out(small_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures-html")
    before = snapshot(small_run)
    written = {name: run_script(name, [small_run], out, "html") for name in FIGURES}
    assert snapshot(small_run) == before, "the scripts changed the run folder"
    return out, written


@pytest.mark.parametrize("script", list(FIGURES))
def test_script_writes_valid_html(html_out, script):
    out, written = html_out
    for stem in FIGURES[script]:
        path = out / f"{stem}.html"
        assert path in written[script], f"{script} did not report {path.name}"
        check_html(path, kind_of(stem))
    assert not list(out.glob("*.png")), "--formats html wrote a PNG"


def test_tables_and_csvs(html_out):
    out, _ = html_out
    gains = list(csv.DictReader((out / "iso_compute_gains.csv").open()))
    assert len(gains) == 1 and gains[0]["task"] == "capitals" and gains[0]["n_examples"] == "12"
    assert -100 <= float(gains[0]["gain_points"]) <= 100
    table = (out / "main_table.md").read_text()
    assert "| smollm2-135m | capitals | 12 |" in table
    rows = list(csv.DictReader((out / "main_table.csv").open()))
    assert rows[0]["calibration"] == "no Linear SimLens" and rows[0]["speedup_best"] == ""
    points = list(csv.DictReader((out / "simexit_points.csv").open()))
    # no Linear SimLens: the logit and SimLens policies are marked, chosen in-sample
    assert {p["policy"] for p in points} == {"logit", "simlens"}
    assert {p["how"] for p in points} == {"in-sample"}


def test_missing_lens_is_noted(small_run, tmp_path, capsys):
    run_script("per_layer", [small_run], tmp_path, "html")
    err = capsys.readouterr().err
    assert "no 'linear-simlens' lens" in err and "no 'tuned' lens" in err
    run_script("simexit", [small_run], tmp_path, "html")
    assert "policy 'linear-simlens' needs lenses the run lacks" in capsys.readouterr().err


def test_logit_only_run(small_run, tmp_path, capsys):
    """A run with only the logit lens (like a CPU run of one lens): figures that need SimLens are
    skipped with a note, the others are written."""
    import pyarrow.parquet as pq

    from lensbench.metrics import summarize

    run = tmp_path / "logit-only"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("attention.safetensors", "report.json", "parts"))
    import pyarrow.compute as pc

    table = pq.read_table(run / "predictions.parquet")
    table = table.filter(pc.equal(table["lens"], "logit"))
    pq.write_table(table, run / "predictions.parquet")
    predictions = table.to_pandas()
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["lenses"] = ["logit"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "summary.json").write_text(json.dumps(summarize(predictions)))
    out = tmp_path / "figs"
    assert run_script("per_layer", [run], out, "html") == [out / f"per_layer_{STEM}.html"]
    assert run_script("roles", [run], out, "html") == []
    assert run_script("simexit", [run], out, "html") == []
    written = run_script("main_table", [run], out, "html")
    assert out / "main_table.md" in written
    err = capsys.readouterr().err
    assert "no SimLens ablations" in err and "no attention.safetensors" in err


def test_calibration_pairing(small_run, tmp_path):
    from analyses import common
    from lensbench.store import open_run

    for part in ("calib", "test"):
        shutil.copytree(small_run, tmp_path / part)
        manifest = json.loads((tmp_path / part / "manifest.json").read_text())
        manifest["task"] = f"capitals@{part}"
        (tmp_path / part / "manifest.json").write_text(json.dumps(manifest))
    test, calib = open_run(tmp_path / "test"), open_run(tmp_path / "calib")
    assert common.find_calibration(test).path == calib.path
    assert common.find_calibration(calib) is None
    args = common.argument_parser("x").parse_args([str(tmp_path)])
    runs, slugs, pairs = common.figure_runs(args)
    assert [r.path for r in runs] == [test.path]  # the calibration run is not drawn on its own
    assert pairs[test.path].path == calib.path
    assert slugs[test.path] == "smollm2-135m_capitals-test"


def test_make_all_plan(small_run, tmp_path, capsys):
    from analyses import make_all

    assert make_all.main(["--dry-run", "--tasks", "arc-easy", "--limit", "5", "--runs", str(tmp_path),
                          "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "lensbench fit-linear --model smollm2-135m --device cuda" in out and "--target final" in out
    assert f"--task arc-easy@calib --limit 5" in out and f"--task arc-easy@test --limit 5" in out
    assert "--ablations drop-s,drop-a,a=swap" in out
    assert "python -m analyses.main_table" in out
    # an existing complete run is reused; one with other options is reported as different
    want = {"model": "smollm2-135m", "task": "capitals", "limit": 12}
    assert make_all.run_state(small_run, want)[0] == "complete"
    state, detail = make_all.run_state(small_run, dict(want, limit=50))
    assert state == "different" and "limit" in detail
    assert make_all.run_state(tmp_path / "nothing", want)[0] == "missing"


def test_make_all_model_folders_keep_the_version_dots(tmp_path):
    """qwen2.5-coder-0.5b's runs go under `qwen2.5-coder-0.5b/`, not `qwen2.5-coder-0/` (a shipped
    name is not a file name with a suffix); a .gguf path is named by its file."""
    from analyses import make_all

    assert make_all.Pair("qwen2.5-coder-0.5b", "arc-easy", tmp_path).slug == "qwen2.5-coder-0.5b"
    assert make_all.Pair("qwen2.5-coder-1.5b", "arc-easy", tmp_path).slug == "qwen2.5-coder-1.5b"
    assert make_all.Pair("/models/tiny.gguf", "arc-easy", tmp_path).slug == "tiny"


def _chromium_available() -> bool:
    return bool(os.environ.get("BROWSER_PATH")) or os.path.exists("/usr/bin/chromium") or bool(shutil.which("chromium"))


@pytest.mark.browser
@pytest.mark.skipif(not _chromium_available(), reason="static export needs Chromium: bash scripts/setup-browser.sh")
def test_every_script_writes_valid_png_and_html(small_run, tmp_path):
    from lensbench import figure_files

    before = snapshot(small_run)
    with figure_files.static_export():
        for script, stems in FIGURES.items():
            written = run_script(script, [small_run], tmp_path, "png,html")
            for stem in stems:
                assert tmp_path / f"{stem}.png" in written and tmp_path / f"{stem}.html" in written
                check_png(tmp_path / f"{stem}.png")
                check_html(tmp_path / f"{stem}.html", kind_of(stem))
    assert snapshot(small_run) == before


def test_png_without_a_browser_is_a_one_line_error_not_a_hang(small_run, tmp_path, monkeypatch):
    """Without a Chromium kaleido waits forever: every script refuses PNGs up front (one line,
    nothing written), `save_figure` refuses them too, and HTML still works."""
    import plotly.graph_objects as go

    from lensbench import figure_files
    from lensbench.errors import LensbenchError

    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    assert figure_files.find_browser() is None
    for script in FIGURES:
        with pytest.raises(SystemExit, match="PNG figures need Chromium"):
            run_script(script, [small_run], tmp_path / "out", "png")
    from analyses import results_figures

    with pytest.raises(SystemExit, match="PNG figures need Chromium"):
        results_figures.main(["--only", "qwen15", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(LensbenchError, match="PNG figures need Chromium"):
        figure_files.save_figure(go.Figure(), tmp_path / "out", "empty", ("png",))
    with figure_files.static_export():  # starts nothing
        written = run_script("per_layer", [small_run], tmp_path / "html", "html")
    assert written and all(p.suffix == ".html" for p in written)


def test_make_all_no_tuned_fits_and_evaluates_linear_simlens_only(tmp_path, capsys):
    from analyses import make_all

    assert make_all.main(["--dry-run", "--tasks", "arc-easy", "--limit", "5", "--runs", str(tmp_path), "--no-tuned",
                          "--icl-tasks", ""]) == 0
    out = capsys.readouterr().out
    assert "--target simlens" in out and "--target final" not in out
    assert "--lenses logit,simlens,linear-simlens " in out and "arc-easy-tuned" not in out and ",tuned" not in out
