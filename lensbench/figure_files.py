"""Figures to files: interactive HTML and static PNG (through kaleido and the system's Chromium)."""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go

from lensbench.errors import LensbenchError

SYSTEM_CHROMIUM = "/usr/bin/chromium"


def _point_kaleido_at_system_chromium() -> None:
    # choreographer (kaleido's browser driver) takes BROWSER_PATH before its own search, and
    # nothing here calls its download helpers.
    if "BROWSER_PATH" not in os.environ:
        found = SYSTEM_CHROMIUM if os.path.exists(SYSTEM_CHROMIUM) else shutil.which("chromium")
        if found:
            os.environ["BROWSER_PATH"] = found


def find_browser() -> str | None:
    """The Chromium kaleido would drive for a PNG (BROWSER_PATH, the system's, or one
    choreographer finds), or None. Without one kaleido does not fail: it waits forever."""
    _point_kaleido_at_system_chromium()
    named = os.environ.get("BROWSER_PATH")
    if named:
        return named if os.path.isfile(named) and os.access(named, os.X_OK) else None
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:  # another choreographer: nothing more to look for
        return None


NO_BROWSER = (f"PNG figures need Chromium (kaleido drives it): install it with `bash scripts/setup-browser.sh` "
              f"(Debian's chromium at {SYSTEM_CHROMIUM}), set BROWSER_PATH, or write HTML only")


@contextmanager
def static_export():
    """Keep one Chromium open for a batch of PNG exports (otherwise each starts its own).
    Without a browser nothing is started (`save_figure` then refuses a PNG)."""
    if find_browser() is None:
        yield
        return
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
        if find_browser() is None:
            raise LensbenchError(NO_BROWSER)
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
