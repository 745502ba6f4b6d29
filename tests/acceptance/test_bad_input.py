"""User mistakes in fit-linear, eval (ablations), calibrate, exit-speed and report: one line
(`lensbench: error: ...`), exit 2, no traceback, checked before any compute; and the files on
disk those commands read and write (damaged lenses, strict JSON, interrupted fits).

The command lines run in-process (`lensbench.commands.main`) on a tiny random model; the inputs
(a Linear SimLens, calibration and test runs, a calibration file) are made once per module.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from lensbench import exits, store
from lensbench.commands import main
from lensbench.errors import LensbenchError

MODEL = "random:tiny-rotary:1"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """L: a Linear SimLens; C, T: runs of capitals@calib/@test with logit, SimLens and L; P: a run
    with the logit lens only; CAL: `calibrate --json` of C and T (fidelity target)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops on a shared CPU (module fixtures run before `one_thread`)
    root = tmp_path_factory.mktemp("bad-input")
    paths = {name: root / name for name in ("L", "C", "T", "P")}
    paths["CAL"] = root / "calibration.json"
    assert main(["fit-linear", "--model", MODEL, "--task", "capitals", "--split", "calib", "--steps", "2",
                 "--out", str(paths["L"]), "--quiet"]) == 0
    for name, task in (("C", "capitals@calib"), ("T", "capitals@test")):
        assert main(["eval", "--model", MODEL, "--task", task, "--lenses", "logit,simlens,linear-simlens",
                     "--linear", str(paths["L"]), "--out", str(paths[name]), "--quiet"]) == 0
    assert main(["eval", "--model", MODEL, "--task", "capitals@test", "--limit", "6", "--lenses", "logit",
                 "--out", str(paths["P"]), "--quiet"]) == 0
    assert main(["calibrate", "--calib", str(paths["C"]), "--test", str(paths["T"]), "--target", "fidelity",
                 "--json", str(paths["CAL"])]) == 0
    torch.set_num_threads(threads)
    return paths


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lensbench: error: ") and fragment in lines[0], lines[0]


def _no_compute(monkeypatch) -> None:
    """Make every model load, run read and calibration fail loudly: a check that passes with
    these in place ran before any compute."""
    def compute(*args, **kwargs):
        raise AssertionError("compute started before the input was checked")

    for target in ("lensbench.lenses.fit.load_model", "lensbench.runner.load_model",
                   "lensbench.commands.calibrate.load_model", "lensbench.commands.exit_speed.load_model",
                   "lensbench.commands.report.load_model", "lensbench.exits.calibration.as_run",
                   "lensbench.report.open_run"):
        monkeypatch.setattr(target, compute)


