# syntax=docker/dockerfile:1
# Photos of an object -> textured 3D model, on an NVIDIA GPU. Run it with `docker compose up --build`
# (README, "Run with Docker"); checkpoints go in the /app/weights volume.
#
# Two stages: "build" has the CUDA toolkit, compilers, git and ninja to compile nvdiffrast against
# torch; "runtime" receives only the finished virtual environment, which keeps several GB of
# build tools out of the image. All Python pins come from requirements.txt, read by
# .ci/install-python-deps (the script `make` uses too), so the image, the venv and the Hugging Face
# Space install the same versions.

# CUDA 13.0 matches the cu130 torch wheels below; change both together.
ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build

# Ubuntu 24.04's python3 is 3.12; the runtime stage installs the same one so the venv carries over.
# apt packages stay unpinned (DL3008): Ubuntu's archive drops superseded versions, so pins would
# break rebuilds; the CUDA tag pins the image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git ninja-build \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Only the pins and the installer: editing code never invalidates the torch layers below.
COPY requirements.txt /src/requirements.txt
COPY .ci/install-python-deps /src/.ci/install-python-deps

# 1. torch from the official CUDA index, same version as requirements.txt. torchvision is not
#    installed: nothing in this project imports it. The cache mount keeps the ~3 GB of wheels
#    across rebuilds, so a change to requirements.txt reinstalls torch without downloading it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN --mount=type=cache,target=/root/.cache/pip \
    bash /src/.ci/install-python-deps torch "${TORCH_INDEX_URL}"

# 2. nvdiffrast (NVIDIA Source Code License: non-commercial use only; not on PyPI) compiled here
#    against the torch above, hence --no-build-isolation. Kernels for Ampere (8.0, 8.6), Ada (8.9)
#    and Hopper (9.0), plus PTX so newer GPUs can JIT-compile them. No GPU is needed to build;
#    setuptools, which the build uses, came with torch. For commercial use delete this step (or
#    set PHOTO3D_RENDER_BACKEND=triton): the app then renders with its Triton kernels, which the
#    triton package that torch's CUDA wheels install compiles at run time (MIT licence).
ARG NVDIFFRAST_REF=v0.4.0
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0+PTX"
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-build-isolation "git+https://github.com/NVlabs/nvdiffrast.git@${NVDIFFRAST_REF}"

# 3. Everything else in requirements.txt (torch is already satisfied). A step of its own, so a
#    failure names the step that failed.
# hadolint ignore=DL3059
RUN --mount=type=cache,target=/root/.cache/pip \
    bash /src/.ci/install-python-deps requirements


# torch's wheels bring their own cuBLAS/cuDNN, so the small "base" image (CUDA runtime library and
# driver hooks only) is enough; the "runtime" tag would add several GB of duplicate libraries.
FROM nvidia/cuda:${CUDA_VERSION}-base-${UBUNTU} AS runtime

# Replace the image's "ubuntu" user by "app" with the same uid 1000, the usual uid of a desktop
# user, so a bind-mounted weights folder stays readable and writable from both sides.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --no-log-init --create-home --uid 1000 app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    PHOTO3D_WEIGHTS=/app/weights \
    PHOTO3D_MANIFEST=/app/weights-manifest.json \
    HF_HOME=/app/weights/.huggingface

COPY --from=build /opt/venv /opt/venv
WORKDIR /app

# The manifest lives outside the volume: a volume keeps the files of its first run, so a manifest
# inside it would not follow image updates. The app may write only to the volume and outputs/.
COPY weights/manifest.json /app/weights-manifest.json
RUN mkdir -p /app/weights /app/outputs && chown app:app /app/weights /app/outputs
VOLUME ["/app/weights"]

COPY app.py ./
COPY pipeline/ pipeline/
COPY ui/ ui/
COPY assets/ assets/

# Numeric, so orchestrators that enforce non-root (e.g. Kubernetes runAsNonRoot) can check it.
USER 1000:1000
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:7860/', timeout=8)"]
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
