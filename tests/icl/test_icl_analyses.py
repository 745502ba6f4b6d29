"""analyses/icl.py draws ICL runs; the eval figure scripts leave them alone."""

from __future__ import annotations

import pytest

from analyses import common
from analyses import icl as icl_analysis
from lensbench.icl.runner import ICLConfig, run_icl


@pytest.fixture(scope="module")
def icl_root(tmp_path_factory, tiny_rotary):
    root = tmp_path_factory.mktemp("icl-analyses")
    for task in ("plurals", "sentiment"):
        run_icl(ICLConfig(out=str(root / task), model="random:tiny-rotary:1", task=task, shots=4, queries=4, donors=3),
                model=tiny_rotary, progress=False)
    return root


def test_icl_figures_and_table(icl_root, tmp_path):
    written = icl_analysis.main([str(icl_root), "--out", str(tmp_path), "--formats", "html"])
    names = {p.name for p in written}
    assert "icl_accuracy_tiny-rotary-1.html" in names or any(n.startswith("icl_accuracy_") for n in names)
    assert sum(n.startswith("icl_convergence_") for n in names) == 2
    table = next(p for p in written if p.suffix == ".md").read_text()
    assert "plurals" in table and "sentiment" in table and "rule" in table and "categorization" in table


def test_eval_scripts_skip_icl_runs(icl_root):
    assert common.collect_runs([icl_root]) == []
    assert len(common.collect_runs([icl_root], kind="icl")) == 2
