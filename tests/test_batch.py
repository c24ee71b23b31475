"""The batch runner (`python -m pipeline batch`) on Ray in local mode, on the CPU, with tiny captures."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from pipeline import batch
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
LEGO = REPO / "tests" / "fixtures" / "lego_128"
# Seconds, not quality: 12 views at 128 px, a coarse hull and a few refinement steps.
TINY = ["--preset", "fast", "--set", "refine.iterations=4", "--set", "refine.views_per_step=2",
        "--set", "refine.texture_size=256", "--set", "hull.grid_resolution=48", "--set", "refine.mesh_faces=2000",
        "--set", "export.target_faces=2000"]


def _tiny_capture(folder: Path, views: int = 12) -> Path:
    """The first ``views`` training views of the lego fixture, with their transforms_train.json."""
    meta = json.loads((LEGO / "transforms_train.json").read_text())
    frames = meta["frames"][:views]
    (folder / "train").mkdir(parents=True)
    for frame in frames:
        shutil.copy(LEGO / f"{frame['file_path'][2:]}.png", folder / "train")
    (folder / "transforms_train.json").write_text(json.dumps({**meta, "frames": frames}))
    return folder


def _batch(captures: Path, out: Path, *extra: str, **kwargs):
    command = [sys.executable, "-m", "pipeline", "batch", str(captures), "-o", str(out), *TINY, *extra]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _rows(out: Path) -> list:
    return [json.loads(line) for line in (out / batch.MANIFEST_NAME).read_text().splitlines()]


@pytest.fixture(scope="module")
def captures(tmp_path_factory) -> Path:
    """a_broken (a truncated photo: it fails first), b_good (a folder), c_good (a .zip of a folder)."""
    root = tmp_path_factory.mktemp("captures")
    broken = _tiny_capture(root / "a_broken")
    photo = broken / "train" / "r_0.png"
    photo.write_bytes(photo.read_bytes()[:300])
    _tiny_capture(root / "b_good")
    folder = _tiny_capture(tmp_path_factory.mktemp("zipped") / "c_good")
    with zipfile.ZipFile(root / "c_good.zip", "w") as archive:
        for file in folder.rglob("*"):
            archive.write(file, Path("c_good") / file.relative_to(folder))
    (root / "notes.txt").write_text("not a capture")
    return root


def test_interrupt_resume_and_skip(captures, tmp_path):
    out = tmp_path / "out"
    # 1. Ctrl-C once the first row (the broken capture's) is written: the good ones are cancelled.
    proc = _batch(captures, out)
    manifest = out / batch.MANIFEST_NAME
    deadline = time.monotonic() + 120
    while not (manifest.exists() and manifest.read_text().strip()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == batch.EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("interrupted: ")
    first = {row["capture"]: row for row in _rows(out)}  # every line is whole JSON
    assert first["a_broken"]["status"] == "failed"
    assert not all(first.get(name, {}).get("status") == "ok" for name in ("b_good", "c_good"))

    # 2. The same command again finishes the rest; the broken capture's row is kept, not redone.
    proc = _batch(captures, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr  # 1: some capture failed
    rows = {row["capture"]: row for row in _rows(out)}
    assert sorted(rows) == ["a_broken", "b_good", "c_good"] and len(_rows(out)) == 3  # one row each
    assert rows["a_broken"] == first["a_broken"]
    assert "r_0.png" in rows["a_broken"]["error"] and "truncated" in rows["a_broken"]["error"]
    assert rows["a_broken"]["glb"] is None
    for name in ("b_good", "c_good"):
        row = rows[name]
        assert row["status"] == "ok" and row["error"] is None and row["glb"] == f"{name}/{name}.glb"
        assert (out / row["glb"]).read_bytes()[:4] == b"glTF" and (out / name / f"{name}_obj.zip").is_file()
        assert row["metrics"]["train_mask_iou"] > 0.8 and row["seconds"] > 0
        assert row["host"] == socket.gethostname() and row["gpu"] is None  # no GPU here: CPU tasks
    assert "c_good" in stdout and "truncated" in stdout  # the summary table

    # 3. Nothing left to do: no Ray, no work, the manifest untouched.
    before = manifest.read_text()
    start = time.monotonic()
    proc = _batch(captures, out)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and time.monotonic() - start < 15
    assert "2 done before, 1 failed before on the same input" in stderr and "0 to run" in stderr
    assert manifest.read_text() == before


def test_which_captures_run_again(tmp_path):
    captures = tmp_path / "captures"
    for name in ("fixed", "same", "done", "new"):
        (captures / name).mkdir(parents=True)
        (captures / name / "a.png").write_bytes(b"x")
    (captures / ".hidden").mkdir()
    out = captures / "out"  # the output folder inside the captures folder is no capture
    (out / "done").mkdir(parents=True)
    (out / "done" / "done.glb").write_bytes(b"glTF")
    entries = {e.name: e for e in batch.find_captures(captures, skip=out)}
    assert sorted(entries) == ["done", "fixed", "new", "same"]
    rows = {name: {"capture": name, "status": "failed", "fingerprint": entries[name].fingerprint} for name in ("fixed", "same")}
    rows["done"] = {"capture": "done", "status": "ok", "glb": "done/done.glb"}
    (captures / "fixed" / "a.png").write_bytes(b"xy")  # the user fixed that one
    entries = batch.find_captures(captures, skip=out)
    assert [e.name for e in batch.to_run(entries, rows, out, retry_failed=False)] == ["fixed", "new"]
    assert [e.name for e in batch.to_run(entries, rows, out, retry_failed=True)] == ["fixed", "new", "same"]
    (out / "done" / "done.glb").unlink()  # an "ok" row without its GLB is done again
    assert "done" in [e.name for e in batch.to_run(entries, rows, out, retry_failed=False)]

    (captures / "new.zip").write_bytes(b"PK")
    with pytest.raises(PipelineError, match="new.zip would both be capture 'new'|new and new.zip"):
        batch.find_captures(captures, skip=out)
    with pytest.raises(PipelineError, match="no captures in"):
        batch.find_captures(tmp_path / "captures" / ".hidden")


def test_manifest_ignores_a_line_cut_short(tmp_path):
    manifest = tmp_path / batch.MANIFEST_NAME
    batch.append_row(manifest, {"capture": "a", "status": "failed"})
    batch.append_row(manifest, {"capture": "a", "status": "ok"})
    with manifest.open("a") as file:
        file.write('{"capture": "b", "sta')  # a crash mid-write
    assert batch.read_manifest(manifest) == {"a": {"capture": "a", "status": "ok"}}


def test_missing_ray_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    from pipeline.__main__ import main  # noqa: PLC0415

    with pytest.raises(PipelineError, match=r"needs Ray, which is not installed: pip install -r requirements-batch.txt"):
        batch.import_ray()
    assert main(["batch", str(tmp_path), "-o", str(tmp_path / "out")]) == 2


def test_bench_plan_and_summary():
    from bench.batch_gpus import gpu_counts, summarise  # noqa: PLC0415

    assert gpu_counts("", 1) == [1] and gpu_counts("", 4) == [1, 2, 4] and gpu_counts("", 6) == [1, 2, 4, 6]
    assert gpu_counts("1,2,4", 2) == [1, 2] and gpu_counts("", 0) == []
    rows = {name: {"capture": name, "status": "ok", "error": None, "seconds": 20.0, "host": "h", "gpu": gpu,
                   "started": start, "finished": start + 20.0, "metrics": {"train_psnr": 25.0}}
            for name, gpu, start in (("a", "0", 100.0), ("b", "1", 100.0), ("c", "0", 120.0))}
    rows["d"] = {"capture": "d", "status": "failed", "error": "bad photo", "seconds": 0.1, "host": "h", "gpu": "1",
                 "started": 120.0, "finished": 120.1, "metrics": {}}
    summary = summarise(rows, wall_s=50.0, gpus=2)
    assert summary["span_s"] == 40.0 and summary["captures_per_min"] == 4.5  # 3 ok in 40 s
    assert summary["per_gpu"] == {"h:0": 2, "h:1": 1} and summary["failed"] == {"d": "bad photo"}
