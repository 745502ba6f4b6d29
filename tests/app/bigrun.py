"""Run folders for the app tests: copies of a real run, and a large run for the responsiveness check, made by replicating a real run's rows.

The rows of a real (small) run are tiled until there are `n_examples` examples, each copy with
fresh example indices and ids; the summary is recomputed with `lensbench.metrics.summarize`, as
the runner does. The files follow the run folder format of `lensbench.store`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lensbench import metrics, store

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "app" / "main.py"
ARTIFACTS = REPO / "test-artifacts" / "app"


def copy_run(source: Path, target: Path) -> Path:
    """A copy of a finished run folder (without its resume parts)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("parts"))
    manifest = json.loads((target / store.MANIFEST).read_text())
    manifest["config"]["out"] = str(target)
    (target / store.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return target


def scale_up(source: Path, out: Path, n_examples: int = 3000) -> Path:
    """Write a complete run of `n_examples` examples to `out` by tiling the run at `source`."""
    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predictions = pq.read_table(source / "predictions.parquet")
    examples = pq.read_table(source / "examples.parquet")
    n_source = examples.num_rows
    copies = -(-n_examples // n_source)

    def tile(table: pa.Table, index_columns: list[str], id_column: str) -> pa.Table:
        pieces = []
        for copy in range(copies):
            piece = table
            for name in index_columns:
                col = piece[name].to_numpy()
                shifted = np.where(col >= 0, col + copy * n_source, col).astype(col.dtype)
                piece = piece.set_column(piece.schema.get_field_index(name), name, pa.array(shifted, piece.schema.field(name).type))
            ids = [f"{x}~{copy}" if copy else x for x in piece[id_column].to_pylist()]
            piece = piece.set_column(piece.schema.get_field_index(id_column), id_column, pa.array(ids, pa.string()))
            pieces.append(piece)
        table = pa.concat_tables(pieces)
        keep = np.asarray(table["example_index"].to_numpy() < n_examples)
        return table.filter(pa.array(keep))

    big_predictions = tile(predictions, ["example_index", "donor_index"], "example_id")
    big_examples = tile(examples, ["example_index"], "example_id")
    store.atomic_write_table(out / "predictions.parquet", big_predictions)
    store.atomic_write_table(out / "examples.parquet", big_examples)
    if (source / "attention.safetensors").exists():
        shutil.copy(source / "attention.safetensors", out / "attention.safetensors")
    summary_source = json.loads((source / "summary.json").read_text())
    extra = {k: v for k, v in summary_source.items() if k in ("skipped", "attention_a_to_s")}
    store.atomic_write_json(out / "summary.json", metrics.summarize(big_predictions.to_pandas(), extra))
    manifest = json.loads((source / store.MANIFEST).read_text())
    manifest.update(n_examples=n_examples, note=f"{n_source} real examples tiled to {n_examples} for a responsiveness test")
    manifest["config"] = dict(manifest.get("config", {}), out=str(out))
    store.atomic_write_json(out / store.MANIFEST, manifest)
    return out
