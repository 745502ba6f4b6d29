"""The ICL page under AppTest, on ICL runs the real runner wrote (tiny random model): the
curves it draws are the run's summary, and the prompt view follows the chosen query."""

from __future__ import annotations

import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from bigrun import APP
from lensbench.icl.runner import ICLConfig, run_icl
from lensbench.store import open_run

TIMEOUT = 120


@pytest.fixture(scope="module")
def icl_runs(tmp_path_factory, tiny_rotary):
    root = tmp_path_factory.mktemp("icl-app")
    for task in ("antonyms", "animal-fruit"):
        cfg = ICLConfig(out=str(root / f"icl-{task}"), model="random:tiny-rotary:1", task=task, shots=4, queries=4,
                        donors=3, batch_size=4)
        run_icl(cfg, model=tiny_rotary, progress=False)
    return root


def values(v):
    import base64

    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).tolist()
    return v


def figures(at):
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def make_app(root, monkeypatch, page="icl"):
    monkeypatch.setenv("LENSBENCH_RUNS", str(root))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_icl_page_shows_each_task_and_one_prompt(icl_runs, monkeypatch):
    at = make_app(icl_runs, monkeypatch)
    assert at.title[0].value == "In-context learning"
    grid = figures(at)[0]
    summary = open_run(icl_runs / "icl-animal-fruit").summary()
    local = [t for t in grid["data"] if t.get("name", "").startswith("local patch") and t.get("xaxis") in ("x", None)]
    titles = [a["text"] for a in grid["layout"]["annotations"] if "(" in a["text"]]
    assert any("animal-fruit" in t for t in titles) and any("antonyms" in t for t in titles)
    first = titles[0].split("<br>")[0]
    expected = open_run(icl_runs / first).summary()["accuracy"]["local/output"]["accuracy"]
    assert np.allclose(values(local[0]["y"]), expected)
    assert len(figures(at)) == 5  # grid, convergence, attention, decode, one prompt
    markdown = [m.value for m in at.markdown]
    queries = open_run(icl_runs / "icl-animal-fruit").path / "queries.parquet"
    assert any("**Query**" in m for m in markdown) and any("(position " in m for m in markdown)
    before = figures(at)[-1]
    options = at.selectbox(key="icl-query").options
    at.selectbox(key="icl-query").set_value(int(options[1].split(":")[0])).run()
    assert not at.exception
    assert figures(at)[-1]["data"][0]["text"] != before["data"][0]["text"] or figures(at)[-1]["data"][0]["y"] != before["data"][0]["y"]
    assert summary["task"] == "animal-fruit" and queries.exists()


def test_eval_pages_point_to_the_icl_page(icl_runs, monkeypatch):
    at = make_app(icl_runs, monkeypatch, page="runs")
    assert any("is a `lensbench icl` run" in i.value for i in at.info)
