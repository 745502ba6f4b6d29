"""User mistakes in task files and model specs: one line naming what is wrong, before any compute.

Through the CLI: exit status 2, `lensbench: error: ...` as the only line on stderr, no traceback.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lensbench.errors import LensbenchError
from lensbench.tasks import load_jsonl, load_task

ROOT = Path(__file__).resolve().parents[2]
ROWS = [{"id": f"q{i}", "prompt": "The capital of France is", "choices": [" Paris", " Rome"], "gold": 0} for i in range(4)]
TEXT = "".join(json.dumps(r) + "\n" for r in ROWS)


def cli_error(tmp_path, *args) -> str:
    """Run `lensbench eval ARGS` in a subprocess; assert a one-line user error; return that line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "lensbench", "eval", "--out", str(tmp_path / "out"), "--limit", "2", "--quiet", *args]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lensbench: error: "), proc.stderr
    return lines[0]


def one_line_error(func, *args) -> str:
    with pytest.raises(LensbenchError) as info:
        func(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- task files: compression, encoding, unreadable paths ------------------------------------


@pytest.mark.parametrize("name", ["task.jsonl.gz", "task.jsonl"])
def test_gzipped_task_file_is_read(tmp_path, name):
    (tmp_path / "plain.jsonl").write_text(TEXT)
    (tmp_path / name).write_bytes(gzip.compress(TEXT.encode()))
    examples = load_jsonl(tmp_path / name)
    assert [e.id for e in examples] == ["q0", "q1", "q2", "q3"]
    assert [e.__dict__ for e in examples] == [e.__dict__ for e in load_jsonl(tmp_path / "plain.jsonl")]
    halves = load_task(f"{tmp_path / name}@calib") + load_task(f"{tmp_path / name}@test")
    assert sorted(e.id for e in halves) == ["q0", "q1", "q2", "q3"]


def test_damaged_gzip_task_file(tmp_path):
    path = tmp_path / "task.jsonl.gz"
    path.write_bytes(gzip.compress(TEXT.encode())[:30])
    message = one_line_error(load_jsonl, path)
    assert str(path) in message and "damaged gzip file" in message


def test_latin1_task_file_names_the_file_and_the_encoding(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(TEXT.encode() + json.dumps({**ROWS[0], "id": "café"}, ensure_ascii=False).encode("latin-1") + b"\n")
    message = one_line_error(load_jsonl, path)
    assert str(path) in message and "is not UTF-8 text" in message and "line 5" in message
    assert f"{path} is not UTF-8 text" in cli_error(tmp_path, "--task", str(path), "--model", "random:tiny-rotary:1")


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + TEXT.encode())
    assert len(load_jsonl(path)) == 4


def test_directory_as_task_says_it_is_a_directory(tmp_path):
    folder = tmp_path / "tasks.jsonl"
    folder.mkdir()
    assert "is a directory" in one_line_error(load_jsonl, folder)
    plain = tmp_path / "data"
    plain.mkdir()
    assert f"task file {plain} is a directory" in cli_error(tmp_path, "--task", str(plain), "--model", "random:tiny-rotary:1")


def test_fifo_as_task_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    assert "is not a regular file" in one_line_error(load_jsonl, fifo)


def test_unreadable_task_file_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "task.jsonl"
    path.write_text(TEXT)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    message = one_line_error(load_jsonl, path)
    assert message == f"cannot read task file {path}: Permission denied"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_chmod_000_task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(TEXT)
    path.chmod(0)
    assert "cannot read task file" in one_line_error(load_jsonl, path)


# --- example ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, ["a"], {"a": 1}, True, False, 1.5, ""])
def test_id_that_is_not_a_string_or_integer_is_refused(tmp_path, bad):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({**ROWS[1], "id": bad}) + "\n")
    message = one_line_error(load_jsonl, path)
    assert message.startswith(f"{path}:2: 'id' must be a non-empty string or an integer, not {json.dumps(bad)}")


def test_null_id_through_the_cli(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({**ROWS[0], "id": None}) + "\n")
    assert f"{path}:1: 'id' must be" in cli_error(tmp_path, "--task", str(path), "--model", "random:tiny-rotary:1")


def test_integer_id_is_read_as_a_string(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({**ROWS[0], "id": 7}) + "\n" + json.dumps(ROWS[1]) + "\n")
    assert [e.id for e in load_jsonl(path)] == ["7", "q1"]


@pytest.mark.parametrize("task, prefix", [("boolq", "boolq"), ("hellaswag", "hellaswag"), ("medqa-en", "medqa_en")])
def test_ids_missing_from_the_data_are_real_and_stable(task, prefix):
    examples = load_task(task)
    ids = [e.id for e in examples]
    assert all(i == f"{prefix}-{e.metadata['doc_id']:06d}" for i, e in zip(ids, examples))
    assert not any("None" in i for i in ids) and len(set(ids)) == len(ids)
    calib, test = load_task(f"{task}@calib"), load_task(f"{task}@test")
    assert calib and test and sorted(e.id for e in calib + test) == sorted(ids)


@pytest.mark.parametrize("task, digest", [
    ("arc-easy", "088ba7086c5bad5b"), ("sciq", "cdcaf63295eb44b1"),
])
def test_other_tasks_keep_their_ids(task, digest):
    """String and integer native ids: unchanged by the new ids of id-less tasks (so are their halves)."""
    import hashlib

    ids = [e.id for e in load_task(task)]
    assert hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16] == digest


# --- task specs -------------------------------------------------------------------------------


