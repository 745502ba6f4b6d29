"""The integrity of a run folder (docs/format.md): where a run may be written, what identifies
it, what `--overwrite` may remove, and which stored files can be trusted on resume.

- `check_out`: `--out` names a folder lensbench can create or write (before the model loads);
- `input_digests`, `identity`, `fingerprint`: what makes two runs the same run: the options that
  change results and the *contents* (sha256) of the task file and of each `--linear` lens, never
  their paths, so a copy or another spelling of a path is the same run and an edited file is not;
- `read_manifest`, `refusal`: a folder's run and, for a different one, a message naming what
  differs (old -> new);
- `remove_run`: `--overwrite`, which removes only the files a run writes, and only from a run;
- `sound_parts`, `outputs_problem`: parts and outputs that are readable and hold what they should.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from lensbench import store
from lensbench.errors import LensbenchError
from lensbench.lenses.linear import CONFIG_FILE, WEIGHTS_FILE
from lensbench.tasks import parse_spec

# What lensbench writes in a run folder (`eval`, `report`, `calibrate --json`, make_all's speed
# measurement; docs/format.md); `--overwrite` removes these only.
RUN_FILES = (store.MANIFEST, "examples.parquet", "predictions.parquet", "summary.json", "attention.safetensors",
             "report.json", "calibration.json", "simexit_speed.json")
PARTS = "parts"
_PART = re.compile(r"part-\d{6}(\.parquet|\.attn\.safetensors)")
_TEMPORARY = re.compile(r"\.(.+)\.\d+\.tmp")  # store's atomic writes: .NAME.PID.tmp
# Identity keys that need the model (its sha256, the tokenized examples); the rest is known before it loads.
MODEL_KEYS = ("model_sha256", "examples_sha256", "n_examples")


def _short(digest: str | None) -> str:
    return "none" if digest is None else digest[:12] + "…"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- where a run may go ---------------------------------------------------------------------------


def check_out(out: str) -> Path:
    """`--out` as a folder lensbench can write: not empty, not a file or under one, writable.

    Nothing is created (a probe folder is made and removed where the run folder would go).
    """
    if not str(out).strip():
        raise LensbenchError("--out is empty: name the run folder to write")
    path = Path(out)
    if os.path.lexists(path) and not path.is_dir():
        raise LensbenchError(f"--out {path} is a file, not a folder; choose another --out")
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise LensbenchError(f"--out {path} is under {existing}, which is a file; choose another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lensbench-probe-", dir=existing))
    except OSError as exc:
        raise LensbenchError(f"--out {path}: cannot write in {existing} ({exc.strerror}); choose another --out") from None
    return path


# --- what identifies a run ------------------------------------------------------------------------


def input_digests(task: str, linear: list[str]) -> dict:
    """The manifest's `inputs`: the task file's path and sha256 (None for a named task), and per
    `--linear` folder its path, sha256 (of config.json and lens.safetensors), kind and map cost."""
    name, _, _ = parse_spec(task)
    task_file = {"path": str(Path(name).resolve()), "sha256": file_sha256(Path(name))} if Path(name).is_file() else None
    lenses = []
    for folder in linear:
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise LensbenchError(f"--linear {folder} is not a fitted linear lens (expected {CONFIG_FILE} and {WEIGHTS_FILE}; "
                                 "see `lensbench fit-linear`)")
        digest = hashlib.sha256()
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            digest.update(file_sha256(folder / file).encode())
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except ValueError:
            raise LensbenchError(f"{folder / CONFIG_FILE} is not valid JSON") from None
        lenses.append({"path": str(folder.resolve()), "sha256": digest.hexdigest(), "kind": config.get("kind"),
                       "map_cost": config.get("map_cost")})
    return {"task": task_file, "linear": lenses}


def task_key(task: str, inputs: dict) -> str:
    """The task as the identity holds it: a named task's spec, or a file's sha256 (and its half)."""
    if inputs["task"] is None:
        return task
    _, _, part = parse_spec(task)
    return f"file:{inputs['task']['sha256']}" + (f"@{part}" if part else "")


def identity(options: dict, lens_names: list[str], inputs: dict) -> dict:
    """What identifies a run, less the model keys (`complete_identity` adds them).

    `options`: `EvalConfig.identity()`; its task spec and `--linear` paths are replaced by
    their contents' sha256, and the lens names (which a `--linear` folder's name can change)
    are added."""
    ident = dict(options)
    ident["task"] = task_key(options["task"], inputs)
    ident["linear"] = [lens["sha256"] for lens in inputs["linear"]]
    ident["lens_names"] = list(lens_names)
    return ident


def complete_identity(ident: dict, model_sha256: str | None, example_ids: list[str]) -> dict:
    examples = hashlib.sha256(json.dumps(example_ids).encode()).hexdigest()
    return dict(ident, model_sha256=model_sha256, examples_sha256=examples, n_examples=len(example_ids))


def fingerprint(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


# --- a folder's run, and why it is another ---------------------------------------------------------


def read_manifest(out: Path) -> dict | None:
    """The manifest of the run in `out`; None if `out` holds no manifest.json. An unreadable
    manifest, or one that is not lensbench's, is an error (never "a different run")."""
    path = out / store.MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not valid JSON"
        raise LensbenchError(f"{path} is unreadable ({reason}), so {out} cannot be resumed or replaced; "
                             "choose another --out") from None
    if not isinstance(data, dict) or "fingerprint" not in data or "format_version" not in data:
        raise LensbenchError(f"{out} is not a lensbench run (its {store.MANIFEST} is not lensbench's); choose another --out")
    return data


