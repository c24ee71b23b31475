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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.hull import carve_visual_hull, hull_mesh  # noqa: E402
from pipeline.importers import load_capture  # noqa: E402
from pipeline.mesh import clip_range, render_colored  # noqa: E402
from pipeline.normalize import normalize_scene, transform_cameras  # noqa: E402
from pipeline.reconstruct import split_holdout  # noqa: E402
from pipeline.refine.surface import remesh, target_edge_length  # noqa: E402
from pipeline.render import Rasterizer  # noqa: E402


def disagreement(vertices, faces, cameras, masks, rasterizer) -> dict:  # % of the views' pixels
    near, far = clip_range(cameras)
    size = masks.shape[1:3]
    mats = torch.tensor(cameras.clip_matrices(size, near, far), dtype=torch.float32)
    v = torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32))
    f = torch.from_numpy(np.ascontiguousarray(faces, dtype=np.int32))
    extra = missing = 0.0
    for i in range(len(mats)):  # one view at a time: the CPU rasterizer's memory
        _, alpha = render_colored(rasterizer, v, f, torch.ones(len(v), 3), mats[i:i + 1], size)
        covered, truth = alpha[0, ..., 0].numpy() > 0.5, masks[i] > 0.5
        extra += float((covered & ~truth).mean())
        missing += float((~covered & truth).mean())
    n = len(mats)
    return {"disagree_pct": 100 * (extra + missing) / n, "extra_pct": 100 * extra / n, "missing_pct": 100 * missing / n}


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
    rasterizer = Rasterizer(backend="torch", device="cpu")
    runs = [(int(g), int(d)) for g in args.grids.split(",") for d in args.dilations.split(",")]
    for grid, dilation in runs:
        field = carve_visual_hull(cameras, fit.masks, resolution=grid, mask_dilation_px=dilation, device="cpu")
        vertices, faces = hull_mesh(field)
        name = f"hull {grid}" + (f", masks grown {dilation} px" if dilation else "")
        row = {"surface": name, "faces": len(faces)}
        print(json.dumps({**row, **disagreement(vertices, faces, held_cameras, held.masks, rasterizer)}), flush=True)
        for count in (int(c) for c in args.faces.split(",")):
            start = time.perf_counter()
            length = target_edge_length(vertices, faces, count)
            new_vertices, new_faces = remesh(vertices, faces, length, iterations=args.remesh_iterations)
            row = {"surface": f"{name}, remeshed to {count}", "faces": len(new_faces),
                   "remesh_seconds": time.perf_counter() - start}
            print(json.dumps({**row, **disagreement(new_vertices, new_faces, held_cameras, held.masks, rasterizer)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
