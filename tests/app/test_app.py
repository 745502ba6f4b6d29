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
    runs_shown = {t.get("meta") for t in traces(figures(at)[0]) if t.get("meta")}
    assert runs_shown == {"small", "small-b"}
    assert len(figures(at)) == 3  # per-layer curves and one Iso-Compute figure per run


def test_runs_page_follows_the_sidebar_run(app_runs, monkeypatch):
    """Defect 2: after the first load, choosing another run in the sidebar changes the runs compared."""
    at = make_app(app_runs, monkeypatch)
    assert at.multiselect(key="runs-compare").value == [str(app_runs / "small")]
    at.selectbox(key="run").set_value(str(app_runs / "small-b")).run()
    assert not at.exception
    assert at.multiselect(key="runs-compare").value == [str(app_runs / "small-b")]
    assert {t.get("meta") for t in traces(figures(at)[0])} == {"small-b"}
    assert any("small-b" in c for c in texts(at, "caption"))  # the whole run name under the sidebar's selectbox


def test_runs_page_visual_grammar(stored_runs, monkeypatch):
    """Defect 4: three runs of 24, 28 and 30 layers: one colour per lens, the logit lens grey dashed,
    one legend entry per lens, relative depth by default, a chance line, lenses as pills."""
    at = make_app(stored_runs, monkeypatch, run="arc-easy-0.5b")
    three = [str(stored_runs / n) for n in ("arc-easy-0.5b", "arc-easy-1.5b", "small")]
    at.multiselect(key="runs-compare").set_value(three).run()
    assert not at.exception
    pills = at.button_group(key="runs-lenses")
    lenses = ["logit", "simlens", "linear-simlens", "tuned", "simlens[drop-s]", "simlens[drop-a]"]
    pills.set_value(lenses).run()
    assert at.radio(key="runs-axis").value == "relative"
    fig = figures(at)[0]
    lines = [t for t in traces(fig) if t.get("meta")]
    assert len({t["meta"] for t in lines}) == 3
    assert len({t["line"]["color"] for t in lines}) == 6  # one colour per lens, not per (run, lens)
    logit = [t for t in lines if t["legendgroup"] == "logit"]
    assert logit and all(t["line"]["color"] == "#7f7f7f" and t["line"]["dash"] == "dash" for t in logit)
    assert sum(1 for t in traces(fig) if t.get("showlegend", True) and t.get("name")) == 6  # legend: the lenses
    assert max(max(values(t["x"])) for t in lines) == pytest.approx(1.0)  # layer / number of layers
    assert not any(t["name"].startswith("simlens[") for t in lines)  # friendly names
    chance = [a for a in fig["layout"]["annotations"] if a.get("text", "").startswith("chance")]
    assert chance


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


def test_trajectories_finding_the_question(stored_runs, monkeypatch):
    """Defect 5: the query is shown apart from the demonstrations and search matches it alone;
    BoolQ examples are named by document; layers run the same way in the heatmaps and the table."""
    at = make_app(stored_runs, monkeypatch, "trajectories", run="arc-easy-0.5b")
    examples = open_run(stored_runs / "arc-easy-0.5b").examples()
    first = examples.iloc[0]
    query = first["prompt"].rstrip("\n").rsplit("\n\n", 1)[-1]
    shown = next(m for m in texts(at, "markdown") if 'class="lb-query"' in m)
    assert query.split("\n")[0][:40] in shown and "Answer: B" not in shown  # no demonstration in the query box
    at.text_input(key="traj-search").input("Lichens").run()
    own = int(examples["prompt"].map(lambda p: "lichens" in p.rstrip("\n").rsplit("\n\n", 1)[-1].lower()).sum())
    assert f"{own} of {len(examples)} examples match" in texts(at, "caption")
    assert own < len(examples)
    at.checkbox(key="traj-search-all").check().run()
    assert f"{len(examples)} of {len(examples)} examples match" in texts(at, "caption")  # every prompt's demos

    at = make_app(stored_runs, monkeypatch, "trajectories", run="boolq-0.5b")
    assert any(m.startswith("**doc 0** — gold") for m in texts(at, "markdown"))
    heat = figures(at)[0]
    table = at.dataframe[0].value
    assert int(table.index[0]) == max(values(traces(heat, "heatmap")[0]["y"]))  # the final layer first, at the top
    axis = [v for k, v in heat["layout"].items() if k.startswith("yaxis")][0]
    assert axis.get("autorange") != "reversed"
    hover = traces(heat, "heatmap")[0]["customdata"]
    assert "vocabulary" in json.dumps(hover)  # the absolute view next to the renormalised one
    assert heat["layout"]["coloraxis"]["colorbar"]["title"]["text"].startswith("share among")


