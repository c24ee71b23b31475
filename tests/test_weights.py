"""Optional-model weights: states, checksums, the CLI table, the panel rows, fetch, the shape prior.

Every test builds its own tiny weights folder and manifest in tmp_path; nothing leaves the machine
(the download test serves its file from a loopback HTTP server).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline import weights
from pipeline.__main__ import main
from pipeline.capture import Capture
from pipeline.errors import PipelineError
from pipeline.shape_prior import ReconViaGenPrior

ROOT = Path(__file__).resolve().parents[1]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model(name, files, **extra):
    return {"name": name, "enables": f"feature {name}", "source": "test", "licence": "test", "files": files, **extra}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A weights folder with one model in each state, its manifest, and the env vars pointing at them."""
    root = tmp_path / "weights"
    (root / "good").mkdir(parents=True)
    (root / "good" / "a.bin").write_bytes(b"hello")
    (root / "bad.bin").write_bytes(b"world")
    (root / "short.bin").write_bytes(b"abc")
    (root / "nopin.bin").write_bytes(b"anything")
    models = [
        _model("good", [{"path": "good/a.bin", "size": 5, "sha256": _sha(b"hello")}]),
        _model("bad", [{"path": "bad.bin", "size": 5, "sha256": _sha(b"other")}]),
        _model("short", [{"path": "short.bin", "size": 5, "sha256": _sha(b"abcde")}]),
        _model("absent", [{"path": "absent/x.onnx", "size": 1, "sha256": _sha(b"x")}]),
        _model("nopin", [{"path": "nopin.bin", "size": None, "sha256": None}]),
        _model("nopkg", [{"path": "good/a.bin", "size": 5, "sha256": _sha(b"hello")}],
               package="no_such_module_for_tests", install="pip install no-such-module"),
    ]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": models}))
    monkeypatch.setenv("PHOTO3D_WEIGHTS", str(root))
    monkeypatch.setenv("PHOTO3D_MANIFEST", str(manifest))
    return root, manifest


def _by_name(statuses):
    return {s.name: s for s in statuses}


def test_each_state(setup):
    got = _by_name(weights.status())
    assert {n: s.state for n, s in got.items()} == {
        "good": "available", "bad": "corrupt", "short": "corrupt",
        "absent": "missing", "nopin": "unverified", "nopkg": "available",
    }
    assert got["good"].enables == "feature good"


def test_messages_say_what_is_wrong_and_what_to_do(setup):
    root, _ = setup
    got = _by_name(weights.status())
    bad = got["bad"].message
    assert "bad.bin has sha256" in bad and f"expected {_sha(b'other')[:12]}" in bad
    assert "delete it" in bad and "python -m pipeline weights fetch bad" in bad
    assert "is 3 bytes, expected 5" in got["short"].message
    assert "absent/x.onnx not found" in got["absent"].message
    assert "python -m pipeline weights fetch absent" in got["absent"].message and str(root) in got["absent"].message
    assert "pins no checksum" in got["nopin"].message
    assert "no_such_module_for_tests" in got["nopkg"].message and "pip install no-such-module" in got["nopkg"].message


def test_cli_table_and_panel_rows_agree(setup, capsys):
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    rows = weights.status_rows()
    assert [r[0] for r in rows] == ["good", "bad", "short", "absent", "nopin", "nopkg"]
    lines = out.splitlines()
    assert lines[0].split() == list(weights.TABLE_HEADERS)
    for row, line in zip(rows, lines[2:]):
        assert line.split(None, 1)[0] == row[0]
        position = 0
        for cell in row:  # every cell of the panel's row, in order, on the CLI's line
            position = line.index(cell, position) + len(cell)
    assert out.startswith(weights.format_table(weights.status()))


