"""`lensbench fit-linear`, a fitted lens in `lensbench eval`, `lensbench report` and
`lensbench calibrate`, end to end on a tiny random model (in-process CLI calls)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lensbench.commands import main
from lensbench.store import open_run

MODEL = "random:tiny-rotary:1"


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A Linear SimLens (KL, a few steps) and a tuned lens (closed form), both on capitals@calib."""
    root = tmp_path_factory.mktemp("linear-cli")
    common = ["--model", MODEL, "--task", "capitals", "--split", "calib", "--quiet"]
    assert main(["fit-linear", *common, "--out", str(root / "sim"), "--steps", "5", "--fit-batch", "8"]) == 0
    assert main(["fit-linear", *common, "--out", str(root / "tuned"), "--target", "final", "--objective", "lstsq"]) == 0
    return root


def test_fit_linear_writes_weights_and_config(fitted, capsys):
    from lensbench.tasks import load_task

    config = json.loads((fitted / "sim" / "config.json").read_text())
    n_calib = len(load_task("capitals@calib"))
    assert config["kind"] == "linear-simlens" and config["target"] == "simlens"
    assert config["objective"] == "candidates-kl"
    assert config["task"] == "capitals@calib"
    assert config["layers"] == [0, 1, 2, 3]
    assert config["model_sha256"] == "random-tiny-rotary-1"
    assert config["n_train"] + config["n_val"] == n_calib
    assert len(config["train_loss"]) == len(config["val_loss"]) == 4
    assert config["fit"]["steps"] == 5
    from safetensors.torch import load_file

    tensors = load_file(str(fitted / "sim" / "lens.safetensors"))
    assert tensors["weight"].shape == (4, 64, 64) and tensors["bias"].shape == (4, 64)
    tuned = json.loads((fitted / "tuned" / "config.json").read_text())
    assert (tuned["kind"], tuned["objective"]) == ("tuned", "lstsq")