def test_trajectories_position_grid_and_pin(app_runs, embedded, monkeypatch):
    """The prediction trajectory over all positions for a run of the embedded model, and a pinned token."""
    import lensbench.models

    monkeypatch.setattr(lensbench.models, "load_model", lambda *a, **k: embedded)
    at = make_app(app_runs, monkeypatch, "trajectories")
    assert any(f.get("layout", {}).get("title", {}).get("text", "").startswith("p(") or
               "over the whole vocabulary" in json.dumps(f["layout"]) for f in figures(at))  # the pinned token
    pin = at.text_input(key="traj-pin").value
    stored = {t["legendgroup"]: values(t["y"]) for t in traces(figures(at)[1]) if t.get("xaxis", "x") == "x"}
    at.checkbox(key="traj-pin-exact").check().run(timeout=300)  # exact, with the model
    assert not at.exception, [e.value for e in at.exception]
    exact = {t["legendgroup"]: values(t["y"]) for t in traces(figures(at)[1]) if t.get("xaxis", "x") == "x"}
    assert "simlens[a=swap]" not in exact and {"logit", "simlens", "simlens[drop-s]"} <= set(exact)
    for lens, probs in stored.items():  # where the stored top-k knew it, the exact value agrees
        for known, value in zip(probs, exact.get(lens, probs)):
            if known is not None:
                assert value == pytest.approx(known, abs=2e-4), (pin, lens)
    at.toggle(key="traj-grid-on").set_value(True).run(timeout=300)
    assert not at.exception, [e.value for e in at.exception]
    grid = figures(at)[-1]
    heat = traces(grid, "heatmap")[0]
    z = np.array(values(heat["z"]), dtype=float)
    assert z.shape[0] == 31 and z.shape[1] >= 5  # readout layers x input positions
    assert len(heat["text"]) == 31 and heat["text"][-1][-1].strip()  # a top-1 token in every cell
    at.selectbox(key="traj-grid-lens").set_value("simlens").run(timeout=300)
    assert not at.exception
    top_final = figures(at)[-1]["data"][0]["text"][-1]
    assert top_final == heat["text"][-1]  # every lens is the model's own output at the final layer


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
    counts = next(t for t in traces(swap, "bar"))  # the informative pairs behind each rate
    assert values(counts["y"]) == summary["swap"]["simlens[a=swap]"]["n_informative"]
    assert not [t for t in traces(ablation) if t["name"].startswith("simlens[")]  # friendly names only
    point = at.session_state["roles-att-point"]  # the chosen readout layer: blocks below it do not run
    assert "not run" in attention_point["layout"]["title"]["text"] or point == 0
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
    assert at.selectbox(key="exits-policy").value == "simlens"  # no Linear SimLens in this run
    at.selectbox(key="exits-policy").set_value("logit").run()
    predictions, examples = small.predictions(), small.examples()
    curve = exits.operating_curve(predictions, examples, "logit")
    summary = small.summary()
    slider = at.select_slider[0]
    assert slider.label.startswith("Threshold")
    prepared = exits.prepare_exits(predictions, examples, "logit")
    outcomes = {tuple(exits.exit_layers(prepared, float(t))) for t in curve["threshold"]}
    assert len(slider.options) == len(outcomes)  # one step per distinct operating point of the sweep
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
    line = next(t for t in traces(trace_fig) if t.get("name", "").startswith("threshold"))  # in the legend, not over the exits
    assert values(line["y"])[0] == pytest.approx(float(at.select_slider[0].value), rel=1e-3)  # a threshold of the last step
    assert not [a for a in trace_fig["layout"].get("annotations", []) if "threshold" in a.get("text", "")]


