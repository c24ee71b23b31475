"""The page in a real browser (Debian's chromium driven by Playwright), app launched in this process.

Upload the lego photos through the drop zone, Run and Stop, Run again with small settings, watch
the live preview change, see the 3D viewer's canvas, download the GLB. Screenshots and the
download go to tests/_out/browser/.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
import trimesh
from PIL import Image

playwright = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[1]
LEGO = REPO / "assets" / "lego_24"
OUT = REPO / "tests" / "_out" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
# Headless and offline: no GPU, no QUIC, no background traffic, no first-run or sync prompts.
# SwiftShader draws WebGL on the CPU so the 3D viewer shows the model even without a GPU.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
SMALL = {"Iterations": 30, "Texture size": 256, "Mesh faces": 5000, "Target faces": 5000}

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} missing: run `bash .ci/install-test-tools` as root")


@pytest.fixture(scope="module")
def app_url(launched_app):
    return launched_app[1]


@pytest.fixture
def page(app_url):
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    with playwright.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000},
            accept_downloads=True,
        )
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(app_url)
        try:
            yield page
        finally:
            page.screenshot(path=str(OUT / "last.png"), full_page=True)
            context.close()


def preview_source(page) -> str:
    image = page.locator("#preview img")
    return image.first.get_attribute("src") or "" if image.count() else ""


def drawn(canvas, path: Path, timeout_s: float) -> bool:
    """Whether the canvas shows something (not one flat colour) within ``timeout_s``; the last
    look is saved to ``path``. WebGL on the CPU (SwiftShader) can take a few seconds."""
    canvas.scroll_into_view_if_needed()
    deadline = time.monotonic() + timeout_s
    while True:
        canvas.screenshot(path=str(path))
        shot = Image.open(path).convert("L")
        width, height = shot.size
        # The middle only: the viewer's label and buttons sit on the canvas's top edge.
        low, high = shot.crop((width // 10, height // 5, width * 9 // 10, height * 9 // 10)).getextrema()
        if high - low > 40 or time.monotonic() > deadline:
            return high - low > 40
        time.sleep(1)


def set_fields(page, values: dict) -> None:
    """Type into the Advanced number fields (the accordion open) and check they took."""
    for label, value in values.items():
        field = page.get_by_label(f"number input for {label}")
        field.wait_for(state="visible")
        field.fill(str(value))
        field.blur()
    for label, value in values.items():
        playwright.expect(page.get_by_label(f"number input for {label}")).to_have_value(str(value))


def wait_for_log(page, text: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = page.locator("#log textarea").input_value()
        if text in log:
            return log
        time.sleep(0.2)
    pytest.fail(f"no {text!r} in the log after {timeout_s} s: {page.locator('#log textarea').input_value()!r}")


def test_upload_run_stop_run_preview_viewer_and_download(page):
    files = sorted((LEGO / "train").glob("*.png")) + [LEGO / "transforms_train.json"]
    page.locator("#uploads input[type=file]").set_input_files([str(f) for f in files])
    page.locator("#upload-summary").get_by_text("24 photo(s)").wait_for()

    # Small settings, then Run; while it runs, lower the iterations for the next run. Stop once
    # the refinement shows: the page must say so at once, and a Run clicked right after "stopped"
    # must start (a click while gradio was still cancelling the job used to be dropped silently).
    page.locator("#advanced button").first.click()
    set_fields(page, {label: value for label, value in SMALL.items() if label != "Iterations"})
    page.locator("#run").click()
    page.locator("#preview").scroll_into_view_if_needed()
    deadline = time.monotonic() + 180
    while not preview_source(page) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert preview_source(page), "no preview within 180 s"
    set_fields(page, {"Iterations": SMALL["Iterations"]})
    page.locator("#stop").click()
    wait_for_log(page, "stopping", timeout_s=2)
    wait_for_log(page, "stopped", timeout_s=10)
    page.locator("#run").click()
    deadline = time.monotonic() + 10
    while "stopped" in page.locator("#log textarea").input_value():  # a new run starts a new log
        assert time.monotonic() < deadline, "the Run clicked after Stop did not start"
        time.sleep(0.1)
    # The browser loads the preview image only while it is on screen (lazy loading).
    page.locator("#preview").scroll_into_view_if_needed()
    wait_for_log(page, "Refine:", timeout_s=180)
    seen = {preview_source(page)}
    changes = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "Finished" not in page.locator("#log textarea").input_value():
        source = preview_source(page)
        if source and source not in seen:
            seen.add(source)
            changes += 1
        time.sleep(0.1)
    log = wait_for_log(page, "Finished", timeout_s=5)
    (OUT / "log.txt").write_text(log)
    assert changes >= 2, f"the preview changed {changes} time(s)"
    assert "Refine: 30 iterations" in log  # the Advanced values reached the pipeline

    page.wait_for_function("() => { const i = document.querySelector('#preview img'); "
                           "return i && i.complete && i.naturalWidth > 0; }")
    canvas = page.locator("#model canvas")
    canvas.wait_for(state="visible")
    box = canvas.bounding_box()
    assert box and box["width"] > 100 and box["height"] > 100
    assert drawn(canvas, OUT / "viewer.png", timeout_s=60), "the 3D viewer stayed blank"
    page.screenshot(path=str(OUT / "result.png"), full_page=True)

    with page.expect_download() as download_info:
        page.locator("#download-glb").click()
    glb = OUT / download_info.value.suggested_filename
    download_info.value.save_as(glb)
    assert glb.suffix == ".glb"
    scene = trimesh.load(glb)
    mesh = next(iter(scene.geometry.values()))
    assert mesh.visual.material.baseColorTexture is not None
