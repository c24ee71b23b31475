"""The whole pipeline as one generator of typed events: ingest -> cameras -> hull -> refine -> export."""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch

from . import cosegment, export, sfm
from . import masks as masks_mod
from .cameras import Cameras
from .capture import Capture
from .config import CamerasConfig, ReconstructionConfig
from .errors import PipelineError
from .evaluate import compare_views, error_breakdown, inside_out_pct, render_views, score_views, surface_quality
from .events import Event, Metrics, Preview, Progress, Result, StageFinished, StageStarted, Warning
from .hull import carve_visual_hull, hull_mesh
from .memory import free_memory
from .mesh import render_resolution, warm_up
from .importers import save_cameras_json
from .normalize import cameras_in_world, estimate_up, normalize_scene, transform_cameras
from .refine import Cancelled, check_cancel, refine
from .render import Rasterizer
from .sfm import ProgressFn
from .turntable import turntable_from_files

MIN_VIEWS = 3
MIN_RETRY_RESOLUTION = 128  # the refinement's retry after running out of GPU memory renders at least this
OUT_OF_GPU_MEMORY = ("Out of GPU memory, even at half the render resolution. Lower refine.render_resolution, "
                     "refine.mesh_faces, refine.texture_size or ingest.max_image_side (or choose the fast preset) "
                     "and run again.")


