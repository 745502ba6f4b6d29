"""What every page shares: the sidebar (runs folder and run), clear messages for empty and
broken states, and the render-time footer."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path

import streamlit as st

from lensbench.errors import LensbenchError
from lensbench.store import Run, list_runs

log = logging.getLogger("lensbench.app")

DEFAULT_RUNS = "runs"


class PageEnd(Exception):
    """Ends a page early after it has shown a message (the footer still renders)."""


def runs_root_default(argv: list[str] | None = None) -> str:
    """`--runs DIR` (or `--runs=DIR`) among the script's arguments, else `$LENSBENCH_RUNS`, else `runs`."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--runs" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--runs="):
            return arg.split("=", 1)[1]
    return os.environ.get("LENSBENCH_RUNS") or DEFAULT_RUNS


def _run_label(run: Run) -> str:
    status = run.status
    return run.name if status == "complete" else f"{run.name} ({status})"


def sidebar() -> None:
    """The runs folder and the run the pages show; both persist across pages."""
    if "runs_root" not in st.session_state:
        st.session_state["runs_root"] = runs_root_default()
    st.sidebar.text_input("Runs folder", key="runs_root", help="set with `-- --runs DIR` or LENSBENCH_RUNS")
    root = Path(st.session_state["runs_root"]).expanduser()
    found = list_runs(root) if root.is_dir() else []
    runs = [r for r in found if isinstance(r, Run)]
    broken = [r for r in found if not isinstance(r, Run)]
    st.session_state["_lb_root"] = root
    st.session_state["_lb_runs"] = runs
    st.session_state["_lb_broken"] = broken
    if runs:
        paths = [str(r.path) for r in runs]
        by_name = {r.name: str(r.path) for r in runs}
        requested = st.query_params.get("run")
        if requested in by_name and not st.session_state.get("_lb_run_from_url"):
            # `?run=NAME` picks the run on the first load (a shareable link)
            st.session_state["run"] = by_name[requested]
            st.session_state["_lb_run_from_url"] = True
        if st.session_state.get("run") not in paths:
            complete = [str(r.path) for r in runs if r.status == "complete"]
            st.session_state["run"] = (complete or paths)[0]
        labels = {str(r.path): _run_label(r) for r in runs}
        st.sidebar.selectbox("Run", paths, key="run", format_func=lambda p: labels.get(p, p))
        chosen = next(r for r in runs if str(r.path) == st.session_state["run"])
        # The selectbox cuts long names: the whole name (wrapped) and what the run is, below it.
        st.sidebar.caption(f'<div class="lb-run-name" style="word-break:break-all"><b>{chosen.name}</b><br>'
                           f"{run_description(chosen)}</div>", unsafe_allow_html=True)
    st.sidebar.checkbox(INTERVALS_LABEL, value=True, key=INTERVALS_KEY,
                        help="shaded bands around the per-layer and Iso-Compute curves, error bars at the exit operating "
                             "points, [lo, hi] after the numbers: percentile intervals over resampled examples, as "
                             "`lensbench report` computes them (1000 resamples, seed 0; docs/METHOD.md, 'Uncertainty')")
    if broken:
        with st.sidebar.expander(f"{len(broken)} unreadable run folder(s)"):
            for path, error in broken:
                st.caption(f"**{Path(path).name}**: {error}")


INTERVALS_KEY = "intervals"
INTERVALS_LABEL = "Show 95 % intervals"


def show_intervals() -> bool:
    """Whether the pages show the bootstrap intervals (the sidebar's checkbox; on by default)."""
    return bool(st.session_state.get(INTERVALS_KEY, True))


def run_description(run: Run) -> str:
    """`model · task · N examples · L layers`, from the manifest."""
    manifest = run.manifest
    model = manifest.get("model", {})
    parts = [model.get("spec"), manifest.get("task"),
             f"{manifest['n_examples']} examples" if manifest.get("n_examples") is not None else None,
             f"{model['n_layers']} layers" if model.get("n_layers") else None]
    return " · ".join(str(p) for p in parts if p)


def runs() -> list[Run]:
    return st.session_state.get("_lb_runs", [])


