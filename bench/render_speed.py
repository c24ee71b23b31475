"""GPU speed of the three rendering backends at the refinement's sizes. Prints one JSON document.

The refinement's two kinds of step, forward + backward, on a UV sphere with the default preset's
triangle count seen from orbit cameras (as `bench/gpu_e2e.py`'s raw_render_cost):
- textured: rasterize -> interpolate UVs with derivatives -> texture (trilinear, clamp) ->
  antialias (RGB + coverage), the texture loop's `pipeline.mesh.render_textured`;
- colored: rasterize -> interpolate per-vertex colours -> antialias, the geometry loop's
  `render_colored`.
For each backend: ms per step (median of timed runs after warm-up) and, for the textured step, the
forward time of each op and the backward time (CUDA events), with ratios to nvdiffrast. With
``--variants`` the triton backend is also timed under other launch configurations.

    python bench/render_speed.py [--faces 80000 --views 24 --res 512 400] [--variants] [--out X.json]
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

from bench.render_cpu import uv_sphere  # noqa: E402
from bench.render_parity import _git_commit  # noqa: E402
from pipeline.cameras import Cameras, look_at, to_clip  # noqa: E402
from pipeline.mesh import render_colored, render_textured  # noqa: E402
from pipeline.render import Rasterizer, nvdiffrast_available, triton_available  # noqa: E402

VARIANTS = {  # triton launch configurations tried with --variants (changes to the defaults)
    "items32": {"items": 32},
    "lanes8_items32": {"lanes": 8, "items": 32},
}


def orbit(views: int, size: int, distance: float = 3.0, fov_degrees: float = 40.0) -> Cameras:
    """Cameras on a Fibonacci spiral looking at the origin (as pipeline.synthetic.orbit_cameras)."""
    index = np.arange(views) + 0.5
    height = 1 - 1.35 * index / views
    azimuth = np.pi * (1 + 5**0.5) * index
    ring = np.sqrt(1 - height**2)
    dirs = np.stack([ring * np.cos(azimuth), height, ring * np.sin(azimuth)], 1)
    focal = 0.5 * size / np.tan(np.radians(fov_degrees / 2))
    k = np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]])
    w2c = np.stack([look_at(distance * d, np.zeros(3), np.array([0.0, 1.0, 0.0])) for d in dirs])
    return Cameras(np.repeat(k[None], views, 0), w2c, np.full((views, 2), size))


def scene(faces: int, views: int, res: int, texture_size: int) -> dict:
    vertices, tri = uv_sphere(faces)
    cams = orbit(views, res)
    mats = torch.tensor(cams.clip_matrices((res, res), 0.5, 6.0), dtype=torch.float32, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    return {
        "vertices": vertices.cuda(), "tri": tri.cuda(), "uvs": (vertices[:, :2] * 0.5 + 0.5).contiguous().cuda(),
        "colors": torch.rand(len(vertices), 3, device="cuda", generator=generator),
        "texture": torch.rand(1, texture_size, texture_size, 3, device="cuda", generator=generator),
        "mats": mats, "res": res,
    }


def step_fn(r: Rasterizer, s: dict, kind: str):
    def step():
        verts = s["vertices"].clone().requires_grad_(True)
        if kind == "textured":
            texture = s["texture"].clone().requires_grad_(True)
            rgb, alpha = render_textured(r, verts, s["tri"], s["uvs"], s["tri"], texture, s["mats"],
                                         (s["res"], s["res"]))
        else:
            colors = s["colors"].clone().requires_grad_(True)
            rgb, alpha = render_colored(r, verts, s["tri"], colors, s["mats"], (s["res"], s["res"]))
        (rgb.sum() + alpha.sum()).backward()
    return step


def time_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def op_breakdown(r: Rasterizer, s: dict, repeats: int) -> dict:
    """Forward ms of each op of the textured step and the backward's, by CUDA events (median)."""
    names = ("to_clip", "rasterize", "interpolate", "texture", "antialias", "backward")
    samples = {n: [] for n in names}
    for i in range(repeats + 3):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(names) + 1)]
        verts = s["vertices"].clone().requires_grad_(True)
        texture = s["texture"].clone().requires_grad_(True)
        events[0].record()
        clip = to_clip(verts, s["mats"])
        events[1].record()
        rast, rast_db = r.rasterize(clip, s["tri"], (s["res"], s["res"]))
        events[2].record()
        uv, uv_da = r.interpolate(s["uvs"][None], rast, s["tri"], rast_db=rast_db, diff_attrs="all")
        events[3].record()
        color = r.texture(texture, uv, uv_da, filter_mode="linear-mipmap-linear", boundary_mode="clamp")
        events[4].record()
        covered = rast[..., 3:4] > 0
        out = r.antialias(torch.cat([torch.where(covered, color, 0.0), covered.float()], -1), rast, clip, s["tri"])
        events[5].record()
        out.sum().backward()
        events[6].record()
        torch.cuda.synchronize()
        if i >= 3:
            for k, n in enumerate(names):
                samples[n].append(events[k].elapsed_time(events[k + 1]))
    return {n: float(np.median(v)) for n, v in samples.items()}