# (command line, fragment of the one-line message, checked before any compute)
BAD = [
    # fit-linear: hyper-parameters are finite and in range
    ("fit-linear --model {M} --out {tmp}/f --weight-decay inf", "--weight-decay must be a finite number >= 0", True),
    ("fit-linear --model {M} --out {tmp}/f --weight-decay -1", "--weight-decay must be a finite number >= 0", True),
    ("fit-linear --model {M} --out {tmp}/f --lr nan", "--lr must be a finite number > 0", True),
    ("fit-linear --model {M} --out {tmp}/f --lr inf", "--lr must be a finite number > 0", True),
    ("fit-linear --model {M} --out {tmp}/f --ridge nan", "--ridge must be a finite number >= 0", True),
    ("fit-linear --model {M} --out {tmp}/f --val-fraction nan", "--val-fraction must be in [0, 1)", True),
    ("fit-linear --model {M} --out {tmp}/f --limit 4 --val-fraction 0.9", "holds out all 4 examples", False),
    ("fit-linear --model {M} --out {CAL}", "is a file; give a folder", True),
    # eval: a swap needs a donor other than the example itself
    ("eval --model {M} --task capitals@test --limit 1 --lenses logit --ablations a=swap --out {tmp}/e",
     "a swap needs at least 2 examples", False),
    # calibrate
    ("calibrate --calib {C} --test {T} --json {tmp}", "is a folder; give a file name", True),
    ("calibrate --calib {C} --test {T} --json {tmp}/no/such/out.json", "does not exist", True),
    ("calibrate --calib {C} --test {T} --epsilon -1", "--epsilon must be in [0, 1)", True),
    ("calibrate --calib {C} --test {T} --epsilon 1", "--epsilon must be in [0, 1)", True),
    ("calibrate --calib {C} --test {T} --epsilon nan", "--epsilon must be in [0, 1)", True),
    ("calibrate --calib {C} --test {T} --max-drop 1.5", "--max-drop must be in [0, 1]", True),
    ("calibrate --calib {C} --test {T} --max-drop -0.1", "--max-drop must be in [0, 1]", True),
    ("calibrate --calib {C} --test {T} --measure-speed --repeats 0", "--repeats must be at least 1", True),
    ("calibrate --calib {C} --test {T} --measure-speed --limit 0", "--limit must be at least 1", True),
    ("calibrate --calib {C} --test {T} --linear {L}", "options of --measure-speed", True),
    # exit-speed
    ("exit-speed --model {M} --threshold 1 --limit 0", "--limit must be at least 1", True),
    ("exit-speed --model {M} --threshold 1 --repeats 0", "--repeats must be at least 1", True),
    ("exit-speed --model {M} --threshold -1", "--threshold must be a finite entropy >= 0", True),
    ("exit-speed --model {M} --threshold nan", "--threshold must be a finite entropy >= 0", True),
    ("exit-speed --model {M} --threshold inf", "--threshold must be a finite entropy >= 0", True),
    ("exit-speed --model {M} --threshold 1 --json {tmp}", "is a folder; give a file name", True),
    ("exit-speed --model {M} --calibration {tmp}/missing.json", "no such file", True),
    ("exit-speed --model {M} --calibration {L}/lens.safetensors", "is not JSON", True),
    ("exit-speed --model {M} --calibration {C}/manifest.json", "lacks policy, threshold", True),
    ("exit-speed --model {M} --calibration {CAL} --threshold 0.5", "use one or the other (drop --threshold)", True),
    ("exit-speed --model {M} --calibration {CAL} --policy logit --min-layer 1",
     "use one or the other (drop --policy, --min-layer)", True),
    ("exit-speed --model random:tiny-rotary:2 --calibration {CAL}", "is a different model", False),
    # report
    ("report {T} --n-budgets 0", "--n-budgets must be at least 2", True),
    ("report {T} --n-budgets 1", "--n-budgets must be at least 2", True),
    ("report {T} --calib {C} --epsilon 2", "--epsilon must be in [0, 1)", True),
    ("report {P} --answer-lens linear-simlens", "has no linear-simlens lens (it has logit)", False),
]


@pytest.mark.parametrize("line, fragment, early", BAD, ids=[row[0][:60] for row in BAD])
def test_a_mistake_is_one_line(line, fragment, early, inputs, tmp_path, capsys, monkeypatch):
    values = {name: str(path) for name, path in inputs.items()}
    argv = [part.format(M=MODEL, tmp=tmp_path, **values) for part in line.split()]
    if early:
        _no_compute(monkeypatch)
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, fragment)
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("f"))  # nothing left behind


# --- lens folders on disk ----------------------------------------------------------------------------


def _damage_truncated(folder: Path) -> None:
    path = folder / "lens.safetensors"
    path.write_bytes(path.read_bytes()[:200])


def _damage_missing_key(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["layers"]
    (folder / "config.json").write_text(json.dumps(config))


def _damage_not_an_object(folder: Path) -> None:
    (folder / "config.json").write_text("[1, 2]")


def _damage_nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "lens.safetensors"))
    tensors["weight"][2, 0, 0] = float("nan")
    save_file(tensors, str(folder / "lens.safetensors"))


def _damage_wrong_shape(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "lens.safetensors"))
    tensors["bias"] = tensors["bias"][:2]
    save_file(tensors, str(folder / "lens.safetensors"))


@pytest.mark.parametrize("damage, fragment", [
    (_damage_truncated, "lens.safetensors is damaged or truncated"),
    (_damage_missing_key, "config.json lacks layers"),
    (_damage_not_an_object, "is not a linear lens config"),
    (_damage_nan_weights, "has NaN or infinite weights at layer(s) 2"),
    (_damage_wrong_shape, "'bias' has shape (2, 64)"),
])
@pytest.mark.parametrize("command", ["eval", "exit-speed"])
def test_a_damaged_lens_folder_is_one_line_naming_it(damage, fragment, command, inputs, tmp_path, capsys):
    folder = tmp_path / "lens"
    shutil.copytree(inputs["L"], folder)
    damage(folder)
    if command == "eval":
        argv = ["eval", "--model", MODEL, "--task", "capitals@test", "--limit", "2", "--lenses", "linear-simlens",
                "--linear", str(folder), "--out", str(tmp_path / "run"), "--quiet"]
    else:
        argv = ["exit-speed", "--model", MODEL, "--linear", str(folder), "--threshold", "0.5", "--limit", "2"]
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, fragment)
    assert str(folder) in err


