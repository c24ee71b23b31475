"""The Gradio app through its public API (gradio_client), launched once in this process on CPU.

A good job streams previews and returns a textured GLB; every kind of bad upload ends in a
message that names the file (or a notice, for what the app can fix itself), and the server
keeps serving. Outputs land in tests/_out/app/.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError, ValidationError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LEGO = REPO / "assets" / "lego_24"
MOLD = REPO / "assets" / "mold_cape_12"
OUT = REPO / "tests" / "_out" / "app"
# The fast preset, made smaller still so that a whole run takes seconds on a laptop CPU.
SMALL = dict(quality="fast", refine_iterations=30, refine_texture_size=256, refine_mesh_faces=5000,
             export_target_faces=5000)
RUN_OUTPUTS = ("preview", "stages", "log", "gallery", "glb", "obj_zip", "per_view", "metrics")
PREVIEW, LOG = RUN_OUTPUTS.index("preview"), RUN_OUTPUTS.index("log")


@pytest.fixture(scope="module")
def client(launched_app):
    # Gradio answers a cancel once the handler's current step ends: after a 5000 px photo's ingest
    # that took 8 s on 2 cores, past httpx's default 5 s.
    c = Client(launched_app[1], verbose=False, httpx_kwargs={"timeout": 60})
    yield c
    c.close()


@pytest.fixture
def out_dir(request) -> Path:
    path = OUT / request.node.name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def lego_files(out_dir: Path, replace: dict | None = None, cameras: bool = True) -> list[Path]:
    """The lego example's files, with some photos replaced by files written to ``out_dir``."""
    photos = sorted((LEGO / "train").glob("*.png"))
    files = []
    for photo in photos:
        if replace and photo.name in replace:
            replaced = out_dir / photo.name
            replace[photo.name](photo, replaced)
            files.append(replaced)
        else:
            files.append(photo)
    return files + ([LEGO / "transforms_train.json"] if cameras else [])


def submit(client: Client, files, **settings):
    return client.submit([handle_file(str(f)) for f in files], api_name="/reconstruct", **{**SMALL, **settings})


def error_of(job) -> str:
    """The message a job ends with: from the run (AppError), or from the check made when it was
    submitted (ValidationError: refused before it queued)."""
    with pytest.raises((AppError, ValidationError)) as caught:
        job.result(timeout=180)
    message = str(caught.value)
    assert "/tmp/" not in message and "Traceback" not in message, message  # names, not temp paths
    return message


def notice_then_stop(job, text: str, timeout: float = 120) -> str:
    """Wait until the run's log shows ``text``, then cancel the run; returns the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outputs = job.outputs()
        log = outputs[-1][LOG] if outputs and isinstance(outputs[-1][LOG], str) else ""
        if text in log:
            job.cancel()
            return log
        if job.done():
            job.result()  # raises the app's error, if that is why it ended
            break
        time.sleep(0.2)
    job.cancel()
    pytest.fail(f"no {text!r} in the log within {timeout} s; outputs: {job.outputs()[-1:]}")


def write_text(_source: Path, target: Path) -> None:
    target.write_text("this is not a picture\n")


def write_truncated(source: Path, target: Path) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def write_resized(size):
    def write(source: Path, target: Path) -> None:
        Image.open(source).resize(size, Image.NEAREST).save(target, compress_level=1)
    return write


def write_transparent(source: Path, target: Path) -> None:
    rgba = np.asarray(Image.open(source).convert("RGBA")).copy()
    rgba[..., 3] = 0
    Image.fromarray(rgba).save(target)


# ---------------------------------------------------------------------- the API

def test_api_takes_the_files_first_and_every_setting_with_a_default(client):
    from pipeline.config import describe, preset

    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/reconstruct"]
    params = {p["parameter_name"]: p for p in endpoint["parameters"]}
    first = endpoint["parameters"][0]
    assert first["parameter_name"] == "files" and first["component"] == "File"
    assert all(p["parameter_has_default"] for p in endpoint["parameters"][1:])
    assert params["camera_source"]["parameter_default"] == "auto"
    assert params["quality"]["parameter_default"] == "fast"  # no GPU here
    for spec in describe(preset("fast")):
        name = spec.key.replace(".", "_", 1)
        if spec.key not in ("refine.seed", "cameras.source"):  # seed and camera_source: controls of their own
            assert params[name]["parameter_default"] == spec.default, name


def test_help_needs_neither_gradio_nor_torch():
    code = "import sys, app; app.parse_args([]); print(sorted(m for m in ('torch', 'gradio') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
    result = subprocess.run([sys.executable, "app.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--host" in result.stdout and "--port" in result.stdout


def test_the_console_says_where_to_open_one_line_per_refused_run_and_stops_cleanly():
    """`python app.py --host 0.0.0.0`, as `make run` starts it: it prints addresses a person can open
    (not 0.0.0.0); a refused run is one line on the console, no traceback; and SIGTERM (docker stop)
    after structure from motion ran ends it with status 0, without pycolmap's crash report."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "app.py", "--host", "0.0.0.0", "--port", str(port)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("* Open" in line for line in lines):
            assert server.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        # Four photos, cameras by structure from motion: pycolmap runs and places none of them.
        photos = sorted((LEGO / "train").glob("*.png"))[:4]
        message = error_of(submit(client, photos, camera_source="estimate"))
        assert "structure from motion placed only" in message
        client.close()
    finally:
        server.send_signal(signal.SIGTERM)
        returncode = server.wait(timeout=60)
        reader.join(timeout=10)
    console = "".join(lines)
    assert returncode == 0, console
    assert f"http://localhost:{port}" in console and "0.0.0.0" not in console, console
    assert "Traceback" not in console and "Aborted" not in console and "SIGTERM" not in console, console
    assert sum("structure from motion placed only" in line for line in lines) == 1, console