def _value(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old: dict, new: dict, old_inputs: dict, new_inputs: dict, keys=None) -> list[str]:
    """What differs between two identities, in words (old -> new); content changes first."""
    keys = [k for k in dict.fromkeys([*new, *old]) if keys is None or k in keys]
    changed, options = [], []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "task" and str(a).startswith("file:") and str(b).startswith("file:") \
                and str(a).partition("@")[2] == str(b).partition("@")[2]:
            path = Path((new_inputs.get("task") or {}).get("path", "?")).name
            changed.append(f"the task file {path} changed since this run started "
                           f"(sha256 {_short(str(a)[5:].partition('@')[0])} → {_short(str(b)[5:].partition('@')[0])})")
        elif key == "linear" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                if x != y:
                    path = new_inputs.get("linear", [{}] * len(b))[i].get("path", "?")
                    changed.append(f"the --linear lens {path} changed since this run started (sha256 {_short(x)} → {_short(y)})")
        elif key == "examples_sha256":
            if old.get("n_examples") == new.get("n_examples"):
                options.append("the example ids differ")
        elif key == "model_sha256":
            options.append(f"the model's sha256 {_short(a)} → {_short(b)}")
        else:
            options.append(f"{key}: {_value(a)} → {_value(b)}")
    return changed + options


def refusal(out: Path, old: dict, ident: dict, inputs: dict, overwrite_hint: bool = True, keys=None) -> str | None:
    """Why the run in `out` (manifest `old`) is not the run `ident`, or None if it is (as far
    as `keys` go: before the model loads, the model keys are left out)."""
    hint = "; choose another --out" + (" or pass --overwrite" if overwrite_hint else "")
    if old.get("format_version") != store.FORMAT_VERSION:
        return f"{out} holds a run of format version {old.get('format_version')} (this lensbench writes {store.FORMAT_VERSION}){hint}"
    if "identity" not in old:
        return f"{out} holds a run made by an earlier lensbench, which did not record what identifies it{hint}"
    diffs = differences(old["identity"], ident, old.get("inputs", {}), inputs, keys)
    if not diffs:
        return None
    if len(diffs) == 1 and diffs[0].startswith("the ") and "changed since" in diffs[0]:
        return f"{out}: {diffs[0]}{hint}"
    return f"{out} holds a different run ({'; '.join(diffs)}){hint}"


def not_a_run(out: Path, overwrite: bool) -> str:
    names = foreign_entries(out)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    lead = "--overwrite only replaces a lensbench run: " if overwrite else ""
    return f"{lead}{out} exists and is not a lensbench run (no {store.MANIFEST}; it holds {shown}); choose another --out"


# --- --overwrite ----------------------------------------------------------------------------------


def _ours(name: str, in_parts: bool) -> bool:
    temporary = _TEMPORARY.fullmatch(name)
    name = temporary.group(1) if temporary else name
    return bool(_PART.fullmatch(name)) if in_parts else name in RUN_FILES


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def foreign_entries(out: Path) -> list[str]:
    """The entries of `out` (relative names) that a run does not write."""
    found = []
    for entry in sorted(out.iterdir()):
        if entry.name == PARTS and entry.is_dir() and not entry.is_symlink():
            found += [f"{PARTS}/{sub.name}" for sub in sorted(entry.iterdir())
                      if not (_ours(sub.name, True) and _plain_file(sub))]
        elif not (_ours(entry.name, False) and _plain_file(entry)):
            found.append(entry.name)
    return found


