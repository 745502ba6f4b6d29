"""Every page of the app under `streamlit.testing.v1.AppTest`, on runs the real runner wrote.

The content checks compare what a page shows with what the library computes from the same
run, and check that the page changes when a widget changes.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from bigrun import APP, copy_run
from lensbench import compute, exits, metrics
from lensbench.store import open_run

TIMEOUT = 120


def make_app(runs: Path, monkeypatch, page: str | None = None, run: str | None = None) -> AppTest:
    monkeypatch.setenv("LENSBENCH_RUNS", str(runs))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if run is not None:
        at.session_state["run"] = str(runs / run)
    at.run()
    if page is not None:
        at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def values(v):
    """A plotly JSON array (a list, or a typed array `{"dtype", "bdata"}`) as a list."""
    if isinstance(v, dict) and "bdata" in v:
        array = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        if "shape" in v:
            shape = v["shape"]
            array = array.reshape([int(s) for s in shape.split(",")] if isinstance(shape, str) else shape)
        return array.tolist()
    if isinstance(v, list):
        return [values(x) for x in v]
    return v


def figures(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def traces(figure: dict, kind: str | None = None) -> list[dict]:
    return [t for t in figure["data"] if kind is None or t.get("type") == kind]


def texts(at: AppTest, kind: str) -> list[str]:
    return [el.value for el in getattr(at, kind)]


def footer(at: AppTest) -> str:
    return [c for c in texts(at, "caption") if "rendered in" in c][-1]


@pytest.fixture(scope="module")
def small(app_runs):
    return open_run(app_runs / "small")


# --- Runs --------------------------------------------------------------------------------------


def test_runs_page_shows_the_library_numbers(app_runs, small, monkeypatch):
    at = make_app(app_runs, monkeypatch)
    assert at.title[0].value == "Runs"
    assert footer(at).startswith("Runs rendered in")
    summary = small.summary()
    per_layer, iso = figures(at)[:2]
    shown = {t["name"]: values(t["y"]) for t in traces(per_layer) if t.get("xaxis", "x") == "x"}
    assert np.allclose(shown["SimLens"], summary["lenses"]["simlens"]["accuracy"])
    assert np.allclose(shown["logit lens"], summary["lenses"]["logit"]["accuracy"])
    gain = compute.iso_compute_gain(small, "simlens", "logit")["gain"]
    assert any(f"{gain * 100:+.1f} points" in m for m in texts(at, "markdown"))
    curve = compute.iso_compute_curve(small, "simlens")
    iso_simlens = next(t for t in traces(iso) if t["name"] == "SimLens")
    assert np.allclose(values(iso_simlens["y"]), curve["accuracy"], equal_nan=True)
    assert at.json[0].value and json.loads(at.json[0].value)["status"] == "complete"

    at.multiselect(key="runs-compare").set_value([str(app_runs / "small"), str(app_runs / "small-b")]).run()
    assert not at.exception
    names = {t["name"] for t in traces(figures(at)[0])}
    assert {"small · simlens", "small-b · simlens"} <= names
    assert len(figures(at)) == 3  # per-layer curves and one Iso-Compute figure per run


# --- Trajectories ---------------------------------------------------------------------------------


def test_trajectories_page_switches_examples(app_runs, small, monkeypatch):
    at = make_app(app_runs, monkeypatch, "trajectories")
    examples = small.examples()
    first = examples.iloc[0]
    assert any(m.startswith(f"**{first['example_id']}** — gold") for m in texts(at, "markdown"))
    assert any("[s]" in m and "[a]" in m for m in texts(at, "markdown"))  # the marked prompt
    heat = figures(at)[0]
    heatmaps = traces(heat, "heatmap")
    lenses = small.manifest["lenses"]
    assert len(heatmaps) == len(lenses)
    predictions = small.predictions(columns=["example_index", "lens", "layer", "candidate_logprobs"], lenses=["simlens"])
    expected = np.exp(np.stack(predictions[predictions["example_index"] == first["example_index"]]
                               .sort_values("layer")["candidate_logprobs"].to_list()))
    assert np.allclose(values(heatmaps[lenses.index("simlens")]["z"]), expected, atol=1e-5)
    assert at.dataframe  # the top-k table

    other = examples.iloc[2]["example_id"]
    at.selectbox(key="traj-example").set_value(other).run()
    assert not at.exception
    assert any(m.startswith(f"**{other}** — gold") for m in texts(at, "markdown"))
    assert values(traces(figures(at)[0], "heatmap")[0]["z"]) != values(heatmaps[0]["z"])
    assert at.query_params["example"] == [other] or at.query_params["example"] == other


def test_trajectories_filters(app_runs, small, monkeypatch):
    at = make_app(app_runs, monkeypatch, "trajectories")
    n = small.summary()["n_examples"]
    assert f"{n} of {n} examples match" in texts(at, "caption")
    light = small.predictions(columns=["example_index", "lens", "layer", "decision", "final_decision", "gold"])
    settle = metrics.settle_layer(light, "simlens")
    lo = int(settle.median())
    at.slider(key="traj-settle").set_value((lo, 30)).run()
    assert f"{int(settle.between(lo, 30).sum())} of {n} examples match" in texts(at, "caption")

    at.slider(key="traj-settle").set_value((0, 30)).run()
    finals = light[light["layer"] == light["layer"].max()].drop_duplicates("example_index")
    n_wrong = int((finals["final_decision"] != finals["gold"]).sum())
    at.radio(key="traj-outcome").set_value("wrong").run()
    assert not at.exception
    if n_wrong:
        assert f"{n_wrong} of {n} examples match" in texts(at, "caption")
    else:
        assert any("No example matches" in w for w in texts(at, "warning"))
    at.radio(key="traj-outcome").set_value("all").run()

    at.checkbox(key="traj-dis-only").check().run()
    pair = light[light["lens"].isin(["logit", "simlens"])].pivot_table(
        index=["example_index", "layer"], columns="lens", values="decision")
    n_disagree = int(((pair["logit"] != pair["simlens"]).groupby(level=0).sum() > 0).sum())
    assert f"{n_disagree} of {n} examples match" in texts(at, "caption")
    at.checkbox(key="traj-dis-only").uncheck().run()

    at.text_input(key="traj-search").input("no-such-example").run()
    assert not at.exception
    assert any("No example matches" in w and "no-such-example" in w for w in texts(at, "warning"))
    at.text_input(key="traj-search").input("capital-germany").run()
    assert "1 of" in " ".join(texts(at, "caption"))


def test_trajectories_absent_example_id(app_runs, monkeypatch):
    monkeypatch.setenv("LENSBENCH_RUNS", str(app_runs))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    at.switch_page("app_pages/trajectories.py")
    at.query_params["example"] = "capital-atlantis"
    at.run()
    assert not at.exception
    assert any("no example with id 'capital-atlantis'" in w for w in texts(at, "warning"))
    assert figures(at)  # it still shows an example


# --- Roles ------------------------------------------------------------------------------------------


def test_roles_page(app_runs, small, monkeypatch):
    at = make_app(app_runs, monkeypatch, "roles")
    summary = small.summary()
    ablation, swap, attention_all, attention_point = figures(at)
    shown = {t["legendgroup"]: values(t["y"]) for t in traces(ablation)}
    assert np.allclose(shown["simlens[drop-s]"], summary["lenses"]["simlens[drop-s]"]["accuracy"])
    follow = next(t for t in traces(swap) if t["name"].endswith("follows donor"))
    expected = [np.nan if v is None else v for v in summary["swap"]["simlens[a=swap]"]["follow_donor"]]
    assert np.allclose(np.array(values(follow["y"]), dtype=float), expected, equal_nan=True)
    mean, points = small.attention()
    point = at.select_slider(key="roles-att-point").value
    z = np.array(values(traces(attention_point, "heatmap")[0]["z"]), dtype=float)
    assert np.allclose(z, mean[points.tolist().index(point)].numpy(), equal_nan=True)

    at.select_slider(key="roles-att-point").set_value(point + 2).run()
    assert not at.exception
    assert figures(at)[3]["layout"]["title"]["text"] != attention_point["layout"]["title"]["text"]
    at.radio(key="roles-metric").set_value("fidelity").run()
    shown = {t["legendgroup"]: values(t["y"]) for t in traces(figures(at)[0])}
    assert np.allclose(shown["simlens[drop-a]"], summary["lenses"]["simlens[drop-a]"]["fidelity"])


# --- Exits --------------------------------------------------------------------------------------------


def metric_values(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_exits_page_threshold(app_runs, small, monkeypatch):
    at = make_app(app_runs, monkeypatch, "exits")
    assert at.selectbox(key="exits-policy").value == "logit"
    predictions, examples = small.predictions(), small.examples()
    curve = exits.operating_curve(predictions, examples, "logit")
    summary = small.summary()
    slider = at.select_slider[0]
    assert slider.label.startswith("Threshold")
    assert len(slider.options) == len(curve)  # one step per operating point of the sweep
    first_shown = metric_values(at)

    assert float(slider.options[0]) == 0.0
    slider.set_value(slider.options[0]).run()  # nothing is below 0: no example exits early
    shown = metric_values(at)
    assert shown["accuracy"] == f"{summary['final_accuracy']:.3f}"
    assert shown["mean exit layer"] == f"{summary['final_layer']:.1f}" and shown["exit rate"] == "0.00"
    hist = traces(figures(at)[1], "bar")[0]
    assert values(hist["y"])[-1] == summary["n_examples"]
    assert shown != first_shown

    top = float(curve["threshold"].max())
    at.select_slider[0].set_value(at.select_slider[0].options[-1]).run()
    assert not at.exception
    sim = exits.simulate_exits(predictions, examples, "logit", top)
    shown = metric_values(at)
    assert shown["accuracy"] == f"{sim['correct'].mean():.3f}"
    assert shown["mean exit layer"] == f"{sim['exit_layer'].mean():.1f}"
    counts = np.bincount(sim["exit_layer"], minlength=summary["final_layer"] + 1)
    assert values(traces(figures(at)[1], "bar")[0]["y"]) == counts.tolist()
    tradeoff = figures(at)[0]
    star = [t for t in traces(tradeoff) if t.get("marker", {}).get("symbol") == "star"][0]
    row = curve.iloc[-1]
    assert values(star["x"])[0] == pytest.approx(row["layer_token_speedup"])
    assert values(star["y"])[0] == pytest.approx(row["accuracy"])
    trace_fig = figures(at)[2]
    assert any(shape.get("y0") == pytest.approx(top) for shape in trace_fig["layout"]["shapes"])  # threshold line


def test_exits_policies(app_runs, monkeypatch):
    at = make_app(app_runs, monkeypatch, "exits")
    at.selectbox(key="exits-policy").set_value("linear-simlens").run()
    assert not at.exception
    assert any("linear-simlens" in w and "lacks" in w for w in texts(at, "warning"))
    assert not figures(at)
    at.selectbox(key="exits-policy").set_value("oracle").run()
    assert not at.exception
    assert any("no threshold" in i for i in texts(at, "info"))
    assert len(figures(at)) == 2 and not at.select_slider  # the oracle's point and its exit layers
    at.selectbox(key="exits-policy").set_value("simlens").run()
    assert not at.exception and len(figures(at)) == 3


# --- Live probe -----------------------------------------------------------------------------------------


def test_live_probe(app_runs, embedded, monkeypatch):
    import lensbench.models

    loads = []

    def load_model(*args, **kwargs):  # the session's model: the probe loads it once
        loads.append(args)
        return embedded

    monkeypatch.setattr(lensbench.models, "load_model", load_model)
    at = make_app(app_runs, monkeypatch, "live")
    assert any("Run the probe" in i for i in texts(at, "info"))
    at.button[0].click().run(timeout=300)
    assert not at.exception, [e.value for e in at.exception]
    heatmaps = traces(figures(at)[0], "heatmap")
    assert len(heatmaps) == 4  # logit, SimLens, drop-[s], drop-[a]
    answer = next(m for m in texts(at, "markdown") if m.startswith("Model's answer"))
    assert "' Paris'" in answer  # the embedded model knows the capital of France
    z_before = values(heatmaps[1]["z"])

    at.text_area(key="live-prompt").input("Q: What is the capital of Italy?\nA:")
    at.text_area(key="live-candidates").input(" Rome\n Paris")
    at.multiselect(key="live-ablations").set_value([])
    at.button[0].click().run(timeout=300)
    assert not at.exception
    assert len(traces(figures(at)[0], "heatmap")) == 2
    assert values(traces(figures(at)[0], "heatmap")[1]["z"]) != z_before

    at.text_area(key="live-candidates").input(" Rome\n Buenos Aires")  # not one token
    at.button[0].click().run(timeout=300)
    assert not at.exception
    assert any("not one" in e for e in texts(at, "error"))
    assert len(loads) <= 1


# --- Empty and broken states ----------------------------------------------------------------------------------

PAGES = ["runs", "trajectories", "roles", "exits"]


@pytest.mark.parametrize("page", PAGES)
def test_no_runs_folder(tmp_path, monkeypatch, page):
    at = make_app(tmp_path / "absent", monkeypatch, page)
    assert any("There is no runs folder" in w for w in texts(at, "warning"))
    assert footer(at)


def test_run_in_progress_and_older_format(app_runs, monkeypatch):
    at = make_app(app_runs, monkeypatch, "trajectories", run="zz-running")
    assert any("still in progress" in i for i in texts(at, "info"))
    assert not figures(at)
    old = [c for c in texts(at, "caption") if "format version 0" in c]
    assert old, texts(at, "caption")  # the unreadable run is listed in the sidebar with its reason


def test_only_unreadable_runs(tmp_path, app_runs, monkeypatch):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text((app_runs / "zz-old" / "manifest.json").read_text())
    for page in PAGES:
        at = make_app(tmp_path, monkeypatch, page)
        assert any("no readable run" in w for w in texts(at, "warning"))
        assert any("format version 0" in m for m in texts(at, "markdown"))


def test_broken_complete_run(tmp_path, app_runs, monkeypatch):
    """A run that says it is complete but lost its results: a message, not a traceback."""
    broken = copy_run(app_runs / "small", tmp_path / "broken")
    (broken / "summary.json").unlink()
    (broken / "predictions.parquet").unlink()
    for page in PAGES:
        at = make_app(tmp_path, monkeypatch, page)
        assert any("no summary.json" in e for e in texts(at, "error")), texts(at, "error")
