"""lensbench's Streamlit app: `streamlit run app/main.py [-- --runs DIR]`.

A multipage app over stored runs (the runs folder: `--runs DIR` after `--`, else the
`LENSBENCH_RUNS` environment variable, else `runs/`; it can be changed in the sidebar).
Everything it shows is read through `lensbench.store` and computed by the library
(`metrics`, `compute`, `exits`, `plotting`); the app only arranges and caches it.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run` puts app/ on the path, not the repository
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import ui  # noqa: E402

st.set_page_config(page_title="lensbench", page_icon=":material/search:", layout="wide")

RUNS = st.Page("app_pages/runs.py", title="Runs", icon=":material/monitoring:", url_path="runs")


def home() -> None:
    """The address without a page opens the Runs page, which keeps its own address (`/runs`)."""
    st.switch_page(RUNS, query_params=st.query_params.to_dict())


PAGES = [
    st.Page(home, title="lensbench", url_path="home", default=True, visibility="hidden"),
    RUNS,
    st.Page("app_pages/trajectories.py", title="Trajectories", icon=":material/timeline:", url_path="trajectories"),
    st.Page("app_pages/roles.py", title="Roles", icon=":material/theater_comedy:", url_path="roles"),
    st.Page("app_pages/exits.py", title="Exits", icon=":material/logout:", url_path="exits"),
    st.Page("app_pages/live.py", title="Live probe", icon=":material/science:", url_path="live"),
    st.Page("app_pages/icl.py", title="ICL", icon=":material/school:", url_path="icl"),
]

page = st.navigation(PAGES)
ui.sidebar()
ui.run_page(page)
