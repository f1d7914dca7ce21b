"""`weakstil view` in a real headless Chromium (Debian's `chromium`, driven by Python Playwright).

The cohort page lists the slides and sorts them; a click opens the slide page; OpenSeadragon draws
Deep Zoom tiles on its canvas; the heatmap overlay changes the picture and toggles off and on; the
layer switch and the tile value under the pointer work; the console shows no errors.

Screenshots are kept as test artefacts in ``tests/artifacts/`` (git-ignored) and in pytest's tmp
folder. With ``WEAKSTIL_UPDATE_SCREENSHOT=1`` the slide page's screenshot also replaces
``docs/img/viewer.png`` (the picture in the README, reduced to 256 colours).

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``) and OpenSeadragon (put into the package
by the build: ``pip install -e ".[dev]"``); without them the test is skipped here, saying which is missing.
CI installs both.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from weakstil.viewer import ViewerConfig, create_app, running_server
from weakstil.viewer.app import INSTALL_COMMAND, OSD_DIR

CHROMIUM = Path(os.environ.get("WEAKSTIL_CHROMIUM", "/usr/bin/chromium"))
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
DOCS_SCREENSHOT = REPO / "docs" / "img" / "viewer.png"


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found: install it with `apt-get install -y chromium` (CI does)"
    if not (OSD_DIR / "openseadragon.min.js").is_file():
        return f"OpenSeadragon not in the package: run `{INSTALL_COMMAND}` again (CI does)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python playwright not installed: pip install -e '.[dev]'"
    return None


@pytest.fixture(autouse=True, scope="module")
def _needs_browser():
    """Skip here without Chromium or OpenSeadragon; in CI (CI=true), where both are installed, fail."""
    reason = _missing()
    if reason and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} — the CI set-up must install it")
    if reason:
        pytest.skip(reason)


# no traffic off this machine: Chromium's own background services stay off
CHROMIUM_ARGS = ["--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run", "--disable-domain-reliability"]


@pytest.fixture(scope="module")
def live_viewer(tmp_path_factory):
    from test_viewer import build_results

    data = build_results(tmp_path_factory.mktemp("viewer_browser"))
    app = create_app(ViewerConfig(results_dir=data["results"], slides_dir=data["slides"]))
    with running_server(app) as url:
        yield url, data


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


CANVAS_STATS = """() => {
  const canvas = window.weakstilViewer.state.viewer.drawer.canvas;
  const ctx = canvas.getContext('2d');
  const {data} = ctx.getImageData(0, 0, canvas.width, canvas.height);
  let drawn = 0, nonWhite = 0;
  const colours = new Set();
  for (let i = 0; i < data.length; i += 16) {
    if (data[i + 3] > 0) drawn++;
    if (data[i + 3] > 0 && (data[i] < 235 || data[i + 1] < 235 || data[i + 2] < 235)) nonWhite++;
    colours.add((data[i] >> 3) + ',' + (data[i + 1] >> 3) + ',' + (data[i + 2] >> 3));
  }
  return {drawn, nonWhite, colours: colours.size, total: data.length / 16, width: canvas.width};
}"""

PIXELS = """() => {
  const canvas = window.weakstilViewer.state.viewer.drawer.canvas;
  return Array.from(canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data
    .filter((_, i) => i % 64 < 4));
}"""

FULLY_LOADED = """(n) => {
  const v = window.weakstilViewer && window.weakstilViewer.state.viewer;
  if (!v || v.world.getItemCount() !== n) return false;
  for (let i = 0; i < n; i++) if (!v.world.getItemAt(i).getFullyLoaded()) return false;
  return !v.world.needsDraw();
}"""


def _redrawn(page):
    """Wait until OpenSeadragon has drawn the current state (two animation frames after it settles)."""
    page.wait_for_function("() => !window.weakstilViewer.state.viewer.world.needsDraw()")
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def _check_scale_bar(page) -> None:
    """The scale bar's length on screen is its label in µm at the slide's mpp and the current zoom."""
    bar = page.evaluate("""() => {
      const s = window.weakstilViewer.state;
      const zoom = s.slideItem.viewportToImageZoom(s.viewer.viewport.getZoom(true));
      const box = document.getElementById('scalebar');
      return {um: Number(box.dataset.um), px: document.getElementById('scalebar-bar').getBoundingClientRect().width,
              label: document.getElementById('scalebar-label').textContent, umPerPx: s.info.image.mpp / zoom,
              visible: !box.hidden};
    }""")
    assert bar["visible"] and bar["label"].endswith(("µm", "mm")), bar
    assert abs(bar["px"] * bar["umPerPx"] - bar["um"]) <= 0.05 * bar["um"], bar
    assert 60 <= bar["px"] <= 300, bar


def _mean_abs_diff(a, b) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / max(1, len(a))


def test_viewer_in_headless_chromium(live_viewer, browser, tmp_path):
    url, data = live_viewer
    started = time.monotonic()
    context = browser.new_context(viewport={"width": 1360, "height": 820})
    page = context.new_page()
    page.set_default_timeout(20_000)
    console_errors, failed, responses = [], [], []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: console_errors.append(f"page error: {exc}"))
    page.on("requestfailed", lambda req: failed.append(f"{req.url} {req.failure}"))
    page.on("response", lambda r: responses.append((r.url, r.status)))

    # --- cohort page ---
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']")
    ids = page.locator("#cohort tbody tr").evaluate_all("rows => rows.map(r => r.dataset.slideId)")
    assert ids == ["case-a", "case-b", "case-c"]
    assert page.locator("th.label-col").first.is_visible()  # scores.csv has a label column
    # the evaluation against the labels, and each slide's model − label difference
    evaluation = page.text_content("#evaluation")
    assert page.is_visible("#evaluation") and "R²" in evaluation and "mean absolute error" in evaluation
    diffs = page.locator("#cohort tbody td.diff").all_text_contents()
    assert diffs[0] == f"{'+' if data['tiles']['case-a']['score'] >= 42.0 else '−'}" \
                       f"{abs(data['tiles']['case-a']['score'] - 42.0):.1f}" and diffs[2] == "–", diffs
    page.click("button[data-sort='score']")  # highest first; the failed slide (no score) last
    ids = page.locator("#cohort tbody tr").evaluate_all("rows => rows.map(r => r.dataset.slideId)")
    scores = {sid: info["score"] for sid, info in data["tiles"].items()}
    assert ids == sorted(scores, key=scores.get, reverse=True) + ["case-c"]
    page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer-cohort.png"), full_page=True)

    # --- a click opens the slide page ---
    page.click("#cohort a:text-is('case-a')")
    page.wait_for_url("**/slides/case-a")
    page.wait_for_selector("body[data-overlay='prediction']")
    page.wait_for_function(FULLY_LOADED, arg=2)
    _redrawn(page)
    slide_tiles = [(u, s) for u, s in responses if "/slide_files/" in u]
    overlay_tiles = [(u, s) for u, s in responses if "/overlay/prediction_files/" in u]
    assert slide_tiles and all(s == 200 for _, s in slide_tiles), slide_tiles[:5]
    assert overlay_tiles and all(s == 200 for _, s in overlay_tiles), overlay_tiles[:5]
    stats = page.evaluate(CANVAS_STATS)
    assert stats["drawn"] > 0.5 * stats["total"], stats  # the canvas is painted...
    assert stats["nonWhite"] > 0.1 * stats["total"] and stats["colours"] > 50, stats  # ...with tissue and heatmap

    # --- the legend shows the colours at the overlay's opacity; the scale bar is in µm ---
    page.locator("#opacity").evaluate("el => { el.value = 60; el.dispatchEvent(new Event('input')); }")
    assert page.evaluate("() => getComputedStyle(document.getElementById('legend-ramp')).opacity") == "0.6"
    assert "60% opacity" in page.text_content("#legend-blend")
    _check_scale_bar(page)
    # the overview sits in the side panel, not over the slide
    nav = page.locator("#navigator").bounding_box()
    osd = page.locator("#osd").bounding_box()
    assert nav["x"] >= osd["x"] + osd["width"] - 1 and page.locator("#navigator canvas").count() >= 1

    # --- the overlay toggles: the picture changes, and comes back ---
    page.locator("#opacity").evaluate("el => { el.value = 70; el.dispatchEvent(new Event('input')); }")
    _redrawn(page)
    with_overlay = page.evaluate(PIXELS)
    page.uncheck("#overlay-on")
    page.wait_for_selector("body[data-overlay-on='0']")
    _redrawn(page)
    without = page.evaluate(PIXELS)
    assert page.evaluate("() => window.weakstilViewer.state.overlay.getOpacity()") == 0
    assert _mean_abs_diff(with_overlay, without) > 3, "hiding the overlay did not change the picture"
    page.check("#overlay-on")
    _redrawn(page)
    again = page.evaluate(PIXELS)
    assert _mean_abs_diff(with_overlay, again) < 1

    # --- layer switch: attention tiles are requested and drawn, legend follows ---
    page.check("#layer-attention")
    page.wait_for_selector("body[data-overlay='attention']")
    page.wait_for_function(FULLY_LOADED, arg=2)
    _redrawn(page)
    assert any("/overlay/attention_files/" in u and s == 200 for u, s in responses)
    assert "attention" in page.text_content("#legend-label")
    assert _mean_abs_diff(page.evaluate(PIXELS), with_overlay) > 1
    page.screenshot(path=str(ARTIFACTS / "viewer-attention.png"))
    page.check("#layer-prediction")
    page.wait_for_selector("body[data-overlay='prediction']")
    page.wait_for_function(FULLY_LOADED, arg=2)

    # --- the tile value under the pointer, and pinned on click ---
    page.wait_for_function("() => window.weakstilViewer.state.tiles !== null")
    truth = data["tiles"]["case-a"]
    i = int(truth["prediction"].argmax())
    x, y = (truth["coords"][i] + truth["size"] / 2).tolist()
    point = page.evaluate(
        "([x, y]) => { const s = window.weakstilViewer.state;"
        " const p = s.slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));"
        " const r = s.viewer.canvas.getBoundingClientRect(); return [r.left + p.x, r.top + p.y]; }", [x, y])
    page.mouse.move(*point)
    page.wait_for_function(f"() => document.getElementById('ti-prediction').textContent === "
                           f"'{truth['prediction'][i]:.1f}'")
    readout = page.text_content("#ti-contribution")
    assert readout.startswith("adds ") and "sTIL% points to the slide score" in readout, readout
    assert "average tile" in page.text_content("#ti-attention")
    page.mouse.click(*point)
    page.wait_for_selector(".pin-box")
    assert page.is_visible("#pinned")
    _redrawn(page)

    screenshot = ARTIFACTS / "viewer.png"
    page.screenshot(path=str(screenshot))
    shutil.copy(screenshot, tmp_path / "viewer.png")
    if os.environ.get("WEAKSTIL_UPDATE_SCREENSHOT") == "1":  # 256 colours: a quarter of the bytes
        from PIL import Image

        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        Image.open(screenshot).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(
            DOCS_SCREENSHOT, optimize=True)

    # --- a failed slide still opens (no layers), nothing went wrong anywhere ---
    page.goto(url + "/slides/case-c")
    page.wait_for_selector("body[data-open='1']")
    assert page.is_visible("#no-layers")
    page.wait_for_function(FULLY_LOADED, arg=1)
    context.close()
    assert not console_errors, console_errors
    assert not failed, failed
    bad = [(u, s) for u, s in responses if s >= 400]
    assert not bad, bad
    assert time.monotonic() - started < 60


def test_results_without_slide_files(live_viewer, browser, tmp_path):
    """Only the results folder: the cohort shows placeholders, a slide page shows heatmap.png."""
    _, data = live_viewer
    results = tmp_path / "only" / "results"
    shutil.copytree(data["results"], results)
    app = create_app(ViewerConfig(results_dir=results))
    errors = []
    with running_server(app) as url:
        page = browser.new_page()
        page.set_default_timeout(20_000)
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator(".placeholder").count() == 6
        page.click("#cohort a:text-is('case-b')")
        page.wait_for_selector("body[data-ready='1']")
        assert page.is_visible("#no-slide") and not page.is_visible("#osd")
        page.wait_for_function("() => document.getElementById('static-heatmap').naturalWidth > 0")
        page.close()
    assert not errors, errors
