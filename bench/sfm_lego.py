"""Structure from motion on unposed lego photos: registered views, pose accuracy, time; prints JSON.

    .venv/bin/python bench/sfm_lego.py [--data ../shared/data/lego] [--views 50 25] [--masks]

The lego views (400 px, RGBA) are composited on white, their poses and alpha dropped; every k-th view
of the 100 is used (k = 100 / views). Accuracy: `pipeline.sfm.pose_errors` (similarity alignment of the
camera centres, trimmed of badly placed views; errors in degrees and % of the radius).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.importers import load_capture  # noqa: E402
from pipeline.sfm import estimate_cameras, pose_errors  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "lego"))
    ap.add_argument("--views", type=int, nargs="+", default=[50, 25])
    ap.add_argument("--masks", action="store_true", help="pass the alpha masks to drop background features")
    args = ap.parse_args()
    full = load_capture(args.data)
    order = np.argsort([int(n.split("_")[-1].split(".")[0]) for n in full.names])  # r_0 ... r_99
    for views in args.views:
        index = order[:: max(1, len(order) // views)][:views]
        sub = full.subset(index)
        start = time.monotonic()
        res = estimate_cameras(sub.images, sub.masks if args.masks else None, sub.names)
        row = {"views": views, "registered": int(len(res.registered)), "seconds": round(time.monotonic() - start, 1),
               "mean_reprojection_error_px": res.mean_reprojection_error, "points": int(len(res.points)),
               "warnings": res.warnings}
        errors = pose_errors(res.cameras.world_to_camera, sub.cameras.world_to_camera[res.registered])
        row.update({k: v for k, v in errors.items() if np.ndim(v) == 0})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