def test_exits_opens_on_simexit_at_the_calibrated_point(stored_runs, monkeypatch):
    """Defect 1: a run with Linear SimLens and a stored calibration opens on SimExit at its calibrated
    threshold (the numbers `lensbench calibrate` reported on this test run), with every policy's
    curve in one plot and each policy's point marked."""
    run = stored_runs / "arc-easy-0.5b"
    at = make_app(stored_runs, monkeypatch, "exits", run="arc-easy-0.5b")
    assert at.selectbox(key="exits-policy").value == "linear-simlens"
    calibration = json.loads((run / "calibration.json").read_text())
    first = next(c for c in calibration if c["policy"] == "linear-simlens" and c["answer_lens"] == "simlens")
    assert at.selectbox(key="exits-start-linear-simlens-simlens-0").value == f"calibrated: {first['target']}"
    shown = metric_values(at)
    assert shown["accuracy"] == f"{first['test']['accuracy']:.3f}"
    assert shown["mean exit layer"] == f"{first['test']['mean_exit_layer']:.1f}"
    assert shown["speedup (layer-tokens)"] == f"{first['test']['layer_token_speedup']:.2f}×"
    assert float(shown["exit rate"]) < 1  # not everything exits at layer 0
    tradeoff = figures(at)[0]
    names = {t["legendgroup"] for t in traces(tradeoff) if t.get("mode") != "markers" or len(values(t["x"])) > 1}
    assert {"linear-simlens", "logit", "simlens"} <= names
    assert any(t.get("marker", {}).get("symbol") == "diamond" for t in traces(tradeoff))  # the oracle
    marks = [t for t in traces(tradeoff) if t.get("marker", {}).get("symbol") in ("star", "circle-open")]
    assert len(marks) == 3  # the current point (star) and the other policies' points
    assert any("calibrated" in m for m in texts(at, "markdown"))
    assert any("can exceed the full model" in c for c in texts(at, "caption"))  # cost > full cost explained


def test_exits_best_accuracy_without_calibration(stored_runs, monkeypatch):
    at = make_app(stored_runs, monkeypatch, "exits", run="boolq-0.5b")
    assert at.selectbox(key="exits-policy").value == "linear-simlens"
    run = open_run(stored_runs / "boolq-0.5b")
    curve = exits.operating_curve(run.predictions(), run.examples(), "linear-simlens")
    assert metric_values(at)["accuracy"] == f"{curve['accuracy'].max():.3f}"


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
    assert "probe computed in" in answer
    assert " · probe " in footer(at)  # the probe's own time in the footer too
    pinned = figures(at)[1]  # the pinned token: probability and rank per layer, per lens
    ranks = [t for t in traces(pinned) if t.get("xaxis") == "x2"]
    assert len(ranks) == 4 and values(ranks[1]["y"])[-1] == 1  # ' Paris' is SimLens's top-1 at the end
    z_before = values(heatmaps[1]["z"])

    at.text_area(key="live-prompt").input("Q: What is the capital of Italy?\nA:")
    at.text_area(key="live-candidates").input(" Rome\n Paris")
    at.button_group(key="live-ablations").set_value([])
    at.button[0].click().run(timeout=300)
    assert not at.exception
    assert len(traces(figures(at)[0], "heatmap")) == 2
    assert values(traces(figures(at)[0], "heatmap")[1]["z"]) != z_before

    at.text_input(key="live-gold").input(" Pariss")  # not among the candidates: said, no ✓
    at.button[0].click().run(timeout=300)
    assert any("' Pariss' is not one of the candidates" in w for w in texts(at, "warning"))
    assert "✓" not in json.dumps(figures(at)[0]["data"][0]["x"])

    at.text_area(key="live-candidates").input(" Rome\n Buenos Aires")  # not one token
    at.button[0].click().run(timeout=300)
    assert not at.exception
    error = next(e for e in texts(at, "error"))
    assert "' Buenos' + ' Aires'" in error and "--skip-invalid" not in error
    assert not figures(at)  # the previous probe's result is not shown under the error
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


# --- Intervals (issue 16): the report's bootstrap intervals as bands and error bars ---------------------------


def band(figure: dict, label: str, bound: str, axis: str = "x") -> list:
    """The y values of a band's `lower` / `upper` trace (`plotting.band_name`) on `axis`."""
    from lensbench import plotting

    name = plotting.band_name(label, bound, 0.95)
    found = [t for t in traces(figure) if t.get("name") == name and t.get("xaxis", "x") == axis]
    assert len(found) == 1, f"no single band trace {name!r} on {axis}"
    return [np.nan if v is None else v for v in values(found[0]["y"])]


def bounds(intervals, side: int) -> list:
    return [np.nan if pair[side] is None else pair[side] for pair in intervals]


def band_traces(figure: dict) -> list[dict]:
    return [t for t in traces(figure) if " interval, " in t.get("name", "")]


@pytest.fixture(scope="module")
def small_report(app_runs):
    """The library's report of the small run (default bootstrap: 1000 resamples, seed 0), in memory."""
    from lensbench.report import build_report

    return build_report(app_runs / "small", write=False)


