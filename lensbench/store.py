"""Run folders: what `lensbench eval` writes and everything else reads.

```
RUN/
  manifest.json        model, task, options, versions, times, status (running|complete|interrupted|failed)
  examples.parquet     one row per example: index, id, prompt, choices, gold, tokens, start/answer tokens
  predictions.parquet  one row per (example, lens, readout point)   [complete runs]
  summary.json         per-lens, per-layer accuracy and fidelity; role analyses   [complete runs]
  attention.safetensors  mean attention [a] -> [s] per (point, block, head)   [with SimLens]
  parts/               one file per finished batch while the run is in progress (resume)
```

Every file is written atomically (temporary file, then rename), so an interruption never
leaves a half-written file, and a finished batch is never lost.
"""

from __future__ import annotations

import json
import math
import platform
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lensbench.errors import LensbenchError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _atomic_write(path: Path, write) -> None:
    """`write(file)` into a temporary file beside `path`, flushed and fsynced, then renamed
    onto `path`: `path` is the old file or the whole new one, never a part (also after a crash).
    An interrupted or failed write leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def _json_safe(value):
    """Strict JSON values: NaN and infinities become null (numpy scalars become Python's)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy or torch scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write_json(path: Path, obj) -> None:
    """Strict JSON (no NaN or Infinity tokens, which other readers reject): non-finite floats
    are written as null, so readers take null for "not defined"."""
    text = json.dumps(_json_safe(obj), indent=2, sort_keys=False, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    _atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))


def atomic_write_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class Run:
    """A run folder, read through the library (the app and the analyses use this)."""

    path: Path
    manifest: dict

    @property
    def status(self) -> str:
        return self.manifest.get("status", "unknown")

    @property
    def name(self) -> str:
        return self.path.name

    def summary(self) -> dict:
        path = self.path / "summary.json"
        if not path.exists():
            raise LensbenchError(f"run {self.path} has no summary.json (status: {self.status})")
        return json.loads(path.read_text())

    def predictions(self, columns: list[str] | None = None, lenses: list[str] | None = None):
        """The predictions table as a pandas DataFrame (optionally some columns or lenses)."""
        path = self.path / "predictions.parquet"
        if not path.exists():
            raise LensbenchError(f"run {self.path} has no predictions.parquet (status: {self.status})")
        filters = [("lens", "in", lenses)] if lenses else None
        return pq.read_table(path, columns=columns, filters=filters).to_pandas()

    def examples(self):
        return pq.read_table(self.path / "examples.parquet").to_pandas()

    def attention(self):
        """`(mean, points)`: mean attention [a]->[s] of shape (point, block, head), or None."""
        path = self.path / "attention.safetensors"
        if not path.exists():
            return None
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return tensors["mean"], tensors["points"]

    def report(self) -> dict | None:
        path = self.path / "report.json"
        return json.loads(path.read_text()) if path.exists() else None


def open_run(path: str | Path) -> Run:
    """Open a run folder; a folder that is not a run, or of a newer format, is a clear error."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise LensbenchError(f"{path} is not a lensbench run (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise LensbenchError(f"{manifest_path} is not valid JSON") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise LensbenchError(
            f"run {path} has format version {version}; this lensbench reads version {FORMAT_VERSION} (re-run it)"
        )
    return Run(path, manifest)


def as_run(run) -> Run:
    """A `Run` from a run folder or a `Run`."""
    return run if isinstance(run, Run) else open_run(run)


def list_runs(root: str | Path) -> list[Run | tuple[Path, str]]:
    """Runs under `root` (recursively, one level of nesting); unreadable ones as (path, error)."""
    root = Path(root)
    found = []
    if not root.is_dir():
        return found
    for manifest in sorted(root.glob("*/" + MANIFEST)) + sorted(root.glob("*/*/" + MANIFEST)):
        try:
            found.append(open_run(manifest.parent))
        except LensbenchError as exc:
            found.append((manifest.parent, str(exc)))
    return found


def versions() -> dict:
    """The versions that decide a run's numbers: lensbench, TransformerLens, torch, Python, and
    the packages a checkpoint is converted with (transformers, gguf, numpy; the last bits of a
    converted model's weights can depend on them). A package that is not installed is left out."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import lensbench

    found = {
        "lensbench": lensbench.__version__,
        "transformer_lens": version("transformer-lens"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for package in ("transformers", "gguf", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found
