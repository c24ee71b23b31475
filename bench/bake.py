"""Texture bake on the GPU: nearest texels by jump flooding (CUDA) against scipy's exact distance
transform (CPU), paired in one process. Prints one JSON document.

On a real chart layout (spot subdivided to about 90k faces, unwrapped by `pipeline.uv.unwrap` at
``--size``), for ``--repeats`` rounds, alternating the two paths in each round:
- ``nearest_ms``: one `appearance.nearest_texels` on the atlas's covered texels (a bake calls it
  twice: the border ring, then the fill of unseen texels), synchronised;
- ``bake_ms``: the whole `appearance.bake_texture` with a cheap colour function, once with the
  CUDA path and once with `nearest_texels` forced onto the CPU path;
- ``agreement``: how far the CUDA path's distances are from the exact transform's (share of texels
  exact, the largest excess in texels).
min / median / max per figure and the ratio of the medians (CPU path / CUDA path), measured in the
same run.

    python bench/bake.py --data ../shared/data [--size 2048 --repeats 7] [--out X.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_e2e import _git_commit, host_identity  # noqa: E402
from pipeline.refine import appearance  # noqa: E402
from pipeline.render import Rasterizer  # noqa: E402
from pipeline.uv import unwrap  # noqa: E402


def timed(fn) -> float:  # milliseconds, synchronised on both sides
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start)


def spread(values: list) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    mesh = trimesh.load(args.data / "spot" / "spot.obj", force="mesh", process=True)
    mesh = mesh.subdivide().subdivide()
    vertices, faces = np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.int64)
    vmapping, faces_uv, uvs = unwrap(vertices, faces, args.size)
    rasterizer = Rasterizer(backend="nvdiffrast", device="cuda")
    clip = torch.from_numpy(np.c_[2 * uvs - 1, np.zeros((len(uvs), 1)), np.ones((len(uvs), 1))]).float().cuda()
    rast, _ = rasterizer.rasterize(clip[None], torch.from_numpy(faces_uv).int().cuda(), (args.size, args.size),
                                   grad_db=False)
    covered = rast[0, ..., 3] > 0  # [H, W] bool on the GPU

    def colors_at(points, normals):  # cheap and finite except below the middle: "unseen" texels to fill
        colors = np.abs(normals).astype(np.float32)
        colors[points[:, 1] < np.median(points[:, 1])] = np.nan
        return colors

    exact_nearest = appearance.nearest_texels

    def bake(device: str):
        def nearest_on(valid):
            return tuple(a.to(valid.device) for a in exact_nearest(valid.to(device)))
        appearance.nearest_texels = nearest_on
        try:
            return appearance.bake_texture(vertices[vmapping], faces_uv, uvs, colors_at, args.size, rasterizer=rasterizer)
        finally:
            appearance.nearest_texels = exact_nearest

    bake("cuda"), bake("cpu")  # warm-up: kernels, allocator
    nearest = {"cpu": [], "cuda": []}
    baked = {"cpu": [], "cuda": []}
    for _ in range(args.repeats):
        for device in ("cpu", "cuda"):
            nearest[device].append(timed(lambda: exact_nearest(covered.to(device))))
            baked[device].append(timed(lambda: bake(device)))

    exact = ndimage.distance_transform_edt(~covered.cpu().numpy())
    fast, _, _ = exact_nearest(covered)
    excess = fast.cpu().numpy() - exact
    textures = {device: bake(device) for device in ("cpu", "cuda")}
    report = {
        "commit": _git_commit(), "date": time.strftime("%Y-%m-%d"), "host": host_identity(),
        "faces": int(len(faces)), "texture_size": args.size, "covered_share": float(covered.float().mean()),
        "repeats": args.repeats,
        "nearest_ms": {d: spread(v) for d, v in nearest.items()},
        "bake_ms": {d: spread(v) for d, v in baked.items()},
        "nearest_cpu_over_cuda": statistics.median(nearest["cpu"]) / statistics.median(nearest["cuda"]),
        "bake_cpu_over_cuda": statistics.median(baked["cpu"]) / statistics.median(baked["cuda"]),
        "agreement": {"exact_share": float(np.mean(np.abs(excess) < 1e-9)), "max_excess_texels": float(excess.max()),
                      "min_excess_texels": float(excess.min()),
                      "bake_max_abs_diff": float(np.abs(textures["cpu"] - textures["cuda"]).max()),
                      "bake_texels_differing": float(np.mean(np.any(textures["cpu"] != textures["cuda"], axis=2)))},
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