def preload(gpu: bool = True) -> None:
    """Import now what a first job would otherwise import on its clock: constructing a torch
    optimizer imports ``torch._dynamo`` (about 3 s, once per process); the remesher's package,
    gpytoolbox, imports scikit-image (1-2 s); pycolmap takes SIGTERM over when imported (see
    `sfm.preload`); with ``gpu`` and a GPU, the renderer's kernels are loaded (the triton backend's
    compiled: 19 s on an H200 with an empty cache, `mesh.warm_up`). The app calls this at start,
    from its main thread, with ``gpu=False`` where CUDA must not be touched outside a job (ZeroGPU)."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    with contextlib.suppress(ImportError):  # missing, `refine.surface.remesh` says what to install
        import gpytoolbox.remesh_botsch  # noqa: F401, PLC0415
    sfm.preload()
    if gpu and torch.cuda.is_available():
        warm_up(Rasterizer(backend="auto", device="cuda"))


def holdout_mask(count: int, every: int) -> np.ndarray:  # [count] bool, True = held out
    """Every ``every``-th view is held out (none when 0)."""
    return np.arange(count) % every == every - 1 if every > 0 else np.zeros(count, dtype=bool)


def split_holdout(capture: Capture, every: int) -> tuple[Capture, Optional[Capture]]:
    """(fitting views, held-out views): every ``every``-th view is held out (none when 0)."""
    if every <= 0:
        return capture, None
    held = holdout_mask(len(capture), every)
    return capture.subset(~held), capture.subset(held)


def validate_capture(capture: Capture, camera_source: str = "file") -> None:
    """Refuse what the pipeline cannot use, saying what to do instead.

    With ``camera_source`` "file" the capture must bring its cameras and masks; otherwise the missing
    ones are estimated (`estimate_missing`) and only the photo count and given masks are checked.
    """
    if len(capture) < MIN_VIEWS:
        raise PipelineError(
            f"only {len(capture)} photo(s) given; at least {MIN_VIEWS} views of the object are needed "
            "(20-60 from all around works best)"
        )
    if capture.cameras is None and camera_source == "file":
        raise PipelineError(
            "no camera poses: add a camera file (transforms.json, poses_bounds.npy, a COLMAP model or "
            "cameras.json) next to the photos, or set cameras.source to 'auto' to estimate them"
        )
    if capture.masks is None:
        if camera_source == "file":
            raise PipelineError("no object masks: give PNG photos with an alpha channel or a masks/ folder, "
                                "or set cameras.source to 'auto' to estimate them")
        return
    empty = [capture.names[i] for i in range(len(capture)) if float(capture.masks[i].max()) <= 0.5]
    if empty:
        raise PipelineError(
            f"empty mask (no object pixels) in {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}: "
            "fix or remove these photos"
        )


def _run_in_thread(work: Callable[[ProgressFn], object], stage: str, cancel: Optional[Callable[[], bool]]):
    """Run ``work(progress)`` in a thread, yielding its progress as `Progress` events; returns its result.

    pycolmap blocks for tens of seconds: the thread lets the event stream (and the UI) keep moving.
    """
    reports: "queue.Queue[tuple[float, str]]" = queue.Queue()
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = work(lambda fraction, message: reports.put((fraction, message)))
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive() or not reports.empty():
        try:
            fraction, message = reports.get(timeout=0.2)
        except queue.Empty:
            continue
        yield Progress(stage, fraction, message)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    check_cancel(cancel)
    return outcome["value"]


def _cameras_plan(capture: Capture, source: str) -> str:
    """What the cameras stage is about to do, for its start event."""
    masks = "estimating masks, then " if capture.masks is None else ""
    if source == "turntable":
        return f"{masks}turntable cameras"
    if capture.cameras is None or source == "estimate":
        return f"{masks}structure from motion on {len(capture)} photos"
    return f"{masks}cameras from the camera file"


def estimate_missing(capture: Capture, config: CamerasConfig,
                     cancel: Optional[Callable[[], bool]] = None) -> Iterator[Event]:
    """Cameras and/or masks for a capture that lacks them, as events; returns the completed capture.

    Cameras first, by structure from motion ("auto", "estimate": on the photos at their own
    resolution, features restricted only by the user's own masks) or the turntable prior
    ("turntable", which needs silhouettes, so its masks come first). Then masks, when missing: the
    learned segmenter when installed, else from the geometry (`pipeline.cosegment`: sparse points,
    SfM's or triangulated with the given poses, seed graph cuts refined with the visual hull), else
    the classical border-colour masker ("classical", or when the geometry finds too little). Photos
    whose mask looks wrong are left out when ``config.exclude_bad_masks``, unless that would leave
    too few. Photos SfM cannot place are dropped with a warning naming them. Events are reported under
    the "cameras" stage; its Metrics carry ``registered`` and ``photos`` for estimated cameras.
    """
    stage = "cameras"
    images, masks, cameras = capture.images, capture.masks, capture.cameras
    names = list(capture.names)
    index = np.arange(len(capture))  # [N'] the input views still in use
    points = None
    if config.source == "turntable":
        if masks is None:
            masks, index = yield from _estimate_masks(capture, None, None, config, cancel)
            images, names = images[index], [names[i] for i in index]
        paths = [Path(capture.source) / n for n in names] if capture.source else []
        paths = [p for p in paths if p.is_file()]
        cameras = turntable_from_files(masks, paths, elevation_deg=config.turntable_elevation_deg,
                                       fov_deg=config.fov_deg)
        yield Progress(stage, 0.9, f"turntable cameras: {len(names)} views every {360 / len(names):.1f} deg")
        return Capture(images=images, masks=masks, cameras=cameras, names=names, source=capture.source,
                       warnings=list(capture.warnings))
    if cameras is None or config.source == "estimate":
        originals = capture.originals
        result = yield from _run_in_thread(lambda progress: sfm.estimate_cameras(
            images, masks, names, progress=progress, originals=originals), stage, cancel)
        for message in result.warnings:
            yield Warning(message)
        yield Preview(stage, result.preview(0), f"sparse cloud: {len(result.points)} points seen from {names[result.registered[0]]}")
        yield Metrics(stage, {"registered": float(len(result.registered)), "photos": float(result.total),
                              "reprojection_error_px": result.mean_reprojection_error})
        images, masks, cameras = result.images, result.masks, result.cameras
        index = index[result.registered]
        points = cosegment.Points(result.points, result.visible)
    placed = Capture(images=images, masks=masks, cameras=cameras, names=[capture.names[i] for i in index],
                     source=capture.source, warnings=list(capture.warnings),
                     originals=None if capture.originals is None else [capture.originals[i] for i in index])
    if placed.masks is not None:
        return placed
    masks, keep = yield from _estimate_masks(placed, placed.cameras, points, config, cancel)
    return dataclasses.replace(placed.subset(keep), masks=masks)


def _estimate_masks(capture: Capture, cameras: Optional[Cameras], points: Optional["cosegment.Points"],
                    config: CamerasConfig, cancel) -> Iterator[Event]:
    """(masks [K, H, W], kept view indices [K]) for a capture without masks, as events (`estimate_missing`)."""
    stage = "cameras"
    names = capture.names
    method = config.masks
    if method == "auto" and (cameras is None or masks_mod.segmenter_available()):
        method = "segmenter" if masks_mod.segmenter_available() else "classical"
    flagged = None
    if method == "auto":
        yield Progress(stage, 0.7, f"finding the object in {len(capture)} photos from where the cameras look")
        try:
            if points is None:
                points = yield from _run_in_thread(lambda progress: cosegment.triangulate_with_poses(
                    capture.images, cameras, capture.originals), stage, cancel)
            found = yield from _run_in_thread(lambda progress: cosegment.geometric_masks(
                capture.images, cameras, points), stage, cancel)
        except PipelineError as error:
            yield Warning(f"masks from the cameras' geometry failed ({error}); used the classical masker, which "
                          "needs a plain background")
            method = "classical"
        else:
            masks, flagged = found.masks, found.flagged
            yield Metrics(stage, {"mask_hull_iou_mean": float(found.hull_iou.mean()), "masks_flagged": float(flagged.sum()),
                                  "mask_object_points": float(found.object_points)})
            reasons = [f"{names[i]} (IoU {found.hull_iou[i]:.2f} with the hull)" for i in np.flatnonzero(flagged)]
    if method != "auto":
        yield Progress(stage, 0.7, f"estimating object masks for {len(capture)} photos ({method})")
        est = masks_mod.estimate_masks(capture.images, names, method=method)
        check_cancel(cancel)
        yield Metrics(stage, {"mask_quality_mean": float(est.scores.mean()), "masks_flagged": float(est.flagged.sum())})
        masks, flagged = est.masks, est.flagged
        reasons = [w.split(" looks wrong")[0].removeprefix("mask of ") for w in est.warnings]
    keep = np.arange(len(capture))
    if flagged.any():
        listed = ", ".join(reasons)
        usable = int((~flagged).sum())
        if not config.exclude_bad_masks:
            yield Warning(f"{int(flagged.sum())} estimated mask(s) look wrong and were kept: {listed}")
        elif usable >= max(MIN_VIEWS, len(capture) // 2):
            keep = np.flatnonzero(~flagged)
            yield Warning(f"left out {int(flagged.sum())} photo(s) whose estimated mask looks wrong: {listed} "
                          "(turn 'Exclude bad masks' off to keep them)")
        else:
            yield Warning(f"{int(flagged.sum())} of {len(capture)} estimated masks look wrong ({listed}); kept them all, "
                          "since leaving them out would leave too few photos. For better masks give a mask per photo "
                          "(masks/ folder or PNG alpha), install the learned segmenter, or photograph the object "
                          "against a plain background.")
    return masks[keep], keep


def reconstruct(
    capture: Capture,
    config: ReconstructionConfig,
    out_dir: Union[str, Path],
    cancel: Optional[Callable[[], bool]] = None,
    device: Union[str, torch.device, None] = None,
    name: str = "model",
) -> Iterator[Event]:
    """Reconstruct a textured mesh from a posed, masked capture, streaming events.

    Writes ``{name}.glb``, ``{name}_obj.zip`` and ``{name}_cameras.json`` into ``out_dir`` and ends with a
    `Result`. ``cancel()`` is polled every iteration; when it returns True the generator stops
    (yielding a Warning) and releases GPU memory. Raises PipelineError for unusable input.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rasterizer = Rasterizer(backend="auto", device=device)
    timings: dict[str, float] = {}
    camera_metrics: dict[str, float] = {}  # the cameras stage's, in the result as cameras_<key>
    try:
        # ---------------------------------------------------------------- ingest
        start = _now()
        yield StageStarted("ingest", f"{len(capture)} photos, {capture.resolution[1]}x{capture.resolution[0]} px")
        for message in capture.warnings:
            yield Warning(message)
        validate_capture(capture, config.cameras.source)
        timings["ingest"] = _now() - start
        yield StageFinished("ingest", timings["ingest"])

        # --------------------------------------------------------------- cameras
        start = _now()
        estimate = capture.cameras is None or capture.masks is None or config.cameras.source in ("estimate", "turntable")
        estimated = capture.cameras is None or config.cameras.source in ("estimate", "turntable")  # the poses
        yield StageStarted("cameras", _cameras_plan(capture, config.cameras.source) if estimate else "from the camera file")
        if estimate:
            capture = yield from _noting_metrics(estimate_missing(capture, config.cameras, cancel), camera_metrics)
            validate_capture(capture)
        fit, held = split_holdout(capture, config.ingest.holdout_every)
        if len(fit) < MIN_VIEWS:
            raise PipelineError(f"holding out every {config.ingest.holdout_every}th view leaves too few to fit: "
                                "lower ingest.holdout_every (0 holds none out)")
        timings["cameras"] = _now() - start
        yield StageFinished("cameras", timings["cameras"])

        # ------------------------------------------------------------------ hull
        start = _now()
        yield StageStarted("hull", f"visual hull at {config.hull.grid_resolution}^3")
        cameras, world_from_normalised = normalize_scene(fit.cameras, fit.masks, device=device)
        up = estimate_up(cameras)
        check_cancel(cancel)
        field = carve_visual_hull(cameras, fit.masks, resolution=config.hull.grid_resolution,
                                  bad_view_tolerance=config.hull.bad_view_tolerance,
                                  mask_dilation_px=config.hull.mask_dilation_px, device=device)
        vertices, faces = hull_mesh(field)
        yield Progress("hull", 1.0, f"{len(faces)} triangles carved (the refinement remeshes or simplifies them)")
        check_cancel(cancel)
        timings["hull"] = _now() - start
        yield Metrics("hull", {"faces": float(len(faces)), "vertices": float(len(vertices))})
        yield StageFinished("hull", timings["hull"])

        # ---------------------------------------------------------------- refine
        start = _now()
        yield StageStarted("refine", f"{config.refine.iterations} iterations at {config.refine.render_resolution} px")
        mesh, corrected = yield from _refine_within_memory(vertices, faces, field, cameras, fit, up, config.refine,
                                                           rasterizer, out_dir / ".work", cancel, estimated)
        timings["refine"] = _now() - start
        yield StageFinished("refine", timings["refine"])

        # ---------------------------------------------------------------- export
        start = _now()
        yield StageStarted("export", f"GLB with {config.export.target_faces} triangles at most")
        files = export.export_textured_mesh(mesh, out_dir, world_from_normalised, up, config.export.target_faces,
                                            unlit=config.export.unlit, name=name, rasterizer=rasterizer)
        if corrected is not None:  # pose refinement: the fitted views' cameras as corrected
            world_to_camera = capture.cameras.world_to_camera.copy()
            fitted = ~holdout_mask(len(capture), config.ingest.holdout_every)
            world_to_camera[fitted] = cameras_in_world(corrected, world_from_normalised).world_to_camera
            capture = dataclasses.replace(
                capture, cameras=Cameras(capture.cameras.intrinsics, world_to_camera, capture.cameras.sizes))
            cameras = corrected
        cameras_path = save_cameras_json(capture, None, out_dir / f"{name}_cameras.json")
        yield Progress("export", 0.7, "measuring the result against the photos")
        means, per_view = compare_views(mesh, cameras, fit.images, fit.masks, fit.names, rasterizer)
        metrics = {f"cameras_{k}": v for k, v in camera_metrics.items()}
        metrics.update({f"train_{k}": v for k, v in means.items()})
        surface = surface_quality(files["vertices"], files["faces"])  # the exported geometry, welded
        metrics.update(fold_over_pct=surface["fold_over_pct"], crease_pct=surface["crease_pct"],
                       inside_out_pct=inside_out_pct(files["vertices"], files["faces"], cameras, fit.images.shape[1:3],
                                                     rasterizer))
        heldout = None
        if held is not None and len(held):
            held_cams = transform_cameras(held.cameras, world_from_normalised)
            rendered, alpha = render_views(mesh, held_cams, held.images.shape[1:3], rasterizer)
            heldout, held_views = score_views(rendered, alpha, held.images, held.masks, held.names)
            metrics.update({f"heldout_{k}": v for k, v in heldout.items()})
            # Where the held-out error lies: missing/extra geometry, the outline, or the inside.
            split = error_breakdown(rendered, alpha, held.images, held.masks)
            metrics.update({f"heldout_{region}_error_share": split[f"{region}_error_share"]
                            for region in ("silhouette", "edge", "interior")})
            per_view.update(held_views)
        timings["export"] = _now() - start
        yield Progress("export", 1.0, f"{len(files['faces'])} triangles written; fit to the photos: PSNR "
                                      f"{means['psnr']:.2f} dB, mask IoU {means['mask_iou']:.3f}")
        yield Metrics("export", metrics)
        yield StageFinished("export", timings["export"])
        timings["total"] = sum(timings.values())
        yield Result(glb_path=str(files["glb"]), zip_path=str(files["zip"]), cameras_path=str(cameras_path),
                     shaded_glb_path=str(files["shaded_glb"]),
                     metrics=metrics, per_view=per_view, timings=timings, heldout=heldout)
    except Cancelled:
        yield Warning("cancelled: the reconstruction was stopped before it finished")
    finally:
        shutil.rmtree(out_dir / ".work", ignore_errors=True)
        # Free the GPU for the next job whatever happened (finished, failed, cancelled, closed).
        del rasterizer
        free_memory()


def _noting_metrics(events: Iterator[Event], into: dict) -> Iterator[Event]:
    """Pass ``events`` on, copying the values of their Metrics into ``into``; returns their return value."""
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            return stop.value
        if isinstance(event, Metrics):
            into.update(event.values)
        yield event


def _refine_within_memory(vertices, faces, field, cameras, fit, up, settings, rasterizer, work_dir, cancel,
                          estimated_cameras):
    """`refine`, retried once at half the render resolution when the GPU runs out of memory; a
    second failure is a PipelineError that says which settings to lower."""
    first = max(render_resolution(fit.images.shape[1:3], settings.render_resolution))  # the longer side rendered
    lower = max(MIN_RETRY_RESOLUTION, first // 2 // 32 * 32)
    for resolution in [first, lower] if lower < first else [first]:
        if resolution != first:
            yield Warning(f"Out of GPU memory refining at {first} px; retrying at {resolution} px (lower "
                          "refine.render_resolution, refine.mesh_faces or refine.texture_size to avoid this).")
        try:
            return (yield from refine(vertices, faces, cameras, fit.images, fit.masks, up,
                                      dataclasses.replace(settings, render_resolution=resolution), rasterizer,
                                      work_dir, cancel, estimated_cameras, hull_field=field))
        except torch.cuda.OutOfMemoryError:
            pass  # freed below, outside the handler: the traceback holds the failed step's tensors
        free_memory()
    raise PipelineError(OUT_OF_GPU_MEMORY)


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.monotonic()