def test_fit_linear_prints_the_time_and_refuses_to_overwrite(fitted, capsys):
    out = fitted / "again"
    assert main(["fit-linear", "--model", MODEL, "--task", "capitals@test", "--limit", "6", "--objective", "lstsq",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "time: residuals" in printed and "fitting" in printed
    assert main(["fit-linear", "--model", MODEL, "--task", "capitals", "--out", str(out), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_eval_with_the_fitted_lenses(fitted, tmp_path):
    out = tmp_path / "run"
    assert main(["eval", "--model", MODEL, "--task", "capitals@test", "--lenses", "logit,linear-simlens,tuned",
                 "--linear", str(fitted / "sim"), "--linear", str(fitted / "tuned"), "--out", str(out), "--quiet"]) == 0
    predictions = open_run(out).predictions()
    assert set(predictions["lens"]) == {"logit", "linear-simlens", "tuned"}
    last = predictions[predictions["layer"] == 4].pivot(index="example_index", columns="lens", values="entropy")
    # at the final point every lens reads the model's own output (the maps are the identity there)
    assert torch.allclose(torch.tensor(last["linear-simlens"].to_numpy()), torch.tensor(last["logit"].to_numpy()))
    first = predictions[predictions["layer"] == 0].pivot(index="example_index", columns="lens", values="entropy")
    assert not torch.allclose(torch.tensor(first["tuned"].to_numpy()), torch.tensor(first["logit"].to_numpy()))


def test_a_lens_fitted_for_another_model_is_refused(fitted, tmp_path, capsys):
    code = main(["eval", "--model", "random:tiny-rotary:2", "--task", "capitals@test", "--lenses", "linear-simlens",
                 "--linear", str(fitted / "sim"), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "fitted for random:tiny-rotary:1" in err and len(err.strip().splitlines()) == 1


def test_a_lens_of_the_other_kind_is_refused(fitted, tmp_path, capsys):
    code = main(["eval", "--model", MODEL, "--task", "capitals@test", "--lenses", "linear-simlens",
                 "--linear", str(fitted / "tuned"), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    assert "none of the --linear folders holds a linear-simlens lens" in capsys.readouterr().err


def test_report_gives_simlens_gain_over_the_tuned_lens(fitted, tmp_path, capsys):
    """With the tuned lens in the run, the report gives SimLens's Iso-Compute gain over it too
    (the tuned lens charged its map), with its interval, next to the gain over the logit lens."""
    run = tmp_path / "run"
    assert main(["eval", "--model", MODEL, "--task", "capitals@test", "--lenses", "logit,simlens,tuned",
                 "--linear", str(fitted / "tuned"), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(run), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "Iso-Compute gain of SimLens over the logit lens" in printed
    assert "Iso-Compute gain of SimLens over the tuned lens" in printed
    report = json.loads((run / "report.json").read_text())
    gains = report["iso_compute"]["gains"]
    tuned = gains["simlens_vs_tuned"]
    assert "simlens_vs_logit" in gains
    assert (tuned["lens"], tuned["baseline"]) == ("simlens", "tuned")
    # the baseline's accuracy at each budget is the tuned lens's accuracy at the layer it reaches
    by_layer = dict(zip(report["per_layer"]["tuned"]["layer"], report["per_layer"]["tuned"]["accuracy"]))
    for layer, acc in zip(tuned["baseline_layer"], tuned["baseline_accuracy"]):
        if layer is not None and layer >= 0:
            assert acc == pytest.approx(by_layer[layer])
    lo, hi = tuned["gain_ci"]
    assert lo <= tuned["gain"] <= hi


def test_report_and_calibrate(fitted, tmp_path, capsys):
    runs = {}
    for part in ("calib", "test"):
        runs[part] = tmp_path / part
        assert main(["eval", "--model", MODEL, "--task", f"capitals@{part}", "--lenses", "logit,simlens,linear-simlens",
                     "--linear", str(fitted / "sim"), "--out", str(runs[part]), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(runs["test"]), "--calib", str(runs["calib"])]) == 0
    printed = capsys.readouterr().out
    assert "Iso-Compute gain of SimLens over the logit lens" in printed
    assert "exit operating points" in printed
    report = json.loads((runs["test"] / "report.json").read_text())
    assert set(report["per_layer"]) == {"logit", "simlens", "linear-simlens"}
    assert report["iso_compute"]["gains"]["simlens_vs_logit"]["budgets"][-1] == pytest.approx(
        report["iso_compute"]["gains"]["simlens_vs_logit"]["full_cost"])
    assert set(report["exits"]["policies"]) == {"linear-simlens", "logit", "simlens", "oracle"}
    assert {(c["policy"], c["target"]) for c in report["calibrated"]} >= {
        ("linear-simlens", "best-accuracy"), ("linear-simlens", "max-drop"), ("linear-simlens", "fidelity")}
    map_cost = json.loads((fitted / "sim" / "config.json").read_text())["map_cost"]
    assert report["map_cost"] == pytest.approx(map_cost)

    target = tmp_path / "calibration.json"
    assert main(["calibrate", "--calib", str(runs["calib"]), "--test", str(runs["test"]), "--target", "fidelity",
                 "--measure-speed", "--batch-sizes", "1,4", "--repeats", "1", "--limit", "4", "--json", str(target)]) == 0
    result = json.loads(target.read_text())
    assert result["target"] == "fidelity" and result["policy"] == "linear-simlens"
    assert [t["batch_size"] for t in result["test"]["timings"]] == [1, 4]
    assert result["test"]["wall_clock_speedup"] > 0

    # A run that does not record its Linear SimLens (manifests before `inputs`): the JSON names
    # the --linear folder that was timed, not null.
    older = tmp_path / "older-test"
    shutil.copytree(runs["test"], older)
    manifest = json.loads((older / "manifest.json").read_text())
    manifest.pop("inputs")
    manifest["config"]["linear"] = None
    (older / "manifest.json").write_text(json.dumps(manifest))
    target = tmp_path / "older.json"
    assert main(["calibrate", "--calib", str(runs["calib"]), "--test", str(older), "--target", "max-drop",
                 "--measure-speed", "--batch-sizes", "1", "--repeats", "1", "--limit", "2", "--linear", str(fitted / "sim"),
                 "--json", str(target)]) == 0
    assert json.loads(target.read_text())["executor"]["linear"] == str((fitted / "sim").resolve())

    assert main(["calibrate", "--calib", str(runs["test"]), "--test", str(runs["test"])]) == 2
    assert "share" in capsys.readouterr().err
