"""Our structure from motion against plain pycolmap defaults on the same photos, side by side; prints JSON.

    .venv/bin/python bench/sfm_vs_colmap.py ../shared/data/saharov32_statue [--out bench/results/x.json]

Plain: ``pycolmap.extract_features`` (camera mode AUTO), ``match_exhaustive`` and ``incremental_mapping``
with every option at its default, on the capture's ``images/`` folder (the files as they are: COLMAP
sees the stored pixels and reads EXIF focal lengths itself). Ours: `load_capture` on the same folder
(photos only: a camera file beside them is not read) and `pipeline.sfm.estimate_cameras` on its
originals, as the app runs it. Both run one after the other in this process on the CPU, so their
times share the machine's load; ``ratio`` = our seconds / plain seconds (SfM only; ``load_seconds`` is
our decoding of the photos onto the canvas, which plain COLMAP does not need). ``--order ours-first``
swaps the order to check that it does not matter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.importers import load_capture  # noqa: E402
from pipeline.importers.sources import images_in  # noqa: E402
from pipeline.sfm import estimate_cameras  # noqa: E402


def plain_colmap(images: Path) -> dict:
    import pycolmap

    pycolmap.logging.minloglevel = 2
    pycolmap.logging.stderrthreshold = 2
    names = [p.name for p in images_in(images)]
    with tempfile.TemporaryDirectory(prefix="plain_colmap_") as tmp:
        db, out = Path(tmp) / "database.db", Path(tmp) / "sparse"
        out.mkdir()
        start = time.monotonic()
        pycolmap.extract_features(db, images, image_names=names, device=pycolmap.Device.cpu)
        pycolmap.match_exhaustive(db, device=pycolmap.Device.cpu)
        models = pycolmap.incremental_mapping(db, images, out)
        seconds = time.monotonic() - start
        database = pycolmap.Database.open(db)
        cameras = database.num_cameras()
        database.close()
    best = max(models.values(), key=lambda r: r.num_reg_images(), default=None)
    return {"registered": best.num_reg_images() if best else 0, "models": len(models), "cameras": cameras,
            "photos": len(names), "seconds": round(seconds, 1),
            "reprojection_error_px": round(best.compute_mean_reprojection_error(), 3) if best else None}


def ours(images: Path) -> dict:
    start = time.monotonic()
    capture = load_capture(images)
    loaded = time.monotonic()
    result = estimate_cameras(capture.images, capture.masks, capture.names, originals=capture.originals)
    seconds = time.monotonic() - loaded
    return {"registered": len(result.registered), "photos": len(capture), "seconds": round(seconds, 1),
            "load_seconds": round(loaded - start, 1), "reprojection_error_px": round(result.mean_reprojection_error, 3),
            "points": len(result.points), "canvas": list(capture.resolution), "warnings": result.warnings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("capture", help="a capture folder (its images/ subfolder is used when present)")
    ap.add_argument("--order", choices=("plain-first", "ours-first"), default="plain-first")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    folder = Path(args.capture)
    images = folder / "images" if (folder / "images").is_dir() else folder
    runs = {}
    for which in (("plain", "ours") if args.order == "plain-first" else ("ours", "plain")):
        runs[which] = plain_colmap(images) if which == "plain" else ours(images)
        print(which, json.dumps(runs[which]), file=sys.stderr, flush=True)
    report = {
        "capture": folder.name, "order": args.order, "cpu_cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "plain": runs["plain"], "ours": runs["ours"],
        "registered_at_least_plain": runs["ours"]["registered"] >= runs["plain"]["registered"],
        "ratio": round(runs["ours"]["seconds"] / max(runs["plain"]["seconds"], 1e-9), 3),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
