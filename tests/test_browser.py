"""The page in a real browser (Debian's chromium driven by Playwright), app launched in this process.

Run photos without masks with the camera source "camera file" (an input error, shown once and in the
page's words), then upload the lego photos through the drop zone, Run and Stop, Run again with small
settings, watch the live preview change and the log follow its newest line, read the stages, the
per-view table and the metrics, see the 3D viewer's canvas in each of its views, download the GLB.
Screenshots and the download go to tests/_out/browser/.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
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
        low, high = _middle(path).convert("L").getextrema()
        if high - low > 40 or time.monotonic() > deadline:
            return high - low > 40
        time.sleep(1)


def _middle(path: Path) -> Image.Image:  # the viewer's label and buttons sit on the canvas's top edge
    shot = Image.open(path).convert("RGB")
    width, height = shot.size
    return shot.crop((width // 10, height // 5, width * 9 // 10, height * 9 // 10))


def looks(path: Path) -> dict:
    """A viewer screenshot's model pixels (those that differ from the background, the corner's
    colour), their colourfulness (mean of max - min of R, G, B) and how busy the picture is (mean
    difference between horizontal neighbours: high for the lines of a wireframe)."""
    pixels = np.asarray(_middle(path), dtype=np.int32)
    model = np.abs(pixels - pixels[0, 0]).max(-1) > 30
    chroma = pixels.max(-1) - pixels.min(-1)
    grey = pixels.mean(-1)
    return {"pixels": int(model.sum()), "colour": float(chroma[model].mean()) if model.any() else 0.0,
            "busy": float(np.abs(np.diff(grey, axis=1)).mean())}


def show_view(page, view: str, path: Path, previous: Path) -> Path:
    """Choose a view of the result and wait until the viewer shows a new picture of a model."""
    page.locator("#view").get_by_label(view).check()
    before = previous.read_bytes()
    deadline = time.monotonic() + 60
    while True:
        try:
            assert drawn(page.locator("#model canvas"), path, timeout_s=60), f"the {view} view stayed blank"
        except playwright.Error:  # the viewer is emptied, then shows the model again: a new canvas
            assert time.monotonic() < deadline, f"no canvas for the {view} view"
            time.sleep(0.5)
            continue
        if path.read_bytes() != before or time.monotonic() > deadline:
            return path
        time.sleep(1)


def error_badges(page) -> list:
    """The outputs that show gradio's red "Error" status (a hidden status tracker is transparent)."""
    return [name for name in ("preview", "gallery", "per-view", "metrics", "model", "stages", "log")
            if page.locator(f"#{name} [data-testid=status-tracker]:not(.hide) .error").count()]


