"""The embedded model for the live probe and the position grids: loaded once per server
process, with a `lensbench.probe.Prober` per set of fitted-lens folders."""

from __future__ import annotations

import os

import streamlit as st

MODEL = "smollm2-135m"


def linear_dirs_default() -> list[str]:
    """Fitted lens folders (Linear SimLens, tuned lens) for the embedded model, from
    `LENSBENCH_LINEAR` (separated by `:`)."""
    return [d for d in os.environ.get("LENSBENCH_LINEAR", "").split(":") if d]


@st.cache_resource(show_spinner=f"Loading {MODEL} (once per server)…")
def embedded_model():
    from lensbench.models import load_model

    return load_model(MODEL, device="cpu", dtype="float32")


@st.cache_resource(show_spinner=False, max_entries=4)
def prober(linear_dirs: tuple[str, ...] = ()):
    """The prober of the embedded model (its lenses are built once per key inside it)."""
    from lensbench.probe import Prober

    model, _info = embedded_model()
    return Prober(model, MODEL, linear_dirs=list(linear_dirs))
