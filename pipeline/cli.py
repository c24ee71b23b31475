"""What `python -m pipeline reconstruct` and `eval` do: thin consumers of the pipeline's events."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import events
from .config import apply_overrides, describe, parse_overrides, preset
from .errors import PipelineError
from .importers import detect_format, load_capture


def _source(inputs: list[str]):
    return inputs[0] if len(inputs) == 1 and Path(inputs[0]).is_dir() else inputs


def print_settings(config) -> None:
    width = max(len(spec.key) for spec in describe(config))
    for spec in describe(config):
        lo, hi = spec.range
        span = f"[{lo}, {hi}]" if lo is not None else "on/off" if spec.type is bool else ""
        print(f"{spec.key:<{width}}  {spec.default!s:<10} {span:<18} {spec.help}")


def run_reconstruct(args: argparse.Namespace) -> int:
    from .reconstruct import reconstruct  # noqa: PLC0415 (imports torch; keep `--help` fast)

    config = apply_overrides(preset(args.preset), parse_overrides(args.overrides))
    if args.list_settings:
        print_settings(config)
        return 0
    if not args.input or not args.output:
        raise PipelineError("give the capture and an output: python -m pipeline reconstruct INPUT -o OUT.glb")
    output = Path(args.output)
    if output.suffix.lower() != ".glb":
        raise PipelineError(f"the output must be a .glb path, got {output}")
    capture = load_capture(_source(args.input), max_side=config.ingest.max_image_side, split=args.split)
    bar = None
    result = None
    start = time.monotonic()
    for event in reconstruct(capture, config, output.parent, device=args.device, name=output.stem):
        if isinstance(event, events.StageStarted):
            bar = tqdm(total=100, desc=f"{event.stage:<7}", unit="%", leave=True, file=sys.stderr,
                       bar_format="{desc} {bar} {n:3.0f}% [{elapsed}]{postfix}")
            bar.set_postfix_str(event.message)
        elif isinstance(event, events.Progress) and bar is not None:
            bar.n = 100 * event.fraction
            bar.set_postfix_str(event.message)
        elif isinstance(event, events.StageFinished) and bar is not None:
            bar.n = 100
            bar.close()
        elif isinstance(event, events.Warning):
            tqdm.write(f"warning: {event.message}", file=sys.stderr)
        elif isinstance(event, events.Result):
            result = event
    if result is None:  # cancelled
        return 1
    rows = [("GLB", result.glb_path), ("OBJ zip", result.zip_path), ("shaded GLB", result.shaded_glb_path),
            ("cameras", result.cameras_path)]
    rows += [(f"time {stage}", f"{seconds:.1f} s") for stage, seconds in result.timings.items()]
    rows += [(key, f"{value:.4f}") for key, value in result.metrics.items()]
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key:<{width}}  {value}" for key, value in rows))
    print(f"done in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from .evaluate import (error_breakdown, geometry_scores, inside_out_pct, render_views, score_views,  # noqa: PLC0415
                           surface_quality)
    from .export import load_glb_in_world  # noqa: PLC0415
    from .render import Rasterizer  # noqa: PLC0415

    world = load_glb_in_world(args.glb)
    source = _source(args.input)
    split = args.split or ("test" if detect_format(source, "test") != "images" else "train")
    capture = load_capture(source, split=split)
    if capture.cameras is None or capture.masks is None:
        raise PipelineError(f"{args.input[0]} has no cameras or masks to compare against")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rasterizer = Rasterizer(device=device)
    rendered, alpha = render_views(world, capture.cameras, capture.images.shape[1:3], rasterizer, background=1.0)
    means, per_view = score_views(rendered, alpha, capture.images, capture.masks, capture.names, ssim=True)
    report = {"views": len(capture), **{f"heldout_{k}": v for k, v in means.items()}}
    report.update(error_breakdown(rendered, alpha, capture.images, capture.masks))
    surface = surface_quality(world.vertices, world.faces)
    report.update({key: surface[key] for key in ("fold_over_pct", "crease_pct")})
    report["inside_out_pct"] = inside_out_pct(world.vertices, world.faces, capture.cameras, capture.images.shape[1:3],
                                              rasterizer)
    if args.gt:
        import trimesh  # noqa: PLC0415

        try:
            gt = trimesh.load(args.gt, force="mesh", process=False)
        except Exception as exc:  # trimesh raises many types for unreadable files
            raise PipelineError(f"cannot read the ground-truth mesh {args.gt}: {exc}") from None
        report.update(geometry_scores(world.vertices, world.faces, np.asarray(gt.vertices), np.asarray(gt.faces)))
    if args.images:
        write_view_images(Path(args.images), world, capture, rendered, rasterizer)
    if args.json:
        print(json.dumps({"summary": report, "per_view": per_view}, indent=2))
    else:
        width = max(len(k) for k in report)
        print("\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                        for k, v in report.items()))
    if args.images:
        print(f"pictures (photo | textured | shaded) of {len(capture)} views in {args.images}", file=sys.stderr)
    return 0


def write_view_images(folder: Path, mesh, capture, textured: np.ndarray, rasterizer) -> list[Path]:
    """``NNN_NAME.png`` per view: the photo composited on white (as it is scored), the textured render
    (``textured`` [N, H, W, 3], from `render_views`) and the grey lit render, side by side."""
    from PIL import Image  # noqa: PLC0415

    from .evaluate import on_white, render_shaded_views, view_panels  # noqa: PLC0415

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"cannot create the pictures folder {folder}: {exc}") from None
    shaded = render_shaded_views(mesh.vertices, mesh.faces, capture.cameras, capture.images.shape[1:3], rasterizer)
    panels = view_panels(on_white(capture.images, capture.masks), textured, shaded)
    paths = [folder / f"{index:03d}_{Path(name).stem}.png" for index, name in enumerate(capture.names)]
    for path, panel in zip(paths, panels):  # one file per view
        Image.fromarray(panel).save(path)
    return paths
