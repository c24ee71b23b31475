"""How much of the silhouettes the refinement's starting surface keeps (CPU; torch backend).

The visual hull is carved on a grid, so parts thinner than a voxel are carved away, and the first
remesh of the refinement (coarse, for the first geometry steps) loses more. This measures, on a
capture's held-out views, the pixels where the starting surface and the masks disagree, split into
extra (covered, not in the mask: holes not opened) and missing (in the mask, not covered: thin parts
lost), for the hull at each grid and the hull remeshed to each face count. Prints one JSON line per
surface.

    python bench/start_silhouettes.py --data ../shared/data/lego [--grids 128,192] [--faces 20000,40000,80000]
        [--dilations 0,1]   # hull.mask_dilation_px: the masks grown before carving

lego is NeRF-synthetic (CC BY-NC: non-commercial).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.hull import carve_visual_hull, hull_mesh, render_silhouettes  # noqa: E402
from pipeline.importers import load_capture  # noqa: E402
from pipeline.normalize import normalize_scene, transform_cameras  # noqa: E402
from pipeline.reconstruct import split_holdout  # noqa: E402
from pipeline.refine.surface import remesh, target_edge_length  # noqa: E402


def disagreement(vertices, faces, cameras, masks) -> dict:  # % of the views' pixels
    covered = render_silhouettes(vertices, faces, cameras, masks.shape[1:3])  # [N, H, W] bool, torch on the CPU
    truth = masks > 0.5
    extra, missing = 100 * float((covered & ~truth).mean()), 100 * float((~covered & truth).mean())
    return {"disagree_pct": extra + missing, "extra_pct": extra, "missing_pct": missing}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--holdout-every", type=int, default=10)
    parser.add_argument("--grids", default="128")
    parser.add_argument("--faces", default="20000,40000,80000")
    parser.add_argument("--dilations", default="0")
    parser.add_argument("--remesh-iterations", type=int, default=3)
    args = parser.parse_args()
    capture = load_capture(args.data, max_side=512)
    fit, held = split_holdout(capture, args.holdout_every)
    cameras, world_from_normalised = normalize_scene(fit.cameras, fit.masks, device="cpu")
    held_cameras = transform_cameras(held.cameras, world_from_normalised)  # for points in the normalised frame
    runs = [(int(g), int(d)) for g in args.grids.split(",") for d in args.dilations.split(",")]
    for grid, dilation in runs:
        field = carve_visual_hull(cameras, fit.masks, resolution=grid, mask_dilation_px=dilation, device="cpu")
        vertices, faces = hull_mesh(field)
        name = f"hull {grid}" + (f", masks grown {dilation} px" if dilation else "")
        row = {"surface": name, "faces": len(faces)}
        print(json.dumps({**row, **disagreement(vertices, faces, held_cameras, held.masks)}), flush=True)
        for count in (int(c) for c in args.faces.split(",")):
            start = time.perf_counter()
            length = target_edge_length(vertices, faces, count)
            new_vertices, new_faces = remesh(vertices, faces, length, iterations=args.remesh_iterations)
            row = {"surface": f"{name}, remeshed to {count}", "faces": len(new_faces),
                   "remesh_seconds": time.perf_counter() - start}
            print(json.dumps({**row, **disagreement(new_vertices, new_faces, held_cameras, held.masks)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
