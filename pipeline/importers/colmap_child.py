"""Read a COLMAP model with pycolmap in a child process: ``python -m pipeline.importers.colmap_child DIR``.

pycolmap reads a damaged binary model without bounds: a forged count makes it loop past the end
of the file for ever, and a bad record can abort the process. Uploaded models are therefore read
here, away from the server, under a time limit (`read_model`); the child prints what the importer
needs as JSON: {"cameras": {id: {model, width, height, params, K}}, "images": [{name, has_pose,
camera_id, cam_from_world}]}.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..errors import PipelineError

READ_TIMEOUT_S = 60.0  # a model of thousands of photos reads in a few seconds


def read_model(model_dir: Path, label: str) -> dict:
    """The model in ``model_dir`` as the child reads it; PipelineError naming ``label`` on failure."""
    try:
        done = subprocess.run([sys.executable, "-m", __name__, str(model_dir)], capture_output=True, text=True,
                              timeout=READ_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise PipelineError(f"{label}: reading the COLMAP model took more than {READ_TIMEOUT_S:.0f} s, so the file is "
                            "damaged (its counts do not match its size). Re-export it from COLMAP.") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines and done.returncode == 1 else f"the reader crashed (exit status {done.returncode})"
        raise PipelineError(f"{label}: cannot read the COLMAP model ({reason}). Re-export it from COLMAP.")
    return json.loads(done.stdout)


def _main(model_dir: str) -> None:
    import pycolmap  # noqa: PLC0415 (only the child imports it)

    try:
        model = pycolmap.Reconstruction(model_dir)
        cameras = {
            str(camera_id): {
                "model": camera.model.name, "width": int(camera.width), "height": int(camera.height),
                "params": [float(v) for v in camera.params], "K": camera.calibration_matrix().tolist(),
            }
            for camera_id, camera in model.cameras.items()
        }
        images = [
            {
                "name": image.name, "has_pose": bool(image.has_pose), "camera_id": int(image.camera_id),
                "cam_from_world": image.cam_from_world().matrix().tolist() if image.has_pose else None,
            }
            for image in model.images.values()
        ]
    except Exception as error:  # noqa: BLE001 (any reader failure is one message to the parent)
        print(f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}",
              file=sys.stderr)
        sys.exit(1)
    json.dump({"cameras": cameras, "images": images}, sys.stdout)


if __name__ == "__main__":
    _main(sys.argv[1])
