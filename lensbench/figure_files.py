"""Figures to files: interactive HTML and static PNG (through kaleido and the system's Chromium)."""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go

SYSTEM_CHROMIUM = "/usr/bin/chromium"


def _point_kaleido_at_system_chromium() -> None:
    # choreographer (kaleido's browser driver) takes BROWSER_PATH before its own search, and
    # nothing here calls its download helpers.
    if "BROWSER_PATH" not in os.environ:
        found = SYSTEM_CHROMIUM if os.path.exists(SYSTEM_CHROMIUM) else shutil.which("chromium")
        if found:
            os.environ["BROWSER_PATH"] = found


@contextmanager
def static_export():
    """Keep one Chromium open for a batch of PNG exports (otherwise each starts its own)."""
    _point_kaleido_at_system_chromium()
    try:
        import kaleido

        kaleido.start_sync_server(silence_warnings=True)
        started = True
    except Exception:  # an older kaleido: fall back to one browser per image
        started = False
    try:
        yield
    finally:
        if started:
            kaleido.stop_sync_server(silence_warnings=True)


def save_figure(fig: go.Figure, out_dir: str | Path, stem: str, formats: Sequence[str] = ("png", "html"),
                scale: float = 2.0) -> list[Path]:
    """Write `fig` as OUT_DIR/STEM.html (interactive; plotly.js loaded from a file beside it)
    and OUT_DIR/STEM.png (static); returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if "html" in formats:
        path = out_dir / f"{stem}.html"
        # "directory": one plotly.min.js beside the pages, so they work offline without
        # embedding 4 MB of JavaScript in each.
        fig.write_html(path, include_plotlyjs="directory", full_html=True)
        written.append(path)
    if "png" in formats:
        _point_kaleido_at_system_chromium()
        path = out_dir / f"{stem}.png"
        try:
            with warnings.catch_warnings():  # plotly passes options a running kaleido server ignores
                warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                fig.write_image(path, format="png", scale=scale)
        except Exception as exc:
            if "chrom" in str(exc).lower():
                raise RuntimeError(
                    f"static export needs Chromium at {SYSTEM_CHROMIUM}: run `bash scripts/setup-browser.sh` "
                    f"(or set BROWSER_PATH) ({exc})") from exc
            raise
        written.append(path)
    return written