def bench_backend(backend: str, s: dict, repeats: int) -> dict:
    r = Rasterizer(backend=backend, device="cuda")
    reps = repeats if backend != "torch" else max(3, repeats // 4)
    return {
        "textured_ms": time_ms(step_fn(r, s, "textured"), reps),
        "colored_ms": time_ms(step_fn(r, s, "colored"), reps),
        "textured_ops_ms": op_breakdown(r, s, reps),
    }


def agreement(s: dict) -> dict:
    """The triton kernels against the torch reference on this scene: triangle ids, rast, rast_db,
    and the textured step's output and gradients (vertices, texture)."""
    clip = to_clip(s["vertices"], s["mats"])
    ours = Rasterizer(backend="triton", device="cuda").rasterize(clip, s["tri"], (s["res"], s["res"]))
    ref = Rasterizer(backend="torch", device="cuda").rasterize(clip, s["tri"], (s["res"], s["res"]))
    either = (ours[0][..., 3] > 0) | (ref[0][..., 3] > 0)
    same = (ours[0][..., 3] == ref[0][..., 3]) & either
    uvz = (ours[0] - ref[0])[..., :3][same].abs()
    result = {"id_agreement": float(same.sum() / either.sum()), "uvz_max_abs_diff": float(uvz.max()),
              "uvz_fraction_above_1e-4": float((uvz > 1e-4).float().mean()),
              "rast_db_max_abs_diff": float((ours[1] - ref[1])[same].abs().max())}
    runs = []
    weights = torch.rand(len(s["mats"]), s["res"], s["res"], 3, device="cuda",
                         generator=torch.Generator("cuda").manual_seed(1))
    for backend in ("triton", "torch"):
        verts = s["vertices"].clone().requires_grad_(True)
        texture = s["texture"].clone().requires_grad_(True)
        rgb, alpha = render_textured(Rasterizer(backend=backend, device="cuda"), verts, s["tri"], s["uvs"], s["tri"],
                                     texture, s["mats"], (s["res"], s["res"]))
        ((rgb * weights).sum() + alpha.sum()).backward()
        runs.append((rgb.detach(), verts.grad, texture.grad))
    cosine = torch.nn.functional.cosine_similarity
    result.update({
        "rgb_max_abs_diff": float((runs[0][0] - runs[1][0]).abs().max()),
        "vertex_grad_cosine": float(cosine(runs[0][1].flatten().double(), runs[1][1].flatten().double(), dim=0)),
        "texture_grad_cosine": float(cosine(runs[0][2].flatten().double(), runs[1][2].flatten().double(), dim=0)),
    })
    return result


def profile(backends: list, s: dict, path: Path) -> None:
    """Kernel tables (by GPU time) of 5 textured and 5 colored steps of each fast backend."""
    from torch.profiler import ProfilerActivity  # noqa: PLC0415
    from torch.profiler import profile as torch_profile  # noqa: PLC0415

    tables = []
    for backend in [b for b in backends if b != "torch"]:
        r = Rasterizer(backend=backend, device="cuda")
        for kind in ("textured", "colored"):
            step = step_fn(r, s, kind)
            step()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            tables.append(f"== {backend} {kind} x5 ==\n" + prof.key_averages().table(
                sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tables))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", type=int, default=80000)
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--res", type=int, nargs="+", default=[512, 400])
    parser.add_argument("--texture", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", type=Path, metavar="TXT",
                        help="also write torch.profiler kernel tables of each backend's steps here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    backends = [b for b, ok in (("nvdiffrast", nvdiffrast_available()), ("triton", triton_available("cuda")),
                                ("torch", True)) if ok]
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": _git_commit(),
              "date": time.strftime("%Y-%m-%d"),
              "faces": args.faces, "views": args.views, "texture": args.texture, "configs": []}
    try:
        import triton  # noqa: PLC0415

        report["triton"] = triton.__version__
    except ImportError:
        pass
    for res in args.res:
        s = scene(args.faces, args.views, res, args.texture)
        config = {"resolution": res, "triangles": int(len(s["tri"]))}
        for backend in backends:
            start = time.perf_counter()
            config[backend] = bench_backend(backend, s, args.repeats)
            config[backend]["bench_seconds"] = time.perf_counter() - start  # first call: triton compiles here
        if "triton" in backends:
            config["triton_vs_torch"] = agreement(s)
        if "nvdiffrast" in config:
            for backend in backends[1:]:
                for kind in ("textured_ms", "colored_ms"):
                    ratio = config[backend][kind] / config["nvdiffrast"][kind]
                    config[f"{backend}_over_nvdiffrast_{kind[:-3]}"] = ratio
        if args.variants and "triton" in backends and res == args.res[0]:
            from pipeline.render.triton_backend.rasterize import LAUNCH  # noqa: PLC0415

            defaults = dict(LAUNCH)
            config["triton_variants"] = {}
            r = Rasterizer(backend="triton", device="cuda")
            for name, change in VARIANTS.items():
                LAUNCH.update(change)
                config["triton_variants"][name] = {"textured_ms": time_ms(step_fn(r, s, "textured"), args.repeats),
                                                   "colored_ms": time_ms(step_fn(r, s, "colored"), args.repeats)}
                LAUNCH.clear()
                LAUNCH.update(defaults)
        if args.profile and res == args.res[0]:
            profile(backends, s, args.profile)
        report["configs"].append(config)
        print(json.dumps(config), file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
