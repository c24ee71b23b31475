"""Shared test helpers."""

import json
import shutil
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