def test_host_and_port_come_from_flags_else_gradio_variables(monkeypatch):
    import app as app_module

    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app_module.parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 7999)
    args = app_module.parse_args(["--host", "127.0.0.1", "--port", "8001"])
    assert (args.host, args.port) == ("127.0.0.1", 8001)


def test_settings_follow_the_preset_unless_a_caller_changes_them():
    from pipeline.config import preset
    from ui.settings import build_config, preset_values

    page = preset_values("fast")
    high_texture = preset("high").refine.texture_size
    assert high_texture != page["refine_texture_size"]
    # The page shows the preset's values: all of them apply, edits included.
    shown = {**preset_values("high"), "refine_iterations": 123}
    config = build_config("high", 7, shown, page, controls_follow_preset=True)
    assert (config.refine.iterations, config.refine.texture_size, config.refine.seed) == (123, high_texture, 7)
    # An API caller that asks for "high" and one setting gets the rest from "high", not the page.
    config = build_config("high", 0, {**page, "refine_iterations": 123}, page, controls_follow_preset=False)
    assert (config.refine.iterations, config.refine.texture_size) == (123, high_texture)


# ------------------------------------------------------------------- bad input

def test_not_an_image_is_left_out_with_a_notice(client, out_dir):
    log = notice_then_stop(submit(client, lego_files(out_dir, {"r_4.png": write_text})), "r_4.png")
    assert "r_4.png: named like a photo, but its content is text; left out." in log


def test_unknown_file_type_is_left_out_with_a_notice(client, out_dir):
    notes = out_dir / "notes.pdf"
    notes.write_bytes(b"%PDF-1.4\n")
    log = notice_then_stop(submit(client, lego_files(out_dir) + [notes]), "notes.pdf")
    assert "left out" in log


def test_corrupt_png(client, out_dir):
    message = error_of(submit(client, lego_files(out_dir, {"r_4.png": write_truncated})))
    assert "r_4.png" in message


def test_a_single_photo(client):
    message = error_of(submit(client, [LEGO / "train" / "r_0.png"]))
    assert "r_0.png" in message and "at least 3" in message


def test_mixed_aspect_ratios_are_stretched_with_a_notice(client, out_dir):
    log = notice_then_stop(submit(client, lego_files(out_dir, {"r_4.png": write_resized((160, 128))})), "stretched")
    assert "r_4.png (160x128)" in log


def test_mixed_sizes_of_one_aspect_are_resized_with_a_notice(client, out_dir):
    log = notice_then_stop(submit(client, lego_files(out_dir, {"r_4.png": write_resized((256, 256))})), "resized")
    assert "r_4.png (256x256)" in log


def test_huge_image_is_downscaled_with_a_notice(client, out_dir):
    job = submit(client, lego_files(out_dir, {"r_4.png": write_resized((5000, 5000))}))
    start = time.monotonic()
    log = notice_then_stop(job, "resized", timeout=60)
    assert "r_4.png (5000x5000)" in log
    assert time.monotonic() - start < 60


def test_no_foreground(client, out_dir):
    message = error_of(submit(client, lego_files(out_dir, {"r_4.png": write_transparent})))
    assert "r_4.png" in message and "empty" in message


def test_camera_file_for_other_photos(client, out_dir):
    message = error_of(submit(client, lego_files(out_dir, cameras=False) + [MOLD / "poses_bounds.npy"]))
    assert "poses_bounds.npy" in message and "12 poses but 24 photos" in message
    mold_photos = sorted((MOLD / "images").iterdir())
    message = error_of(submit(client, mold_photos + [LEGO / "transforms_train.json"]))
    assert "transforms_train.json" in message and "r_0" in message