def test_split_after_a_task_file_is_refused(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(TEXT)
    for spec in (f"{path}:test", f"{path}:test@calib", f"{path}:validation", f"{path}:"):
        message = one_line_error(load_task, spec)
        assert message.startswith(f"task file {path} has no splits: drop ':")
    assert len(load_task(f"{path}@calib")) + len(load_task(f"{path}@test")) == 4
    assert "has no splits" in cli_error(tmp_path, "--task", f"{path}:test", "--model", "random:tiny-rotary:1")


def test_split_after_a_missing_task_file_is_refused(tmp_path):
    assert "has no splits" in one_line_error(load_task, str(tmp_path / "absent.jsonl:test"))
    assert one_line_error(load_task, str(tmp_path / "absent.jsonl.gz")).startswith("task file not found")


# --- model specs ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ("random:tiny-rotary:-1", "bad random model spec 'random:tiny-rotary:-1'"),
    ("random:tiny-rotary:x", "bad random model spec"),
    ("random:tiny-rotary:1:2", "bad random model spec"),
    ("random:tiny-rotary:4294967296", "bad random model spec"),
    ("random:nope", "unknown random preset 'nope'"),
    ("random:", "unknown random preset ''"),
])
def test_malformed_random_specs(spec, message):
    from lensbench.models import load_model

    assert message in one_line_error(load_model, spec)


def test_negative_seed_through_the_cli_and_the_library(tmp_path, tokenizer):
    from lensbench.models import random_model

    assert "bad random model spec" in cli_error(tmp_path, "--task", "capitals", "--model", "random:tiny-rotary:-1")
    assert "seed -1 is out of range" in one_line_error(random_model, "tiny-rotary", -1, "cpu", None, tokenizer)


@pytest.mark.parametrize("preset", ["tiny-rotary", "tiny-learned"])
def test_n_ctx_reaches_random_models(preset):
    from lensbench.models import load_model

    model, _ = load_model(f"random:{preset}:3", n_ctx=512)
    assert model.cfg.n_ctx == 512
    model, _ = load_model(f"random:{preset}:3", n_ctx=3000)
    assert model.cfg.n_ctx == 3000


def test_n_ctx_keeps_the_weights_a_seed_gives(tokenizer):
    import torch

    from lensbench.models import random_model

    base = random_model("tiny-learned", 2, tokenizer=tokenizer)
    assert base.cfg.n_ctx == 2048
    for n_ctx in (100, 4096):
        other = dict(random_model("tiny-learned", 2, tokenizer=tokenizer, n_ctx=n_ctx).named_parameters())
        for name, param in base.named_parameters():
            if name == "pos_embed.W_pos":
                rows = min(n_ctx, 2048)
                assert other[name].shape[0] == n_ctx and torch.equal(other[name][:rows], param[:rows])
                assert 0.5 < float(other[name][rows:].std() / param.std()) < 2 if n_ctx > rows else True
            else:
                assert torch.equal(other[name], param), name


def test_n_ctx_through_the_cli(tmp_path):
    """The built-in prompts are longer than 8 tokens: refused only if --n-ctx reaches the model."""
    line = cli_error(tmp_path, "--task", "capitals", "--model", "random:tiny-rotary:1", "--n-ctx", "8")
    assert "longer than the model's context (8)" in line


# --- GGUF files -------------------------------------------------------------------------------


@pytest.fixture()
def gguf_cache(tmp_path, monkeypatch):
    """An empty model cache: nothing converted, so a GGUF spec reaches the conversion."""
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_junk_gguf_is_one_line(tmp_path, gguf_cache):
    from lensbench.models import load_model

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    message = one_line_error(load_model, str(junk))
    assert message == f"{junk} is not a valid GGUF file (it does not start with the GGUF magic bytes)"
    assert "not a valid GGUF file" in cli_error(tmp_path, "--task", "capitals", "--model", str(junk))


@pytest.mark.parametrize("keep", [1000, 4, 0.5])
def test_truncated_gguf_is_one_line(tmp_path, gguf_cache, keep):
    """The first 1000 bytes (inside the header), the magic bytes only, and half the file."""
    from lensbench.models import load_model, shipped_gguf_path

    real = shipped_gguf_path("smollm2-135m")
    data = real.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    message = one_line_error(load_model, str(cut))
    assert message.startswith(f"{cut} is not a valid, complete GGUF file (truncated or corrupt: ")
    if keep == 1000:
        assert "not a valid, complete GGUF file" in cli_error(tmp_path, "--task", "capitals", "--model", str(cut))
    assert not (gguf_cache / "models").exists() or not any((gguf_cache / "models").iterdir())


def test_whole_gguf_passes_the_check():
    from lensbench.convert import check_gguf
    from lensbench.models import shipped_gguf_path

    check_gguf(shipped_gguf_path("smollm2-135m"))


# --- shared model cache -----------------------------------------------------------------------


@pytest.fixture()
def umask_027():
    before = os.umask(0o027)
    yield
    os.umask(before)


def test_converted_cache_folders_follow_the_umask(tmp_path, monkeypatch, tokenizer, umask_027):
    """Not mkdtemp's 0700: a second user of a shared cache can read the converted model."""
    import stat

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lensbench import models

    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    models.load_model(str(folder), n_ctx=64)
    (target,) = (tmp_path / "cache" / "models").iterdir()
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    for path in target.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o750 if path.is_dir() else 0o640), path


def test_unwritable_hash_memo_is_not_an_error(tmp_path, monkeypatch):
    import hashlib

    from lensbench import models

    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "blob.bin"
    path.write_bytes(b"lensbench")

    def denied(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(models, "_atomic_write_text", denied)
    assert models._sha256(path) == hashlib.sha256(b"lensbench").hexdigest()
