"""End-to-end GPU benchmark: speed and quality of the whole pipeline. Prints one JSON document and
writes it under bench/results/ (named with the date, GPU and commit).

- lego (NeRF-synthetic, CC BY-NC: non-commercial) at 400 px: 90 training views, every 10th of the
  100 held out; time per stage, end to end (load to GLB written), refinement ms/iteration,
  held-out PSNR / SSIM / mask IoU and where the error lies (`evaluate.error_breakdown`), peak GPU memory;
- spot and bob rendered into 48 views at 512 px with nvdiffrast and reconstructed: Chamfer-L1 and
  F-score at 1% of the bounding-box diagonal and normal consistency against the true meshes;
- for all three, the exported GLB's fold-overs and creases (`surface_quality`: % of adjacent face
  pairs whose normals are > 90 / > 60 degrees apart, welded);
- the raw cost of one nvdiffrast rasterize + interpolate + texture + antialias forward+backward at
  the refinement's batch, resolution and triangle count, so refine_ms_per_iter can be quoted as a
  ratio to it;
- lego again with each rendering backend (``lego.backends.{nvdiffrast,triton,torch}``: end to end,
  loop ms per step, held-out PSNR, all evaluated with the same renderer), each after an untimed
  short run that compiles the triton kernels (as nvdiffrast's build is not timed either).

    python bench/gpu_e2e.py --data ../shared/data [--preset balanced] [--set KEY=VALUE ...] [--only lego]
        [--backends nvdiffrast,triton,torch | --backends none]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import events  # noqa: E402
from pipeline.config import apply_overrides, preset  # noqa: E402
from pipeline.evaluate import error_breakdown, geometry_scores, render_views, score_views, surface_quality  # noqa: E402
from pipeline.export import load_glb_in_world  # noqa: E402
from pipeline.importers import load_capture  # noqa: E402
from pipeline.mesh import render_textured  # noqa: E402
from pipeline.reconstruct import preload, reconstruct, split_holdout  # noqa: E402
from pipeline.render import Rasterizer, nvdiffrast_available, triton_available  # noqa: E402
from pipeline.render.rasterizer import BACKEND_ENV  # noqa: E402
from pipeline.synthetic import load_textured_mesh, orbit_cameras, render_capture  # noqa: E402


def run_pipeline(capture, config, out_dir: Path) -> tuple[events.Result, dict]:
    refine_steps = {}
    result = None
    for event in reconstruct(capture, config, out_dir, device="cuda"):
        if isinstance(event, events.Result):
            result = event
        elif isinstance(event, events.Metrics) and event.stage == "hull":
            refine_steps["faces"] = event.values["faces"]
        elif isinstance(event, events.Metrics) and "geometry_ms_per_step" in event.values:
            refine_steps.update(event.values)
    return result, refine_steps


def raw_render_cost(faces: int, views: int, resolution: int, texture_size: int, repeats: int = 20,
                    backend: str = "nvdiffrast") -> float:
    """ms per rasterize+interpolate+texture+antialias forward+backward of a sphere with ``faces``
    triangles into ``views`` views (nvdiffrast: the floor the refinement loop is compared with)."""
    from bench.render_cpu import uv_sphere  # noqa: PLC0415

    vertices, tri = uv_sphere(faces)
    vertices, tri = vertices.cuda(), tri.cuda()
    uvs = (vertices[:, :2] * 0.5 + 0.5).contiguous()
    cams = orbit_cameras(views, resolution, np.zeros(3), 3.0)
    mats = torch.tensor(cams.clip_matrices((resolution, resolution), 0.5, 6.0), dtype=torch.float32, device="cuda")
    texture = torch.rand(1, texture_size, texture_size, 3, device="cuda", requires_grad=True)
    r = Rasterizer(backend=backend, device="cuda")

    def step():
        verts = vertices.clone().requires_grad_(True)
        rgb, alpha = render_textured(r, verts, tri, uvs, tri, texture, mats, (resolution, resolution))
        (rgb.sum() + alpha.sum()).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats


def warm_up() -> None:
    """CUDA, nvdiffrast's kernels and the imports a first job pays once per process (`preload`, as the
    app does at start), so that the first job benchmarked does not pay for them."""
    raw_render_cost(2000, 2, 64, 64, repeats=1)
    preload()


def bench_lego(data: Path, config, out: Path, raw_backend: str = "nvdiffrast", measure_raw: bool = True) -> dict:
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    capture = load_capture(data / "lego", max_side=config.ingest.max_image_side)
    fit, held = split_holdout(capture, 10)
    result, info = run_pipeline(fit, config, out / "lego")
    e2e = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    r = Rasterizer(backend="nvdiffrast" if nvdiffrast_available() else "auto", device="cuda")  # one judge
    mesh = load_glb_in_world(result.glb_path)
    rendered, alpha = render_views(mesh, held.cameras, held.images.shape[1:3], r)
    means, _ = score_views(rendered, alpha, held.images, held.masks, held.names, ssim=True)
    surface = surface_quality(mesh.vertices, mesh.faces)
    refine = config.refine
    refine_ms = 1000 * result.timings["refine"] / max(refine.iterations, 1)
    height = min(refine.render_resolution, capture.resolution[0])
    raw_ms = raw_render_cost(int(info["faces"]), refine.views_per_step, height, refine.texture_size,
                             backend=raw_backend) if measure_raw else float("nan")
    # The loops alone (the stage's time less its one-off setup: photo projection, atlas wait, bake).
    loop_ms = info["loop_ms_per_step"]
    return {
        "views_train": len(fit), "views_heldout": len(held), "resolution": list(capture.resolution),
        "e2e_seconds": e2e, "stage_seconds": result.timings,
        "heldout_psnr": means["psnr"], "heldout_ssim": means["ssim"], "mask_iou": means["mask_iou"],
        "heldout_error": error_breakdown(rendered, alpha, held.images, held.masks),
        "train_psnr": result.metrics.get("train_psnr"),
        "refine_iterations": refine.iterations, "refine_iters_per_second": refine.iterations / result.timings["refine"],
        "refine_ms_per_iter": refine_ms, "raw_ms_per_iter": raw_ms, "refine_over_raw": refine_ms / raw_ms,
        "loop_ms_per_iter": loop_ms, "loop_over_raw": loop_ms / raw_ms,
        "geometry_ms_per_step": info["geometry_ms_per_step"], "texture_ms_per_step": info["texture_ms_per_step"],
        "setup_seconds": info["setup_seconds"], "atlas_wait_seconds": info["atlas_wait_seconds"],
        "texture_setup_seconds": info["texture_setup_seconds"], "remesh_seconds": info["remesh_seconds"],
        "refine_faces": info["faces"], "peak_gpu_mem_gb": peak,
        "fold_over_pct": surface["fold_over_pct"], "crease_pct": surface["crease_pct"],
        "inside_out_pct": result.metrics["inside_out_pct"],
    }


def bench_backends(data: Path, config, out: Path, backends: list, results: dict, save) -> None:
    """lego end to end with each rendering backend forced (PHOTO3D_RENDER_BACKEND), in this run, into
    ``results`` (``save()`` after each)."""
    for backend in backends:
        os.environ[BACKEND_ENV] = backend
        try:
            if backend == "triton":  # compile its kernels (cached on disk after a first run) untimed
                short = apply_overrides(copy.deepcopy(config), {"refine.iterations": 20})
                capture = load_capture(data / "lego", max_side=config.ingest.max_image_side)
                run_pipeline(split_holdout(capture, 10)[0], short, out / "lego_warmup")
            lego = bench_lego(data, config, out / f"lego_{backend}", raw_backend=backend)
        finally:
            del os.environ[BACKEND_ENV]
        keys = ("e2e_seconds", "loop_ms_per_iter", "heldout_psnr", "heldout_ssim", "mask_iou", "stage_seconds",
                "geometry_ms_per_step", "texture_ms_per_step", "raw_ms_per_iter")
        results[backend] = {key: lego[key] for key in keys}
        save()


def bench_mesh(data: Path, name: str, obj: str, config, out: Path) -> dict:
    truth = load_textured_mesh(data / obj)
    center = (truth.vertices.max(0) + truth.vertices.min(0)) / 2
    radius = float(np.linalg.norm(truth.vertices - center, axis=1).max())
    cams = orbit_cameras(48, 512, center, 2.6 * radius)
    capture = render_capture(truth, cams, Rasterizer(backend="nvdiffrast", device="cuda"))
    start = time.perf_counter()
    result, _ = run_pipeline(capture, config, out / name)
    seconds = time.perf_counter() - start
    mesh = load_glb_in_world(result.glb_path)
    scores = geometry_scores(mesh.vertices, mesh.faces, truth.vertices, truth.faces)
    surface = surface_quality(mesh.vertices, mesh.faces)
    return {"views": 48, "resolution": 512, "e2e_seconds": seconds, "train_psnr": result.metrics.get("train_psnr"),
            "chamfer_l1_pct_diag": scores["chamfer_l1_pct_diag"], "fscore_1pct": scores["fscore_1pct"],
            "chamfer_l1": scores["chamfer_l1"], "bbox_diag": scores["bbox_diag"],
            "normal_consistency": scores["normal_consistency"],
            "fold_over_pct": surface["fold_over_pct"], "crease_pct": surface["crease_pct"],
            "inside_out_pct": result.metrics["inside_out_pct"]}


def profile_lego(data: Path, config, out: Path, path: Path) -> None:
    """One more lego run under torch.profiler and cProfile (slower: not timed): the torch ops by
    GPU and CPU time, then the Python functions by cumulative time (where the host's time goes)."""
    import cProfile  # noqa: PLC0415
    import io  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    capture = load_capture(data / "lego", max_side=config.ingest.max_image_side)
    fit, _ = split_holdout(capture, 10)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_pipeline(fit, config, out / "lego_profile")
    tables = [prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
              for key in ("self_cuda_time_total", "self_cpu_time_total")]
    python = cProfile.Profile()
    python.runcall(run_pipeline, fit, config, out / "lego_cprofile")
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("cumulative").print_stats(60)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tables + [text.getvalue()]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only", choices=["lego", "spot", "bob"], action="append")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu_e2e"))
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--tag", default="", help="appended to the result file's name (settings being compared)")
    parser.add_argument("--backends", default="all",
                        help="comma-separated rendering backends to time lego with (all: every available; none)")
    parser.add_argument("--profile", type=Path, metavar="TXT",
                        help="also run lego once under torch.profiler and write its op tables here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    config = apply_overrides(preset(args.preset), dict(kv.split("=", 1) for kv in args.overrides))
    commit = _git_commit()
    report = {"gpu": torch.cuda.get_device_name(), "commit": commit, "date": time.strftime("%Y-%m-%d"),
              "host": host_identity(), "torch": torch.__version__, "preset": args.preset, "overrides": args.overrides}
    only = args.only or ["lego", "spot", "bob"]
    gpu = report["gpu"].replace(" ", "-")
    tag = f"_{args.tag}" if args.tag else ""
    path = args.results / f"gpu_e2e_{report['date']}_{gpu}_{commit}{tag}.json"

    def save() -> str:  # after every scene, so that a run stopped by a time limit keeps what finished
        args.results.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=2)
        path.write_text(text + "\n")
        return text

    warm_up()
    if "lego" in only:
        report["lego"] = bench_lego(args.data, config, args.out)
        save()
        available = [b for b, ok in (("nvdiffrast", nvdiffrast_available()), ("triton", triton_available("cuda")),
                                     ("torch", True)) if ok]
        backends = available if args.backends == "all" else [b for b in args.backends.split(",") if b in available]
        if backends and args.backends != "none":
            bench_backends(args.data, config, args.out, backends, report["lego"].setdefault("backends", {}), save)
    for name, obj in (("spot", "spot/spot.obj"), ("bob", "bob/bob_tri.obj")):
        if name in only:
            report[name] = bench_mesh(args.data, name, obj, config, args.out)
            save()
    if args.profile:
        profile_lego(args.data, config, args.out, args.profile)
    print(save())
    return 0


def host_identity() -> dict:
    """Which machine ran this: the device is lent from a pool whose hosts differ (its loop and its
    CPU-side stages by 20-40%), so figures from two runs compare only with this beside them."""
    cpu = "unknown"
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    host = {"hostname": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        host["gpu_uuid"] = str(getattr(props, "uuid", "unknown"))
    try:
        host["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        host["driver"] = "unknown"
    return host


def _git_commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # the device machine gets a copy of the tree without .git
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
