"""GPU parity of the torch and triton rendering backends with nvdiffrast. Prints one JSON document.

Runs on a CUDA machine with nvdiffrast installed (NVIDIA Source Code License: non-commercial use).
Feeds the same scenes (meshes from the shared data folder, several views, 256 and 512 px) through
the three backends: rasterize -> interpolate (per-vertex colours, UVs) -> texture -> antialias, then
backward of a fixed random weighting of the result. Reports, per scene, for torch (plain keys) and
for triton (the same keys prefixed ``triton_``) against nvdiffrast:
- id_agreement: fraction of pixels covered by either backend whose triangle ids agree;
- attr_max_abs_diff / uv_max_abs_diff / texture_max_abs_diff: on pixels where the ids agree;
- pos_grad_cosine / attr_grad_cosine: cosine similarity of the gradients w.r.t. clip-space
  positions and vertex attributes after antialias;
- ms_torch / ms_triton / ms_nvdiffrast: forward+backward time per iteration (median of timed runs).

    python bench/render_parity.py --data ../shared/data [--out bench/results/parity.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cameras import Cameras, look_at, to_clip  # noqa: E402
from pipeline.render import Rasterizer, triton_available  # noqa: E402

MESHES = {"spot": ("spot/spot.obj", "spot/spot_texture.png"), "bob": ("bob/bob_tri.obj", "bob/bob_diffuse.png")}


def load_mesh(data: Path, name: str, weld: bool = False):
    import trimesh  # noqa: PLC0415 (only the benchmarks need it on the GPU machine)
    from PIL import Image  # noqa: PLC0415

    obj, tex = MESHES[name]
    mesh = trimesh.load(data / obj, process=False, force="mesh")
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    vertices = (vertices - vertices.mean(0)) / np.linalg.norm(vertices - vertices.mean(0), axis=1).max()
    faces = np.asarray(mesh.faces, dtype=np.int32)
    if weld:  # one vertex per position: UV seams are then no longer boundary edges for antialias
        vertices, index = np.unique(vertices, axis=0, return_inverse=True)
        uv_by_position = np.zeros((len(vertices), 2), np.float32)
        uv_by_position[index.reshape(-1)] = np.asarray(mesh.visual.uv, dtype=np.float32)
        faces = index.reshape(-1)[faces].astype(np.int32)
        mesh.visual.uv = uv_by_position
    uv = np.asarray(mesh.visual.uv, dtype=np.float32)
    uv[:, 1] = 1.0 - uv[:, 1]  # OBJ stores v = 0 at the bottom of the image; our textures start at the top
    image = np.asarray(Image.open(data / tex).convert("RGB"), dtype=np.float32) / 255.0
    return vertices.astype(np.float32), faces, uv, image


def cameras_around(views: int, size: int, seed: int = 0) -> Cameras:
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(views, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    focal = 0.5 * size / np.tan(np.radians(20))
    k = np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]])
    w2c = np.stack([look_at(2.6 * d, np.zeros(3), np.array([0.0, 1.0, 0.0])) for d in dirs])
    return Cameras(np.repeat(k[None], views, 0), w2c, np.full((views, 2), size))


def run_backend(backend: str, scene: dict, repeats: int, textured: bool = True):
    r = Rasterizer(backend=backend, device="cuda")
    res = scene["res"]

    def forward_backward():
        pos = scene["clip"].clone().requires_grad_(True)
        attr = scene["attr"].clone().requires_grad_(True)
        rast, rast_db = r.rasterize(pos, scene["tri"], (res, res))
        colour, _ = r.interpolate(attr[None], rast, scene["tri"])
        uv, uv_da = r.interpolate(scene["uv"][None], rast, scene["tri"], rast_db=rast_db, diff_attrs="all")
        if textured:
            tex = r.texture(scene["tex"], uv, uv_da, filter_mode="linear-mipmap-linear", boundary_mode="wrap")
        else:
            tex = torch.ones_like(colour)
        shaded = colour * tex * (rast[..., 3:] > 0)
        out = r.antialias(shaded, rast, pos, scene["tri"])
        (out * scene["weights"]).sum().backward()
        return rast.detach(), colour.detach(), uv.detach(), tex.detach(), out.detach(), pos.grad, attr.grad

    result = forward_backward()
    for _ in range(2 if repeats else 0):  # warm-up (kernel compilation, allocator)
        forward_backward()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        forward_backward()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return result, float(np.median(times)) if times else float("nan")


def topology_cache_error(scene: dict) -> float:
    """Largest difference between `Rasterizer.antialias` (its cached topology hash, reused and
    then rebuilt after an in-place change of the faces) and nvdiffrast's antialias building the
    hash itself, output and position gradient: 0 when the cache is right."""
    import nvdiffrast.torch as dr  # noqa: PLC0415

    r = Rasterizer(backend="nvdiffrast", device="cuda")
    tri = scene["tri"].clone()
    res = scene["res"]
    worst = 0.0
    for change in (False, False, True):  # build, reuse, then rebuild after the faces change in place
        if change:  # the same triangles in reverse order: a stale hash would name the wrong ones
            tri.copy_(tri.flip(0))
        outs = []
        for ours in (True, False):
            pos = scene["clip"].clone().requires_grad_(True)
            rast, _ = r.rasterize(pos, tri, (res, res), grad_db=False)
            colour = (rast[..., :3] * (rast[..., 3:] > 0)).contiguous()
            out = r.antialias(colour, rast, pos, tri) if ours else dr.antialias(colour, rast, pos, tri)
            (out * scene["weights"]).sum().backward()
            outs.append((out.detach(), pos.grad))
        worst = max(worst, float((outs[0][0] - outs[1][0]).abs().max()), float((outs[0][1] - outs[1][1]).abs().max()))
    return worst


def compare(ours, theirs, ours_untextured_grad, theirs_untextured_grad) -> dict:
    """Parity figures of one backend's run_backend results against nvdiffrast's."""
    rast_o, col_o, uv_o, tex_o, out_o, gpos_o, gattr_o = ours
    rast_n, col_n, uv_n, tex_n, out_n, gpos_n, gattr_n = theirs
    id_o, id_n = rast_o[..., 3], rast_n[..., 3]
    either = (id_o > 0) | (id_n > 0)
    agree = (id_o == id_n) & either
    return {
        "covered_pixels": int(either.sum()),
        "id_agreement": float(agree.sum() / either.sum()),
        "attr_max_abs_diff": float((col_o - col_n).detach()[agree].abs().max()),
        "uv_max_abs_diff": float((uv_o - uv_n)[agree].abs().max()),
        "texture_max_abs_diff": float((tex_o - tex_n)[agree].abs().max()),
        "texture_p99_abs_diff": float((tex_o - tex_n)[agree].abs().flatten().quantile(0.99)),
        "antialias_mean_abs_diff": float((out_o - out_n).abs().mean()),
        "pos_grad_cosine": cosine(gpos_o, gpos_n),
        "pos_grad_cosine_untextured": cosine(ours_untextured_grad, theirs_untextured_grad),
        "attr_grad_cosine": cosine(gattr_o, gattr_n),
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: this benchmark compares against nvdiffrast on the GPU"}))
        return 1

    backends = ["nvdiffrast", "torch"] + (["triton"] if triton_available("cuda") else [])
    scenes = []
    for name, weld, resolutions in (("spot", False, (256, 512)), ("bob", False, (256, 512)), ("spot", True, (256,))):
        vertices, faces, uv_per_vertex, image = load_mesh(args.data, name, weld)
        normals_colour = (vertices - vertices.min(0)) / (vertices.max(0) - vertices.min(0))
        for res in resolutions:
            cams = cameras_around(args.views, res, seed=res)
            mats = torch.tensor(cams.clip_matrices((res, res), 0.5, 5.0), dtype=torch.float32, device="cuda")
            scene = {
                "res": res,
                "clip": to_clip(torch.tensor(vertices, device="cuda"), mats).contiguous(),
                "tri": torch.tensor(faces, device="cuda"),
                "attr": torch.tensor(normals_colour, dtype=torch.float32, device="cuda"),
                "uv": torch.tensor(uv_per_vertex, device="cuda"),
                "tex": torch.tensor(image, device="cuda")[None].contiguous(),
                "weights": torch.rand(args.views, res, res, 3, device="cuda",
                                      generator=torch.Generator("cuda").manual_seed(0)),
            }
            runs = {b: run_backend(b, scene, args.repeats) for b in backends}
            # The same without texture: separates rasterize+antialias gradients from texture ones.
            untextured = {b: run_backend(b, scene, 0, textured=False)[0][5] for b in backends}
            entry = {"mesh": name + (" (welded)" if weld else ""), "resolution": res, "views": args.views,
                     "triangles": int(len(faces))}
            for backend in backends[1:]:
                prefix = "" if backend == "torch" else backend + "_"
                entry.update({prefix + k: v for k, v in compare(runs[backend][0], runs["nvdiffrast"][0],
                                                                untextured[backend], untextured["nvdiffrast"]).items()})
                entry[f"ms_{backend}"] = runs[backend][1]
                entry[f"speed_ratio_{backend}_over_nvdiffrast"] = runs[backend][1] / runs["nvdiffrast"][1]
            entry["ms_nvdiffrast"] = runs["nvdiffrast"][1]
            if "triton" in runs:  # the triton kernels against their reference, the torch backend
                versus = compare(runs["triton"][0], runs["torch"][0], untextured["triton"], untextured["torch"])
                entry.update({f"triton_vs_torch_{k}": versus[k] for k in ("id_agreement", "attr_max_abs_diff",
                                                                          "texture_max_abs_diff", "pos_grad_cosine",
                                                                          "attr_grad_cosine")})
            entry["antialias_topology_cache_max_diff"] = topology_cache_error(scene)
            scenes.append(entry)
    report = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "commit": _git_commit(), "date": time.strftime("%Y-%m-%d"),
        "scenes": scenes,
        "summary": {
            f"{prefix}{key}": fold(s[prefix + field] for s in scenes)
            for prefix in ["", "triton_"][:len(backends) - 1]
            for key, field, fold in (("min_id_agreement", "id_agreement", min),
                                     ("max_attr_abs_diff", "attr_max_abs_diff", max),
                                     ("min_pos_grad_cosine", "pos_grad_cosine", min),
                                     ("min_attr_grad_cosine", "attr_grad_cosine", min))
        },
    }
    report["summary"]["max_antialias_topology_cache_diff"] = max(s["antialias_topology_cache_max_diff"] for s in scenes)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def _git_commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # the device machine gets a copy of the tree without .git
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
