"""Shared test helpers."""

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _validate_glb(path) -> dict:
    """The Khronos glTF validator's report for ``path`` (see tests/gltf_validate.js)."""
    if not (REPO / "node_modules" / "gltf-validator").is_dir() or shutil.which("node") is None:
        pytest.fail("the Khronos glTF validator (node + npm package gltf-validator) is missing: run `bash .ci/install-test-tools`")
    result = subprocess.run(
        ["node", str(REPO / "tests" / "gltf_validate.js"), str(path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    if result.returncode != 0:
        pytest.fail(f"gltf validator did not run on {path}: {result.stderr.strip()}")
    return json.loads(result.stdout)


@pytest.fixture
def validate_glb():
    """``validate_glb(path) -> dict``: the validator's report; fails (never skips) when it cannot run."""
    return _validate_glb


@pytest.fixture(scope="module")
def launched_app():
    """The Gradio app served on a free local port for one test module: (Blocks, url)."""
    from ui.layout import build_app  # noqa: PLC0415 (gradio is only needed by the app tests)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app()
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    yield app, url
    app.close()