def test_runs_page_bands_are_the_reports_intervals(app_runs, small_report, monkeypatch):
    from lensbench import plotting

    at = make_app(app_runs, monkeypatch)
    assert at.checkbox(key="intervals").value is True  # on by default
    per_layer, iso = figures(at)[:2]
    for lens in ("logit", "simlens"):
        label = plotting.lens_label(lens)
        for metric, axis in (("accuracy", "x"), ("fidelity", "x2")):
            intervals = small_report["per_layer"][lens][f"{metric}_ci"]
            assert np.allclose(band(per_layer, label, "lower", axis), bounds(intervals, 0), equal_nan=True)
            assert np.allclose(band(per_layer, label, "upper", axis), bounds(intervals, 1), equal_nan=True)
        intervals = small_report["iso_compute"]["curves_ci"][lens]
        assert np.allclose(band(iso, label, "lower"), bounds(intervals, 0), equal_nan=True)
        assert np.allclose(band(iso, label, "upper"), bounds(intervals, 1), equal_nan=True)
    assert sum(1 for t in traces(per_layer) if t.get("showlegend", True)) == 2  # the legend: the two lenses
    lo, hi = small_report["iso_compute"]["gains"]["simlens_vs_logit"]["gain_ci"]
    assert any(f"[{lo * 100:+.1f}, {hi * 100:+.1f}]" in m for m in texts(at, "markdown"))

    at.checkbox(key="intervals").uncheck().run()
    assert not at.exception
    per_layer, iso = figures(at)[:2]
    assert not band_traces(per_layer) and not band_traces(iso)
    shown = {t["name"]: values(t["y"]) for t in traces(per_layer) if t.get("xaxis", "x") == "x"}
    assert np.allclose(shown["SimLens"], small_report["per_layer"]["simlens"]["accuracy"])  # the lines stay
    assert not any(f"[{lo * 100:+.1f}, {hi * 100:+.1f}]" in m for m in texts(at, "markdown"))

    at.switch_page("app_pages/roles.py").run()  # the choice holds on every page
    assert not at.exception and at.checkbox(key="intervals").value is False
    assert not band_traces(figures(at)[0])
    at.checkbox(key="intervals").check().run()
    ablations = figures(at)[0]
    intervals = small_report["per_layer"]["simlens[drop-s]"]["accuracy_ci"]
    assert np.allclose(band(ablations, plotting.lens_label("simlens[drop-s]"), "upper"), bounds(intervals, 1),
                       equal_nan=True)


def test_exits_page_error_bars(app_runs, small, small_report, monkeypatch):
    """The current point's error bars and intervals: at τ = 0 nothing exits, so its accuracy
    interval is the report's full-model interval and the paired drop is 0; at the last step they
    are the library's for that threshold (`report.exit_point_intervals`)."""
    from lensbench import uncertainty
    from lensbench.report import exit_point_intervals

    at = make_app(app_runs, monkeypatch, "exits")
    slider = at.select_slider[0]
    slider.set_value(slider.options[0]).run()
    star = next(t for t in traces(figures(at)[0]) if t.get("marker", {}).get("symbol") == "star")
    y = values(star["y"])[0]
    lo, hi = small_report["final_accuracy_ci"]
    assert y - values(star["error_y"]["arrayminus"])[0] == pytest.approx(lo)
    assert y + values(star["error_y"]["array"])[0] == pytest.approx(hi)
    assert any(f"accuracy [{lo:.3f}, {hi:.3f}]" in c and "accuracy drop from the full model [+0.0, +0.0]" in c
               for c in texts(at, "caption"))

    at.select_slider[0].set_value(at.select_slider[0].options[-1]).run()
    assert not at.exception
    predictions, examples = small.predictions(), small.examples()
    top = float(exits.operating_curve(predictions, examples, "simlens")["threshold"].max())
    boot, order = uncertainty.run_bootstrap(predictions)
    expected = exit_point_intervals(predictions, examples, "simlens", top, "simlens", 0, None, boot, order)
    star = next(t for t in traces(figures(at)[0]) if t.get("marker", {}).get("symbol") == "star")
    x, y = values(star["x"])[0], values(star["y"])[0]
    lo, hi = expected["accuracy_ci"]
    assert y - values(star["error_y"]["arrayminus"])[0] == pytest.approx(lo)
    assert y + values(star["error_y"]["array"])[0] == pytest.approx(hi)
    lo, hi = expected["layer_token_speedup_ci"]
    assert x - values(star["error_x"]["arrayminus"])[0] == pytest.approx(lo)
    assert x + values(star["error_x"]["array"])[0] == pytest.approx(hi)

    at.checkbox(key="intervals").uncheck().run()
    assert not at.exception
    assert not any("error_x" in t or "error_y" in t for t in traces(figures(at)[0]))
    assert not any("bootstrap intervals" in c for c in texts(at, "caption"))
