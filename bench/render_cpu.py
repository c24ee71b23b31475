"""Torch-backend speed on the CPU: rasterize + interpolate + antialias, forward + backward.

A ~20k-triangle sphere seen from 4 views at 256 x 256 (the issue's target: <= 0.5 s per iteration
on the 2-core development machine). Prints one JSON document.

    python bench/render_cpu.py [--triangles 20000] [--views 4] [--res 256] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cameras import Cameras, look_at, to_clip  # noqa: E402
from pipeline.render import Rasterizer  # noqa: E402


def uv_sphere(triangles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A UV sphere with about ``triangles`` faces: vertices [V, 3], faces [F, 3] int32."""
    rings = max(3, int(round(np.sqrt(triangles / 2))))
    theta = torch.linspace(0, np.pi, rings + 1)[1:-1]
    phi = torch.linspace(0, 2 * np.pi, rings + 1)[:-1]
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    body = torch.stack([t.sin() * p.cos(), t.cos(), t.sin() * p.sin()], -1).reshape(-1, 3)
    vertices = torch.cat([torch.tensor([[0.0, 1.0, 0.0]]), body, torch.tensor([[0.0, -1.0, 0.0]])])
    n = rings
    ring = lambda r, c: 1 + r * n + (c % n)  # noqa: E731
    faces = []
    cols = torch.arange(n)
    faces.append(torch.stack([torch.zeros(n, dtype=torch.long), ring(0, cols + 1), ring(0, cols)], 1))
    for r in range(rings - 2):  # one loop step per ring of the sphere: setup only, not the timed path
        faces.append(torch.stack([ring(r, cols), ring(r, cols + 1), ring(r + 1, cols)], 1))
        faces.append(torch.stack([ring(r, cols + 1), ring(r + 1, cols + 1), ring(r + 1, cols)], 1))
    last = len(vertices) - 1
    faces.append(torch.stack([ring(rings - 2, cols), ring(rings - 2, cols + 1), torch.full((n,), last)], 1))
    return vertices, torch.cat(faces).int()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triangles", type=int, default=20000)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    vertices, faces = uv_sphere(args.triangles)
    focal = 0.5 * args.res / np.tan(np.radians(25))
    k = np.array([[focal, 0, args.res / 2], [0, focal, args.res / 2], [0, 0, 1.0]])
    angles = np.linspace(0, 2 * np.pi, args.views, endpoint=False)
    w2c = np.stack([look_at(np.array([3 * np.cos(a), 0.8, 3 * np.sin(a)]), np.zeros(3), np.array([0.0, 1, 0]))
                    for a in angles])
    cams = Cameras(np.repeat(k[None], args.views, 0), w2c, np.full((args.views, 2), args.res))
    mats = torch.tensor(cams.clip_matrices((args.res, args.res), 0.5, 6.0), dtype=torch.float32)
    colours = (vertices + 1) / 2
    weights = torch.rand(args.views, args.res, args.res, 3, generator=torch.Generator().manual_seed(0))
    r = Rasterizer(backend="torch", device="cpu")

    def step() -> dict:
        times = {}
        t0 = time.perf_counter()
        verts = vertices.clone().requires_grad_(True)
        pos = to_clip(verts, mats)
        rast, rast_db = r.rasterize(pos, faces, (args.res, args.res))
        t1 = time.perf_counter()
        colour, _ = r.interpolate(colours[None], rast, faces)
        t2 = time.perf_counter()
        out = r.antialias(colour, rast, pos, faces)
        t3 = time.perf_counter()
        (out * weights).sum().backward()
        t4 = time.perf_counter()
        times.update(rasterize=t1 - t0, interpolate=t2 - t1, antialias=t3 - t2, backward=t4 - t3, total=t4 - t0)
        return times

    step()  # warm-up
    runs = [step() for _ in range(args.repeats)]
    median = {key: float(np.median([run[key] for run in runs])) for key in runs[0]}
    print(json.dumps({
        "benchmark": "render_cpu", "backend": "torch", "triangles": int(len(faces)), "views": args.views,
        "resolution": args.res, "seconds_per_iteration": median, "target_seconds": 0.5,
        "meets_target": median["total"] <= 0.5, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