def set_fields(page, values: dict) -> None:
    """Type into the Advanced number fields (the accordion open) and check they took (once more
    for one that did not: a field typed into while the accordion's content renders can lose it)."""
    for attempt in range(2):
        for label, value in values.items():
            field = page.get_by_label(f"number input for {label}")
            field.wait_for(state="visible")
            if field.input_value() != str(value):
                field.fill(str(value))
                field.blur()
        time.sleep(0.5)
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
    # Photos without masks and the camera source "camera file": refused after reading them. The
    # message is in one place (a toast), in the page's words; no output is marked "Error", the
    # gallery keeps the photos.
    # The upload summary names, as soon as the files are dropped, every photo treated specially:
    # here one of another size (resized, its camera following) and a file that is no photo.
    plain = OUT / "plain"
    plain.mkdir()
    for photo in sorted((LEGO / "train").glob("*.png")):
        Image.open(photo).convert("RGB").save(plain / photo.name)
    first = sorted(plain.iterdir())[0]
    Image.open(first).resize((64, 64)).save(first)
    (OUT / "notes.jpg").write_text("not a photo")
    page.locator("#uploads input[type=file]").set_input_files(
        [str(f) for f in sorted(plain.iterdir())] + [str(LEGO / "transforms_train.json"), str(OUT / "notes.jpg")])
    summary = page.locator("#upload-summary")
    summary.get_by_text("24 photo(s)").wait_for()
    summary.get_by_text("notes.jpg").wait_for()
    text = summary.inner_text()
    assert f"{first.name} (64x64)" in text and "resized to the most common" in text, text
    assert "notes.jpg: named like a photo, but its content is text; left out" in text and "/tmp" not in text, text
    page.get_by_label("Camera source").click()
    page.get_by_role("option", name="camera file").click()
    page.locator("#run").click()
    toast = page.get_by_test_id("toast-body").filter(has_text="no object masks")
    toast.wait_for()
    message = toast.inner_text()
    assert "no object masks" in message and "'Camera source'" in message and "cameras.source" not in message
    log = wait_for_log(page, "error: no object masks", timeout_s=10)
    assert "'Camera source'" in log
    assert error_badges(page) == []
    assert page.locator("#gallery img").count() >= 6
    toast.get_by_test_id("toast-close").click()
    page.get_by_label("Camera source").click()
    page.get_by_role("option", name="auto").click()
    page.locator("#uploads").get_by_role("button", name="Clear").click()

    files = sorted((LEGO / "train").glob("*.png")) + [LEGO / "transforms_train.json"]
    page.locator("#uploads input[type=file]").set_input_files([str(f) for f in files])
    page.locator("#upload-summary").get_by_text("24 photo(s)").wait_for()

    # Small settings, then Run; while it runs, lower the iterations for the next run. Stop once
    # the refinement shows: the page must say so at once, and a Run clicked right after "stopped"
    # must start (a click while gradio was still cancelling the job used to be dropped silently).
    # Stop is no error: nothing is marked "Error".
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
    time.sleep(1)  # gradio's cancel completes after "stopped" shows
    assert error_badges(page) == []
    assert "stopped" in page.locator("#stages .detail").nth(3).inner_text()
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
    # The log box shows its newest line.
    page.wait_for_function("() => { const t = document.querySelector('#log textarea'); "
                           "return t.scrollHeight > t.clientHeight && t.scrollTop + t.clientHeight >= t.scrollHeight - 2; }",
                           timeout=5000)

    # Each stage's line says what it made, as the log does; the refinement's ends with its loss,
    # its timings are in the metrics panel.
    details = dict(zip(["ingest", "cameras", "hull", "refine", "export"],
                       page.locator("#stages .detail").all_inner_texts()))
    (OUT / "stages.json").write_text(json.dumps(details, indent=1))
    assert "Visual hull done in" in log and details["hull"].split(" · ")[0] in log, details
    assert "triangles carved" in details["hull"]
    assert "measuring" not in details["export"] and "triangles written" in details["export"], details
    assert re.fullmatch(r"step 30/30 · loss [0-9.e-]+ · \d+ s", details["refine"]), details
    page.locator("#metrics").scroll_into_view_if_needed()
    page.locator("#metrics").get_by_text("geometry_ms_per_step").first.wait_for()
    page.locator("#metrics").get_by_text("train_psnr").first.wait_for()
    # The per-view table in the photos' order: r_0, r_1, r_4, ... r_10 after r_9, not after r_1.
    page.locator("#per-view").scroll_into_view_if_needed()
    page.locator("#per-view").get_by_text("r_0.png").first.wait_for()
    numbers = [int(n) for n in re.findall(r"\br_(\d+)\.png", page.locator("#per-view").inner_text())]
    assert len(numbers) >= 5 and numbers == sorted(numbers), numbers

    page.wait_for_function("() => { const i = document.querySelector('#preview img'); "
                           "return i && i.complete && i.naturalWidth > 0; }")
    canvas = page.locator("#model canvas")
    canvas.wait_for(state="visible")
    box = canvas.bounding_box()
    assert box and box["width"] > 100 and box["height"] > 100
    assert drawn(canvas, OUT / "viewer.png", timeout_s=60), "the 3D viewer stayed blank"
    page.screenshot(path=str(OUT / "result.png"), full_page=True)

    # The views: the texture in colour; the shape alone in grey; its triangles (fewer pixels
    # drawn); and the texture again (after the wireframe, gradio's viewer stays in wireframe
    # unless emptied first).
    seen = {"Textured": looks(OUT / "viewer.png")}
    previous = OUT / "viewer.png"
    for view in ("Shaded", "Wireframe", "Textured"):
        previous = show_view(page, view, OUT / f"viewer-{view.lower()}.png", previous)
        seen[view if view not in seen else "Textured again"] = looks(previous)
    (OUT / "views.json").write_text(json.dumps(seen, indent=1))
    textured, shaded, wireframe, again = seen["Textured"], seen["Shaded"], seen["Wireframe"], seen["Textured again"]
    assert textured["colour"] > 3 * shaded["colour"] and shaded["pixels"] > 0.5 * textured["pixels"], seen
    assert wireframe["busy"] > 3 * shaded["busy"], seen
    assert again["colour"] > 3 * shaded["colour"] and again["busy"] < 0.5 * wireframe["busy"], seen

    with page.expect_download() as download_info:
        page.locator("#download-glb").click()
    glb = OUT / download_info.value.suggested_filename
    download_info.value.save_as(glb)
    assert glb.suffix == ".glb"
    scene = trimesh.load(glb)
    mesh = next(iter(scene.geometry.values()))
    assert mesh.visual.material.baseColorTexture is not None
