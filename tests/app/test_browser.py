"""The app in a real browser: `streamlit run` on 127.0.0.1, driven by Playwright on Debian's
Chromium (never `playwright install`).

Visits every page on a small real run, selects an example, moves the exit threshold slider,
runs the live probe, and checks that the rendered text and plots change and that no exception
box appears; then measures, on a run of 3000 examples x 31 readout points, how long each page
takes to render after its first load. Screenshots go to `test-artifacts/app/`; the render
times are printed (run with `-s` to see them) and written to `test-artifacts/app/timings.json`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bigrun import APP, ARTIFACTS, copy_run, scale_up

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = ["Runs", "Trajectories", "Roles", "Exits", "Live probe"]
BUDGET_S = float(os.environ.get("LENSBENCH_APP_BUDGET_S", "2.0"))
FOOTER = re.compile(r"rendered in ([\d.]+) s · render (\d+) · (\d+) plots")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def browser_runs(tmp_path_factory, source_run) -> Path:
    root = tmp_path_factory.mktemp("browser-runs")
    copy_run(source_run, root / "small")
    scale_up(source_run, root / "big3000", n_examples=3000)
    return root


@pytest.fixture(scope="session")
def server(browser_runs, tmp_path_factory):
    """`streamlit run app/main.py -- --runs DIR` on a free port; stopped by its PID."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/setup-browser.sh`")
    port = _free_port()
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("LENSBENCH_RUNS", None)
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false", "--", "--runs", str(browser_runs)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=APP.parents[1])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"streamlit did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        text = log.read_text() if log.exists() else ""
        if "Traceback" in text:
            print(f"streamlit server log:\n{text[-4000:]}")


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


class App:
    """One browser tab on the app, with waits keyed on the page's render footer."""

    def __init__(self, page):
        self.page = page
        self.render = 0

    def footer(self) -> tuple[str, int, int] | None:
        texts = self.page.locator('[data-testid="stCaptionContainer"]', has_text="rendered in").all_inner_texts()
        for text in reversed(texts):
            found = FOOTER.search(text)
            if found:
                return text, int(found.group(2)), int(found.group(3))
        return None

    def wait_rendered(self, title: str, timeout: float = 120.0) -> float:
        """Wait until the page `title` finished a new render and its plots are drawn; the
        seconds since the call."""
        start = time.perf_counter()
        deadline = start + timeout
        while True:
            found = self.footer()
            if found and found[1] > self.render and found[0].startswith(f"{title} rendered"):
                running = self.page.locator('[data-testid="stStatusWidget"]').filter(has_text="Running").count()
                if not running and self._plots_drawn() == found[2]:
                    self.render = found[1]
                    return time.perf_counter() - start
            if time.perf_counter() > deadline:
                raise AssertionError(f"page '{title}' did not render within {timeout} s (footer: {found})")
            time.sleep(0.02)

    def _plots_drawn(self) -> int:
        return self.page.evaluate(
            "() => Array.from(document.querySelectorAll('.js-plotly-plot')).filter(d => d._fullLayout && d.querySelector('.main-svg')).length"
        )

    def goto(self, title: str) -> float:
        """Switch page with the sidebar link (the session, and so its caches, stay)."""
        self.page.locator('[data-testid="stSidebarNav"] a').filter(has_text=title).first.click()
        return self.wait_rendered(title)

    def text(self) -> str:
        return self.page.locator('[data-testid="stMain"]').inner_text()

    def plots(self) -> list:
        """The data of every plotly chart on the page (to tell that a plot changed)."""
        return self.page.evaluate(
            "() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(d => JSON.stringify((d.data || []).map(t => [t.x, t.y, t.z])))"
        )

    def screenshot(self, path: Path) -> None:
        """The whole page: the app scrolls inside its main block, so the viewport is made tall
        enough to hold it for the shot."""
        size = self.page.viewport_size
        height = self.page.evaluate(
            "() => Math.max(...Array.from(document.querySelectorAll('[data-testid=\"stMain\"], [data-testid=\"stMainBlockContainer\"]')).map(e => e.scrollHeight))"
        )
        self.page.set_viewport_size({"width": size["width"], "height": min(max(height + 80, size["height"]), 8000)})
        self.page.wait_for_timeout(400)  # plotly relayouts to the new size
        self.page.screenshot(path=str(path), full_page=True)
        self.page.set_viewport_size(size)

    def assert_no_exception(self) -> None:
        assert self.page.locator('[data-testid="stException"]').count() == 0, self.text()[:2000]

    def choose(self, label: str, option: str) -> float:
        """Pick `option` in the selectbox labelled `label` (typing it filters the options);
        the time of the click on the option."""
        box = self.page.locator('[data-testid="stSelectbox"]').filter(has_text=label).first
        box.click()
        self.page.keyboard.type(option)
        exact = re.compile(rf"^\s*{re.escape(option)} ·")
        choice = self.page.get_by_role("option").filter(has_text=exact).first
        choice.wait_for()
        start = time.perf_counter()
        choice.click()
        return start


def _timed_visit(app: App, title: str) -> float:
    seconds = app.goto(title)
    app.assert_no_exception()
    return seconds