def no_runs_message() -> None:
    """Explain why there is nothing to show (no folder, no runs, only unreadable runs)."""
    root = st.session_state.get("_lb_root", Path(DEFAULT_RUNS))
    if not root.is_dir():
        st.warning(
            f"There is no runs folder at `{root}`. Create a run with "
            f"`lensbench eval --task capitals --lenses logit,simlens --out {root}/demo`, or point the app at "
            "another folder (sidebar, `streamlit run app/main.py -- --runs DIR`, or `LENSBENCH_RUNS`)."
        )
        return
    broken = st.session_state.get("_lb_broken", [])
    if broken:
        st.warning(f"`{root}` holds no readable run; {len(broken)} folder(s) could not be read:")
        for path, error in broken:
            st.markdown(f"- `{Path(path).name}`: {error}")
    else:
        st.info(f"`{root}` holds no runs yet. Create one with `lensbench eval ... --out {root}/NAME`.")


def status_message(run: Run) -> str | None:
    """Why a run's results cannot be shown yet (None for a complete run)."""
    status = run.status
    if status == "complete":
        return None
    started = run.manifest.get("started", "?")
    if status == "running":
        return (f"Run `{run.name}` is still in progress (started {started}): its results appear when it finishes. "
                "Reload the page then.")
    if status in ("interrupted", "failed"):
        return (f"Run `{run.name}` {status} before finishing (started {started}); run the same `lensbench eval` "
                "command again to resume it.")
    return f"Run `{run.name}` has status '{status}' and no results to show."


def run_kind(run: Run) -> str:
    """`eval` (lensbench eval) or `icl` (lensbench icl)."""
    return run.manifest.get("kind", "eval")


def current_run(kind: str = "eval") -> Run:
    """The run chosen in the sidebar, complete and of `kind`; otherwise a message and the page ends."""
    available = runs()
    if not available:
        no_runs_message()
        raise PageEnd
    chosen = st.session_state.get("run")
    run = next((r for r in available if str(r.path) == chosen), available[0])
    if run_kind(run) != kind:
        other = "the ICL page" if run_kind(run) == "icl" else "the other pages"
        st.info(f"Run `{run.name}` is a `lensbench {run_kind(run)}` run: see {other}, or choose another run in the sidebar.")
        raise PageEnd
    message = status_message(run)
    if message:
        st.info(message)
        raise PageEnd
    return run


def complete_runs(kind: str = "eval") -> list[Run]:
    return [r for r in runs() if r.status == "complete" and run_kind(r) == kind]


def run_page(page) -> None:
    """Run a page: a library error is a message, any other error a short one (its traceback
    goes to the server log, never into the page); then the render-time footer."""
    start = time.perf_counter()
    st.session_state["_lb_plots"] = 0
    try:
        page.run()
    except PageEnd:
        pass
    except LensbenchError as exc:
        st.error(str(exc))
    except Exception as exc:  # noqa: BLE001 - the page must not show a traceback
        log.error("page %s failed:\n%s", page.title, traceback.format_exc())
        st.error(f"This page could not be shown: {type(exc).__name__}: {exc}")
    st.session_state["_lb_renders"] = st.session_state.get("_lb_renders", 0) + 1
    elapsed = time.perf_counter() - start
    # The plot count lets a browser test wait until every figure of this render is drawn.
    note = st.session_state.pop("_lb_footer_note", None)  # what a page timed itself, for this render only
    st.caption(f"{page.title} rendered in {elapsed:.2f} s · render {st.session_state['_lb_renders']} · "
               f"{st.session_state['_lb_plots']} plots" + (f" · {note}" if note else ""))


def distinct_labels(numbers: list[float]) -> list[str]:
    """Short labels for distinct numbers, with as many significant digits as keep them distinct."""
    for digits in range(3, 17):
        labels = [f"{x:.{digits}g}" for x in numbers]
        if len(set(labels)) == len(labels):
            return labels
    return [repr(x) for x in numbers]


def ranges(numbers: list[int]) -> str:
    """`[0, 1, 2, 5, 7, 8]` -> `0–2, 5, 7–8`."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(f"{start}–{n}" if n != start else f"{n}")
            start = None
    return ", ".join(parts)


def plot(fig, key: str) -> None:
    st.session_state["_lb_plots"] = st.session_state.get("_lb_plots", 0) + 1
    st.plotly_chart(fig, key=key, config={"displaylogo": False})
