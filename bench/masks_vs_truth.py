"""Masks estimated without weights (pipeline/cosegment.py) against a capture's true masks; prints JSON.

    .venv/bin/python bench/masks_vs_truth.py ../shared/data/nerd_blowtorch_carpet \\
        --poses poses/poses_bounds_present.npy [--max-side 512] [--out bench/results/x.json]

The capture's photos and LLFF poses (``--poses``, relative to the capture folder; a COLMAP model or
cameras.json found by `load_capture` works too when ``--poses`` is left out) are loaded without their
masks; `estimate_missing` finds masks as a run without masks does (sparse points triangulated with
the given poses, graph cuts, visual-hull rounds; no photo left out), and each is compared with the
true mask in ``masks/<stem>.png`` at the canvas size (``--max-side``, as the preset would).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import events  # noqa: E402
from pipeline.capture import Capture  # noqa: E402
from pipeline.config import CamerasConfig  # noqa: E402
from pipeline.importers import load_capture  # noqa: E402
from pipeline.reconstruct import estimate_missing  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("capture")
    ap.add_argument("--poses", help="an LLFF poses_bounds.npy inside the capture, rows in sorted photo order")
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--out")
    args = ap.parse_args()
    folder = Path(args.capture)
    with tempfile.TemporaryDirectory() as tmp:
        source = folder
        if args.poses:  # photos and poses side by side, the true masks left behind
            source = Path(tmp)
            os.symlink((folder / "images").resolve(), source / "images")
            os.symlink((folder / args.poses).resolve(), source / "poses_bounds.npy")
        loaded = load_capture(source, max_side=args.max_side)
        capture = Capture(images=loaded.images, masks=None, cameras=loaded.cameras, names=loaded.names,
                          source=loaded.source, originals=loaded.originals)
        start = time.monotonic()
        seen, done = events.collect(estimate_missing(capture, CamerasConfig(exclude_bad_masks=False)))
        log = [repr(event)[:300] for event in seen if isinstance(event, (events.Metrics, events.Warning))]
        seconds = time.monotonic() - start
    height, width = done.resolution
    truth = np.stack([np.asarray(Image.open(folder / "masks" / f"{Path(n).stem}.png").convert("L")
                                 .resize((width, height), Image.BILINEAR)) > 127 for n in done.names])
    estimated = done.masks > 0.5
    iou = (estimated & truth).sum((1, 2)) / np.maximum((estimated | truth).sum((1, 2)), 1)
    report = {"capture": folder.name, "views": len(done), "canvas": [height, width], "seconds": round(seconds, 1),
              "load_average_1min": round(os.getloadavg()[0], 2),
              "iou_mean": round(float(iou.mean()), 4), "iou_median": round(float(np.median(iou)), 4),
              "iou_min": round(float(iou.min()), 4), "views_below_0.7": int((iou < 0.7).sum()),
              "per_view": {n: round(float(v), 4) for n, v in zip(done.names, iou)}, "log": log}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