def check_removable(out: Path) -> None:
    """Refuse to overwrite `out` unless everything in it is a run's own file."""
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise LensbenchError(f"--overwrite refused: {out} holds files that are not lensbench's ({shown}); "
                             "move them away or choose another --out")


def remove_run(out: Path) -> None:
    """Remove the files a run wrote in `out` (which must hold nothing else); `out` itself stays.

    The manifest goes last, so an interrupted removal leaves the old run with fewer files."""
    check_removable(out)
    parts = out / PARTS
    if parts.is_dir():
        for entry in parts.iterdir():
            entry.unlink()
        parts.rmdir()
    for entry in out.iterdir():
        if entry.name != store.MANIFEST:
            entry.unlink()
    (out / store.MANIFEST).unlink(missing_ok=True)


# --- parts and outputs ----------------------------------------------------------------------------


def tensors_readable(path: Path, keys: set[str]) -> bool:
    """Whether `path` is a safetensors file whose header reads and names `keys`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return keys <= set(f.keys())
    except Exception:  # noqa: BLE001 - missing, truncated, empty: unreadable
        return False


def sound_parts(parts_dir: Path, batches: list[list], lens_names: list[str], n_points: int, schema) -> tuple[set[int], list[str]]:
    """The batches whose part files are sound, and a note per broken part file, which is deleted
    (its batch is then computed again). A part is sound when it reads, has the predictions'
    schema, and holds exactly its batch's examples x lenses x points; when some batches stored
    attention sums, every sound batch must have a readable attention part."""
    done, notes = set(), []
    if not parts_dir.is_dir():
        return done, notes

    def broken(path: Path, why: str) -> None:
        notes.append(f"{path.name} {why}; computing its batch again")
        path.unlink(missing_ok=True)

    for path in sorted(parts_dir.glob("part-*.parquet")):
        try:
            i = int(path.stem.split("-")[1])
        except ValueError:
            continue
        if i >= len(batches):
            broken(path, f"is not a batch of this run's plan ({len(batches)} batches)")
            continue
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - truncated, empty or otherwise unreadable
            broken(path, f"is unreadable ({type(exc).__name__})")
            continue
        indices = {e.index for e in batches[i]}
        if not table.schema.equals(schema, check_metadata=False):
            broken(path, "has another schema")
        elif table.num_rows != len(batches[i]) * len(lens_names) * n_points:
            broken(path, f"has {table.num_rows} rows, not {len(batches[i]) * len(lens_names) * n_points}")
        elif set(table.column("example_index").to_pylist()) != indices or \
                set(table.column("lens").to_pylist()) != set(lens_names):
            broken(path, "holds other examples or lenses than its batch")
        else:
            done.add(i)
    attention = {}
    for path in sorted(parts_dir.glob("part-*.attn.safetensors")):
        i = int(path.name.split("-")[1].split(".")[0])
        if tensors_readable(path, {"sum", "count"}):
            attention[i] = path
        elif i in done:
            broken(path, "is unreadable")
            done.discard(i)
    if attention:
        for i in sorted(done - set(attention)):
            notes.append(f"part-{i:06d} has no attention sums; computing its batch again")
            done.discard(i)
    return done, notes


def outputs_problem(out: Path, manifest: dict) -> str | None:
    """What is missing or unreadable among a complete run's outputs; None when all are sound."""
    expected_rows = manifest.get("n_examples", 0) * len(manifest.get("lenses", [])) * len(manifest.get("readout_points", []))
    for name, rows in (("examples.parquet", manifest.get("n_examples")), ("predictions.parquet", expected_rows)):
        try:
            found = pq.read_metadata(out / name).num_rows
        except FileNotFoundError:
            return f"{name} is missing"
        except Exception as exc:  # noqa: BLE001
            return f"{name} is unreadable ({type(exc).__name__})"
        if found != rows:
            return f"{name} has {found} rows, not {rows}"
    try:
        summary = json.loads((out / "summary.json").read_text())
    except FileNotFoundError:
        return "summary.json is missing"
    except (OSError, ValueError):
        return "summary.json is unreadable"
    if not isinstance(summary, dict) or "lenses" not in summary:
        return "summary.json is unreadable"
    if "attention_a_to_s" in summary and not tensors_readable(out / "attention.safetensors", {"mean", "points"}):
        return "attention.safetensors is missing or unreadable"
    return None
