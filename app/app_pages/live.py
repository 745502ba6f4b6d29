"""Live probe: a typed prompt and candidates through the embedded model, every lens at once.

The probe is a one-example run: the prompt becomes a JSONL task, `lensbench.runner.run_eval`
evaluates it into a temporary run folder, and the trajectories are read back from there like
any stored run. The model is loaded once per server process.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import streamlit as st

from app import data, ui, views
from lensbench import plotting

MODEL = "smollm2-135m"
DEFAULT_PROMPT = "Q: What is the capital of Japan?\nA: Tokyo\n\nQ: What is the capital of France?\nA:"
DEFAULT_CANDIDATES = " Paris\n Rome\n Berlin\n Madrid"
ABLATIONS = ["drop-s", "drop-a"]


@st.cache_resource(show_spinner=f"Loading {MODEL} (once per server)…")
def embedded_model():
    from lensbench.models import load_model

    return load_model(MODEL, device="cpu", dtype="float32")


def probe(prompt: str, candidates: list[str], gold: int, lenses: list[str], ablations: list[str]) -> Path:
    """Evaluate the prompt into a fresh temporary run folder (the previous one is removed)."""
    from lensbench.runner import EvalConfig, run_eval

    old = st.session_state.get("live-run")
    if old:
        shutil.rmtree(Path(old).parent, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix="lensbench-probe-"))
    task = folder / "probe.jsonl"
    task.write_text(json.dumps({"id": "probe", "prompt": prompt, "choices": candidates, "gold": gold}) + "\n")
    model, info = embedded_model()
    cfg = EvalConfig(out=str(folder / "run"), model=MODEL, task=str(task), lenses=",".join(lenses),
                     ablations=",".join(ablations), batch_size=1)
    try:
        return run_eval(cfg, model=model, model_info=info, progress=False)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


st.title("Live probe")
st.caption(f"Type a prompt and one candidate answer per line (each must be a single token for {MODEL}; "
           "mind the leading space). The start token [s] is prepended; the answer position [a] is the last token.")
with st.form("live-form"):
    prompt = st.text_area("Prompt", DEFAULT_PROMPT, height=140, key="live-prompt")
    c1, c2 = st.columns([1, 1])
    candidates_text = c1.text_area("Candidates (one per line)", DEFAULT_CANDIDATES, height=120, key="live-candidates")
    gold_text = c2.text_input("Gold candidate (optional, exact text)", " Paris", key="live-gold")
    lenses = c2.multiselect("Lenses", ["logit", "simlens"], default=["logit", "simlens"], key="live-lenses",
                            format_func=plotting.lens_label)
    ablations = c2.multiselect("SimLens slot ablations", ABLATIONS, default=ABLATIONS, key="live-ablations")
    extra = c2.text_input("More ablations (e.g. s=token:\" the\", a=position:-2)", "", key="live-extra")
    submitted = st.form_submit_button("Run the probe", type="primary")

if submitted:
    candidates = [line for line in candidates_text.split("\n") if line.strip()]
    more = [a.strip() for a in extra.split(",") if a.strip()]
    if not prompt.strip() or len(candidates) < 2:
        st.warning("Give a prompt and at least two candidates.")
        raise ui.PageEnd
    if "simlens" not in lenses and (ablations or more):
        lenses = [*lenses, "simlens"]
    if not lenses:
        st.warning("Choose at least one lens.")
        raise ui.PageEnd
    gold = candidates.index(gold_text) if gold_text in candidates else 0
    with st.spinner("Running the model…"):
        st.session_state["live-run"] = str(probe(prompt, candidates, gold, lenses, [*ablations, *more]))

result = st.session_state.get("live-run")
if not result or not Path(result).exists():
    st.info("Run the probe to see its trajectories.")
    raise ui.PageEnd

from lensbench.store import open_run  # noqa: E402

run = open_run(result)
path, stamp = data.key(run)
example = data.examples(path, stamp).iloc[0]
summary = data.summary(path, stamp)
traj = data.trajectory(path, stamp, int(example["example_index"]))
choices = list(example["choices"])
final = traj[traj["layer"] == traj["layer"].max()].iloc[0]
st.markdown(f"Model's answer: **{final['decision_token']!r}** (candidates: {', '.join(repr(c) for c in choices)})")
views.show_prompt(example)
views.show_trajectories(traj, example, list(summary["lenses"]), key="live")