def test_cli_as_a_subprocess(setup):
    result = subprocess.run([sys.executable, "-m", "pipeline", "weights"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(weights.format_table(weights.status()))
    assert f"weights folder: {setup[0]}" in result.stdout


def test_cli_errors_are_one_line_and_exit_2(setup, capsys):
    assert main(["weights", "fetch", "nope"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown model 'nope'; the manifest lists: good, bad, short, absent, nopin, nopkg\n"


def test_hash_streams_in_chunks_and_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    f = tmp_path / "big.bin"
    data = bytes(range(256)) * 40
    f.write_bytes(data)
    want, want_reversed = _sha(data), _sha(data[::-1])
    monkeypatch.setattr(weights, "_CHUNK", 1000)  # several chunks
    monkeypatch.setattr(weights, "_hash_cache", {})
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(weights.hashlib, "sha256", lambda: calls.append(1) or real())
    assert weights.sha256_of(f) == want
    assert weights.sha256_of(f) == want
    assert len(calls) == 1  # the second call is served from the cache
    f.write_bytes(data[::-1])
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert weights.sha256_of(f) == want_reversed and len(calls) == 2


def test_bad_manifests_are_reported_clearly(tmp_path):
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"models": [_model("x", [{"path": "x", "size": 1, "sha256": "abc"}])]}))
    with pytest.raises(PipelineError, match="sha256 of x must be 64 lowercase hex digits"):
        weights.load_manifest(m)
    m.write_text(json.dumps({"models": [_model("x", [{"path": "../x", "size": 1, "sha256": None}])]}))
    with pytest.raises(PipelineError, match="relative 'path' inside the weights folder"):
        weights.load_manifest(m)
    with pytest.raises(PipelineError, match="not found"):
        weights.load_manifest(tmp_path / "none.json")


def test_the_shipped_manifest(tmp_path):
    specs = {s.name: s for s in weights.load_manifest(ROOT / "weights" / "manifest.json")}
    assert {"segmenter", "reconviagen"} <= set(specs)
    for spec in specs.values():
        assert spec.licence and spec.enables and spec.source
    seg = specs["segmenter"].files[0]
    assert seg.sha256 and seg.size and seg.url.startswith("https://github.com/danielgatis/rembg/releases/")
    assert specs["reconviagen"].hf_repo and all(f.sha256 is None for f in specs["reconviagen"].files)
    # In an empty folder everything is missing: nothing is faked.
    assert {s.state for s in weights.status(tmp_path, ROOT / "weights" / "manifest.json")} == {"missing"}


def test_fetch_refuses_when_offline(setup, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError, match=r"offline \(HF_HUB_OFFLINE is set\).*absent/x.onnx into"):
        weights.fetch("absent")


@pytest.fixture
def http_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_downloads_verifies_and_rejects(tmp_path, http_server, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    served, base = http_server
    payload = b"tiny model " * 100
    (served / "model.onnx").write_bytes(payload)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"models": [
        _model("ok", [{"path": "seg/model.onnx", "url": f"{base}/model.onnx", "size": len(payload), "sha256": _sha(payload)}]),
        _model("tampered", [{"path": "t/model.onnx", "url": f"{base}/model.onnx", "size": len(payload), "sha256": _sha(b"x")}]),
    ]}))
    root = tmp_path / "w"

    assert weights.fetch("ok", root, manifest).state == "available"
    assert (root / "seg" / "model.onnx").read_bytes() == payload

    with pytest.raises(PipelineError, match="downloaded file rejected: .*has sha256"):
        weights.fetch("tampered", root, manifest)
    assert not any((root / "t").iterdir())  # neither the file nor its .part stays behind


def test_shape_prior_is_off_until_package_and_checkpoint_are_there(tmp_path, monkeypatch):
    capture = Capture(images=np.zeros((1, 4, 4, 3), np.float32), masks=None, cameras=None, names=["a.png"])
    prior = ReconViaGenPrior(weights_dir=tmp_path / "w")

    ok, reason = prior.available()
    assert not ok and "'trellis' is not installed" in reason
    with pytest.raises(PipelineError, match="ReconViaGen shape prior is not installed: .*trellis"):
        prior.build(capture)

    package = tmp_path / "site" / "trellis"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    ok, reason = prior.available()
    assert not ok and "checkpoint missing" in reason and "reconviagen/pipeline.json not found" in reason

    (tmp_path / "w" / "reconviagen").mkdir(parents=True)
    (tmp_path / "w" / "reconviagen" / "pipeline.json").write_text("{}")
    ok, reason = prior.available()
    assert ok and "unverified" in reason
    with pytest.raises(PipelineError, match="needs object masks"):
        prior.build(capture)