def test_a_lens_with_non_finite_weights_is_not_saved(inputs, tmp_path):
    from lensbench.lenses.linear import LinearLens

    lens = LinearLens.load(inputs["L"])
    lens.bias[1, 3] = float("inf")
    with pytest.raises(LensbenchError, match=r"layer\(s\) 1 have NaN or infinite weights; nothing written"):
        lens.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- fit-linear: interruption, nothing held out --------------------------------------------------------


@pytest.mark.parametrize("where", ["fitting", "saving"])
def test_an_interrupted_fit_exits_130_and_writes_nothing(where, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "fitting":
        monkeypatch.setattr("lensbench.lenses.fit.fit_linear_lens", interrupt)
    else:  # after the weights are written, before the config
        monkeypatch.setattr(store, "atomic_write_json", interrupt)
    out = tmp_path / "lens"
    try:
        code, _, err = _run(["fit-linear", "--model", MODEL, "--task", "capitals@calib", "--limit", "6",
                             "--objective", "lstsq", "--out", str(out), "--quiet"], capsys)
    except KeyboardInterrupt:  # (pytest would take it for the user's Ctrl-C and stop the session)
        pytest.fail("the interrupt escaped as a traceback")
    assert code == 130
    assert err.strip().splitlines() == [f"lensbench: interrupted; nothing written to {out}"]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_fit_with_nothing_held_out_says_so(tmp_path, capsys):
    out = tmp_path / "lens"
    code, printed, _ = _run(["fit-linear", "--model", MODEL, "--task", "capitals@calib", "--limit", "6",
                             "--objective", "lstsq", "--val-fraction", "0", "--out", str(out), "--quiet"], capsys)
    assert code == 0
    assert "held-out: none (n_val=0" in printed and "held-out  " not in printed
    config = json.loads((out / "config.json").read_text())
    assert config["n_val"] == 0 and config["n_train"] == 6
    assert config["val_loss"] == [None] * 4 and config["identity_val_loss"] == [None] * 4
    assert len(config["identity_train_loss"]) == 4 and all(x > 0 for x in config["identity_train_loss"])
    assert config["train_loss"] != config["val_loss"]


# --- strict JSON and atomic writes ------------------------------------------------------------------------


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_and_a_failed_write_leaves_no_temp_file(tmp_path):
    import numpy as np

    store.atomic_write_json(tmp_path / "a.json", {"x": float("nan"), "y": [1.5, float("inf"), np.float64(-np.inf)],
                                                  "z": np.float32(2.0), "n": np.int64(3), "ok": True})
    assert _strict((tmp_path / "a.json").read_text()) == {"x": None, "y": [1.5, None, None], "z": 2.0, "n": 3, "ok": True}
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(OSError):
        store.atomic_write_json(folder, {"a": 1})
    with pytest.raises(OSError):
        store.atomic_write_bytes(folder, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "folder"]


def test_the_files_the_commands_write_are_strict_json(inputs):
    for path in (inputs["L"] / "config.json", inputs["CAL"], inputs["T"] / "summary.json", inputs["T"] / "manifest.json"):
        _strict(path.read_text())


# --- calibrate and report: no warnings, an infinite speedup -------------------------------------------------


def test_logit_exits_answered_by_the_logit_lens_warn_nothing(inputs, tmp_path, capsys):
    """Exits at layer 0 answered by the logit lens cost no block: their layer-token speedup is
    infinite, printed as such, not a division-by-zero warning per threshold."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, printed, err = _run(["calibrate", "--calib", str(inputs["C"]), "--test", str(inputs["T"]),
                                   "--policy", "logit", "--answer-lens", "logit", "--per-layer"], capsys)
        assert code == 0, err
        run = tmp_path / "T"
        shutil.copytree(inputs["T"], run)
        code, printed, err = _run(["report", str(run), "--answer-lens", "logit"], capsys)
        assert code == 0, err
    assert "logit" in printed and "infx" in printed  # the Pareto front's exit-everything-at-0 point
    report = _strict((run / "report.json").read_text())
    curve = report["exits"]["policies"]["logit"]["curve"]
    assert None in curve["layer_token_speedup"]  # infinite: null in strict JSON


def test_report_needs_an_answer_lens_only_when_asked(inputs, tmp_path, capsys):
    run = tmp_path / "P"
    shutil.copytree(inputs["P"], run)
    code, printed, err = _run(["report", str(run)], capsys)  # no simlens, none asked for: no exits table
    assert code == 0, err
    assert json.loads((run / "report.json").read_text())["exits"]["policies"] == {}


# --- calibrate --json -> exit-speed --calibration ---------------------------------------------------------


def test_calibrate_json_records_what_the_executor_needs(inputs):
    saved = json.loads(inputs["CAL"].read_text())
    lens = json.loads((inputs["L"] / "config.json").read_text())
    assert saved["executor"] == {
        "model": MODEL, "model_sha256": "random-tiny-rotary-1", "entropy": "candidates", "positions": "consecutive",
        "linear": str(inputs["L"].resolve()), "map_cost": pytest.approx(lens["map_cost"]),
    }


def test_exit_speed_runs_the_calibrations_settings(inputs, tmp_path, capsys, monkeypatch):
    saved = json.loads(inputs["CAL"].read_text())
    saved["executor"].update(entropy="vocab", positions="original")
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(saved))
    built = []

    class Spy(exits.SimExitExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(exits, "SimExitExecutor", Spy)
    code, printed, err = _run(["exit-speed", "--model", MODEL, "--calibration", str(calibration), "--limit", "2",
                               "--batch-sizes", "1", "--repeats", "1"], capsys)
    assert code == 0, err
    (executor,) = built
    assert (executor.entropy_mode, executor.positions) == ("vocab", "original")
    assert (executor.policy, executor.answer_lens, executor.min_layer) == (saved["policy"], saved["answer_lens"], 0)
    assert executor.tau[0] == pytest.approx(saved["threshold"])
    assert executor.linear_lens.path == str(inputs["L"].resolve())


def test_measured_speedup_headline_is_batch_1_whatever_the_order(inputs, tmp_path, capsys):
    out = tmp_path / "speed.json"
    code, printed, err = _run(["calibrate", "--calib", str(inputs["C"]), "--test", str(inputs["T"]), "--target",
                               "fidelity", "--measure-speed", "--batch-sizes", "4,1", "--repeats", "1", "--limit", "4",
                               "--json", str(out)], capsys)
    assert code == 0, err
    test = _strict(out.read_text())["test"]
    by_size = {row["batch_size"]: row["wall_clock_speedup"] for row in test["timings"]}
    assert test["wall_clock_speedup_batch_size"] == 1
    assert test["wall_clock_speedup"] == by_size[1]
    assert test["wall_clock_speedup_by_batch_size"] == {"4": by_size[4], "1": by_size[1]}
    assert "wall-clock (batch 1)" in printed


def test_swap_with_two_examples_still_runs(tmp_path, capsys):
    code, _, err = _run(["eval", "--model", MODEL, "--task", "capitals@test", "--limit", "2", "--lenses", "logit",
                         "--ablations", "a=swap", "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 0, err
    from lensbench.store import open_run

    swapped = open_run(tmp_path / "run").predictions(lenses=["simlens[a=swap]"])
    donors = swapped.drop_duplicates("example_index").set_index("example_index")["donor_index"].to_dict()
    assert len(donors) == 2 and all(d != i and d in donors for i, d in donors.items())  # each the other's donor


def test_exit_speed_with_every_exit_at_layer_0_answered_by_the_logit_lens(tmp_path, capsys):
    """No block runs, so the layer-token and attainable speedups are infinite (were a
    ZeroDivisionError)."""
    out = tmp_path / "speed.json"
    code, printed, err = _run(["exit-speed", "--model", MODEL, "--policy", "logit", "--answer-lens", "logit",
                               "--threshold", "100", "--limit", "2", "--batch-sizes", "1", "--repeats", "1",
                               "--json", str(out)], capsys)
    assert code == 0, err
    (row,) = _strict(out.read_text())
    assert row["mean_exit_layer"] == 0 and row["layer_token_speedup"] is None
    assert row["attainable_wall_clock_speedup"] is None


@pytest.mark.parametrize("line, fragment", [
    ("eval --limit 0 --out x", "argument --limit: expected a positive integer, got 0"),
    ("eval --batch-size x --out x", "argument --batch-size: expected an integer, got 'x'"),
    ("eval", "the following arguments are required: --out"),
    ("fit-linear --out x --dtype float64", "argument --dtype: invalid choice: 'float64'"),
    ("calibrate --calib a --test b --policy nope", "argument --policy: invalid choice: 'nope'"),
    ("nope", "argument command: invalid choice: 'nope'"),
])
def test_an_option_the_parser_refuses_is_one_line(line, fragment, capsys):
    """argparse's own checks too: one line naming the help to read, no usage block."""
    with pytest.raises(SystemExit) as exit_info:
        main(line.split())
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lensbench: error: ") and fragment in lines[0], err
    assert "--help`" in lines[0]