def test_no_camera_file(client, out_dir):
    message = error_of(submit(client, lego_files(out_dir, cameras=False), camera_source="file"))
    assert "No camera file among the uploads" in message and "transforms.json" in message
    # The turntable prior needs no camera file: the run gets past its cameras stage.
    log = notice_then_stop(submit(client, lego_files(out_dir, cameras=False), camera_source="turntable"),
                           "Cameras done")
    assert "Cameras: turntable cameras" in log


def test_photos_without_masks(client, out_dir):
    def drop_alpha(source: Path, target: Path) -> None:
        Image.open(source).convert("RGB").save(target)

    files = lego_files(out_dir, {p.name: drop_alpha for p in (LEGO / "train").glob("*.png")})
    message = error_of(submit(client, files, camera_source="file"))
    assert "no object masks" in message
    log = notice_then_stop(submit(client, files), "Cameras done")  # auto: masks estimated, cameras from the file
    assert "Cameras: estimating masks, then cameras from the camera file" in log


def test_unsafe_zip_is_refused_when_submitted(client, out_dir):
    archive = out_dir / "capture.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("capture/../../escape.png", b"x")
    job = submit(client, [archive])
    with pytest.raises(ValidationError, match="capture.zip: member .* points outside the archive"):
        job.result(timeout=10)


def test_zip_of_a_capture_folder_is_read(client, out_dir):
    archive = out_dir / "lego.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(LEGO.rglob("*")):
            zf.write(path, Path("lego_24") / path.relative_to(LEGO))
    log = notice_then_stop(submit(client, [archive]), "Read photos done")
    assert "24 photos" in log


# ------------------------------------------------------------- a good job

def test_a_good_job_streams_previews_and_returns_a_textured_glb(client, out_dir):
    """Also shows that the server still serves after all the bad uploads above."""
    job = submit(client, lego_files(out_dir))
    previews = set()
    for outputs in job:
        if isinstance(outputs[PREVIEW], str):
            previews.add(outputs[PREVIEW])
    result = job.result(timeout=60)
    log = result[LOG]
    (out_dir / "log.txt").write_text(log)
    assert len(previews) >= 3, log

    glb = out_dir / "model.glb"
    shutil.copy(result[RUN_OUTPUTS.index("glb")], glb)
    scene = trimesh.load(glb)
    meshes = list(scene.geometry.values()) if isinstance(scene, trimesh.Scene) else [scene]
    assert meshes and len(meshes[0].faces) > 1000
    texture = meshes[0].visual.material.baseColorTexture
    assert texture is not None and min(texture.size) >= 128
    with zipfile.ZipFile(result[RUN_OUTPUTS.index("obj_zip")]) as zf:
        assert any(name.endswith(".obj") for name in zf.namelist())

    per_view = result[RUN_OUTPUTS.index("per_view")]
    assert len(per_view["data"]) == 24
    assert [row[0] for row in per_view["data"]][:4] == ["r_0.png", "r_1.png", "r_4.png", "r_5.png"]  # not r_10
    metrics = result[RUN_OUTPUTS.index("metrics")]
    assert metrics["metrics"]["train_mask_iou"] > 0.9 and metrics["timings_s"]["total"] > 0
    # Each stage's figures; the refinement's timings are here, not in its progress line.
    assert metrics["stages"]["hull"]["faces"] > SMALL["refine_mesh_faces"]  # carved; the refinement simplifies
    assert metrics["stages"]["refine"]["geometry_ms_per_step"] > 0
    assert "ms_per_step" not in log

    # Each run writes a new file, so the 3D viewer reloads.
    assert Path(result[RUN_OUTPUTS.index("glb")]).name.startswith("model-")


def test_stop_frees_the_job_quickly_and_the_session_folder_goes_with_the_client(launched_app, out_dir):
    served, url = launched_app
    own = Client(url, verbose=False)
    job = submit(own, lego_files(out_dir), refine_iterations=2000)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any(isinstance(o[PREVIEW], str) for o in job.outputs()):
        time.sleep(0.2)
    session = next(s for s in served.sessions.all() if s.current is not None and s.current.active())
    job.cancel()
    stopped = time.monotonic()
    while session.current.active() and time.monotonic() - stopped < 10:
        time.sleep(0.05)
    took = time.monotonic() - stopped
    (out_dir / "stop_seconds.txt").write_text(f"{took:.2f}\n")
    assert not session.current.active(), "the pipeline kept running after cancel"
    assert took < 5  # one refine step on a busy 2-core CPU; well under 2 s on an idle one or a GPU

    folder = session.folder
    assert folder.is_dir()
    own.close()
    deadline = time.monotonic() + 30
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists(), "the session folder outlived its client"