def test_every_page_in_the_browser(server, browser, artifacts):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    app = App(page)
    page.goto(server + "/?run=small", wait_until="domcontentloaded")
    app.wait_rendered("Runs")
    app.assert_no_exception()
    text = app.text()
    assert "Per-layer accuracy and fidelity" in text and "Iso-Compute accuracy" in text
    assert len(app.plots()) >= 2
    app.screenshot(artifacts / "runs.png")

    # Trajectories: select another example; the text and the heatmaps change.
    _timed_visit(app, "Trajectories")
    assert "[s]" in app.text() and "[a]" in app.text()
    before_text, before_plots = app.text(), app.plots()
    heatmaps = page.evaluate("() => document.querySelectorAll('.js-plotly-plot')[0].data.filter(t => t.type === 'heatmap').length")
    assert heatmaps == 5  # one per lens
    first = re.search(r"^(\S+) — gold", before_text, re.M).group(1)
    options = page.locator('[data-testid="stSelectbox"]').filter(has_text="Example")
    assert options.count() == 1
    target = "capital-spain" if first != "capital-spain" else "capital-germany"
    app.choose("Example", target)
    app.wait_rendered("Trajectories")
    app.assert_no_exception()
    after_text, after_plots = app.text(), app.plots()
    assert f"{target} — gold" in after_text and first + " — gold" not in after_text
    assert after_plots != before_plots
    app.screenshot(artifacts / "trajectories.png")

    # Roles
    _timed_visit(app, "Roles")
    text = app.text()
    assert "Slot ablations per layer" in text and "Swap follow-rates" in text and "Attention from [a] to [s]" in text
    assert len(app.plots()) >= 4
    app.screenshot(artifacts / "roles.png")

    # Exits: move the threshold slider; the metrics, the marked point and the histogram change.
    _timed_visit(app, "Exits")
    before_text, before_plots = app.text(), app.plots()
    thumb = page.locator('[data-testid="stSlider"]').filter(has_text="Threshold").get_by_role("slider")
    thumb.focus()
    for _ in range(60):
        page.keyboard.press("ArrowRight")
    app.wait_rendered("Exits")
    app.assert_no_exception()
    after_text, after_plots = app.text(), app.plots()
    assert after_text != before_text
    assert after_plots[0] != before_plots[0] and after_plots[1] != before_plots[1]
    app.screenshot(artifacts / "exits.png")

    # Live probe: run the embedded model on the default prompt.
    _timed_visit(app, "Live probe")
    assert "Run the probe to see its trajectories" in app.text()
    page.get_by_role("button", name="Run the probe").click()
    app.wait_rendered("Live probe", timeout=300)
    app.assert_no_exception()
    text = app.text()
    assert "Model's answer" in text and "[a]" in text
    heatmaps = page.evaluate("() => document.querySelectorAll('.js-plotly-plot')[0].data.filter(t => t.type === 'heatmap').length")
    assert heatmaps == 4  # logit, SimLens, drop-[s], drop-[a]
    app.screenshot(artifacts / "live.png")
    page.close()


def test_pages_stay_responsive_on_3000_examples(server, browser, artifacts):
    """After a page's first load, every page renders within the budget on 3000 x 31 readouts
    (each measured twice; the better of the two counts, since the machine may be shared)."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    app = App(page)
    page.goto(server + "/?run=big3000", wait_until="domcontentloaded")
    first = {"Runs": app.wait_rendered("Runs", timeout=300)}
    for title in PAGES[1:4]:
        first[title] = app.goto(title)
        app.assert_no_exception()
    timings: dict[str, list[float]] = {}
    for _ in range(2):
        for title in PAGES[:4]:
            timings.setdefault(title, []).append(_timed_visit(app, title))
    # interactions on the big run, warm: another example; the threshold slider
    _timed_visit(app, "Trajectories")
    assert "of 3000 examples match" in app.text()
    for target in ("capital-spain~50", "capital-egypt~60"):
        before = app.plots()
        start = app.choose("Example", target)
        app.wait_rendered("Trajectories")
        timings.setdefault("Trajectories: select an example", []).append(time.perf_counter() - start)
        assert f"{target} — gold" in app.text() and app.plots() != before
    app.screenshot(artifacts / "trajectories-3000.png")
    _timed_visit(app, "Exits")
    slider = page.locator('[data-testid="stSlider"]').filter(has_text="Threshold")
    for _ in range(2):
        before = slider.get_by_test_id("stSliderThumbValue").inner_text()
        slider.get_by_role("slider").focus()
        start = time.perf_counter()
        page.keyboard.press("ArrowRight")
        app.wait_rendered("Exits")
        timings.setdefault("Exits: move the threshold", []).append(time.perf_counter() - start)
        assert slider.get_by_test_id("stSliderThumbValue").inner_text() != before
    app.assert_no_exception()
    app.screenshot(artifacts / "exits-3000.png")
    page.close()

    best = {name: min(values) for name, values in timings.items()}
    report = {"first_load_s": first, "warm_s": timings, "best_warm_s": best, "budget_s": BUDGET_S}
    (artifacts / "timings.json").write_text(json.dumps(report, indent=2))
    print("\nrender times on 3000 examples x 31 readout points (browser, seconds):")
    for name, values in timings.items():
        print(f"  {name:<36} first {first.get(name, float('nan')):6.2f}  warm " + " ".join(f"{v:5.2f}" for v in values))
    slow = {name: value for name, value in best.items() if value > BUDGET_S}
    assert not slow, f"pages slower than {BUDGET_S} s after the first load: {slow}"
